"""AdamW/SGD with decay only where it belongs, and a warmup + cosine schedule computed in steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cxrclip.exceptions import ConfigError
from cxrclip.spec import OptimizerSpec, ScheduleSpec


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Sequence[str],
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
) -> list[dict]:
    """Biases, norm layers, other 1-d parameters and the temperature get no weight decay. ``lr_scale`` maps a
    parameter-name prefix (``image_encoder``, ``text_encoder``, ...) to a learning-rate multiplier, so
    pre-trained encoders can learn slower than the new projections; the longest matching prefix wins."""
    lr_scale = dict(lr_scale or {})
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        decays = not (p.ndim <= 1 or any(part in lowered for part in no_decay) or name.endswith("logit_scale"))
        matches = [prefix for prefix in lr_scale if name == prefix or name.startswith(prefix + ".")]
        scale = float(lr_scale[max(matches, key=len)]) if matches else 1.0
        groups.setdefault((decays, scale), []).append(p)
    out = []
    for (decays, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(model: nn.Module, spec: OptimizerSpec | Mapping) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups` (``spec``: an ``optimizer`` section, typed or plain)."""
    spec = spec if isinstance(spec, OptimizerSpec) else OptimizerSpec.from_mapping(spec)
    options = dict(spec.options)
    groups = param_groups(
        model, float(options.pop("weight_decay", 0.0)), spec.no_decay, lr=options.get("lr"), lr_scale=spec.lr_scale
    )
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, **options)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, **options)
    raise ConfigError(f"optimizer.name must be adamw or sgd, got {spec.name!r}")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup from ~0 to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec | Mapping, steps_per_epoch: int):
    """``total_epochs`` / ``warmup_epochs`` turned into steps (nothing written back)."""
    spec = spec if isinstance(spec, ScheduleSpec) else ScheduleSpec.from_mapping(spec)
    if spec.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if spec.name != "cosine":
        raise ConfigError(f"scheduler.name must be cosine or constant, got {spec.name!r}")
    total = spec.total_epochs * steps_per_epoch
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
