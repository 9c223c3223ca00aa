"""``finetune.py``: a linear probe (or full fine-tuning) on a pre-trained CXR-CLIP image encoder."""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch.utils.data import ConcatDataset

from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.dataset import LabeledImageDataset
from cxrclip.data.records import load_labeled_records, stratified_subset, summarize
from cxrclip.data.transforms import build_transform
from cxrclip.engine.dist import DistEnv
from cxrclip.engine.settings import RunSettings
from cxrclip.engine.tasks import Task
from cxrclip.engine.trainer import train
from cxrclip.exceptions import ConfigError
from cxrclip.model.loading import load_image_encoder
from cxrclip.model.probe import LinearProbe, MaskedBCELoss
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)


def _label_names(spec: RunSpec, group: str) -> tuple[str, ...]:
    names = {dc.label_names for dc in spec.data.get(group, ())}
    if len(names) != 1:
        raise ConfigError(f"every {group} dataset of a probe must have the same label_names, got {names}")
    return names.pop()


def probe_task(spec: RunSpec, run: RunSettings, env: DistEnv) -> Task:
    """Classification data (image + one 0/1 column per label), a frozen (or not) encoder, masked BCE."""
    backbone = spec.model.get("load_backbone_weights")
    if not backbone:
        raise ConfigError("set model.load_backbone_weights=/PATH/model-best.tar (a CXR-CLIP checkpoint)")
    names = _label_names(spec, "data_train")
    records = {}
    for group in ("data_train", "data_valid"):
        rows = []
        for dc in spec.data.get(group, ()):
            part = load_labeled_records(dc, need_text=False)
            if group == "data_train":
                part = stratified_subset(part, dc.data_frac, run.seed)
            if env.is_main:
                log.info("%s %s: %s", group, dc.name, summarize(dc, part)["label_counts"])
            rows += part
        records[group] = rows
    # the encoder's config (and so its normalization) comes from the checkpoint, read once here
    encoder, image_cfg = load_image_encoder(backbone)
    normalize = image_cfg["normalize"]
    train_set = LabeledImageDataset(
        records["data_train"], build_transform(spec.transform_steps("train"), normalize), names
    )
    valid_set = (
        LabeledImageDataset(records["data_valid"], build_transform(spec.transform_steps("valid"), normalize), names)
        if records["data_valid"]
        else None
    )
    freeze = bool(spec.model.get("freeze_backbone_weights", True))
    extra = {
        "probe": {"image_encoder": image_cfg, "label_names": list(names), "freeze": freeze, "backbone": str(backbone)},
        "preprocess": spec.test_preprocess(normalize, ("valid",)).to_dict(),
    }
    loss_options = spec.loss.get("classification", {})
    return Task(
        ConcatDataset([train_set]),
        valid_set,
        ImageTextCollator(None, label_names=names),
        lambda: LinearProbe(encoder, len(names), freeze=freeze),
        MaskedBCELoss(**loss_options),
        lambda: extra,
        keep_partial_batch=freeze,  # a frozen encoder (eval-mode BatchNorm) takes any batch size; a trained one not 1
    )


def finetune(cfg: DictConfig | RunSpec) -> dict:
    """Train a linear probe from a composed ``finetune_10`` / ``finetune_100`` config."""
    return train(cfg, probe_task)
