"""The run's ``base`` section, typed (``RunSettings``), and what follows from it on a device (autocast)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrclip.exceptions import ConfigError, OutputError
from cxrclip.model.speed import parse_channels_last

log = logging.getLogger(__name__)
CHECKPOINT_NAMES = ("model-last.tar", "model-best.tar")


@dataclass(frozen=True)
class RunSettings:
    """``base`` section, typed. Derived values (per-rank batch, steps) live elsewhere, never in the config."""

    seed: int
    amp: bool
    amp_dtype: str
    resume: str | None
    grad_accum_steps: int
    grad_clip_norm: float | None
    max_decode_failure_frac: float
    checkpoint_dir: Path
    tensorboard_dir: Path
    overwrite: bool = False
    log_every: int = 10
    channels_last: bool | str = "auto"  # auto: NHWC for a convolutional image encoder (cxrclip.model.speed)
    compile: bool = False
    ema_decay: float | None = None  # an exponential moving average of the weights is what gets saved and evaluated
    ema_warmup: bool = True  # the decay grows with the step (timm's warmup), so a short run is not pulled to its start

    @classmethod
    def from_cfg(cls, base: Mapping) -> RunSettings:
        if base.get("amp_dtype", "fp16") not in ("fp16", "bf16"):
            raise ConfigError("base.amp_dtype must be fp16 or bf16")
        ema_decay = None if base.get("ema_decay") in (None, 0) else float(base["ema_decay"])
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(f"base.ema_decay must be between 0 and 1 (e.g. 0.999) or null, got {ema_decay}")
        return cls(
            seed=int(base.get("seed", 1234)),
            amp=bool(base.get("amp", False)),
            amp_dtype=base.get("amp_dtype", "fp16"),
            resume=base.get("resume"),
            grad_accum_steps=int(base.get("grad_accum_steps", 1)),
            grad_clip_norm=base.get("grad_clip_norm"),
            max_decode_failure_frac=float(base.get("max_decode_failure_frac", 0.01)),
            checkpoint_dir=Path(base["output"]["checkpoint"]),
            tensorboard_dir=Path(base["output"]["tensorboard"]),
            overwrite=bool(base.get("overwrite", False)),
            log_every=max(1, int(base.get("log_every", 10))),
            channels_last=parse_channels_last(base.get("channels_last", "auto")),
            compile=bool(base.get("compile", False)),
            ema_decay=ema_decay,
            ema_warmup=bool(base.get("ema_warmup", True)),
        )

    def check_run_folder(self) -> None:
        """A run never writes over another run's checkpoints unless told to (``base.resume`` / ``base.overwrite``)."""
        if self.resume or self.overwrite:
            return
        found = [name for name in CHECKPOINT_NAMES if (self.checkpoint_dir / name).exists()]
        if found:
            raise OutputError(
                f"{self.checkpoint_dir} already holds {' and '.join(found)} of another run; continue it with "
                f"base.resume={self.checkpoint_dir / 'model-last.tar'}, pick another hydra.run.dir, "
                "or replace it with base.overwrite=true"
            )


def autocast_settings(run: RunSettings, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, dtype, needs a grad scaler). CPU autocast only in bf16 (fp16 on CPU is slow)."""
    if not run.amp:
        return False, torch.float32, False
    if device.type == "cuda":
        dtype = torch.bfloat16 if run.amp_dtype == "bf16" else torch.float16
        return True, dtype, dtype == torch.float16
    if run.amp_dtype == "bf16":
        return True, torch.bfloat16, False
    log.info("base.amp with fp16 is CUDA-only; training in fp32 on CPU (use base.amp_dtype=bf16 for CPU AMP)")
    return False, torch.float32, False
