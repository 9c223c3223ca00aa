"""A linear classifier on a pre-trained image encoder (linear probe, or full fine-tuning)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrclip.data.batch import Batch
from cxrclip.data.transforms import spec_transform
from cxrclip.exceptions import ConfigError
from cxrclip.model.checkpoint import CheckpointError, load_checkpoint
from cxrclip.model.loading import load_image_encoder, stored_preprocess


class LinearProbe(nn.Module):
    """``image_encoder`` (pooled features) → ``classifier`` (one logit per label). A frozen encoder gets no
    gradient and stays in eval mode (its BatchNorm statistics never move)."""

    def __init__(self, image_encoder: nn.Module, n_class: int, freeze: bool = True):
        super().__init__()
        self.image_encoder = image_encoder
        self.classifier = nn.Linear(image_encoder.out_dim, n_class)
        self.freeze = freeze
        if freeze:
            self.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if self.freeze:
            self.image_encoder.eval()
        return self

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            features = self.image_encoder(batch.images)
        return {"logits": self.classifier(features.float())}


class MaskedBCELoss(nn.Module):
    """Binary cross-entropy per label; unknown entries (``label_mask`` False: uncertain, excluded) are left out."""

    def __init__(self, loss_ratio: float = 1.0, loss_type: str = "bce"):
        super().__init__()
        if loss_type != "bce":
            raise ConfigError("loss.classification.loss_type must be bce")
        self.loss_ratio = loss_ratio

    def forward(self, out: Mapping[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        logits, labels = out["logits"].float(), batch.labels.float()
        mask = batch.label_mask.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, weight=mask, reduction="sum")
        loss = loss / mask.sum().clamp(min=1)
        return {"loss": self.loss_ratio * loss, "bce": loss.detach()}


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
    return spec_transform(stored_preprocess(ckpt, ckpt["probe"]["image_encoder"]["normalize"], ("valid",)))
