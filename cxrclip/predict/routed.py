"""A routed model: several models used as one, each label answered by the member trained for it.

On real radiographs one model per label family did better than any single model (docs/RESULTS.md: the tube at
320 px, the pneumonias at the default size), but a deployment wants one model. A routed model is a folder with
``routed.json``::

    {"format": 1, "kind": "cxrclip routed model",
     "members": [{"name": "tube", "path": "tube.tar", "sha256": "…", "labels": ["Endotracheal tube in place", …]},
                 {"name": "air", "path": "members/air", "sha256": "…", "labels": [...]}],
     "default": "tube",                    # free-text similarity, the ranking, the preview and the card
     "labels": [...],                      # the answer's label order
     "card": {...}}                        # how the members were chosen (``cxrclip route``), when known

A member is a checkpoint (its SHA-256 is that of the file) or an inference bundle (the SHA-256 of its
``bundle.json``, which in turn holds the hash of every file). A member whose file changed since the routed model
was written is refused. Each label gets its member's own preprocessing, calibration and operating point: a routed
answer equals the member's own answer, label by label. An image is refused when any member's input gate refuses
it (the strictest gate wins).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrclip.data.images import read_image
from cxrclip.exceptions import InputError, OutputError, UserError
from cxrclip.io import atomic_write_text, file_sha256
from cxrclip.predict.answer import Answer, GateVerdict
from cxrclip.predict.base import label_bank, with_reading_warnings
from cxrclip.predict.bundle import MANIFEST as BUNDLE_MANIFEST
from cxrclip.predict.bundle import Bundle, is_bundle
from cxrclip.predict.card import model_card
from cxrclip.predict.gate import precheck
from cxrclip.scoring.calibration import Calibration

MANIFEST = "routed.json"
FORMAT = 1
KIND = "cxrclip routed model"
UTC = datetime.timezone.utc


class RoutingError(UserError, ValueError):
    """A routed model that is missing, malformed, or whose members changed since it was written."""


def is_routed(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class Member:
    name: str
    path: str  # as given: absolute, or relative to the routed folder
    labels: tuple[str, ...] | None = None  # None: every label of the member not claimed by another

    @classmethod
    def parse(cls, text: str) -> Member:
        """``NAME=PATH[:label,label…]`` (a label list after the last ':' that is not part of a Windows drive)."""
        name, sep, rest = text.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise RoutingError(f"--member {text!r}: expected NAME=CHECKPOINT[:label,label,...]")
        path, labels = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and not Path(rest).exists() and len(head) > 1:
            path, labels = head, tuple(x.strip() for x in tail.split(",") if x.strip())
        return cls(name.strip(), path.strip(), labels or None)


def member_sha256(path: Path) -> str:
    """What identifies a member: a bundle's ``bundle.json``, else the checkpoint file."""
    return file_sha256(path / BUNDLE_MANIFEST) if is_bundle(path) else file_sha256(path)


def member_labels(path: Path) -> list[str]:
    """The labels a member was trained (or exported) with."""
    from cxrclip.model.checkpoint import load_checkpoint, plain_config  # torch: a checkpoint member

    if is_bundle(path):
        return Bundle(path).labels
    return label_bank(None, None, plain_config(load_checkpoint(path).get("config")))[1]


def assign_labels(members: Sequence[Member], available: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Each member's labels: those listed for it; a member without a list takes its labels that no list claims
    (the first such member wins a label two of them have)."""
    claimed: dict[str, str] = {}
    for m in members:
        for label in m.labels or ():
            if label not in available[m.name]:
                raise RoutingError(
                    f"member {m.name}: label {label!r} is not one of its labels {list(available[m.name])}"
                )
            if label in claimed:
                raise RoutingError(f"label {label!r} is given to two members: {claimed[label]} and {m.name}")
            claimed[label] = m.name
    out = {m.name: list(m.labels) if m.labels else [] for m in members}
    for m in members:
        if m.labels:
            continue
        for label in available[m.name]:
            if label not in claimed:
                claimed[label] = m.name
                out[m.name].append(label)
    empty = [name for name, labels in out.items() if not labels]
    if empty:
        raise RoutingError(f"member(s) {empty} answer no label: every label is given to another member")
    return out


def write_routed(
    out: str | Path,
    members: Sequence[Member],
    *,
    default: str | None = None,
    card: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out/routed.json`` for ``members`` (checkpoints or bundles, referenced where they are)."""
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise OutputError(f"{out / MANIFEST} already exists; choose another --out or pass --overwrite")
    if not members:
        raise RoutingError("a routed model needs at least one member (--member NAME=CHECKPOINT[:labels])")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise RoutingError(f"member names must differ: {names}")
    default = default or names[0]
    if default not in names:
        raise RoutingError(f"--default {default!r} is not a member: {names}")
    paths = {m.name: Path(m.path).resolve() for m in members}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RoutingError(f"member file(s) not found: {missing}")
    routes = assign_labels(members, {m.name: member_labels(paths[m.name]) for m in members})
    order = [label for m in members for label in routes[m.name]]
    manifest = {
        "format": FORMAT,
        "kind": KIND,
        "members": [
            {
                "name": m.name,
                "path": str(paths[m.name]),
                "sha256": member_sha256(paths[m.name]),
                "labels": routes[m.name],
            }
            for m in members
        ],
        "default": default,
        "labels": order,
        "card": {"created": datetime.datetime.now(UTC).isoformat(timespec="seconds"), **dict(card or {})},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def open_routed(path: Path) -> tuple[dict, dict[str, Path]]:
    """A routed model's manifest and each member's location, after checking that no member changed."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RoutingError(f"{path / MANIFEST}: not readable JSON ({e})") from e
    if manifest.get("kind") != KIND or manifest.get("format") != FORMAT:
        said = manifest.get("kind"), manifest.get("format")
        raise RoutingError(f"{path}: not a routed model of format {FORMAT} ({MANIFEST} says {said})")
    paths = {}
    for m in manifest["members"]:
        where = Path(m["path"]) if Path(m["path"]).is_absolute() else path / m["path"]
        if not where.exists():
            raise RoutingError(f"{path}: member {m['name']} not found at {where}")
        if member_sha256(where) != m["sha256"]:
            raise RoutingError(
                f"{path}: member {m['name']} ({where}) changed since the routed model was written (its SHA-256 "
                "differs); nothing was run. Write the routed model again (cxrclip route / cxrclip export)."
            )
        paths[m["name"]] = where
    return manifest, paths


class RoutedGate:
    """The members' gates seen as one (for ``/v1/model``)."""

    def __init__(self, members: Mapping):
        self.members = members

    def describe(self) -> dict:
        parts = {name: p.gate.describe() for name, p in self.members.items()}
        return {
            "fitted": all(d["fitted"] for d in parts.values()),
            "enforced": all(d["enforced"] for d in parts.values()),
            "rule": "refused when any member's gate refuses",
            "members": parts,
        }


class RoutedPredictor:
    """Each label answered by its member (a checkpoint or bundle predictor created with that member's labels); the
    ranking, free text and preview from the default member."""

    def __init__(self, path: Path, manifest: dict, members: dict, default: str):
        self.path, self.manifest, self.members, self.default = path, manifest, members, default
        self.routes = {label: m["name"] for m in manifest["members"] for label in m["labels"]}
        self.label_names = list(manifest["labels"])
        base = members[default]
        self.preprocess, self.transform = base.preprocess, base.transform
        self.encoders, self.scale = base.encoders, base.scale
        self.precision = "/".join(sorted({m.precision for m in members.values()}))
        self.calibration = Calibration(
            {n: members[self.routes[n]].calibration.labels[n] for n in self.label_names},
            base.calibration.fitted_on,
            base.calibration.prompts_sha256,
            base.calibration.created,
        )
        self.gate = RoutedGate(members)

    @property
    def candidates(self) -> list[str]:
        return self.members[self.default].candidates

    calibration_name = "default"  # each member answers with its own calibration; no site calibration here

    def sites(self) -> list[str]:
        return []

    def identity(self) -> dict:
        """Named by its manifest (which names each member's hash), with the routing."""
        return {"name": self.path.name, "checkpoint_sha256": file_sha256(self.path / MANIFEST),
                "routing": self.routing()}  # fmt: skip

    def card(self) -> dict:
        """What ``GET /v1/model`` and the DICOM SR say about this model."""
        return model_card(self)

    def routing(self) -> dict:
        """The routing for ``/v1/model``: each member, its file and hash, and the labels it answers."""
        return {
            "default": self.default,
            "members": [
                {
                    "name": m["name"],
                    "path": m["path"],
                    "sha256": m["sha256"],
                    "labels": m["labels"],
                    "image_size": self.members[m["name"]].preprocess.size,
                }
                for m in self.manifest["members"]
            ],  # fmt: skip
            "card": self.manifest.get("card", {}),
        }

    def predict(self, images: Sequence[str | Path], threshold=None) -> list[Answer]:
        arrays, facts = [], []
        for p in images:
            facts.append({})
            arrays.append(read_image(p, facts[-1]))
        return self.predict_arrays(images, arrays, facts, threshold)

    def _member_threshold(self, name: str, threshold):
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(self.label_names))
            if unknown:
                raise InputError(f"thresholds for unknown labels {unknown}; labels: {self.label_names}")
            return {k: v for k, v in threshold.items() if self.routes[k] == name}
        return threshold

    def predict_arrays(
        self, images: Sequence, arrays: Sequence[np.ndarray], facts=None, threshold=None
    ) -> list[Answer]:
        if not len(arrays):
            return []
        thumbnail = any(m.gate.reads_pixels for m in self.members.values())
        checks = [precheck(a, f, thumbnail) for a, f in zip(arrays, facts or [None] * len(arrays))]
        answers = {}
        for name, member in self.members.items():
            emb = member.embed([member.transform(a) for a in arrays])
            answers[name] = member.predict_embeddings(images, emb, checks, self._member_threshold(name, threshold))
        results = []
        for i, path in enumerate(images):
            refused = next((name for name in self.members if not answers[name][i].analysed), None)
            gates = {name: answers[name][i].gate.model_dump(exclude_unset=True) for name in self.members}
            if refused is not None:
                gate = GateVerdict(**gates[refused], member=refused, members=gates)
                results.append(Answer(image=str(path), analysed=False, reason=answers[refused][i].reason, gate=gate))
                continue
            overridden = next((n for n in self.members if gates[n].get("reason")), None)
            gate = GateVerdict(**gates[overridden or self.default], member=overridden or self.default, members=gates)
            labels = {
                n: answers[self.routes[n]][i].labels[n].model_copy(update={"member": self.routes[n]})
                for n in self.label_names
            }
            results.append(Answer(image=str(path), analysed=True, gate=gate, ranking=answers[self.default][i].ranking,
                                  labels=labels, calibration=self.calibration_name))  # fmt: skip
        return with_reading_warnings(results, facts)

    def picture_of(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """The default member's picture, or (``label``) the picture of the member that answers it."""
        return self.members[self.routes[label] if label in self.routes else self.default].picture_of(image)

    def heatmap_of(self, image: np.ndarray, label: str) -> np.ndarray:
        if label not in self.routes:
            raise InputError(f"heatmap: unknown label {label!r}; labels: {self.label_names}")
        return self.members[self.routes[label]].heatmap_of(image, label)

    def saliency_of(self, image: np.ndarray, label: str) -> np.ndarray:
        if label not in self.routes:
            raise InputError(f"heatmap: unknown label {label!r}; labels: {self.label_names}")
        return self.members[self.routes[label]].saliency_of(image, label)

    def texts_of(self, image: np.ndarray, texts: Sequence[str]) -> list[dict]:
        return self.members[self.default].texts_of(image, texts)
