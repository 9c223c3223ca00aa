"""Rebuild a model from a checkpoint (cxrclip's or a published CXR-CLIP one) without downloading weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrclip.data.preprocess import PreprocessSpec, image_normalization
from cxrclip.data.transforms import build_transform, spec_transform
from cxrclip.model.checkpoint import CheckpointError, load_checkpoint, plain_config
from cxrclip.model.clip import CXRClip, build_model
from cxrclip.model.encoders import build_image_encoder, build_tokenizer
from cxrclip.model.speed import use_channels_last

log = logging.getLogger(__name__)

# Tensors that the original module had but ours does not need: BERT's pooler (eos/bos/mean pooling never
# uses it) and the position_ids buffer that older transformers saved. Dropped by name, nothing else.
UNUSED_KEYS = ("text_encoder.text_encoder.pooler.", "text_encoder.text_encoder.embeddings.position_ids")


@dataclass
class LoadedModel:
    model: CXRClip
    model_config: dict
    tokenizer: object
    checkpoint: dict
    path: Path

    @property
    def normalize(self):
        return self.model_config["image_encoder"]["normalize"]

    @property
    def config(self) -> dict:
        """The run config stored in the checkpoint (plain data, as ``load_checkpoint`` returns it)."""
        return self.checkpoint.get("config") or {}

    def preprocess_spec(self, image_size: int | None = None) -> PreprocessSpec:
        """How this model's images are prepared (see :func:`stored_preprocess`); ``image_size`` overrides the size."""
        return stored_preprocess(self.checkpoint, self.normalize, ("test", "valid"), image_size)

    def preprocess(self, image_size: int | None = None):
        """The model's deterministic test transform (torch)."""
        return spec_transform(self.preprocess_spec(image_size))


def stored_steps(config: Mapping, splits=("test", "valid")) -> dict:
    """The first of ``splits`` a run config stores under ``transform``; a config without stored transforms (the
    published ones) gives Resize + CenterCrop at its ``base.image_size``."""
    transforms = config.get("transform") or {}
    steps = next((transforms[s] for s in splits if transforms.get(s)), None)
    if not steps:
        size = (config.get("base") or {}).get("image_size")
        if not size:
            raise CheckpointError(
                "the checkpoint records neither a test transform nor base.image_size: give the size "
                "(inference: Predictor.create(image_size=...); evaluation: base.image_size=N)"
            )
        steps = {"Resize": {"size": int(size)}, "CenterCrop": {"size": int(size)}}
    return {name: dict(kw or {}) for name, kw in steps.items()}


def stored_preprocess(
    checkpoint: Mapping, normalize, splits=("test", "valid"), image_size: int | None = None
) -> PreprocessSpec:
    """A checkpoint's :class:`PreprocessSpec`: the one training stored (key ``preprocess``), else the one its
    config implies (older and published checkpoints); ``image_size``: Resize + CenterCrop at that size instead."""
    if checkpoint.get("preprocess"):
        spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    elif image_size:
        spec = PreprocessSpec.create({}, normalize)
    else:
        spec = PreprocessSpec.create(stored_steps(plain_config(checkpoint.get("config")), splits), normalize)
    return spec.resized(image_size) if image_size else spec


def default_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def upgrade_model_config(cfg: Mapping) -> dict:
    """Fill what a published CXR-CLIP config leaves implicit, as the original code did: ResNet
    (``name: resnet``) used ImageNet normalization, other encoders 0.5/0.5 and token-0 pooling."""
    cfg = copy.deepcopy(dict(cfg))
    image = dict(cfg["image_encoder"])
    legacy = "normalize" not in image
    if image.get("source") == "torchvision" and image.get("name") == "resnet":
        image["name"] = "resnet50"
    if legacy:
        image["normalize"] = image_normalization(image)
        if image.get("source") == "huggingface":
            image.setdefault("pooling", "first")
    for key in ("model_type", "gradient_checkpointing", "local_files_only"):
        image.pop(key, None)
    cfg["image_encoder"] = image
    text = dict(cfg["text_encoder"])
    for key in ("trust_remote_code", "mlm_head", "local_files_only"):
        text.pop(key, None)
    cfg["text_encoder"] = text
    return cfg


def architecture_only(cfg: Mapping, text_encoder: str | None = None, image_encoder: str | None = None) -> dict:
    """The model config with pretrained weights switched off (the checkpoint supplies them)."""
    cfg = copy.deepcopy(dict(cfg))
    cfg["image_encoder"] = {**cfg["image_encoder"], "pretrained": False, "weights": None}
    cfg["text_encoder"] = {**cfg["text_encoder"], "pretrained": False}
    if text_encoder:
        cfg["text_encoder"]["name"] = text_encoder
    if image_encoder:
        cfg["image_encoder"]["name"] = image_encoder
    return cfg


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    text_encoder: str | None = None,
    image_encoder: str | None = None,
) -> LoadedModel:
    """Load a CLIP checkpoint strictly (every weight must be used and every weight must be present); its image
    encoder in NHWC where that is faster (a CNN on the CPU, :func:`cxrclip.model.speed.use_channels_last`)."""
    ckpt = load_checkpoint(path)
    config = plain_config(ckpt.get("config"))
    if "model" not in config or "image_encoder" not in config.get("model", {}):
        raise CheckpointError(f"{path}: its config has no model section; is it a CLIP (not a fine-tuned) checkpoint?")
    model_cfg = upgrade_model_config(config["model"])
    model = build_model(architecture_only(model_cfg, text_encoder, image_encoder))
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith(UNUSED_KEYS)}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its configured model: {len(missing)} missing weight(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
    name = text_encoder or model_cfg["text_encoder"]["name"]
    tokenizer = build_tokenizer({"pretrained_model_name_or_path": name})
    model.to(device).eval()
    model.set_channels_last(use_channels_last("auto", model.image_encoder, device))
    return LoadedModel(model, model_cfg, tokenizer, ckpt, Path(path))


def load_model_and_transforms(
    path: str | Path, *, device: str | torch.device = "cpu", text_encoder: str | None = None
) -> tuple[LoadedModel, object]:
    """A checkpoint's model and its test transform (built from its one :class:`PreprocessSpec`), as open_clip's
    ``create_model_and_transforms`` hands both back."""
    loaded = load_model(path, device=device, text_encoder=text_encoder)
    return loaded, loaded.preprocess()


def load_image_encoder(path: str | Path, ckpt: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Only the image encoder of a CLIP checkpoint (no text model needed), loaded strictly; with its config.
    ``ckpt``: the file's content, when it is already loaded."""

    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    config = plain_config(ckpt.get("config"))
    if "probe" in ckpt:  # a fine-tuned checkpoint: its encoder config is recorded next to the weights
        image_cfg = dict(ckpt["probe"]["image_encoder"])
    elif "image_encoder" in config.get("model", {}):
        image_cfg = upgrade_model_config(config["model"])["image_encoder"]
    else:
        raise CheckpointError(f"{path}: no image encoder configuration in the checkpoint")
    encoder = build_image_encoder({**image_cfg, "pretrained": False, "weights": None})
    prefix = "image_encoder."
    state = {
        k.removeprefix("module.")[len(prefix) :]: v
        for k, v in ckpt["model"].items()
        if k.removeprefix("module.").startswith(prefix)
    }
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected or not state:
        raise CheckpointError(
            f"{path}: image encoder weights do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return encoder, image_cfg


def evaluation_transform(spec, checkpoint: Mapping, normalize, splits=("test", "valid")):
    """How evaluation preprocesses a checkpoint's images: with ``base.image_size`` null (the evaluation configs'
    default) the checkpoint's own preprocessing (its stored spec), the size it was trained, validated and
    calibrated at (a `+recipe=small_data` run is 288 px); with a number, the evaluation config's ``transform.test``."""

    if spec.image_size is None:
        return spec_transform(stored_preprocess(checkpoint, normalize, splits))
    return build_transform(spec.transform_steps("test"), normalize)
