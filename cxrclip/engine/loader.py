"""Training data: validated records → datasets per split, and loaders whose order is fixed by (seed, epoch) and
split across processes, so that a resumed or multi-process run sees exactly the rows it would have seen."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.dataset import ImageTextDataset, LabeledImageDataset
from cxrclip.data.records import load_imagetext_records, stratified_subset, summarize
from cxrclip.data.schema import LabeledRecord
from cxrclip.data.transforms import build_transform
from cxrclip.engine.dist import DistEnv
from cxrclip.engine.settings import RunSettings
from cxrclip.exceptions import ConfigError
from cxrclip.spec import LoaderSpec, RunSpec

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch: a permutation fixed by (seed, epoch), split across ranks
    (padded so every rank has the same count), optionally starting ``skip`` indices in (resume)."""

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(size / world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.per_rank * self.world - self.size]
        return iter(order[self.rank :: self.world][self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def load_split(spec: RunSpec, group: str, train: bool, run: RunSettings, env: DistEnv) -> ConcatDataset:
    """Validate every CSV of a data group (all problems at once) and build its dataset."""
    transform = build_transform(spec.transform_steps("train" if train else "valid"), spec.normalize)
    datasets = []
    for dc in spec.data.get(group, ()):
        records = load_imagetext_records(dc)
        if train:
            records = stratified_subset(records, dc.data_frac, run.seed)
        if env.is_main:
            s = summarize(dc, records)
            log.info("%s %s: %d rows, %d images (%s)", group, dc.name, s["rows"], s["images"], s["csv"])
        datasets.append(
            ImageTextDataset(
                records,
                dc,
                dc.caption_prompts(),
                transform,
                train=train,
                max_decode_failure_frac=run.max_decode_failure_frac,
            )
        )
    if not datasets:
        raise ConfigError(f"no {group} dataset configured")
    return ConcatDataset(datasets)


def make_loader(dataset, loader: LoaderSpec, collate, env: DistEnv, seed: int) -> DataLoader:
    if loader.batch_size % env.world_size:
        raise ConfigError(f"batch_size {loader.batch_size} is not divisible by the {env.world_size} processes")
    sampler = EpochSampler(len(dataset), shuffle=loader.shuffle, seed=seed, rank=env.rank, world=env.world_size)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size // env.world_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=collate,
        drop_last=loader.drop_last,
        pin_memory=loader.pin_memory and env.device.type == "cuda",
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=False,
    )


def image_loader(records: Sequence[LabeledRecord], transform, loader: LoaderSpec | Mapping) -> DataLoader:
    """Batches of test images and labels in dataset order. Texts are not tokenized here: the distinct texts
    are embedded once, separately."""
    loader = loader if isinstance(loader, LoaderSpec) else LoaderSpec.from_mapping(loader, "dataloader")
    return DataLoader(
        LabeledImageDataset(records, transform),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=ImageTextCollator(None),
        prefetch_factor=loader.prefetch_factor,
    )
