"""Single-image (or folder / CSV) inference: rank candidate texts, and say yes/no per label."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrclip.data.images import read_image
from cxrclip.data.prompts import load_prompts
from cxrclip.eval.calibrate import stored_calibration
from cxrclip.eval.calibration import Calibration, sigmoid
from cxrclip.eval.zeroshot import LabelScorer
from cxrclip.model.checkpoint import plain_config
from cxrclip.model.loading import LoadedModel, default_device, load_model
from cxrclip.paths import resolve_user_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")
DEFAULT_PROMPTS = "datasets/train_prompts_cgmh.json"


def _training_data_config(checkpoint: dict) -> dict:
    config = plain_config(checkpoint.get("config"))
    for group in ("data_train", "data_valid", "data_test"):
        for dc in (config.get(group) or {}).values():
            if isinstance(dc, dict) and dc.get("label_names"):
                return dc
    return {}


@dataclass
class Predictor:
    """A loaded model with its candidate and per-label embeddings computed once (warm calls reuse them),
    and the checkpoint's calibration (per-label probability map and operating point)."""

    loaded: LoadedModel
    candidates: list[str]
    candidate_emb: torch.Tensor
    scorer: LabelScorer
    calibration: Calibration
    transform: object
    device: torch.device

    @property
    def label_names(self) -> list[str]:
        return self.scorer.names

    @classmethod
    def create(
        cls,
        model_path: str,
        *,
        prompts: str | None = None,
        texts: str | None = None,
        labels: Sequence[str] | None = None,
        device: str | None = None,
        image_size: int | None = None,
        text_encoder: str | None = None,
    ) -> Predictor:
        from cxrclip.eval.zeroshot import embed_texts

        dev = default_device(device)
        loaded = load_model(model_path, device=dev, text_encoder=text_encoder)
        data_cfg = _training_data_config(loaded.checkpoint)
        bank = load_prompts(resolve_user_path(prompts or data_cfg.get("prompt_path") or DEFAULT_PROMPTS))
        names = list(labels or data_cfg.get("label_names") or bank.labels)
        bank.check_covers(names)
        scorer = LabelScorer.create(loaded.model, loaded.tokenizer, bank, names, dev)
        if texts:
            candidates = read_texts(texts)
            candidate_emb = embed_texts(loaded.model, loaded.tokenizer, candidates, dev)
        else:  # one candidate per label: its positive sentences' mean embedding
            candidates, candidate_emb = names, scorer.pos_emb
        calibration = stored_calibration(loaded.checkpoint, names)
        return cls(loaded, candidates, candidate_emb, scorer, calibration, loaded.preprocess(image_size), dev)

    def operating_points(self, threshold: float | Mapping[str, float] | None) -> tuple[np.ndarray, list[str]]:
        """Per label (threshold, rule): the calibration's, unless ``--threshold`` / ``--thresholds`` override."""
        stored = self.calibration.labels
        if threshold is None:
            return self.calibration.thresholds, [stored[n].rule for n in self.label_names]
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(self.label_names))
            if unknown:
                raise ValueError(f"thresholds for unknown labels {unknown}; labels: {self.label_names}")
            values = [float(threshold.get(n, stored[n].threshold)) for n in self.label_names]
            rules = ["given" if n in threshold else stored[n].rule for n in self.label_names]
            return np.array(values), rules
        return np.full(len(self.label_names), float(threshold)), [f"fixed={float(threshold):g}"] * len(self.label_names)

    @torch.no_grad()
    def predict(self, images: Sequence[str | Path], threshold: float | Mapping[str, float] | None = None) -> list[dict]:
        """Per image: every candidate ranked (similarity, softmax probability); per label the calibrated
        probability, its threshold and rule, and the decision."""
        model = self.loaded.model
        batch = torch.stack([self.transform(read_image(p)) for p in images]).to(self.device)
        emb = model.encode_image(batch).float().cpu()
        sims = emb @ self.candidate_emb.t()
        probs = (sims * self.scorer.scale).softmax(dim=-1)
        logits = self.scorer.logits(emb)
        yes, raw = self.calibration.probabilities(logits), sigmoid(logits)
        limits, rules = self.operating_points(threshold)
        results = []
        for i, path in enumerate(images):
            order = sims[i].argsort(descending=True).tolist()
            ranking = [
                {
                    "text": self.candidates[j],
                    "similarity": round(float(sims[i, j]), 4),
                    "probability": round(float(probs[i, j]), 4),
                }
                for j in order
            ]
            labels = {
                n: {
                    "probability": round(float(yes[i, j]), 4),
                    "threshold": round(float(limits[j]), 4),
                    "rule": rules[j],
                    "present": bool(yes[i, j] >= limits[j]),
                    "calibrated": self.calibration.labels[n].calibrated,
                    "uncalibrated_probability": round(float(raw[i, j]), 4),
                }
                for j, n in enumerate(self.label_names)
            }
            results.append({"image": str(path), "ranking": ranking, "labels": labels})
        return results


def read_texts(path: str) -> list[str]:
    """Candidate texts: a JSON list (``texts.json``) or one text per line."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return [t for t in data if t.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_images(image_path: str) -> list[Path]:
    """One image, every image in a folder, or the ``image`` column of a CSV (first path of list cells)."""
    from cxrclip.data.records import parse_list_cell

    p = Path(image_path)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
        return found
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "image" not in rows[0]:
            raise ValueError(f"{p}: needs an 'image' column")
        return [(p.parent / parse_list_cell(r["image"])[0]) for r in rows]
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    return [p]


def format_table(result: dict, top: int) -> str:
    lines = [f"image: {result['image']}", "", f"{'rank':>4}  {'prob':>6}  {'sim':>7}  candidate"]
    for k, r in enumerate(result["ranking"][:top], 1):
        lines.append(f"{k:>4}  {r['probability']:6.3f}  {r['similarity']:7.4f}  {r['text']}")
    width = max(len(n) for n in result["labels"])
    lines += ["", f"{'label':<{width}}  P(yes)  threshold  {'rule':<16}  finding"]
    flagged = False
    for name, v in result["labels"].items():
        mark = "" if v.get("calibrated", True) else "  (uncalibrated)"
        flagged |= bool(mark)
        decision = "YES" if v["present"] else "no"
        p, t = v["probability"], v["threshold"]
        lines.append(f"{name:<{width}}  {p:6.3f}  {t:9.3f}  {v['rule']:<16}  {decision}{mark}")
    n_yes = sum(v["present"] for v in result["labels"].values())
    lines += ["", f"{n_yes} of {len(result['labels'])} labels called YES."]
    if flagged:
        lines.append("(uncalibrated: the probability is the model's raw score and the threshold a fixed default.)")
    return "\n".join(lines)


CSV_FIELDS = (("", "probability"), (":threshold", "threshold"), (":rule", "rule"), (":present", "present"))


def to_csv(results: Sequence[dict]) -> str:
    """One row per image: the top candidate, then per label its probability, threshold, rule and decision."""
    names = list(results[0]["labels"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    per_label = [f"{n}{suffix}" for n in names for suffix, _ in CSV_FIELDS]
    writer.writerow(["image", "top_candidate", "top_probability", *per_label, "findings"])
    for r in results:
        cells = [r["labels"][n][key] for n in names for _, key in CSV_FIELDS]
        cells = ["YES" if c is True else "no" if c is False else c for c in cells]
        findings = "; ".join(n for n in names if r["labels"][n]["present"])
        writer.writerow([r["image"], r["ranking"][0]["text"], r["ranking"][0]["probability"], *cells, findings])
    return out.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank candidate texts for chest X-rays with a CXR-CLIP checkpoint.")
    p.add_argument("--model_path", "--model-path", required=True, help="a model-best.tar / published .tar")
    p.add_argument("--image_path", "--image-path", required=True, help="an image (JPEG/PNG/DICOM), a folder or a CSV")
    p.add_argument("--texts", help="candidate texts: a JSON list or one per line (default: one per label)")
    p.add_argument("--prompts", help="prompt file (default: the one the checkpoint was trained with)")
    p.add_argument(
        "--threshold", type=float, help="one P(yes) threshold for every label (default: the stored operating points)"
    )
    p.add_argument("--thresholds", help="per-label thresholds: a JSON file {label: threshold} (overrides the stored)")
    p.add_argument("--top", type=int, default=20, help="candidates shown in the table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--output", help="CSV file for folder/CSV input (default: predictions.csv next to the input)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--text_encoder", "--text-encoder", help="local folder of the text encoder (offline)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    from cxrclip.errors import exit_on_user_error

    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        images = list_images(args.image_path)
        predictor = Predictor.create(
            args.model_path, prompts=args.prompts, texts=args.texts, device=args.device, text_encoder=args.text_encoder
        )
        threshold = json.loads(Path(args.thresholds).read_text()) if args.thresholds else args.threshold
        results = []
        for start in range(0, len(images), args.batch_size):
            results += predictor.predict(images[start : start + args.batch_size], threshold)
        if len(images) == 1 and not args.output:
            print(json.dumps(results[0], indent=2) if args.json else format_table(results[0], args.top))
            return 0
        if args.json:
            print(json.dumps(results, indent=2))
        target = Path(args.output) if args.output else Path(args.image_path).with_suffix("") / "predictions.csv"
        if not args.output and not Path(args.image_path).is_dir():
            target = Path(args.image_path).parent / "predictions.csv"
        from cxrclip.io import atomic_write_text

        atomic_write_text(target, to_csv(results))
        print(f"wrote {len(results)} predictions to {target}", file=sys.stderr)
    return 0
