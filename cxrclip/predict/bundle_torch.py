"""The inference bundle's PyTorch side, imported only when a bundle needs it (Grad-CAM, free text, other prompts,
bf16, a GPU): the model rebuilt from the bundle's stored weights, the image forward under autocast, the text tower.
ONNX Runtime inference never imports this module, so it never imports torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cxrclip.model.clip import CXRClip, build_model, build_projection
from cxrclip.model.embed import class_embeddings, embed_texts, label_prompts
from cxrclip.model.encoders import build_image_encoder, build_tokenizer
from cxrclip.model.loading import architecture_only
from cxrclip.model.speed import autocast, use_channels_last


def rebuild_model(model_config: Mapping, text_folder: str, image_state: Mapping, text_state: Mapping | None, device):
    """The CLIP model from its architecture and the stored arrays (the image side; the text side too when
    ``text_state`` is given), in eval mode on ``device``; returns (model, missing keys, unexpected keys)."""
    arch = architecture_only(model_config, text_encoder=text_folder)
    state = {k: torch.from_numpy(v.copy()) for k, v in image_state.items()}
    if text_state is not None:
        model = build_model(arch)
        state.update({k: torch.from_numpy(v.copy()) for k, v in text_state.items()})
    else:  # the image side only: no transformers import
        model = torch.nn.Module()
        model.image_encoder = build_image_encoder(arch["image_encoder"])
        model.image_projection = build_projection(arch.get("projection_head"), model.image_encoder.out_dim)
        model.logit_scale = torch.nn.Parameter(torch.zeros(()))
        model.encode_image = lambda x: CXRClip.encode_image(model, x)
        model.set_channels_last = lambda on: CXRClip.set_channels_last(model, on)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.to(device).eval().set_channels_last(use_channels_last("auto", model.image_encoder, device))
    return model, missing, unexpected


def encode_images(model, batch: np.ndarray, precision: str, device) -> np.ndarray:
    """L2-normalized image embeddings of a preprocessed batch, the image encoder under ``precision``."""
    with torch.no_grad(), autocast(precision, device):
        return model.encode_image(torch.from_numpy(batch).to(device)).float().cpu().numpy()


def tokenizer(folder: str):
    return build_tokenizer({"pretrained_model_name_or_path": folder})


def prompt_embeddings(model, tok, bank, names: Sequence[str], device) -> tuple[np.ndarray, np.ndarray]:
    """Each label's mean positive and mean negative prompt embedding."""
    pos, neg = (class_embeddings(model, tok, g, device).numpy() for g in label_prompts(bank, list(names)))
    return pos, neg


def text_embeddings(model, tok, texts: Sequence[str], device, max_length: int = 256) -> np.ndarray:
    return embed_texts(model, tok, list(texts), device, max_length=max_length).numpy()
