"""Image and text encoders from well-kept libraries, with one interface: ``forward(x) -> (B, out_dim)``.

Attribute names (``resnet``, ``image_encoder``, ``text_encoder``) follow the original CXR-CLIP so its
published checkpoints load without renaming.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cxrclip.exceptions import ConfigError, UserError
from cxrclip.paths import resolve_package_path

log = logging.getLogger(__name__)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model's weights or files could not be found (e.g. no network); the message says how to supply them."""


def model_missing_error(name: str, what: str, error: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load the {what} {name!r} ({type(error).__name__}: {error}).\n"
        f"Without internet, copy the model to a local folder (on a machine with internet: "
        f"`hf download {name} --local-dir /models/{Path(name).name}`), then set "
        f"model.{what.replace(' ', '_')}.name=/models/{Path(name).name}."
    )


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load report (it lists BERT's unused pooler weights as "unexpected")."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain tensor state dict from a local file, loaded without executing pickled code."""
    path = Path(resolve_package_path(str(path)))
    if not path.is_file():
        raise ModelNotFoundError(f"weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConfigError(f"{path} does not hold a state dict")
    return dict(sd)


def load_by_order(module: nn.Module, source: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy tensors whose names differ but whose order and shapes match (e.g. the EfficientNet-Lite0
    package vs timm); extra trailing tensors in ``source`` (a classifier) are ignored."""
    target = module.state_dict()
    if len(source) < len(target):
        raise ConfigError(f"{what}: the weights file has {len(source)} tensors, the model needs {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
        if tv.shape != sv.shape:
            raise ConfigError(f"{what}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    module.load_state_dict(mapped, strict=True)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class TimmImageEncoder(nn.Module):
    """Any timm backbone; features are its pooled output (``num_classes=0``)."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=False, num_classes=0)
        self.out_dim = self.model.num_features
        if pretrained:
            if not weights:
                raise ModelNotFoundError(
                    f"timm model {name!r}: set model.image_encoder.weights to a local state-dict file "
                    "(or pretrained=false to start from random weights)"
                )
            self._load(load_state_dict_file(weights), name)

    def _load(self, source: Mapping[str, torch.Tensor], name: str) -> None:
        own = self.model.state_dict()
        if set(own) <= set(source):
            self.model.load_state_dict({k: source[k] for k in own}, strict=True)
        else:
            load_by_order(self.model, source, f"image encoder {name}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def cam_features(self, images: torch.Tensor):
        """(last spatial feature map, pooled features, map view): what Grad-CAM differentiates."""
        fmap = self.model.forward_features(images)
        return fmap, self.model.forward_head(fmap, pre_logits=True), _identity


class TorchvisionResNet(nn.Module):
    """torchvision ResNet without its classifier; pooled 2048-d features for ResNet-50."""

    def __init__(self, name: str = "resnet50", pretrained: bool = True, weights: str | None = None):
        super().__init__()
        import torchvision

        name = "resnet50" if name == "resnet" else name  # the original's config says "resnet"
        builder = getattr(torchvision.models, name, None)
        if builder is None or not name.startswith(("resnet", "resnext", "wide_resnet")):
            raise ConfigError(f"unsupported torchvision image encoder {name!r}; use a ResNet")
        self.resnet = builder(weights=None)
        self.out_dim = self.resnet.fc.in_features
        self.resnet.fc = nn.Identity()
        if pretrained:
            sd = load_state_dict_file(weights) if weights else self._download(name, torchvision)
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            self.resnet.load_state_dict(sd, strict=True)

    @staticmethod
    def _download(name: str, torchvision) -> dict:
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            return weights.get_state_dict(progress=False)
        except Exception as e:  # URLError, OSError, ...: all mean "not available offline"
            raise ModelNotFoundError(
                f"cannot get torchvision's ImageNet weights for {name} ({type(e).__name__}: {e}).\n"
                f"Without internet, copy {name}'s .pth file (torchvision's, from a machine with internet) and set "
                "model.image_encoder.weights=/path/to/that.pth"
            ) from e

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resnet(images)

    def cam_features(self, images: torch.Tensor):
        """(layer4's feature map, pooled features, map view): what Grad-CAM differentiates."""
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        fmap = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return fmap, torch.flatten(r.avgpool(fmap), 1), _identity


class HuggingfaceImageEncoder(nn.Module):
    """A transformers vision model (Swin, ViT). ``pooling``: ``first`` (token 0, what the published
    CXR-CLIP Swin checkpoints were trained with) or ``mean`` (average of all tokens)."""

    def __init__(self, name: str, pretrained: bool = True, pooling: str = "first", cache_dir: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in ("first", "mean"):
            raise ConfigError(f"image pooling must be 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling
        name = resolve_package_path(name)
        try:
            if pretrained:
                self.image_encoder = AutoModel.from_pretrained(name, cache_dir=cache_dir)
            else:
                self.image_encoder = AutoModel.from_config(AutoConfig.from_pretrained(name, cache_dir=cache_dir))
        except OSError as e:
            raise model_missing_error(name, "image encoder", e) from e
        self.out_dim = self.image_encoder.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._pool(self.image_encoder(pixel_values=images).last_hidden_state)

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.pooling == "first" else hidden.mean(dim=1)

    def cam_features(self, images: torch.Tensor):
        """(last hidden tokens, pooled features, tokens → B×C×h×w grid): Swin's tokens form a square grid;
        a ViT's follow its class token."""
        hidden = self.image_encoder(pixel_values=images).last_hidden_state

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            n = tokens.shape[1]
            skip = 0 if math.isqrt(n) ** 2 == n else 1
            side = math.isqrt(n - skip)
            return tokens[:, skip:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

        return hidden, self._pool(hidden), to_map


class HuggingfaceTextEncoder(nn.Module):
    """A transformers text model (BERT family), pooled by ``eos`` (last real token), ``bos`` or ``mean``."""

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        pooling: str = "eos",
        cache_dir: str | None = None,
        gradient_checkpointing: bool = False,
        config: Mapping | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in ("eos", "bos", "mean"):
            raise ConfigError(f"text pooling must be eos, bos or mean, got {pooling!r}")
        self.pooling = pooling
        path = resolve_package_path(name)
        try:
            with quiet_transformers():
                if pretrained:
                    self.text_encoder = AutoModel.from_pretrained(path, cache_dir=cache_dir, add_pooling_layer=False)
                else:
                    model_config = AutoConfig.from_pretrained(path, cache_dir=cache_dir, **dict(config or {}))
                    self.text_encoder = AutoModel.from_config(model_config, add_pooling_layer=False)
        except OSError as e:
            raise model_missing_error(name, "text encoder", e) from e
        if gradient_checkpointing:
            self.text_encoder.gradient_checkpointing_enable()
        self.out_dim = self.text_encoder.config.hidden_size

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"]
        hidden = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "bos":
            return hidden[:, 0]
        if self.pooling == "eos":
            last = mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def build_image_encoder(cfg: Mapping) -> nn.Module:
    source, name = cfg["source"], cfg["name"]
    pretrained = bool(cfg.get("pretrained", False))
    if source == "timm":
        return TimmImageEncoder(name, pretrained, cfg.get("weights"))
    if source == "torchvision":
        return TorchvisionResNet(name, pretrained, cfg.get("weights"))
    if source == "huggingface":
        return HuggingfaceImageEncoder(name, pretrained, cfg.get("pooling", "first"), cfg.get("cache_dir"))
    raise ConfigError(f"image_encoder.source must be timm, torchvision or huggingface, got {source!r}")


def build_text_encoder(cfg: Mapping) -> nn.Module:
    if cfg.get("source", "huggingface") != "huggingface":
        raise ConfigError("text_encoder.source must be huggingface")
    return HuggingfaceTextEncoder(
        cfg["name"],
        pretrained=bool(cfg.get("pretrained", True)),
        pooling=cfg.get("pooling", "eos"),
        cache_dir=cfg.get("cache_dir"),
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
        config=cfg.get("config"),
    )


def build_tokenizer(cfg: Mapping):
    """The tokenizer of a text encoder (``tokenizer`` config: ``pretrained_model_name_or_path``, ``cache_dir``)."""
    from transformers import AutoTokenizer

    name = cfg["pretrained_model_name_or_path"]
    try:
        return AutoTokenizer.from_pretrained(resolve_package_path(name), cache_dir=cfg.get("cache_dir"))
    except OSError as e:
        raise model_missing_error(name, "text encoder", e) from e
