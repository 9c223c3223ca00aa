"""``cxrclip calibrate`` and the end of training: fit per-label calibration on validation data and store
it in the checkpoint (key ``calibration``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from cxrclip.data.records import load_records
from cxrclip.data.schema import DataConfig, ImageTextRecord, LabeledRecord
from cxrclip.engine.loader import image_loader
from cxrclip.io import atomic_write_text
from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint
from cxrclip.model.embed import LabelScorer, embed_images
from cxrclip.model.loading import LoadedModel, default_device, load_model
from cxrclip.model.probe import load_probe, probe_logits, probe_transform
from cxrclip.model.speed import autocast
from cxrclip.predict.bundle import is_bundle
from cxrclip.predict.routed import MANIFEST as ROUTED_MANIFEST
from cxrclip.predict.routed import member_sha256, open_routed
from cxrclip.scoring.calibration import (
    Calibration,
    CalibrationError,
    CalibrationSettings,
    file_sha256,
    fit_calibration,
    stored_calibration,
    with_site_calibration,
)
from cxrclip.spec import LoaderSpec, RunSpec

log = logging.getLogger(__name__)


def label_matrix(records: Sequence, names: Sequence[str]) -> np.ndarray:
    """Rows × labels of 1 (present), 0 (absent) or -1 (uncertain / left out), from either kind of record.
    Train/valid rows name their positives (and, in triplet files, negatives and uncertain ones); a label a
    row does not mention is absent."""
    out = np.zeros((len(records), len(names)), dtype=np.int64)
    for i, r in enumerate(records):
        if isinstance(r, LabeledRecord):
            out[i] = r.labels
        elif isinstance(r, ImageTextRecord):
            out[i] = [1 if n in r.positives else -1 if n in r.uncertain else 0 for n in names]
    return out


def as_labeled(records: Sequence) -> list[LabeledRecord]:
    """Image rows for the evaluation loader (labels are read separately by :func:`label_matrix`)."""
    return [LabeledRecord(r.line, r.images[:1], ()) if isinstance(r, ImageTextRecord) else r for r in records]


def zero_shot_logits(
    loaded: LoadedModel,
    records: Sequence,
    bank,
    names: Sequence[str],
    loader_cfg: LoaderSpec | Mapping,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Zero-shot label logits of every row's first image, preprocessed as the run's test transform, the image
    encoder under ``precision`` (as a predictor of that precision computes them)."""

    loader = image_loader(as_labeled(records), loaded.preprocess(), loader_cfg)
    scorer = LabelScorer.create(loaded.model, loaded.tokenizer, bank, names, device)
    with autocast(precision, device):
        emb = embed_images(loaded.model, loader, device, desc="calibration images")
    return scorer.logits(emb.float())


def usable(dc: DataConfig) -> bool:
    """Calibration needs label sets: report-only data (``text_source: report``) has none."""
    return bool(dc.label_names) and dc.text_source == "labels" and dc.label_source != "none"


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: Sequence[DataConfig],
    settings: CalibrationSettings,
    *,
    out: str | Path | None = None,
    loader_cfg: LoaderSpec | Mapping | None = None,
    device: str | torch.device | None = None,
    text_encoder: str | None = None,
    site: str | None = None,
) -> Calibration:
    """Fit the calibration of a checkpoint — a CLIP model (zero-shot scores) or a linear probe (its logits) —
    on the rows of ``data`` (all with the same label list) and write the checkpoint back (to ``out`` if
    given) with it under ``calibration``, atomically. ``site``: store it as that site's calibration, under
    ``site_calibrations[site]``, beside the model's own (which stays as it was)."""
    data = [dc for dc in data if usable(dc)]
    if not data:
        raise CalibrationError("no validation data with label sets to calibrate on (need image + text_label rows)")
    names = list(data[0].label_names)
    if any(list(dc.label_names) != names for dc in data):
        raise CalibrationError("every calibration dataset must have the same label_names")
    device = default_device(str(device) if device else None)
    loader_cfg = loader_cfg or LoaderSpec(batch_size=32)
    ckpt = load_checkpoint(checkpoint)
    if "probe" in ckpt and settings.precision != "fp32":
        raise CalibrationError("a linear probe is calibrated in fp32 (calibration.precision applies to CLIP models)")
    make_scorer = _probe_scorer if "probe" in ckpt else _clip_scorer
    score = make_scorer(checkpoint, ckpt, names, loader_cfg, device, text_encoder, settings.precision)
    logits, labels = [], []
    for dc in data:
        records = load_records(dc)
        logits.append(score(records, dc))
        labels.append(label_matrix(records, names))
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    fitted_on = {
        "dataset": data[0].name,
        "path": str(data[0].csv_path),
        "sha256": file_sha256(data[0].csv_path),
        "rows": int(len(labels)),
        "files": [{"path": str(dc.csv_path), "sha256": file_sha256(dc.csv_path)} for dc in data],
        "precision": settings.precision,  # the image encoder's while these logits were computed
    }
    prompts = file_sha256(data[0].prompts_file) if "probe" not in ckpt else None
    if site:
        fitted_on["site"] = site
    calibration = fit_calibration(logits, labels, names, settings, fitted_on, prompts)
    if site:  # a label the site cannot calibrate keeps the model's own calibration
        calibration = calibration.over(stored_calibration(ckpt, names))
        ckpt = with_site_calibration(ckpt, site, calibration)
    else:
        ckpt["calibration"] = calibration.to_dict()
    target = save_checkpoint(out or checkpoint, {k: v for k, v in ckpt.items() if k != "format"})
    flagged = [n for n, c in calibration.labels.items() if not c.calibrated]
    log.info(
        "calibrated %d/%d labels on %d rows of %s (rule %s) → %s%s",
        len(names) - len(flagged),
        len(names),
        len(labels),
        data[0].csv_path,
        settings.rule,
        target,
        f"; uncalibrated (too few rows): {flagged}" if flagged else "",
    )
    return calibration


def _clip_scorer(checkpoint, ckpt, names, loader_cfg, device, text_encoder, precision):
    """records → zero-shot logits of a CLIP checkpoint, its image encoder under ``precision``."""
    loaded = load_model(checkpoint, device=device, text_encoder=text_encoder)
    return lambda records, dc: zero_shot_logits(loaded, records, dc.prompts(), names, loader_cfg, device, precision)


def _probe_scorer(checkpoint, ckpt, names, loader_cfg, device, text_encoder, precision):
    """records → the logits of a linear-probe checkpoint."""

    probe, info = load_probe(Path(checkpoint), ckpt)
    if list(info["label_names"]) != names:
        raise CalibrationError(f"{checkpoint} was trained on labels {info['label_names']}, the data has {names}")
    probe.to(device)
    transform = probe_transform(ckpt)
    return lambda records, dc: probe_logits(probe, image_loader(as_labeled(records), transform, loader_cfg), device)


def calibrate_after_training(cfg, result: Mapping) -> Calibration | None:
    """The end of ``train.py``: calibrate ``model-best.tar`` on the validation split (``calibration`` config)."""

    spec = cfg if isinstance(cfg, RunSpec) else RunSpec.from_config(cfg)
    settings = CalibrationSettings.from_mapping(spec.calibration)
    best = Path(spec.base["output"]["checkpoint"]) / "model-best.tar"
    data = [dc for dc in spec.data.get("data_valid", ()) if usable(dc)]
    if not settings.enabled or result.get("stopped") or not best.is_file():
        return None
    if not data:
        log.warning("no labelled validation data: %s stays uncalibrated (see `cxrclip calibrate`)", best)
        return None
    return calibrate_checkpoint(best, data, settings, loader_cfg=spec.loader("valid"))


def calibrate_routed(
    path: str | Path, data: Sequence[DataConfig], settings: CalibrationSettings, *, device=None, text_encoder=None
) -> Calibration:
    """``cxrclip calibrate`` on a routed model: each member checkpoint calibrated on ``data`` (written back in place,
    atomically; the routed model reads each member's calibration of the labels it answers), then ``routed.json``
    rewritten with the members' new hashes.
    A bundle member keeps the calibration it was exported with: calibrate its checkpoint and export it again."""
    path = Path(path)
    manifest, paths = open_routed(path)
    bundles = [name for name, where in paths.items() if is_bundle(where)]
    if bundles:
        raise CalibrationError(
            f"members {bundles} are bundles, which keep the calibration they were exported with: calibrate their "
            "checkpoints and export them again (cxrclip export --member ...)"
        )
    missing = sorted(set(manifest["labels"]) - {n for dc in data for n in dc.label_names})
    if missing:
        raise CalibrationError(f"the calibration data lacks labels the routed model answers: {missing}")
    merged = {}
    for m in manifest["members"]:
        fitted = calibrate_checkpoint(paths[m["name"]], data, settings, device=device, text_encoder=text_encoder)
        merged.update({n: fitted.labels[n] for n in m["labels"] if n in fitted.labels})
        m["sha256"] = member_sha256(paths[m["name"]])
    atomic_write_text(path / ROUTED_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return Calibration({n: merged[n] for n in manifest["labels"]}, fitted.fitted_on, fitted.prompts_sha256)
