"""``evaluate_finetune.py``: per-label AUROC/F1/Accuracy of a fine-tuned (probe) checkpoint."""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from cxrclip.engine.loader import image_loader
from cxrclip.eval.evaluate import EvaluationRun, label_metrics
from cxrclip.eval.metrics import multiclass_metrics
from cxrclip.exceptions import ConfigError
from cxrclip.model.checkpoint import load_checkpoint
from cxrclip.model.loading import evaluation_transform
from cxrclip.model.probe import load_probe, probe_logits
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)
COLUMNS = (
    ("multilabel_classification", "AUROC(Avg)"),
    ("multilabel_classification", "F1(Avg)"),
    ("multilabel_classification", "Accuracy(Avg)"),
    ("multiclass_classification", "Accuracy(Micro)"),
)


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
            transform = evaluation_transform(job.spec, ckpt_data, info["image_encoder"]["normalize"], ("valid",))
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
