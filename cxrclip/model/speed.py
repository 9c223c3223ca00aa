"""The fast paths, chosen per model and machine: the image encoder's memory format (NHWC for convolutional
encoders) and the inference precision (bf16 on CPUs that compute it natively).

``channels_last``: ``auto`` (the default everywhere) turns NHWC on for a convolutional image encoder (ResNet,
EfficientNet, DenseNet, ConvNeXt: more than two 2-D convolutions) on the CPU, and on CUDA under autocast (the
tensor-core layout); a ViT / Swin (one patch-embedding convolution) keeps NCHW, where NHWC does nothing. Both
layouts compute the same function; only the speed differs (docs/PERFORMANCE.md).

``precision`` (:func:`cxrclip.hardware.resolve_precision`): ``bf16`` runs the image encoder under bf16 autocast
(fast on CPUs with native bf16: AVX512-BF16 or AMX); prompt embeddings, the zero-shot score, the calibration and
the gate stay in fp32. ``auto`` is fp32: on the demo's test set bf16 moved calibrated probabilities by up to 0.17
and changed 20 of 2,600 decisions (docs/PERFORMANCE.md), so bf16 is opt-in.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cxrclip.exceptions import ConfigError


def is_convolutional(encoder: nn.Module) -> bool:
    """A CNN (many 2-D convolutions), not a transformer with a patch-embedding convolution."""
    return sum(isinstance(m, nn.Conv2d) for m in encoder.modules()) > 2


def parse_channels_last(value) -> bool | str:
    """``base.channels_last`` / ``--channels-last``: auto, true or false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "none", "null", ""):
        return "auto"
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"channels_last must be auto, true or false, got {value!r}")


def use_channels_last(setting, encoder: nn.Module, device: torch.device | str, autocast: bool = False) -> bool:
    """Whether the image encoder should run NHWC: ``setting`` true/false is obeyed; ``auto`` decides from the
    encoder (convolutional) and the device (CPU: always; CUDA: under autocast, the layout tensor cores read)."""
    setting = parse_channels_last(setting)
    if setting != "auto":
        return setting
    kind = torch.device(device).type
    return is_convolutional(encoder) and (kind == "cpu" or (kind == "cuda" and autocast))


def autocast(precision: str, device: torch.device | str):
    """The context an image forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
