"""The CLIP model: two encoders, two projection heads, a learnable temperature."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxrclip.data.batch import Batch
from cxrclip.exceptions import ConfigError
from cxrclip.model.encoders import build_image_encoder, build_text_encoder

MAX_LOGIT_SCALE = math.log(100.0)


class LinearProjectionHead(nn.Module):
    def __init__(self, in_dim: int, proj_dim: int):
        super().__init__()
        self.projection = nn.Linear(in_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class MLPProjectionHead(nn.Module):
    """Linear → GELU → Linear → dropout, residual to the first projection, LayerNorm (the original's layout)."""

    def __init__(self, in_dim: int, proj_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, proj_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.layer_norm(projected + self.dropout(self.fc(self.gelu(projected))))


def build_projection(cfg: Mapping | None, in_dim: int) -> nn.Module:
    if not cfg:
        return nn.Identity()
    if cfg["name"] == "linear":
        return LinearProjectionHead(in_dim, cfg["proj_dim"])
    if cfg["name"] == "mlp":
        return MLPProjectionHead(in_dim, cfg["proj_dim"], cfg.get("dropout", 0.1))
    raise ConfigError(f"projection_head.name must be linear or mlp, got {cfg['name']!r}")


class CXRClip(nn.Module):
    """``encode_image`` / ``encode_text`` give L2-normalized embeddings; ``forward`` gives all of a batch's."""

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        projection: Mapping | None,
        temperature=0.07,
        freeze: Sequence[str] = (),
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        if not projection and image_encoder.out_dim != text_encoder.out_dim:
            raise ConfigError("without a projection_head the image and text encoders must have the same width")
        self.image_projection = build_projection(projection, image_encoder.out_dim)
        self.text_projection = build_projection(projection, text_encoder.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.frozen = tuple(freeze)
        self._freeze(self.frozen)
        self.image_memory_format = torch.contiguous_format

    def set_channels_last(self, on: bool) -> CXRClip:
        """The image encoder's weights, and every image batch it is given, in NHWC (``on``) or NCHW: the same
        function, the layout oneDNN and cuDNN convolutions prefer (:mod:`cxrclip.model.speed` decides when)."""
        self.image_memory_format = torch.channels_last if on else torch.contiguous_format
        self.image_encoder.to(memory_format=self.image_memory_format)
        return self

    def _freeze(self, prefixes: Sequence[str]) -> None:
        """Lock the parameters under these module names (e.g. ``text_encoder``: a locked text tower, as LiT
        locks its image tower); they get no gradient and their modules stay in eval mode (no dropout)."""
        names = dict(self.named_modules())
        for prefix in prefixes:
            if prefix not in names:
                raise ConfigError(f"model.freeze: no module named {prefix!r} (e.g. text_encoder, image_encoder)")
            for p in names[prefix].parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> CXRClip:
        super().train(mode)
        modules = dict(self.named_modules())
        for prefix in self.frozen:
            modules[prefix].eval()
        return self

    @property
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so it never exceeds 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 4:
            images = images.contiguous(memory_format=self.image_memory_format)
        return F.normalize(self.image_projection(self.image_encoder(images)).float(), dim=-1)

    def encode_text(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(tokens)).float(), dim=-1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Embeddings of every image view and text sample present in the batch, and the logit scale."""
        out = {"logit_scale": self.scale}
        if batch.image_views is not None:  # one pass over both views: better batching, one BN statistic
            both = self.encode_image(torch.cat([batch.images, batch.image_views]))
            out["image_embeddings"], out["image_view_embeddings"] = both.chunk(2)
        else:
            out["image_embeddings"] = self.encode_image(batch.images)
        out["text_embeddings"] = self.encode_text(batch.tokens)
        if batch.tokens2 is not None:
            out["text_embeddings2"] = self.encode_text(batch.tokens2)
        return out


def build_model(cfg: Mapping) -> CXRClip:
    """A ``CXRClip`` from a ``model`` config section."""
    return CXRClip(
        build_image_encoder(cfg["image_encoder"]),
        build_text_encoder(cfg["text_encoder"]),
        cfg.get("projection_head"),
        cfg.get("temperature", 0.07),
        freeze=tuple(cfg.get("freeze") or ()),
    )
