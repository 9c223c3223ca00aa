"""Single-image (or folder / CSV) inference: rank candidate texts, and say yes/no per label."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrclip.data.images import ImageReadError, read_image
from cxrclip.data.preprocess import PreprocessSpec
from cxrclip.eval.calibration import Calibration, sigmoid
from cxrclip.eval.scores import label_logits, softmax
from cxrclip.exceptions import InputError
from cxrclip.gate import InputGate, Precheck, precheck, stored_gate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")
DEFAULT_PROMPTS = "datasets/train_prompts_cgmh.json"

if TYPE_CHECKING:
    from cxrclip.model.loading import LoadedModel


def _training_data_config(config: Mapping) -> dict:
    for group in ("data_train", "data_valid", "data_test"):
        for dc in (config.get(group) or {}).values():
            if isinstance(dc, dict) and dc.get("label_names"):
                return dc
    return {}


class PredictorBase:
    """What every predictor does once it has embeddings: rank the candidates, score each label, apply the
    calibration and the operating points. Subclasses provide ``transform`` (image array → model input),
    ``embed`` (inputs → L2-normalized embeddings), ``heatmap``, ``texts_similarity`` and the fields below."""

    label_names: list[str]
    candidates: list[str]
    candidate_emb: np.ndarray  # candidates × dim, L2-normalized
    pos_emb: np.ndarray  # labels × dim: each label's positive-prompt embedding
    neg_emb: np.ndarray
    scale: float
    calibration: Calibration
    preprocess: PreprocessSpec  # the one preprocessing spec: size, steps, normalization (``transform`` runs it)
    gate: InputGate  # asked before any label is scored (cxrclip/gate.py)
    encoders: dict  # {"image_encoder": name, "text_encoder": name}

    def operating_points(self, threshold: float | Mapping[str, float] | None) -> tuple[np.ndarray, list[str]]:
        """Per label (threshold, rule): the calibration's, unless ``--threshold`` / ``--thresholds`` override."""
        stored = self.calibration.labels
        if threshold is None:
            return self.calibration.thresholds, [stored[n].rule for n in self.label_names]
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(self.label_names))
            if unknown:
                raise InputError(f"thresholds for unknown labels {unknown}; labels: {self.label_names}")
            values = [float(threshold.get(n, stored[n].threshold)) for n in self.label_names]
            rules = ["given" if n in threshold else stored[n].rule for n in self.label_names]
            return np.array(values), rules
        return np.full(len(self.label_names), float(threshold)), [f"fixed={float(threshold):g}"] * len(self.label_names)

    def predict(self, images: Sequence[str | Path], threshold: float | Mapping[str, float] | None = None) -> list[dict]:
        """Per image: the input gate's verdict; for an image it lets through, every candidate ranked (similarity,
        softmax probability) and per label the calibrated probability, its threshold and rule, and the decision.
        A refused image gets its reason and no probability."""
        arrays, facts = [], []
        for path in images:
            facts.append({})
            arrays.append(read_image(path, facts[-1]))
        return self.predict_arrays(images, arrays, facts, threshold)

    def predict_arrays(self, images: Sequence, arrays: Sequence[np.ndarray], facts=None, threshold=None) -> list[dict]:
        """:meth:`predict` on images already read (``images`` names them; ``facts``: what reading each found,
        for the gate's DICOM stage)."""
        if not len(arrays):
            return []
        checks = [precheck(a, f) for a, f in zip(arrays, facts or [None] * len(arrays))]
        return self.predict_embeddings(images, self.embed([self.transform(a) for a in arrays]), checks, threshold)

    def logits(self, emb) -> np.ndarray:
        """Zero-shot label logits of image embeddings."""
        return label_logits(np.asarray(emb), self.pos_emb, self.neg_emb, self.scale)

    def predict_embeddings(self, images: Sequence, emb, checks: Sequence[Precheck], threshold=None) -> list[dict]:
        """:meth:`predict` on image embeddings and the prechecks of their images (:func:`cxrclip.gate.precheck`)."""
        emb = np.asarray(emb, dtype=np.float32)
        verdicts = self.gate.verdicts(emb, checks)
        sims = emb @ self.candidate_emb.T
        probs = softmax(sims * np.float32(self.scale))
        logits = self.logits(emb)
        yes, raw = self.calibration.probabilities(logits), sigmoid(logits)
        limits, rules = self.operating_points(threshold)
        results = []
        for i, (path, verdict) in enumerate(zip(images, verdicts)):
            if not verdict.analysed:  # no probability of any kind leaves for a refused input
                refusal = {"analysed": False, "reason": verdict.reason, "gate": verdict.to_dict()}
                results.append({"image": str(path), **refusal})
                continue
            order = np.argsort(-sims[i], kind="stable")
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
            results.append(
                {"image": str(path), "analysed": True, "gate": verdict.to_dict(), "ranking": ranking, "labels": labels}
            )
        return results

    def picture_of(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """The grayscale picture the model sees of an image read from a file (preprocessed, un-normalized); ``label``:
        the picture that label's heatmap is drawn on (the same here; a routed model's member may see another)."""
        return self.picture(self.transform(image))

    def heatmap_of(self, image: np.ndarray, label: str) -> np.ndarray:
        """The Grad-CAM map of an image read from a file, for one label."""
        return self.heatmap(self.transform(image), label)

    def texts_of(self, image: np.ndarray, texts: Sequence[str]) -> list[dict]:
        """Free-text queries against an image read from a file."""
        return self.texts_similarity(self.embed([self.transform(image)])[0], texts)

    def picture(self, image) -> np.ndarray:
        """The grayscale picture the model saw (a preprocessed image, un-normalized)."""
        from cxrclip.explain import display_image

        return display_image(image, self.transform.mean, self.transform.std)

    def similarities(self, image_emb, text_emb, texts: Sequence[str]) -> list[dict]:
        """Free-text queries against one image's embedding: cosine similarity and the softmax over the queries."""
        sims = np.asarray(text_emb, dtype=np.float32) @ np.asarray(image_emb, dtype=np.float32).reshape(-1)
        probs = softmax(sims * np.float32(self.scale))
        return [
            {"text": t, "similarity": round(float(s), 4), "probability": round(float(p), 4)}
            for t, s, p in zip(texts, sims, probs)
        ]


def label_bank(prompts: str | None, labels: Sequence[str] | None, config: Mapping):
    """The prompt file (given, else the one the run trained with, else the CGMH default) and the label list."""
    from cxrclip.data.prompts import load_prompts
    from cxrclip.paths import resolve_user_path

    data_cfg = _training_data_config(config)
    bank = load_prompts(resolve_user_path(prompts or data_cfg.get("prompt_path") or DEFAULT_PROMPTS))
    names = list(labels or data_cfg.get("label_names") or bank.labels)
    bank.check_covers(names)
    return bank, names


class Predictor(PredictorBase):
    """A loaded checkpoint with its candidate and per-label embeddings computed once (warm calls reuse them),
    and the checkpoint's calibration (per-label probability map and operating point)."""

    def __init__(
        self, loaded: LoadedModel, names, candidates, candidate_emb, scorer, calibration, preprocess, device, gate=True
    ):
        self.loaded, self.device, self.calibration = loaded, device, calibration
        self.preprocess, self.transform = preprocess, preprocess.transform()
        self.label_names, self.candidates = list(names), list(candidates)
        self.candidate_emb = candidate_emb.float().numpy()
        self.pos_emb, self.neg_emb = scorer.pos_emb.float().numpy(), scorer.neg_emb.float().numpy()
        self.scale = float(scorer.scale)
        self.encoders = {k: loaded.model_config[k].get("name") for k in ("image_encoder", "text_encoder")}
        dim = self.pos_emb.shape[1]
        self.gate = stored_gate(loaded.checkpoint.get("gate"), dim, enforced=gate, where=str(loaded.path))

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
        gate: bool = True,
    ) -> PredictorBase:
        """A predictor for a checkpoint, or (when ``model_path`` is an exported bundle) a :class:`BundlePredictor`,
        or (a folder with ``routed.json``) a :class:`~cxrclip.routed.RoutedPredictor`.
        ``gate=False`` (``--no-gate``): the input gate's verdicts are recorded but do not hide the labels."""
        from cxrclip.bundle import BundlePredictor, is_bundle
        from cxrclip.routed import RoutedPredictor, is_routed

        if is_routed(model_path):
            if image_size or prompts or labels:
                raise InputError("a routed model keeps each member's own preprocessing, prompts and labels")
            return RoutedPredictor.create(model_path, device=device, text_encoder=text_encoder, gate=gate, texts=texts)

        if is_bundle(model_path):
            if image_size:
                raise InputError("a bundle keeps the preprocessing it was exported with; image_size cannot change")
            return BundlePredictor.create(
                model_path, prompts=prompts, texts=texts, labels=labels, device=device, gate=gate
            )
        from cxrclip.eval.calibrate import stored_calibration
        from cxrclip.eval.zeroshot import LabelScorer, embed_texts
        from cxrclip.model.loading import default_device, load_model

        dev = default_device(device)
        loaded = load_model(model_path, device=dev, text_encoder=text_encoder)
        bank, names = label_bank(prompts, labels, loaded.config)
        scorer = LabelScorer.create(loaded.model, loaded.tokenizer, bank, names, dev)
        if texts:
            candidates = read_texts(texts)
            candidate_emb = embed_texts(loaded.model, loaded.tokenizer, candidates, dev)
        else:  # one candidate per label: its positive sentences' mean embedding
            candidates, candidate_emb = names, scorer.pos_emb
        calibration = stored_calibration(loaded.checkpoint, names)
        preprocess = loaded.preprocess_spec(image_size)
        return cls(loaded, names, candidates, candidate_emb, scorer, calibration, preprocess, dev, gate)

    def heatmap(self, tensor, label: str) -> np.ndarray:
        """The Grad-CAM map in [0, 1] of one preprocessed image for one label."""
        import torch

        from cxrclip.explain import grad_cam

        if label not in self.label_names:
            raise InputError(f"heatmap: unknown label {label!r}; labels: {self.label_names}")
        j = self.label_names.index(label)
        direction = torch.from_numpy(self.pos_emb[j] - self.neg_emb[j])
        return grad_cam(self.loaded.model, torch.as_tensor(tensor)[None].to(self.device), direction, self.scale)

    def texts_similarity(self, image_emb, texts: Sequence[str]) -> list[dict]:
        from cxrclip.eval.zeroshot import embed_texts

        text_emb = embed_texts(self.loaded.model, self.loaded.tokenizer, list(texts), self.device)
        return self.similarities(image_emb, text_emb.numpy(), texts)

    def embed(self, tensors: Sequence) -> np.ndarray:
        """L2-normalized image embeddings (float32, on the CPU) of preprocessed images."""
        import torch

        with torch.no_grad():
            batch = torch.stack([torch.as_tensor(t) for t in tensors]).to(self.device)
            return self.loaded.model.encode_image(batch).float().cpu().numpy()


def read_texts(path: str) -> list[str]:
    """Candidate texts: a JSON list (``texts.json``) or one text per line."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise InputError(f"{path}: expected a JSON list of strings")
        return [t for t in data if t.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_images(image_path: str) -> list[Path]:
    """One image, every image in a folder, or the ``image`` column of a CSV (first path of list cells)."""

    p = Path(image_path)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
        return found
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    if p.suffix.lower() == ".csv":
        return _csv_images(p)
    return [p]


def _csv_images(p: Path) -> list[Path]:
    from cxrclip.data.cells import parse_list_cell
    from cxrclip.data.schema import csv_line

    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{p}: not a readable CSV ({e})") from e
    if not rows or "image" not in rows[0]:
        raise InputError(f"{p}: needs an 'image' column and at least one row")
    images = []
    for index, row in enumerate(rows):
        try:
            images.append(p.parent / parse_list_cell(row["image"] or "")[0])
        except (ValueError, SyntaxError, IndexError) as e:
            raise InputError(f"{p}:{csv_line(index)}: column 'image': no image path in {row['image']!r}") from e
    return images


def format_table(result: dict, top: int) -> str:
    gate = result.get("gate") or {}
    lines = [f"image: {result['image']}", ""]
    if not result.get("analysed", True):
        return "\n".join(
            lines
            + [
                f"NOT ANALYSED: {result['reason']}",
                "(this model answers frontal chest radiographs only: no label probability is shown for this input;",
                " --no-gate shows them anyway, recorded in the output)",
            ]
        )
    if gate.get("reason"):
        lines += [f"WARNING --no-gate: the input gate would refuse this image: {gate['reason']}", ""]
    lines.append(f"{'rank':>4}  {'prob':>6}  {'sim':>7}  candidate")
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
    if gate.get("stage") == "none":
        lines.append("(input gate: no image gate fitted for this model; `cxrclip fit-gate` fits one.)")
    return "\n".join(lines)


CSV_FIELDS = (("", "probability"), (":threshold", "threshold"), (":rule", "rule"), (":present", "present"))


def to_csv(results: Sequence[dict], failed: Sequence[tuple[Path, str]] = (), names: Sequence[str] = ()) -> str:
    """One row per image: whether the gate let it through (``analysed``, ``reason``, ``gate_score``), the top
    candidate, then per label its probability, threshold, rule and decision (blank for a refused image);
    images that could not be read keep their row, with the reason in ``error``."""
    names = next((list(r["labels"]) for r in results if "labels" in r), list(names))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    per_label = [f"{n}{suffix}" for n in names for suffix, _ in CSV_FIELDS]
    head = ["image", "analysed", "reason", "gate_score", "top_candidate", "top_probability"]
    writer.writerow([*head, *per_label, "findings", "error"])
    for r in results:
        gate = r.get("gate") or {}
        head = [r["image"], "yes" if r.get("analysed", True) else "no", gate.get("reason") or "", gate.get("score", "")]
        if "labels" not in r:
            writer.writerow([*head, "", "", *([""] * len(per_label)), "", ""])
            continue
        cells = [r["labels"][n][key] for n in names for _, key in CSV_FIELDS]
        cells = ["YES" if c is True else "no" if c is False else c for c in cells]
        findings = "; ".join(n for n in names if r["labels"][n]["present"])
        top = r["ranking"][0]
        writer.writerow([*head, top["text"], top["probability"], *cells, findings, ""])
    for path, error in failed:
        writer.writerow([str(path), "no", "", "", "", "", *([""] * len(per_label)), "", error])
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
    p.add_argument("--heatmap", metavar="DIR", help="write Grad-CAM overlays (PNG) of each image's YES labels here")
    p.add_argument("--heatmap-label", action="append", help="the label(s) to draw (default: those called YES)")
    p.add_argument(
        "--no-gate",
        action="store_true",
        help="show the labels even for an input the gate refuses (lateral, CT, not a radiograph); recorded in output",
    )
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


def predict_files(predictor: Predictor, images: Sequence[Path], threshold, batch_size: int):
    """Predictions for the readable images, and (path, error) for the others: one bad file never stops a batch."""
    results, failed = [], []
    for start in range(0, len(images), batch_size):
        ok, arrays, facts = [], [], []
        for path in images[start : start + batch_size]:
            found: dict = {}
            try:
                arrays.append(read_image(path, found))
            except ImageReadError as e:
                failed.append((path, str(e)))
                continue
            ok.append(path)
            facts.append(found)
        results += predictor.predict_arrays(ok, arrays, facts, threshold)
    return results, failed


def write_heatmaps(predictor: Predictor, results: Sequence[dict], folder: Path, labels: Sequence[str] | None) -> None:
    """``<image stem>.<label>.png`` overlays: the given labels, else each image's YES labels (else its top one);
    none for an image the gate refused."""
    import re

    from cxrclip.explain import write_overlay

    for result in results:
        if "labels" not in result:
            continue
        image = read_image(result["image"])
        chosen = labels or [n for n, v in result["labels"].items() if v["present"]]
        if not chosen:
            chosen = [max(result["labels"], key=lambda n: result["labels"][n]["probability"])]
        for label in chosen:
            cam = predictor.heatmap_of(image, label)
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            path = write_overlay(
                folder / f"{Path(result['image']).stem}.{slug}.png", predictor.picture_of(image, label), cam
            )
            print(f"heatmap: {path}", file=sys.stderr)


def read_thresholds(path: str | None, threshold: float | None):
    if not path:
        return threshold
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--thresholds {path}: cannot read a JSON object {{label: threshold}} ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise InputError(f"--thresholds {path}: expected a JSON object {{label: threshold}}")
    return data


def main(argv: list[str] | None = None) -> int:
    """``inference.py``: 0 = all predicted; 2 = a user error, nothing predicted; 1 = some images failed (the
    others are predicted and written; the failures are listed on stderr and in the CSV's ``error`` column)."""
    from cxrclip.exceptions import exit_on_user_error

    args = build_parser().parse_args(argv)
    with exit_on_user_error(debug=args.debug):
        images = list_images(args.image_path)
        threshold = read_thresholds(args.thresholds, args.threshold)
        single = len(images) == 1 and not args.output
        if single:
            read_image(images[0])  # a bad file fails here, in one line, before the model is loaded
        predictor = Predictor.create(
            args.model_path,
            prompts=args.prompts,
            texts=args.texts,
            device=args.device,
            text_encoder=args.text_encoder,
            gate=not args.no_gate,
        )
        results, failed = predict_files(predictor, images, threshold, args.batch_size)
        refused = [r for r in results if not r["analysed"]]
        if args.heatmap:
            write_heatmaps(predictor, results, Path(args.heatmap), args.heatmap_label)
        if single:
            print(json.dumps(results[0], indent=2) if args.json else format_table(results[0], args.top))
            return 0
        if args.json:
            print(json.dumps(results + [{"image": str(p), "error": e} for p, e in failed], indent=2))
        target = Path(args.output) if args.output else Path(args.image_path).with_suffix("") / "predictions.csv"
        if not args.output and not Path(args.image_path).is_dir():
            target = Path(args.image_path).parent / "predictions.csv"
        from cxrclip.io import atomic_write_text

        atomic_write_text(target, to_csv(results, failed, predictor.label_names))
        print(f"wrote {len(results)} predictions to {target}", file=sys.stderr)
        if refused:
            print(f"{len(refused)} image(s) not analysed by the input gate (reason in the CSV)", file=sys.stderr)
        for _, error in failed:
            print(f"error: {error}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} of {len(images)} images could not be read (listed above)", file=sys.stderr)
            return 1
    return 0
