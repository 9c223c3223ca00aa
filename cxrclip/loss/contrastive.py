"""CLIP and CXR-CLIP losses (CXR-CLIP paper §2).

The global loss is computed on every rank from embeddings gathered with gradient; with DDP's
gradient averaging this reproduces single-process training at the global batch size exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cxrclip.data.batch import Batch
from cxrclip.exceptions import ConfigError
from cxrclip.loss.distributed import gather_with_grad
from cxrclip.loss.targets import contrastive_targets


def symmetric_ce(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, label_smoothing: float, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the a→b and b→a cross-entropies of the scaled similarity: row i matches column i, or the
    symmetric-support distribution ``targets[i]`` (label-aware targets)."""
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device) if targets is None else targets.to(logits.dtype)
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)
    )


class ClipLoss(nn.Module):
    """Image↔text InfoNCE on (image_embeddings, text_embeddings)."""

    def __init__(self, label_smoothing: float = 0.0, loss_ratio: float = 1.0):
        super().__init__()
        self.label_smoothing, self.loss_ratio = label_smoothing, loss_ratio

    def forward(self, out: Mapping[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        img = gather_with_grad(out["image_embeddings"])
        txt = gather_with_grad(out["text_embeddings"])
        clip = symmetric_ce(img, txt, out["logit_scale"], self.label_smoothing)
        return {"loss": self.loss_ratio * clip, "clip": clip.detach()}


class CXRClipLoss(nn.Module):
    """CLIP over the four pairs (image, image view) × (text, text2), averaged,
    + ``i2i_weight``·ICL(image, image view) + ``t2t_weight``·TCL(text, text2)."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        i2i_weight: float = 1.0,
        t2t_weight: float = 0.5,
        loss_ratio: float = 1.0,
        targets: str = "diagonal",
    ):
        super().__init__()
        self.label_smoothing, self.i2i_weight, self.t2t_weight = label_smoothing, i2i_weight, t2t_weight
        self.loss_ratio, self.targets = loss_ratio, targets
        contrastive_targets(targets, None, 0, "cpu")  # validates the name

    def forward(self, out: Mapping[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        scale, ls = out["logit_scale"], self.label_smoothing
        images = [gather_with_grad(out["image_embeddings"]), gather_with_grad(out["image_view_embeddings"])]
        texts = [gather_with_grad(out["text_embeddings"]), gather_with_grad(out["text_embeddings2"])]
        labels = batch.labels if batch is not None and self.targets != "diagonal" else None
        target = None
        if labels is not None:
            known = batch.has_label_set
            target = contrastive_targets(
                self.targets,
                gather_with_grad(labels.float()),
                images[0].shape[0],
                images[0].device,
                known=gather_with_grad(known.float()).bool(),
            )
        clip = sum(symmetric_ce(i, t, scale, ls, target) for i in images for t in texts) / 4
        icl = symmetric_ce(images[0], images[1], scale, ls, target)
        tcl = symmetric_ce(texts[0], texts[1], scale, ls, target)
        total = clip + self.i2i_weight * icl + self.t2t_weight * tcl
        return {"loss": self.loss_ratio * total, "clip": clip.detach(), "icl": icl.detach(), "tcl": tcl.detach()}


def build_loss(cfg: Mapping) -> nn.Module:
    """From the ``loss`` config section: one key naming the loss (``cxr_clip`` or ``clip``) with its options."""
    if len(cfg) != 1:
        raise ConfigError(f"loss config must name exactly one loss, got {list(cfg)}")
    ((name, options),) = cfg.items()
    losses = {"cxr_clip": CXRClipLoss, "clip": ClipLoss}
    if name not in losses:
        raise ConfigError(f"unknown loss {name!r}; use one of {sorted(losses)}")
    return losses[name](**dict(options or {}))
