"""``evaluate_clip.py``: zero-shot classification and retrieval for every checkpoint × test dataset."""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from cxrclip.data.records import load_labeled_records
from cxrclip.data.schema import DataConfig, LabeledRecord
from cxrclip.engine.loader import image_loader
from cxrclip.eval import report
from cxrclip.eval.metrics import binary_metrics, merge_texts, multiclass_metrics, retrieval_metrics
from cxrclip.exceptions import ConfigError
from cxrclip.model.checkpoint import CheckpointError
from cxrclip.model.loading import default_device
from cxrclip.paths import resolve_user_path
from cxrclip.predict.factory import PredictorOptions, open_predictor, predictor_kind
from cxrclip.predict.gate import stored_gate
from cxrclip.predict.routed import RoutedPredictor
from cxrclip.scoring.calibration import Calibration, file_sha256, sigmoid, stored_calibration
from cxrclip.scoring.zeroshot import label_logits
from cxrclip.spec import EvalSpec, RunSpec

log = logging.getLogger(__name__)


def checkpoint_paths(spec) -> list[Path]:
    """A file, a glob, a folder (its ``*.tar``), an inference bundle, or a list of those → checkpoints/bundles."""
    specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    paths: list[Path] = []
    for s in specs:
        p = resolve_user_path(str(s))
        if predictor_kind(p) != "checkpoint":  # a bundle or routed model: a folder that is one model
            paths.append(p)
        elif p.is_dir():
            paths += sorted(p.glob("*.tar"))
        elif any(ch in str(s) for ch in "*?["):
            paths += sorted(Path(m) for m in glob.glob(str(p)))
        else:
            paths.append(p)
    missing = [str(p) for p in paths if not (p.is_file() or predictor_kind(p) != "checkpoint")]
    if not paths or missing:
        raise CheckpointError(f"no checkpoint found for test.checkpoint={spec!r}" + (f": {missing}" if missing else ""))
    return paths


class AsTensor:
    """A predictor's transform for the evaluation loader: its output (a torch tensor, or a bundle's NumPy array)
    as a tensor (a class, not a lambda, so that loader workers can receive it)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return torch.as_tensor(self.transform(image))


def zero_shot_scores(predictor, dc: DataConfig, records: Sequence[LabeledRecord], spec):
    """One predictor's image embeddings of the test rows (its own preprocessing) and, when the data has labels and
    prompts, the zero-shot label logits and each label's positive-prompt similarity."""
    loader = image_loader(records, AsTensor(predictor.transform), spec.loader("test"))
    batches = tqdm(loader, desc=f"{dc.name} images", leave=False, dynamic_ncols=True)
    image_emb = torch.cat([torch.as_tensor(predictor.embed(b.images)) for b in batches])
    if not (dc.prompt_path and dc.label_names):
        return image_emb, None, None
    pos, neg = predictor.label_embeddings(dc.prompts(), dc.label_names)
    emb = image_emb.numpy()
    return image_emb, label_logits(emb, pos, neg, predictor.scale), emb @ np.asarray(pos).T


def routed_scores(routed: RoutedPredictor, dc: DataConfig, records: Sequence[LabeledRecord], spec):
    """A routed model's: each label's logits from its member (its own preprocessing and prompts), the image
    embeddings (for retrieval) from the default member."""
    missing = [n for n in dc.label_names if n not in routed.routes]
    if missing:
        raise CheckpointError(f"the routed model answers no member for labels {missing} of {dc.name}")
    image_emb = logits = sims = None
    for name, member in routed.members.items():
        mine = tuple(n for n in dc.label_names if routed.routes[n] == name)
        if not mine and name != routed.default:
            continue
        emb, member_logits, member_sims = zero_shot_scores(member, replace(dc, label_names=mine), records, spec)
        if name == routed.default:
            image_emb = emb
        if member_logits is None:
            continue
        if logits is None:
            logits = np.zeros((len(records), len(dc.label_names)))
            sims = np.zeros((len(records), len(dc.label_names)), dtype=np.float32)
        cols = [dc.label_names.index(n) for n in mine]
        logits[:, cols], sims[:, cols] = member_logits, member_sims
    return image_emb, logits, sims


def evaluation_predictor(path: Path, spec: RunSpec, device: torch.device, data: Sequence[DataConfig] = ()):
    """The predictor of a checkpoint, a bundle or a routed model, as evaluation needs it: a number in
    ``base.image_size`` resizes a checkpoint's images; ``test.text_encoder`` / ``test.image_encoder`` override
    a checkpoint's towers (offline copies)."""
    kind = predictor_kind(path)
    if kind == "routed" and spec.image_size is not None:
        raise ConfigError(
            "a routed model is evaluated with each member's own preprocessing: leave base.image_size null"
        )
    options = PredictorOptions(str(path), device=str(device), precision=spec.test.precision,
                               text_encoder=spec.test.text_encoder)  # fmt: skip
    if kind != "checkpoint":  # a bundle answers with the prompts it was exported with, a routed model per member
        return open_predictor(replace(options, device=None) if kind == "bundle" else options)
    labelled = next((dc for dc in data if dc.prompt_path and dc.label_names), None)
    return open_predictor(
        options,
        prompts=str(labelled.prompts_file) if labelled else None,
        labels=list(labelled.label_names) if labelled else None,
        image_size=spec.image_size,
        image_encoder=spec.test.image_encoder,
    )


def evaluate_one(predictor, dc: DataConfig, records: Sequence[LabeledRecord], spec: RunSpec) -> tuple[dict, dict]:
    """Metrics of one checkpoint (or bundle, or routed model) on one dataset, plus the arrays the plots need."""
    if isinstance(predictor, RoutedPredictor):
        image_emb, logits, sims = routed_scores(predictor, dc, records, spec)
        stored = {"calibration": predictor.calibration.to_dict()}
    else:
        image_emb, logits, sims = zero_shot_scores(predictor, dc, records, spec)
        stored = predictor.stored
    labels = np.array([r.labels for r in records], dtype=np.int64)
    results: dict = {"n_images": len(records)}
    arrays: dict = {"labels": labels}
    if logits is not None:
        results["zeroshot_binary"], calibration = label_metrics(logits, labels, dc, stored, spec.test)
        multi = multiclass_metrics(sims, labels, dc.label_names)
        if multi is not None:
            results["zeroshot_multiclass"] = multi
        arrays.update(probs=calibration.probabilities(logits), raw_probs=sigmoid(logits))
    gate = gate_report(stored.get("gate"), image_emb)
    if gate is not None:
        results["input_gate"] = gate
    if all(r.text for r in records):  # image-text sets; classification sets have no texts to retrieve
        texts, gt = merge_texts([r.text for r in records])
        base = predictor.members[predictor.default] if isinstance(predictor, RoutedPredictor) else predictor
        text_emb = torch.from_numpy(base.embed_texts(texts, max_length=dc.text_max_length))
        results.update(retrieval_metrics(image_emb, text_emb, gt))
        results["n_texts_unique"] = len(texts)
    return results, arrays


def gate_report(stored: Mapping | None, image_emb: torch.Tensor) -> dict | None:
    """How many test images the model's input gate (image stage) would refuse at inference, and as what. The
    metrics above include them: a test set of frontal films should have (almost) none."""
    gate = stored_gate(stored, int(image_emb.shape[1]), where="the evaluated model").image_gate
    if gate is None:
        return None
    if gate.pixel_side:
        return {"note": "this gate also reads the pixels, which evaluation does not keep: its refusals are not "
                "counted here (inference, serve and the PACS worker apply it)"}  # fmt: skip
    scores, kinds = gate.scores(image_emb.float().numpy())
    refused = scores > gate.threshold
    by_kind: dict[str, int] = {}
    for kind in np.asarray(kinds)[refused]:
        by_kind[str(kind)] = by_kind.get(str(kind), 0) + 1
    return {
        "refused": int(refused.sum()),
        "of": len(scores),
        "by_kind": by_kind,
        "note": "the image stage only (no DICOM attributes here); the metrics include these images",
    }


def label_metrics(
    logits: np.ndarray, labels: np.ndarray, dc: DataConfig, checkpoint: dict, test: EvalSpec
) -> tuple[dict, Calibration]:
    """Per-label metrics at the checkpoint's stored operating points (or flagged fixed ones), and where
    those operating points came from."""
    calibration = stored_calibration(checkpoint, dc.label_names)
    binary = binary_metrics(logits, labels, dc.label_names, calibration, ci=test.auroc_ci)
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


@dataclass
class EvaluationRun:
    """What every evaluation job starts from: the typed spec, the checkpoints, the test datasets (validated and
    read up front, so a bad CSV fails before any model loads), the device and the output folder."""

    spec: RunSpec
    checkpoints: list[Path]
    datasets: list[tuple[DataConfig, list[LabeledRecord]]]
    device: torch.device
    out_dir: Path

    @classmethod
    def create(cls, cfg: DictConfig | RunSpec, need_text) -> EvaluationRun:
        """``need_text(dc)``: whether a dataset's rows must carry a text."""
        spec = cfg if isinstance(cfg, RunSpec) else RunSpec.from_config(cfg)
        torch.manual_seed(spec.test.seed)
        ckpts = checkpoint_paths(spec.test.checkpoint)
        datasets = [(dc, load_labeled_records(dc, need_text=need_text(dc))) for dc in spec.data.get("data_test", ())]
        return cls(spec, ckpts, datasets, default_device(), spec.test.output_dir or ckpts[0].parent)

    def write(self, everything: dict[str, dict[str, dict]], **table) -> None:
        """``results-<dataset>.json`` (merged with earlier runs) and ``.md`` for each dataset."""
        for name, results in everything.items():
            path = report.write_json_merged(self.out_dir / f"results-{name}.json", results)
            report.atomic_write_text(self.out_dir / f"results-{name}.md", report.markdown_table(name, results, **table))
            log.info("wrote %s", path)


def evaluate(cfg: DictConfig | RunSpec) -> dict[str, dict[str, dict]]:
    """Evaluate every checkpoint on every ``data_test`` dataset; write JSON, markdown and plots."""
    job = EvaluationRun.create(cfg, lambda dc: dc.data_type == "imagetext_eval")
    everything: dict[str, dict[str, dict]] = {dc.name: {} for dc, _ in job.datasets}
    for ckpt in job.checkpoints:
        model = evaluation_predictor(ckpt, job.spec, job.device, [dc for dc, _ in job.datasets])
        for dc, records in job.datasets:
            results, arrays = evaluate_one(model, dc, records, job.spec)
            everything[dc.name][str(ckpt)] = results
            _plots(job.out_dir, dc, ckpt, results, arrays)
            summary = results.get("zeroshot_binary", {}).get("AUROC(Avg)")
            recall = results.get("retrieval_i2t", {}).get("Recall@5")
            log.info(
                "%s on %s: AUROC(Avg) %s, i2t Recall@5 %s",
                ckpt.name,
                dc.name,
                "–" if summary is None else f"{summary:.3f}",
                "–" if recall is None else f"{recall:.3f}",
            )
    job.write(everything)
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
