"""Single-image (or folder / CSV) inference: rank candidate texts, and say yes/no per label."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrclip.data.images import read_image
from cxrclip.data.prompts import load_prompts
from cxrclip.data.transforms import build_transform
from cxrclip.model.checkpoint import plain_config
from cxrclip.model.loading import LoadedModel, load_model
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
    """A loaded model with its candidate and per-label embeddings computed once (warm calls reuse them)."""

    loaded: LoadedModel
    candidates: list[str]
    candidate_emb: torch.Tensor
    label_names: list[str]
    pos_emb: torch.Tensor
    neg_emb: torch.Tensor
    transform: object
    device: torch.device

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
        from cxrclip.eval.zeroshot import class_embeddings, embed_texts, label_prompts

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_model(model_path, device=dev, text_encoder=text_encoder)
        data_cfg = _training_data_config(loaded.checkpoint)
        bank = load_prompts(resolve_user_path(prompts or data_cfg.get("prompt_path") or DEFAULT_PROMPTS))
        names = list(labels or data_cfg.get("label_names") or bank.labels)
        bank.check_covers(names)
        pos, neg = label_prompts(bank, names)
        model = loaded.model
        pos_emb = class_embeddings(model, loaded.tokenizer, pos, dev)
        neg_emb = class_embeddings(model, loaded.tokenizer, neg, dev)
        if texts:
            candidates = read_texts(texts)
            candidate_emb = embed_texts(model, loaded.tokenizer, candidates, dev)
        else:  # one candidate per label: its positive sentences' mean embedding
            candidates, candidate_emb = names, pos_emb
        size = image_size or int(plain_config(loaded.checkpoint.get("config")).get("base", {}).get("image_size", 224))
        steps = {"Resize": {"size": size}, "CenterCrop": {"size": size}}
        return cls(
            loaded, candidates, candidate_emb, names, pos_emb, neg_emb, build_transform(steps, loaded.normalize), dev
        )

    @torch.no_grad()
    def predict(self, images: Sequence[str | Path], threshold: float | dict[str, float] = 0.5) -> list[dict]:
        """Per image: every candidate ranked (similarity, softmax probability); per label P(yes) and yes/no."""
        model = self.loaded.model
        batch = torch.stack([self.transform(read_image(p)) for p in images]).to(self.device)
        emb = model.encode_image(batch).float().cpu()
        scale = float(model.scale.detach())
        sims = emb @ self.candidate_emb.t()
        probs = (sims * scale).softmax(dim=-1)
        pos, neg = emb @ self.pos_emb.t(), emb @ self.neg_emb.t()
        yes = torch.stack([pos, neg], -1).mul(scale).softmax(-1)[..., 0]
        limits = threshold if isinstance(threshold, dict) else {}
        limits = {n: float(limits.get(n, 0.5 if limits else threshold)) for n in self.label_names}
        results = []
        for i, path in enumerate(images):
            order = sims[i].argsort(descending=True).tolist()
            results.append(
                {
                    "image": str(path),
                    "ranking": [
                        {
                            "text": self.candidates[j],
                            "similarity": round(float(sims[i, j]), 4),
                            "probability": round(float(probs[i, j]), 4),
                        }
                        for j in order
                    ],
                    "labels": {
                        n: {"probability": round(float(yes[i, j]), 4), "present": bool(yes[i, j] >= limits[n])}
                        for j, n in enumerate(self.label_names)
                    },
                }
            )
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
    lines += ["", f"{'label':<{width}}  P(yes)  finding"]
    for name, v in result["labels"].items():
        lines.append(f"{name:<{width}}  {v['probability']:6.3f}  {'YES' if v['present'] else 'no'}")
    return "\n".join(lines)


def to_csv(results: Sequence[dict]) -> str:
    names = list(results[0]["labels"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "top_candidate", "top_probability", *names, "findings"])
    for r in results:
        writer.writerow(
            [
                r["image"],
                r["ranking"][0]["text"],
                r["ranking"][0]["probability"],
                *(r["labels"][n]["probability"] for n in names),
                "; ".join(n for n in names if r["labels"][n]["present"]),
            ]
        )
    return out.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank candidate texts for chest X-rays with a CXR-CLIP checkpoint.")
    p.add_argument("--model_path", "--model-path", required=True, help="a model-best.tar / published .tar")
    p.add_argument("--image_path", "--image-path", required=True, help="an image (JPEG/PNG/DICOM), a folder or a CSV")
    p.add_argument("--texts", help="candidate texts: a JSON list or one per line (default: one per label)")
    p.add_argument("--prompts", help="prompt file (default: the one the checkpoint was trained with)")
    p.add_argument("--threshold", type=float, default=0.5, help="P(yes) at or above which a label is reported")
    p.add_argument("--thresholds", help="per-label thresholds: a *.thresholds-<dataset>.json from evaluate_clip.py")
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
