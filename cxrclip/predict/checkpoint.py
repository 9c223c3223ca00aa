"""A checkpoint as a predictor: its model, prompt embeddings (computed once), preprocessing, calibration and gate.
torch, timm and transformers are imported when a checkpoint is loaded, not when this module is: the bundle
predictor's path never imports them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrclip.hardware import resolve_precision
from cxrclip.predict.base import PredictorBase, label_bank, read_texts
from cxrclip.predict.gate import stored_gate
from cxrclip.scoring.calibration import stored_calibration

if TYPE_CHECKING:
    from cxrclip.model.loading import LoadedModel


class Predictor(PredictorBase):
    """A loaded checkpoint with its candidate and per-label embeddings computed once (warm calls reuse them),
    and the checkpoint's calibration (per-label probability map and operating point)."""

    def __init__(
        self, loaded: LoadedModel, names, candidates, candidate_emb, scorer, calibration, preprocess, device, gate=True,
        precision: str = "fp32",
    ):  # fmt: skip
        self.loaded, self.device, self.calibration = loaded, device, calibration
        self.precision = precision
        from cxrclip.data.transforms import spec_transform  # torch

        self.preprocess, self.transform = preprocess, spec_transform(preprocess)
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
        image_encoder: str | None = None,
        gate: bool = True,
        precision: str = "auto",
    ) -> PredictorBase:
        """A predictor for a checkpoint (:func:`cxrclip.predict.load_predictor` takes bundles and routed models too).
        ``gate=False`` (``--no-gate``): the input gate's verdicts are recorded but do not hide the labels.
        ``precision``: the image encoder's (auto = fp32; bf16 is opt-in, cxrclip/hardware.py; prompts, scores,
        calibration and gate stay fp32, :mod:`cxrclip.model.speed`); its image encoder is NHWC when convolutional."""
        from cxrclip.model.embed import LabelScorer, embed_texts  # torch: loaded with the checkpoint
        from cxrclip.model.loading import default_device, load_model

        dev = default_device(device)
        loaded = load_model(model_path, device=dev, text_encoder=text_encoder, image_encoder=image_encoder)
        bank, names = label_bank(prompts, labels, loaded.config)
        scorer = LabelScorer.create(loaded.model, loaded.tokenizer, bank, names, dev)
        if texts:
            candidates = read_texts(texts)
            candidate_emb = embed_texts(loaded.model, loaded.tokenizer, candidates, dev)
        else:  # one candidate per label: its positive sentences' mean embedding
            candidates, candidate_emb = names, scorer.pos_emb
        calibration = stored_calibration(loaded.checkpoint, names)
        precision = resolve_precision(precision, dev, calibrated=calibration.precision)  # auto: as it was calibrated
        preprocess = loaded.preprocess_spec(image_size)
        predictor = cls(loaded, names, candidates, candidate_emb, scorer, calibration, preprocess, dev, gate, precision)
        predictor.source = Path(model_path)
        return predictor

    @property
    def stored(self) -> dict:
        """What the checkpoint stores beside the weights (its calibration, its gate)."""
        return self.loaded.checkpoint

    def cam_model(self):
        return self.loaded.model, self.device

    def label_embeddings(self, bank, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from cxrclip.model.embed import LabelScorer

        scorer = LabelScorer.create(self.loaded.model, self.loaded.tokenizer, bank, list(names), self.device)
        return scorer.pos_emb.float().numpy(), scorer.neg_emb.float().numpy()

    def embed_texts(self, texts: Sequence[str], max_length: int = 256) -> np.ndarray:
        from cxrclip.model.embed import embed_texts

        return embed_texts(
            self.loaded.model, self.loaded.tokenizer, list(texts), self.device, max_length=max_length
        ).numpy()

    def embed(self, tensors) -> np.ndarray:
        """L2-normalized image embeddings (float32, on the CPU) of preprocessed images (a list or a batch tensor)."""
        import torch

        from cxrclip.model.speed import autocast

        with torch.no_grad(), autocast(self.precision, self.device):
            batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack([torch.as_tensor(t) for t in tensors])
            return self.loaded.model.encode_image(batch.to(self.device)).float().cpu().numpy()
