"""``cxrclip fit-gate``: fit the input gate's image stage on the user's frontal films and other images, choose its
threshold on a patient-disjoint validation part, and store it in the checkpoint (key ``gate``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrclip.data.cells import image_csv
from cxrclip.data.images import IMAGE_SUFFIXES, ImageReadError, read_image
from cxrclip.data.schema import csv_line
from cxrclip.model.checkpoint import save_checkpoint
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.gate import (
    FRONTAL,
    GateError,
    ImageGate,
    fit_image_gate,
    generated_negatives,
    group_split,
    pixel_features,
)

log = logging.getLogger(__name__)
GROUP_COLUMNS = ("patient_id", "patient", "PatientID", "subject_id")
MAX_LISTED = 20
KEEP_FOR_GENERATED = 64  # frontal films kept (downsized) to make rotated / inverted negatives from


@dataclass(frozen=True)
class GateImage:
    path: Path
    kind: str
    group: str


def gather(spec: str, kind: str | None) -> list[GateImage]:
    """The images of a folder or a CSV. ``kind`` None (the ``--other`` sets): a CSV's ``kind`` column, or in a
    folder the name of the sub-folder an image lies in (``other/lateral/x.png`` → lateral; ``not_radiograph``
    for files at the top). The group (for the patient-disjoint split) is a CSV's patient column, else the image."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise GateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        out = []
        for f in files:
            sub = f.relative_to(path).parts
            out.append(GateImage(f, kind or (sub[0] if len(sub) > 1 else "not_radiograph"), str(f)))
        return out
    if not path.is_file():
        raise GateError(f"{path}: no such folder or CSV of images")
    rows, images = image_csv(path)
    group_column = next((c for c in GROUP_COLUMNS if c in rows[0]), None)
    out = []
    for index, (row, image) in enumerate(zip(rows, images)):
        row_kind = kind or (row.get("kind") or "").strip() or "not_radiograph"
        if kind is None and row_kind == FRONTAL:
            raise GateError(f"{path}:{csv_line(index)}: kind frontal in an --other set (list them in --frontal)")
        group = (row.get(group_column) or "").strip() if group_column else ""
        out.append(GateImage(image, row_kind, group or str(image)))
    return out


def fit_gate_checkpoint(
    checkpoint: str | Path,
    frontal: Sequence[str],
    other: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    valid_frac: float = 0.3,
    target_frr: float = 0.01,
    generated: int = 100,
    seed: int = 0,
    c: float = 1.0,
    batch_size: int = 32,
    device: str | None = None,
    text_encoder: str | None = None,
    pixels: bool = True,
    synthetic_only: bool = False,
) -> ImageGate:
    """Embed every image with the checkpoint's own model and test transform, fit the gate on the fit part, choose
    its threshold on the validation part (whole patients on one side), and write the checkpoint back (to
    ``out`` if given) with it, atomically. Every unreadable image is listed before anything is fitted. ``pixels``:
    the gate also reads a thumbnail of each image (what catches inverted films). ``synthetic_only``: the frontal
    films are synthetic (the demo's) — recorded, and every refusal and ``/v1/model`` say so."""
    if not frontal:
        raise GateError("fit-gate needs frontal chest radiographs (--frontal FOLDER_OR_CSV)")
    if not other and generated <= 0:
        raise GateError("fit-gate needs other images (--other FOLDER_OR_CSV) or generated ones (--generated N)")
    if not 0.05 <= valid_frac <= 0.8:
        raise GateError(f"--valid {valid_frac}: expected a fraction between 0.05 and 0.8")
    items = [x for spec in frontal for x in gather(spec, FRONTAL)] + [x for spec in other for x in gather(spec, None)]
    problems = [f"{x.path}: image not found" for x in items if not x.path.is_file()]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        raise GateError(f"{len(problems)} image(s) cannot be used:\n  {listed}")
    predictor = Predictor.create(
        str(checkpoint), device=device, text_encoder=text_encoder, gate=False, precision="fp32"
    )  # fitted on fp32 embeddings
    kept: list[np.ndarray] = []
    emb, thumbs, failed = [], [], []
    for start in range(0, len(items), batch_size):
        tensors = []
        for x in items[start : start + batch_size]:
            try:
                image = read_image(x.path)
            except ImageReadError as e:
                failed.append(str(e))
                continue
            if x.kind == FRONTAL and len(kept) < KEEP_FOR_GENERATED:
                kept.append(_downsized(image))
            tensors.append(predictor.transform(image))
            thumbs.append(pixel_features(image))
        if tensors:
            emb.append(predictor.embed(tensors))
    if failed:
        listed = "\n  ".join(failed[:MAX_LISTED])
        raise GateError(f"{len(failed)} image(s) cannot be read; nothing was fitted:\n  {listed}")
    kinds = [x.kind for x in items]
    groups = [x.group for x in items]
    if generated > 0:
        images, made = generated_negatives(kept, generated, seed=seed)
        for start in range(0, len(images), batch_size):
            emb.append(predictor.embed([predictor.transform(a) for a in images[start : start + batch_size]]))
        thumbs += [pixel_features(a) for a in images]
        kinds += made
        groups += [f"generated:{i}" for i in range(len(made))]
    emb = np.concatenate(emb)
    thumbs_arr = np.stack(thumbs) if pixels else None
    kinds_arr = np.asarray(kinds)
    valid = np.zeros(len(kinds), dtype=bool)
    for kind in sorted(set(kinds)):  # each kind split on its own, so every kind is on both sides
        rows = np.flatnonzero(kinds_arr == kind)
        valid[rows] = group_split([groups[i] for i in rows], valid_frac, seed)
    for kind in sorted(set(kinds)):
        if not ((kinds_arr == kind) & ~valid).any():
            raise GateError(f"kind {kind!r} has too few patients/images to fit on after the validation split")
    if not ((kinds_arr == FRONTAL) & valid).any():
        raise GateError("no frontal film left for validation: give more frontal films")
    fitted_on = {
        "frontal": [str(s) for s in frontal],
        "other": [str(s) for s in other],
        "generated": int(generated),
        "valid_frac": valid_frac,
        "seed": seed,
        "split": "by patient where the CSV has a patient column, else by image",
        **({"synthetic_only": True} if synthetic_only else {}),
    }
    fit_kinds = [k for k, v in zip(kinds, valid) if not v]
    valid_kinds = [k for k, v in zip(kinds, valid) if v]
    gate = fit_image_gate(
        emb[~valid], fit_kinds, emb[valid], valid_kinds, target_frr=target_frr, c=c, fitted_on=fitted_on,
        pixels_fit=None if thumbs_arr is None else thumbs_arr[~valid],
        pixels_valid=None if thumbs_arr is None else thumbs_arr[valid],
    )  # fmt: skip
    ckpt = {k: v for k, v in predictor.loaded.checkpoint.items() if k != "format"}
    ckpt["gate"] = gate.to_dict()
    target = save_checkpoint(out or checkpoint, ckpt)
    log.info("input gate fitted (%s) → %s", ", ".join(gate.kinds), target)
    return gate


def _downsized(image: np.ndarray, side: int = 384) -> np.ndarray:
    from PIL import Image

    h, w = image.shape
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale)))))


def summary_lines(gate: ImageGate) -> list[str]:
    """The gate's validation evidence, for the terminal."""
    valid = gate.evidence.get("valid", {})
    lines = [
        f"kinds: {', '.join(gate.kinds)}; fitted on {gate.evidence.get('fit_rows')}",
        f"threshold {gate.threshold:.4f} (refused when 1 − P(frontal) is above it; target false refusals "
        f"{gate.target_frr:.1%} of frontal films)",
        f"reads: {gate.evidence.get('reads', 'image embedding')}",
        f"validation AUROC frontal vs other: {valid.get('auroc', float('nan')):.4f}",
    ]
    f = valid.get("frontal", {})
    if f:
        lines.append(f"  frontal films refused: {f['false_refusals']}/{f['n']} = {f['rate']:.1%}  95 % CI {f['ci95']}")
    for kind, v in valid.items():
        if kind in ("frontal", "auroc"):
            continue
        lines.append(f"  {kind:<16} let through: {v['missed']}/{v['n']} = {v['rate']:.1%}  95 % CI {v['ci95']}")
    return lines
