"""What a training run is about: its data, how to build its model, its loss (a ``Task``). Pre-training is
``clip_task``; the linear probe's task is in ``engine/finetune.py``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from cxrclip.data.collate import ImageTextCollator, union_label_names
from cxrclip.engine.dist import DistEnv
from cxrclip.engine.loader import load_split
from cxrclip.engine.settings import RunSettings
from cxrclip.loss import build_loss
from cxrclip.model.clip import build_model
from cxrclip.model.encoders import build_tokenizer
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What differs between pre-training and probing: the data, how to build the model, the loss,
    and what the checkpoint must carry besides the config."""

    train_set: Dataset
    valid_set: Dataset | None
    collate: Callable
    build_model: Callable[[], torch.nn.Module]
    loss_fn: torch.nn.Module
    checkpoint_extra: Callable[[], dict] = dict
    keep_partial_batch: bool = False  # a linear probe has no in-batch negatives: its last, smaller batch is kept


def run_label_names(spec: RunSpec, env: DistEnv) -> tuple[str, ...]:
    """The union of the run's datasets' label lists: every batch's labels are aligned onto it by name."""
    configs = [dc for group in ("data_train", "data_valid") for dc in spec.data.get(group, ())]
    lists = [dc.label_names for dc in configs]
    names = union_label_names(lists)
    if len(set(lists)) > 1 and env.is_main:
        log.warning(
            "the datasets have different label lists (%s): labels are aligned by name over their union of %d; a "
            "label a dataset does not have is unknown for its rows (label-aware targets compare positives)",
            "; ".join(f"{dc.name}: {len(dc.label_names)}" for dc in configs),
            len(names),
        )
    return names


def clip_task(spec: RunSpec, run: RunSettings, env: DistEnv) -> Task:
    """CXR-CLIP pre-training on image–text data."""
    train_set = load_split(spec, "data_train", True, run, env)
    valid_set = load_split(spec, "data_valid", False, run, env) if spec.data.get("data_valid") else None
    collate = ImageTextCollator(
        build_tokenizer(spec.tokenizer), spec.text_max_length, label_names=run_label_names(spec, env)
    )
    preprocess = {"preprocess": spec.test_preprocess(spec.normalize).to_dict()}  # stored with every checkpoint
    return Task(
        train_set, valid_set, collate, lambda: build_model(spec.model), build_loss(spec.loss), lambda: preprocess
    )
