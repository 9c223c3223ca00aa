"""Jobs that join stages: training (pre-training or a linear probe) followed by calibration of
``model-best.tar`` on the validation split."""

from __future__ import annotations

import os
from collections.abc import Callable

from omegaconf import DictConfig

from cxrclip.engine.finetune import finetune
from cxrclip.engine.trainer import train
from cxrclip.eval.calibrate import calibrate_after_training
from cxrclip.spec import RunSpec


def _then_calibrate(cfg: DictConfig, run: Callable[[RunSpec], dict]) -> dict:

    spec = RunSpec.from_config(cfg)  # the config is read once, here
    result = run(spec)
    if int(os.environ.get("RANK", "0")) == 0:  # one process calibrates; the others are done
        calibration = calibrate_after_training(spec, result)
        result = {**result, "calibrated": calibration is not None}
    return result


def pretrain(cfg: DictConfig) -> dict:
    """``train.py``: CXR-CLIP pre-training, then calibration of the zero-shot scores."""

    return _then_calibrate(cfg, train)


def probe(cfg: DictConfig) -> dict:
    """``finetune.py``: a linear probe, then calibration of its outputs."""

    return _then_calibrate(cfg, finetune)
