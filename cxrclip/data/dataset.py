"""Datasets: records → (two image views, two texts) for training; (image, labels, text) for evaluation."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from cxrclip.data.batch import labels_from_values
from cxrclip.data.images import ImageReadError, read_image
from cxrclip.data.prompts import PromptBank, generate_report
from cxrclip.data.schema import DataConfig, ImageTextRecord, LabeledRecord
from cxrclip.data.transforms import ImageTransform

log = logging.getLogger(__name__)


class DecodeFailureGuard:
    """Counts images that failed to decode mid-run; raises once more than ``max_frac`` of the data failed."""

    def __init__(self, size: int, max_frac: float):
        self.size, self.max_frac, self.failures = size, max_frac, 0

    def record(self, error: Exception) -> None:
        self.failures += 1
        log.warning("skipping an unreadable image (%d so far): %s", self.failures, error)
        if self.failures > self.max_frac * self.size:
            raise RuntimeError(
                f"{self.failures} images failed to decode, more than {self.max_frac:.1%} of {self.size} rows; "
                "run `cxrclip validate-data CSV --deep` to list them"
            ) from error


def multi_hot(positives: Sequence[str], label_names: Sequence[str]) -> torch.Tensor:
    index = {n: i for i, n in enumerate(label_names)}
    out = torch.zeros(len(label_names))
    for p in positives:
        out[index[p]] = 1.0
    return out


def label_set(record: ImageTextRecord, label_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training row's (0/1 labels, known-mask): positives 1, the rest 0, uncertain labels unknown; a free-text
    report row has no label set (all unknown)."""
    labels = multi_hot(record.positives, label_names)
    if not record.has_label_set:
        return labels, torch.zeros(len(label_names), dtype=torch.bool)
    uncertain = set(record.uncertain) - set(record.positives)
    return labels, torch.tensor([n not in uncertain for n in label_names], dtype=torch.bool)


class ImageTextDataset(Dataset):
    """Training/validation pairs. ``train=True``: two different images of the row when it has several
    (else two augmentations of one) and two independently generated reports; ``train=False``:
    deterministic (first image, first sentences, no negatives)."""

    def __init__(
        self,
        records: Sequence[ImageTextRecord],
        cfg: DataConfig,
        prompts: PromptBank,
        transform: ImageTransform,
        *,
        train: bool,
        max_decode_failure_frac: float = 0.01,
    ):
        self.records, self.cfg, self.prompts, self.transform, self.train = list(records), cfg, prompts, transform, train
        self.guard = DecodeFailureGuard(len(self.records), max_decode_failure_frac)

    def __len__(self) -> int:
        return len(self.records)

    def _report(self, record: ImageTextRecord, rng: random.Random | None) -> str:
        if record.texts:
            return self._report_text(record, rng)
        return generate_report(
            record.positives,
            self.prompts,
            label_names=self.cfg.label_names,
            normal_sentence=self.cfg.normal_sentence,
            rng=rng,
            num_negs=self.cfg.num_negs if rng is not None else 0,
            uncertain=record.uncertain,
        )

    def _report_text(self, record: ImageTextRecord, rng: random.Random | None) -> str:
        """A report row: one section (validation: the longest), its back-translation half of the time,
        sentences shuffled when configured."""
        if rng is None:
            return max(record.texts, key=len)
        i = rng.randrange(len(record.texts))
        text = record.texts[i]
        if record.texts_augment and rng.random() < 0.5:
            text = record.texts_augment[min(i, len(record.texts_augment) - 1)]
        if self.cfg.sentence_shuffle:
            sentences = [t.strip() for t in text.split(". ") if t.strip()]
            rng.shuffle(sentences)
            text = ". ".join(s.rstrip(".") for s in sentences) + "."
        return text

    def _paths(self, record: ImageTextRecord, rng: random.Random | None) -> list:
        if rng is not None and len(record.views) >= 2:  # two different views, one image of each
            return [rng.choice(view) for view in rng.sample(record.views, 2)]
        if rng is None:
            return [record.images[0], record.images[min(1, len(record.images) - 1)]]
        if len(record.images) >= 2:
            return rng.sample(record.images, 2)
        return [record.images[0]] * 2

    def _load(self, record: ImageTextRecord, rng: random.Random | None):
        paths = self._paths(record, rng)
        first = read_image(paths[0])
        second = first if paths[1] == paths[0] else read_image(paths[1])
        if rng is None and second is first:
            view = self.transform(first)
            return view, view.clone()
        return self.transform(first), self.transform(second)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            # Derived from torch's RNG so DataLoader worker seeding and resume (RNG state) cover it.
            rng = random.Random(int(torch.randint(2**62, ()))) if self.train else None
            try:
                image, image_view = self._load(record, rng)
                break
            except ImageReadError as e:
                self.guard.record(e)
        labels, mask = label_set(record, self.cfg.label_names)
        return {
            "image": image,
            "image_view": image_view,
            "text": self._report(record, rng),
            "text2": self._report(record, rng),
            "labels": labels,
            "label_mask": mask,
            "label_names": self.cfg.label_names,
        }


class LabeledImageDataset(Dataset):
    """Test / classification rows: one image (the first), the labels with their known-mask (an uncertain or
    excluded label, -1 in the record, is unknown) and the text."""

    def __init__(
        self, records: Sequence[LabeledRecord], transform: ImageTransform, label_names: Sequence[str] | None = None
    ):
        self.records, self.transform = list(records), transform
        self.label_names = None if label_names is None else tuple(label_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        labels, mask = labels_from_values(record.labels)
        return {
            "image": self.transform(read_image(record.images[0])),
            "labels": labels,
            "label_mask": mask,
            "label_names": self.label_names,
            "text": record.text,
            "index": index,
        }
