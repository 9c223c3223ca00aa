"""``evaluate_finetune.py``: per-label AUROC/F1/Accuracy of a fine-tuned (probe) checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrclip.eval.evaluate import EvaluationRun, image_loader, label_metrics
from cxrclip.eval.metrics import multiclass_metrics
from cxrclip.exceptions import ConfigError
from cxrclip.model.checkpoint import CheckpointError, load_checkpoint
from cxrclip.model.loading import load_image_encoder, stored_preprocess
from cxrclip.model.probe import LinearProbe
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)
COLUMNS = (
    ("multilabel_classification", "AUROC(Avg)"),
    ("multilabel_classification", "F1(Avg)"),
    ("multilabel_classification", "Accuracy(Avg)"),
    ("multiclass_classification", "Accuracy(Micro)"),
)


def load_probe(path: Path, ckpt: dict | None = None) -> tuple[LinearProbe, dict]:
    """A fine-tuned checkpoint's probe (``ckpt``: the file, when it is already loaded) and its ``probe`` facts."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    if "probe" not in ckpt:
        raise CheckpointError(f"{path} is not a fine-tuned checkpoint (made by finetune.py)")
    encoder, _ = load_image_encoder(path, ckpt)
    probe = LinearProbe(encoder, len(ckpt["probe"]["label_names"]))
    head = {k.removeprefix("classifier."): v for k, v in ckpt["model"].items() if k.startswith("classifier.")}
    probe.classifier.load_state_dict(head, strict=True)
    return probe.eval(), ckpt["probe"]


@torch.no_grad()
def probe_logits(probe: LinearProbe, loader: DataLoader, device: torch.device) -> np.ndarray:
    """The probe's per-label logits (rows × labels), float64."""
    out = [probe(b.to(device))["logits"].float().cpu() for b in tqdm(loader, leave=False)]
    return torch.cat(out).double().numpy()


def probe_transform(ckpt: dict):
    """The probe run's deterministic (valid) transform with its encoder's normalization."""
    return stored_preprocess(ckpt, ckpt["probe"]["image_encoder"]["normalize"], ("valid",)).transform()


def evaluate_finetune(cfg: DictConfig | RunSpec) -> dict[str, dict[str, dict]]:
    """Every checkpoint on every ``data_test`` dataset → ``results-<dataset>.json`` and ``.md``."""
    job = EvaluationRun.create(cfg, lambda dc: False)
    everything: dict[str, dict[str, dict]] = {dc.name: {} for dc, _ in job.datasets}
    for ckpt in job.checkpoints:
        ckpt_data = load_checkpoint(ckpt)
        probe, info = load_probe(ckpt, ckpt_data)
        probe.to(job.device)
        for dc, records in job.datasets:
            if list(dc.label_names) != list(info["label_names"]):
                raise ConfigError(
                    f"{dc.name}: label_names {list(dc.label_names)} differ from the ones {ckpt.name} "
                    f"was trained on {info['label_names']}"
                )
            transform = job.spec.eval_transform(ckpt_data, info["image_encoder"]["normalize"], ("valid",))
            loader = image_loader(records, transform, job.spec.loader("test"))
            logits = probe_logits(probe, loader, job.device)
            labels = np.array([r.labels for r in records])
            result = {"multilabel_classification": label_metrics(logits, labels, dc, ckpt_data, job.spec.test)[0]}
            multi = multiclass_metrics(logits, labels, dc.label_names) if len(dc.label_names) > 1 else None
            if multi is not None:
                result["multiclass_classification"] = multi
            everything[dc.name][str(ckpt)] = result
            log.info("%s on %s: AUROC(Avg) %s", ckpt.name, dc.name, result["multilabel_classification"]["AUROC(Avg)"])
    job.write(everything, best_by=COLUMNS[0], columns=COLUMNS)
    return everything
