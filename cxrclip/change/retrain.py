"""``cxrclip retrain``: a challenger from the site's reviews.

The reviewed films whose images were kept (``cxrclip serve --keep-images``), each with its reader's latest verdicts
(a correction replaces what it corrects), are split **by patient** into a fit part and a validation part. The
challenger starts from the base checkpoint and learns what the base's own recipe let learn — with
``+recipe=small_data`` (``model.freeze: [image_encoder, text_encoder]``) only the projection heads and the
temperature, so a few hundred reviews cannot wear the pre-trained features down — on the fit part (with ``--train``,
together with the original training data), its best epoch chosen by the validation loss, then calibrated on the
validation part, and its input gate refitted on the reviewed films (the gate reads the projected embedding, which
has changed). A reader's "can't tell" is an uncertain label (the prompt file's ``unc`` sentences; left out of the
calibration).

It refuses before any training, with the counts it has and needs, when a label in scope has too few reviewed
positives or negatives in either part. The challenger carries what it was trained on (``retrain`` in the
checkpoint: the base's hash, the review store, the reviewed images of each part) so that ``cxrclip compare --db``
judges it only on reviewed cases it never saw.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrclip.engine.tasks import clip_task
from cxrclip.engine.trainer import train
from cxrclip.eval.calibrate import calibrate_after_training
from cxrclip.exceptions import InputError, UserError
from cxrclip.fit_gate import GateFit, fit_gate_checkpoint, group_split
from cxrclip.io import atomic_write_text, database_url, file_sha256, redact_url
from cxrclip.model.checkpoint import load_checkpoint, plain_config, save_checkpoint
from cxrclip.model.clip import build_model
from cxrclip.model.loading import architecture_only, upgrade_model_config
from cxrclip.reviews.store import ReviewStore
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)
MIN_REVIEWED = 5  # per label in scope: positives and negatives in each part (the calibration's own minimum)
GATE_GENERATED = 100  # non-radiographs made from the reviewed films for the refitted gate
MANIFEST = "retrain.json"  # beside checkpoints/: what the run was given and which films it learnt from


class RetrainRefused(UserError):
    """Too little reviewed evidence to train and calibrate a challenger (the counts are in the message)."""


@dataclass(frozen=True)
class ReviewedFilm:
    image: Path | None  # None: the image was not kept (only its logged answers can be judged)
    sha256: str
    patient: str
    verdicts: Mapping[str, str]  # label → present | absent | unsure


def read_patients(path: str | Path | None) -> dict[str, str]:
    """``--patients CSV``: columns ``image`` (the uploaded name, the kept file's path or the image's SHA-256) and
    ``patient`` (or ``patient_id``)."""
    if not path:
        return {}
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--patients {path}: not a readable CSV ({e})") from e
    column = next((c for c in ("patient", "patient_id") if rows and c in rows[0]), None)
    if not rows or "image" not in rows[0] or column is None:
        raise InputError(f"--patients {path}: needs the columns image and patient (one row per image)")
    return {r["image"].strip(): r[column].strip() for r in rows if r["image"].strip() and r[column].strip()}


def latest_reviews(store) -> list[dict]:
    """Per reviewed image, its latest uncorrected review (a correction replaces what it corrects; a later independent
    review of the same image wins), oldest first."""
    latest: dict[str, dict] = {}
    for review in store.current():
        latest[review["image_sha256"]] = review
    return sorted(latest.values(), key=lambda r: r["id"])


def patient_of(review: Mapping, patients: Mapping[str, str]) -> str:
    """``patients`` (by uploaded name, kept path or SHA-256), else the film's DICOM study (one study, one patient),
    else the image itself."""
    keys = (review["image_name"], review["image_path"], review["image_sha256"])
    found = next((patients[k] for k in keys if k in patients), None)
    return str(found or (review.get("dicom") or {}).get("study") or review["image_sha256"])


def reviewed_films(store, patients: Mapping[str, str] | None = None) -> tuple[list[ReviewedFilm], dict]:
    """The latest review of each image whose file was kept; and what was left out, counted."""
    reviews, patients = latest_reviews(store), patients or {}
    films, missing = [], []
    for review in (r for r in reviews if r["image_path"]):
        image = Path(review["image_path"]).resolve()
        if not image.is_file():
            missing.append(str(image))
            continue
        films.append(
            ReviewedFilm(image, review["image_sha256"], patient_of(review, patients), dict(review["verdicts"]))
        )
    if missing:
        listed = "\n  ".join(missing[:10])
        raise InputError(f"{len(missing)} kept image(s) of reviews are missing (moved or deleted?):\n  {listed}")
    not_kept = sum(not r["image_path"] for r in reviews)
    return films, {"images_reviewed": len(reviews), "not_kept": not_kept, "used": len(films)}


def split_by_patient(films: Sequence[ReviewedFilm], valid_frac: float, seed: int,
                     stratify: str | None = None) -> tuple[list, list]:  # fmt: skip
    """(fit, validation): whole patients on one side, about ``valid_frac`` of the films in validation; with
    ``stratify`` (a label: the scarcest in scope) its reviewed positives spread over both sides in proportion
    (scikit-learn's StratifiedGroupKFold, one fold kept) — a rare finding's few positives must reach both parts."""
    patients = [f.patient for f in films]
    y = [int(f.verdicts.get(stratify) == "present") for f in films] if stratify else []
    folds = max(2, round(1 / valid_frac))
    if stratify and len({p for p, v in zip(patients, y) if v}) >= folds and len(set(patients)) >= 2 * folds:
        from sklearn.model_selection import StratifiedGroupKFold

        split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(films, y, patients)
        held = set(next(split)[1].tolist())
        mask = [i in held for i in range(len(films))]
    else:
        mask = group_split(patients, valid_frac, seed)
    return [f for f, v in zip(films, mask) if not v], [f for f, v in zip(films, mask) if v]


def counts(films: Sequence[ReviewedFilm], names: Sequence[str]) -> dict[str, dict[str, int]]:
    return {n: {v: sum(f.verdicts.get(n) == v for f in films) for v in ("present", "absent", "unsure")} for n in names}


def check_evidence(fit: Sequence, valid: Sequence, scope: Sequence[str], need: int) -> dict:
    """Per label in scope, the reviewed counts of both parts; :class:`RetrainRefused` listing every short label."""
    table = {"fit": counts(fit, scope), "validation": counts(valid, scope)}
    short = []
    for n in scope:
        have = {part: (table[part][n]["present"], table[part][n]["absent"]) for part in table}
        if min(min(v) for v in have.values()) < need:
            short.append(f"  {n}: fit {have['fit'][0]} positive / {have['fit'][1]} negative, validation "
                         f"{have['validation'][0]} / {have['validation'][1]}")  # fmt: skip
    if short:
        raise RetrainRefused(
            f"too few reviewed cases to train and calibrate a challenger: every label in scope needs at least {need} "
            f"reviewed positives and {need} negatives in the fit part and in the validation part (whole patients "
            f"each; {len(fit)} + {len(valid)} films):\n"
            + "\n".join(short)
            + "\nreview more films with these findings (GET /v1/review-queue), or narrow the scope (--scope)"
        )
    return table


def write_split(films: Sequence[ReviewedFilm], names: Sequence[str], path: Path) -> Path:
    """A train/valid CSV in the triplet format: ``[[present], [absent], [unsure]]`` per film, and its patient."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "text_label", "patient_id"])
    for f in films:
        triplet = [[n for n in names if f.verdicts.get(n) == v] for v in ("present", "absent", "unsure")]
        writer.writerow([repr([str(f.image)]), repr(triplet), f.patient])
    return atomic_write_text(path, out.getvalue())


def recipe_note(model_cfg: Mapping) -> str:
    frozen = list(model_cfg.get("freeze") or [])
    if {"image_encoder", "text_encoder"} <= set(frozen):
        return ("the projection heads and the temperature (both towers locked, as the base's recipe: a few hundred "
                "reviews cannot wear the pre-trained features down)")  # fmt: skip
    if frozen:
        return f"everything but {frozen} (as the base's recipe)"
    return "the whole model (the base's recipe locked nothing; +recipe=small_data locks both towers)"


def challenger_config(base: Mapping, fit_csv: Path, valid_csv: Path, out: Path, *, names: Sequence[str],
                      prompts: str | None, extra_train: Sequence[str], epochs: int | None,
                      seed: int) -> dict:  # fmt: skip
    """The base's own config with the reviewed films as its data and ``out`` as its run folder."""
    cfg = copy.deepcopy(dict(base))
    template = dict(next(iter((cfg.get("data_train") or {}).values()), {}))
    prompt_path = prompts or template.get("prompt_path")
    if not prompt_path:
        raise InputError("the base checkpoint names no prompt file: give --prompts FILE")
    reviewed = {**template, "data_type": "imagetext", "label_names": list(names), "label_format": "triplet",
                "prompt_path": str(prompt_path), "image_root": None, "data_frac": 1.0}  # fmt: skip
    reviewed.pop("name", None)
    train = {"reviews": {**reviewed, "data_path": str(fit_csv)}}
    for i, extra in enumerate(extra_train):  # the original training data, read as the base read its own
        train[f"train_{i}"] = {**reviewed, "label_format": template.get("label_format", "list"),
                               "data_path": str(Path(extra).resolve())}  # fmt: skip
    cfg["data_train"] = train
    cfg["data_valid"] = {"reviews_validation": {**reviewed, "num_negs": 0, "data_path": str(valid_csv)}}
    cfg.pop("data_test", None)
    output = {"checkpoint": str(out / "checkpoints"), "tensorboard": str(out / "tensorboard")}
    cfg["base"] = {**cfg["base"], "seed": seed, "resume": None, "overwrite": False, "output": output}
    if epochs is not None:
        cfg["scheduler"] = {**cfg["scheduler"], "config": {**cfg["scheduler"]["config"], "total_epochs": epochs}}
    return cfg


def from_base(base_state: Mapping):
    """``make_task`` for the trainer: CLIP pre-training whose model starts as the base's (loaded strictly)."""
    state = {k.removeprefix("module."): v for k, v in base_state.items()}

    def make(spec, run, env):
        task = clip_task(spec, run, env)

        def build():
            model = build_model(architecture_only(upgrade_model_config(spec.model)))
            model.load_state_dict(state, strict=True)
            return model

        return dataclasses.replace(task, build_model=build)

    return make


def retrain(reviews: ReviewStore | str | Path, base: str | Path, out: str | Path, *, scope: Sequence[str] | None = None,
            extra_train: Sequence[str] = (), prompts: str | None = None, patients: str | None = None,
            valid_frac: float = 0.3, min_reviewed: int = MIN_REVIEWED, epochs: int | None = None,
            seed: int = 0, gate_other: Sequence[str] = ()) -> dict:  # fmt: skip
    """Train, calibrate and gate a challenger under ``out`` from ``reviews`` (a review store, or its SQLite file or
    URL); returns the manifest (also ``out/retrain.json``). ``gate_other``: real images that are not frontal films
    (folders or CSVs, as ``cxrclip fit-gate --other``) for the refitted gate, beside the generated ones."""
    store = reviews if isinstance(reviews, ReviewStore) else ReviewStore(database_url(reviews, must_exist=True))
    base, out = Path(base), Path(out).resolve()
    ckpt = load_checkpoint(base)
    config = plain_config(ckpt.get("config"))
    if "probe" in ckpt or "image_encoder" not in config.get("model", {}):
        raise InputError(f"--base {base}: not a CLIP checkpoint (cxrclip retrain trains CLIP models)")
    names = list((ckpt.get("calibration") or {}).get("labels") or ())  # the labels the base answers
    if not names:
        raise InputError(
            f"--base {base}: not calibrated (train.py calibrates; or cxrclip calibrate) — its labels "
            "and their calibration are what the challenger is measured against"
        )
    unknown = sorted(set(scope or ()) - set(names))
    if unknown:
        raise InputError(f"--scope {unknown}: not labels of {base} ({names})")
    scope = list(scope or names)
    for extra in extra_train:
        if not Path(extra).is_file():
            raise InputError(f"--train {extra}: no such CSV")
    films, seen = reviewed_films(store, read_patients(patients))
    if not films:
        raise RetrainRefused(f"no reviewed film with its image kept in {redact_url(store.url)} "
                             f"({seen['images_reviewed']} reviewed images; cxrclip serve --keep-images DIR keeps "
                             "them)")  # fmt: skip
    scarcest = min(scope, key=lambda n: sum(f.verdicts.get(n) == "present" for f in films))
    fit, valid = split_by_patient(films, valid_frac, seed, stratify=scarcest)
    table = check_evidence(fit, valid, scope, min_reviewed)
    if (out / "checkpoints" / "model-best.tar").exists():
        raise InputError(f"{out} already holds a challenger; give another --out")
    data = out / "data"
    fit_csv, valid_csv = write_split(fit, names, data / "fit.csv"), write_split(valid, names, data / "validation.csv")
    cfg = challenger_config(config, fit_csv, valid_csv, out, names=names, prompts=prompts, extra_train=extra_train,
                            epochs=epochs, seed=seed)  # fmt: skip
    spec = RunSpec.from_config(cfg)
    trained = recipe_note(spec.model)
    fit_patients, valid_patients = len({f.patient for f in fit}), len({f.patient for f in valid})
    log.info("retrain: %d fit + %d validation films (%d + %d patients); training %s", len(fit), len(valid),
             fit_patients, valid_patients, trained)  # fmt: skip
    manifest = {
        "state": "training",  # written before training: a run that dies still says which films it learnt from
        "base": {"path": str(base), "sha256": file_sha256(base)},
        "store": redact_url(store.url),
        "trained": trained,
        "labels_in_scope": scope,
        "reviewed": seen,
        "counts": table,
        "split": {"by": "patient", "valid_frac": valid_frac, "seed": seed, "fit_patients": fit_patients,
                  "validation_patients": valid_patients},
        "images": {"fit": sorted(f.sha256 for f in fit), "validation": sorted(f.sha256 for f in valid)},
        "extra_train": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in extra_train],
    }  # fmt: skip
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    result = train(spec, make_task=from_base(ckpt["model"]))
    calibrate_after_training(spec, result)
    challenger = out / "checkpoints" / "model-best.tar"
    if "gate" in ckpt:  # the gate reads the projected embedding: refit it on the reviewed films (a frontal film each)
        synthetic = bool(((ckpt["gate"].get("evidence") or {}).get("fitted_on") or {}).get("synthetic_only"))
        fit_gate_checkpoint(challenger, [str(fit_csv), str(valid_csv)], list(gate_other),
                            fit=GateFit(generated=GATE_GENERATED, seed=seed, synthetic_only=synthetic))  # fmt: skip
    state = {k: v for k, v in load_checkpoint(challenger).items() if k != "format"}
    manifest["state"] = "done"
    manifest["epochs"] = {"best": int(state.get("epoch", 0)), "of": int(result.get("epoch", 0)),
                          "best_val_loss": result.get("best_val_loss")}  # fmt: skip
    state["retrain"] = json.loads(json.dumps(manifest))  # plain types only (the safe loader's allowlist)
    save_checkpoint(challenger, state)
    manifest["challenger"] = {"path": str(challenger), "sha256": file_sha256(challenger)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def trained_on(checkpoint: Mapping, path: str | Path | None = None) -> set[str]:
    """The reviewed images (SHA-256) a challenger saw in training or calibration: its ``retrain`` record, and the
    ``retrain.json`` of the run folder it lies in (``DIR/checkpoints/model-best.tar``), which exists from before
    training — a checkpoint of a run that died before its record was written is still known. None for any other
    model."""
    records = [checkpoint.get("retrain") or {}]
    folder = Path(path).resolve().parent.parent if path else None
    if folder is not None and (folder / MANIFEST).is_file():
        try:
            records.append(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{folder / MANIFEST}: unreadable ({e}); it lists the films this model learnt from") from e
    return {sha for r in records for part in ("fit", "validation") for sha in (r.get("images") or {}).get(part, ())}


def evidence_lines(manifest: Mapping) -> list[str]:
    lines = [f"{'label':34s} {'fit +/-/?':>12s} {'validation +/-/?':>17s}"]
    for n, c in manifest["counts"]["fit"].items():
        v = manifest["counts"]["validation"][n]
        lines.append(f"{n[:34]:34s} {c['present']:4d}/{c['absent']:3d}/{c['unsure']:3d} "
                     f"{v['present']:8d}/{v['absent']:3d}/{v['unsure']:3d}")  # fmt: skip
    return lines
