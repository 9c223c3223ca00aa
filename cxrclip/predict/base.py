"""What every predictor does once it has image embeddings — gate, rank, score, calibrate, decide — and the helpers
the predictors share (the label bank, candidate texts). No torch here: the bundle predictor builds on it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cxrclip.data.images import read_image
from cxrclip.data.preprocess import PreprocessSpec
from cxrclip.data.prompts import DEFAULT_PROMPTS, load_prompts
from cxrclip.exceptions import InputError
from cxrclip.io import file_sha256
from cxrclip.paths import resolve_user_path
from cxrclip.predict.answer import Answer, GateVerdict, LabelAnswer, RankedText
from cxrclip.predict.card import model_card
from cxrclip.predict.gate import InputGate, Precheck, precheck
from cxrclip.predict.gradcam import display_image, grad_cam
from cxrclip.scoring.calibration import Calibration, sigmoid, site_calibrations
from cxrclip.scoring.zeroshot import label_logits, softmax


def _training_data_config(config: Mapping) -> dict:
    for group in ("data_train", "data_valid", "data_test"):
        for dc in (config.get(group) or {}).values():
            if isinstance(dc, dict) and dc.get("label_names"):
                return dc
    return {}


def with_reading_warnings(results: list[Answer], facts) -> list[Answer]:
    """Each answer carries what reading its file had to work around (a malformed LUT, a multi-frame file, ...)."""
    for result, found in zip(results, facts or ()):
        if found and found.get("warnings"):
            result.warnings = list(found["warnings"])
    return results


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
    gate: InputGate  # asked before any label is scored (cxrclip/predict/gate.py)
    encoders: dict  # {"image_encoder": name, "text_encoder": name}
    calibration_name: str = "default"  # or the site whose calibration answers (``use_site``)
    precision: str = "fp32"  # the image encoder's: fp32 or bf16 (cxrclip/model/speed.py)
    source: Path | None = None  # the checkpoint file it was opened from

    def identity(self) -> dict:
        """Its name and the SHA-256 that names the model in every answer (a bundle says more)."""
        if self.source is None:
            raise InputError("a predictor made without a source file has no identity; open it with open_predictor")
        return {"name": self.source.name, "checkpoint_sha256": file_sha256(self.source)}

    def card(self) -> dict:
        """What ``GET /v1/model`` and the DICOM SR say about this model (:func:`cxrclip.predict.card.model_card`)."""
        return model_card(self)

    def sites(self) -> list[str]:
        """The sites with a calibration of their own (``cxrclip calibrate --site NAME``)."""
        return sorted(site_calibrations(getattr(self, "stored", None)))

    def use_site(self, site: str) -> None:
        """Answer with the calibration and operating points fitted on ``site``'s reviewed cases instead of the
        model's own."""
        stored = site_calibrations(getattr(self, "stored", None))
        if site not in stored:
            have = ", ".join(sorted(stored)) or "none"
            raise InputError(
                f"--site {site}: this model has no calibration for that site (sites: {have}); fit one with "
                "`cxrclip calibrate --checkpoint CKPT --data REVIEWED.csv --site NAME`"
            )
        self.calibration = Calibration.from_dict(stored[site]).for_labels(self.label_names)
        self.calibration_name = site

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

    def predict(
        self, images: Sequence[str | Path], threshold: float | Mapping[str, float] | None = None
    ) -> list[Answer]:
        """Per image: the input gate's verdict; for an image it lets through, every candidate ranked (similarity,
        softmax probability) and per label the calibrated probability, its threshold and rule, and the decision.
        A refused image gets its reason and no probability."""
        arrays, facts = [], []
        for path in images:
            facts.append({})
            arrays.append(read_image(path, facts[-1]))
        return self.predict_arrays(images, arrays, facts, threshold)

    def predict_arrays(
        self, images: Sequence, arrays: Sequence[np.ndarray], facts=None, threshold=None
    ) -> list[Answer]:
        """:meth:`predict` on images already read (``images`` names them; ``facts``: what reading each found,
        for the gate's DICOM stage)."""
        if not len(arrays):
            return []
        thumbnail = self.gate.reads_pixels
        checks = [precheck(a, f, thumbnail) for a, f in zip(arrays, facts or [None] * len(arrays))]
        results = self.predict_embeddings(images, self.embed([self.transform(a) for a in arrays]), checks, threshold)
        return with_reading_warnings(results, facts)

    def logits(self, emb) -> np.ndarray:
        """Zero-shot label logits of image embeddings."""
        return label_logits(np.asarray(emb), self.pos_emb, self.neg_emb, self.scale)

    def predict_embeddings(self, images: Sequence, emb, checks: Sequence[Precheck], threshold=None) -> list[Answer]:
        """:meth:`predict` on image embeddings and their images' prechecks (:func:`~cxrclip.predict.gate.precheck`)."""
        emb = np.asarray(emb, dtype=np.float32)
        verdicts = self.gate.verdicts(emb, checks)
        sims = emb @ self.candidate_emb.T
        probs = softmax(sims * np.float32(self.scale))
        logits = self.logits(emb)
        yes, raw = self.calibration.probabilities(logits), sigmoid(logits)
        limits, rules = self.operating_points(threshold)
        results = []
        for i, (path, verdict) in enumerate(zip(images, verdicts)):
            gate = GateVerdict(**verdict.to_dict())
            if not verdict.analysed:  # no probability of any kind leaves for a refused input
                results.append(Answer(image=str(path), analysed=False, reason=verdict.reason, gate=gate))
                continue
            order = np.argsort(-sims[i], kind="stable")
            ranking = [
                RankedText(text=self.candidates[j], similarity=round(float(sims[i, j]), 4),
                           probability=round(float(probs[i, j]), 4))
                for j in order
            ]  # fmt: skip
            labels = {
                n: LabelAnswer(
                    probability=round(float(yes[i, j]), 4),
                    threshold=round(float(limits[j]), 4),
                    rule=rules[j],
                    present=bool(yes[i, j] >= limits[j]),
                    calibrated=self.calibration.labels[n].calibrated,
                    uncalibrated_probability=round(float(raw[i, j]), 4),
                )
                for j, n in enumerate(self.label_names)
            }
            results.append(Answer(image=str(path), analysed=True, gate=gate, ranking=ranking, labels=labels,
                                  calibration=self.calibration_name))  # fmt: skip
        return results

    def picture_of(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """The grayscale picture the model sees of an image read from a file (preprocessed, un-normalized); ``label``:
        the picture that label's heatmap is drawn on (the same here; a routed model's member may see another)."""
        return self.picture(self.transform(image))

    def heatmap_of(self, image: np.ndarray, label: str) -> np.ndarray:
        """The Grad-CAM map of an image read from a file, for one label."""
        return self.heatmap(self.transform(image), label)

    def saliency_of(self, image: np.ndarray, label: str) -> np.ndarray:
        """The Grad-CAM map of one label carried back onto the image's own pixel grid (H×W, in [0, 1]): what a DICOM
        Segmentation or an outline on the film is made of."""
        return self.preprocess.to_image(self.heatmap_of(image, label), *image.shape[:2])

    def texts_of(self, image: np.ndarray, texts: Sequence[str]) -> list[dict]:
        """Free-text queries against an image read from a file."""
        return self.texts_similarity(self.embed([self.transform(image)])[0], texts)

    def heatmap(self, tensor, label: str) -> np.ndarray:
        """The Grad-CAM map in [0, 1] of one preprocessed image for one label (the model from ``cam_model()``)."""
        import torch

        if label not in self.label_names:
            raise InputError(f"heatmap: unknown label {label!r}; labels: {self.label_names}")
        j = self.label_names.index(label)
        direction = torch.from_numpy(self.pos_emb[j] - self.neg_emb[j])
        model, device = self.cam_model()
        x = torch.as_tensor(np.asarray(tensor, dtype=np.float32))[None].to(device)
        return grad_cam(model, x, direction, self.scale)

    def texts_similarity(self, image_emb, texts: Sequence[str]) -> list[dict]:
        return self.similarities(image_emb, self.embed_texts(texts), texts)

    def picture(self, image) -> np.ndarray:
        """The grayscale picture the model saw (a preprocessed image, un-normalized)."""

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

    data_cfg = _training_data_config(config)
    bank = load_prompts(resolve_user_path(prompts or data_cfg.get("prompt_path") or DEFAULT_PROMPTS))
    names = list(labels or data_cfg.get("label_names") or bank.labels)
    bank.check_covers(names)
    return bank, names


def read_texts(path: str) -> list[str]:
    """Candidate texts: a JSON list (``texts.json``) or one text per line."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise InputError(f"{path}: expected a JSON list of strings")
        return [t for t in data if t.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]
