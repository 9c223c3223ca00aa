"""``evaluate_clip.py``: zero-shot classification and retrieval for every checkpoint × test dataset."""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader

from cxrclip.config import data_configs, to_plain
from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.dataset import LabeledImageDataset
from cxrclip.data.records import DataConfig, LabeledRecord, load_labeled_records
from cxrclip.data.transforms import build_transform
from cxrclip.eval import report
from cxrclip.eval.calibrate import stored_calibration
from cxrclip.eval.calibration import Calibration, file_sha256, sigmoid
from cxrclip.eval.metrics import binary_metrics, merge_texts, multiclass_metrics, retrieval_metrics
from cxrclip.eval.zeroshot import LabelScorer, embed_images, embed_texts
from cxrclip.model.checkpoint import CheckpointError
from cxrclip.model.loading import LoadedModel, default_device, load_model
from cxrclip.paths import resolve_user_path

log = logging.getLogger(__name__)


def checkpoint_paths(spec) -> list[Path]:
    """A file, a glob, a folder (its ``*.tar``) or a list of those → sorted checkpoint files."""
    specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    paths: list[Path] = []
    for s in specs:
        p = resolve_user_path(str(s))
        if p.is_dir():
            paths += sorted(p.glob("*.tar"))
        elif any(ch in str(s) for ch in "*?["):
            paths += sorted(Path(m) for m in glob.glob(str(p)))
        else:
            paths.append(p)
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise CheckpointError(f"no checkpoint found for test.checkpoint={spec!r}" + (f": {missing}" if missing else ""))
    return paths


def image_loader(records: Sequence[LabeledRecord], transform, loader_cfg) -> DataLoader:
    """Batches of test images and labels in dataset order. Texts are not tokenized here: the distinct texts
    are embedded once, separately."""
    workers = int(loader_cfg.get("num_workers", 0))
    return DataLoader(
        LabeledImageDataset(records, transform),
        batch_size=int(loader_cfg["batch_size"]),
        num_workers=workers,
        collate_fn=ImageTextCollator(None),
        prefetch_factor=loader_cfg.get("prefetch_factor") if workers else None,
    )


def evaluate_one(
    loaded: LoadedModel, dc: DataConfig, records: Sequence[LabeledRecord], cfg: DictConfig, device: torch.device
) -> tuple[dict, dict]:
    """Metrics of one checkpoint on one dataset, plus the arrays the plots need."""
    transform = build_transform(to_plain(cfg.transform)["test"], loaded.normalize)
    loader = image_loader(records, transform, cfg.dataloader.test)
    model = loaded.model
    image_emb = embed_images(model, loader, device, desc=f"{dc.name} images")
    labels = np.array([r.labels for r in records], dtype=np.int64)
    results: dict = {"n_images": len(records)}
    arrays: dict = {"labels": labels}
    if dc.prompt_path and dc.label_names:
        scorer = LabelScorer.create(model, loaded.tokenizer, dc.prompts(), dc.label_names, device)
        logits = scorer.logits(image_emb)
        results["zeroshot_binary"], calibration = label_metrics(logits, labels, dc, loaded.checkpoint, cfg.test)
        multi = multiclass_metrics((image_emb @ scorer.pos_emb.t()).numpy(), labels, dc.label_names)
        if multi is not None:
            results["zeroshot_multiclass"] = multi
        arrays.update(probs=calibration.probabilities(logits), raw_probs=sigmoid(logits))
    if all(r.text for r in records):  # image-text sets; classification sets have no texts to retrieve
        texts, gt = merge_texts([r.text for r in records])
        text_emb = embed_texts(model, loaded.tokenizer, texts, device, max_length=dc.text_max_length)
        results.update(retrieval_metrics(image_emb, text_emb, gt))
        results["n_texts_unique"] = len(texts)
    return results, arrays


def label_metrics(
    logits: np.ndarray, labels: np.ndarray, dc: DataConfig, checkpoint: dict, test_cfg
) -> tuple[dict, Calibration]:
    """Per-label metrics at the checkpoint's stored operating points (or flagged fixed ones), and where
    those operating points came from."""
    calibration = stored_calibration(checkpoint, dc.label_names)
    binary = binary_metrics(logits, labels, dc.label_names, calibration, ci=str(test_cfg.get("auroc_ci", "delong")))
    binary["calibration"] = calibration_facts(calibration, dc)
    return binary, calibration


def calibration_facts(calibration: Calibration, dc: DataConfig) -> dict:
    """Where the operating points come from, and whether this very data was used to fit them."""
    optimistic = calibration.fitted_on_file(dc.csv_path)
    facts = {
        "source": "checkpoint" if calibration.is_fitted else "none (uncalibrated sigmoid, fixed threshold)",
        "fitted_on": calibration.fitted_on,
        "optimistic": optimistic,
    }
    if optimistic:
        facts["note"] = (
            "the calibration was fitted on this same data: thresholds, F1, sensitivity/specificity and ECE are "
            "optimistic; calibrate on a validation split"
        )
    if calibration.prompts_sha256 and dc.prompt_path and calibration.prompts_sha256 != file_sha256(dc.prompts_file):
        facts["prompts_changed"] = True
        facts["note"] = (facts.get("note", "") + " the prompt file differs from the one calibrated with").strip()
    return facts


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)


def evaluate(cfg: DictConfig) -> dict[str, dict[str, dict]]:
    """Evaluate every checkpoint on every ``data_test`` dataset; write JSON, markdown and plots."""
    torch.manual_seed(int(cfg.test.get("seed", 1234)))
    ckpts = checkpoint_paths(cfg.test.checkpoint)
    datasets = [
        (dc, load_labeled_records(dc, need_text=dc.data_type == "imagetext_eval"))
        for dc in data_configs(cfg, "data_test")
    ]
    device = default_device()
    out_dir = Path(cfg.test.output_dir) if cfg.test.get("output_dir") else ckpts[0].parent
    everything: dict[str, dict[str, dict]] = {dc.name: {} for dc, _ in datasets}
    for ckpt in ckpts:
        loaded = load_model(
            ckpt, device=device, text_encoder=cfg.test.get("text_encoder"), image_encoder=cfg.test.get("image_encoder")
        )
        for dc, records in datasets:
            results, arrays = evaluate_one(loaded, dc, records, cfg, device)
            everything[dc.name][str(ckpt)] = results
            _plots(out_dir, dc, ckpt, results, arrays)
            summary = results.get("zeroshot_binary", {}).get("AUROC(Avg)")
            recall = results.get("retrieval_i2t", {}).get("Recall@5")
            log.info(
                "%s on %s: AUROC(Avg) %s, i2t Recall@5 %s",
                ckpt.name,
                dc.name,
                "–" if summary is None else f"{summary:.3f}",
                "–" if recall is None else f"{recall:.3f}",
            )
    for name, results in everything.items():
        path = report.write_json_merged(out_dir / f"results-{name}.json", results)
        report.atomic_write_text(out_dir / f"results-{name}.md", report.markdown_table(name, results))
        log.info("wrote %s", path)
    return everything


def _plots(out_dir: Path, dc: DataConfig, ckpt: Path, results: dict, arrays: dict) -> None:
    tag = f"{dc.name}-{_slug(ckpt)}"
    if "probs" in arrays:
        report.plot_roc(
            out_dir / f"roc-{tag}.png",
            arrays["raw_probs"],
            arrays["labels"],
            dc.label_names,
            f"zero-shot ROC, {dc.name}, {ckpt.name}",
        )
        report.plot_reliability(
            out_dir / f"reliability-{tag}.png",
            arrays["raw_probs"],
            arrays["probs"],
            arrays["labels"],
            f"reliability, {dc.name}, {ckpt.name}",
        )
    if "zeroshot_multiclass" in results:
        report.plot_confusion(
            out_dir / f"confusion-{tag}.png",
            results["zeroshot_multiclass"]["confusion"],
            dc.label_names,
            f"zero-shot, single-label rows, {ckpt.name}",
        )
