"""AdamW/SGD with decay only where it belongs, and a warmup + cosine schedule computed in steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cxrclip.exceptions import ConfigError


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


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    options = dict(cfg.get("config", {}))
    options = {k: float(v) if isinstance(v, str) else v for k, v in options.items()}
    groups = param_groups(
        model,
        float(options.pop("weight_decay", 0.0)),
        cfg.get("no_decay", ("bias", "norm")),
        lr=options.get("lr"),
        lr_scale=cfg.get("lr_scale"),
    )
    name = cfg["name"]
    if name == "adamw":
        return torch.optim.AdamW(groups, **options)
    if name == "sgd":
        return torch.optim.SGD(groups, **options)
    raise ConfigError(f"optimizer.name must be adamw or sgd, got {name!r}")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup from ~0 to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, steps_per_epoch: int):
    """``scheduler.config.total_epochs`` / ``warmup_epochs`` turned into steps (nothing written back)."""
    name = cfg.get("name", "cosine")
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name != "cosine":
        raise ConfigError(f"scheduler.name must be cosine or constant, got {name!r}")
    total = int(cfg["config"]["total_epochs"]) * steps_per_epoch
    warmup = int(float(cfg["config"].get("warmup_epochs", 0)) * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
