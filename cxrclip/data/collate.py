"""Batching: stack images, tokenize texts padded to the longest in the batch (never a fixed 256), align labels."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from cxrclip.data.batch import Batch
from cxrclip.exceptions import ConfigError

log = logging.getLogger(__name__)


def union_label_names(lists: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Every label of several datasets' label lists, by name, in order of first appearance."""
    return tuple(dict.fromkeys(n for names in lists for n in names))


class ImageTextCollator:
    """Turns dataset items into a :class:`Batch`; texts are tokenized once per batch with dynamic padding.

    With ``label_names`` (the union of the run's datasets' label lists), every batch's labels are aligned by name
    onto that list, so a batch mixing datasets with different label lists keeps its label sets: a label a row's
    dataset does not have is unknown (``label_mask`` False) for that row, and every batch — on every process —
    has the same width. Without it, items of one width are stacked; a batch of several widths without label names
    cannot be aligned and carries no labels (a warning says so once).
    """

    def __init__(
        self,
        tokenizer,
        text_max_length: int = 256,
        padding: str = "longest",
        label_names: Sequence[str] | None = None,
    ):
        if padding not in ("longest", "max_length"):
            raise ConfigError("padding must be 'longest' or 'max_length' (the original's fixed 256, for comparison)")
        self.tokenizer = tokenizer
        self.text_max_length = text_max_length
        self.padding = padding
        self.label_names = None if label_names is None else tuple(label_names)
        self.warned_mixed_labels = False

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(texts), padding=self.padding, truncation=True, max_length=self.text_max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def _aligned(self, items: Sequence[dict], names: tuple[str, ...]):
        """Labels and masks of items from datasets with their own label lists, placed by name onto ``names``."""
        column = {n: j for j, n in enumerate(names)}
        labels = torch.zeros(len(items), len(names))
        mask = torch.zeros(len(items), len(names), dtype=torch.bool)
        for i, it in enumerate(items):
            missing = [n for n in it["label_names"] if n not in column]
            if missing:
                raise ConfigError(f"labels {missing} of a dataset are not in the run's label list {list(names)}")
            index = [column[n] for n in it["label_names"]]
            labels[i, index] = it["labels"].float()
            mask[i, index] = it["label_mask"]
        return labels, mask

    def _labels(self, items: Sequence[dict]):
        """(labels, label_mask, label_names) of a batch; all None when it has no labels to carry."""
        if "labels" not in items[0]:
            return None, None, None
        own = [it.get("label_names") for it in items]
        if all(n is not None for n in own):
            names = self.label_names
            if names is None:  # no run-wide list given: this batch's own list, or the union of several
                names = own[0] if len(set(own)) == 1 else union_label_names(own)
                if len(set(own)) > 1:
                    self._say_mixed(items, names)
            if any(n != names for n in own):
                return (*self._aligned(items, names), names)
        elif len({tuple(it["labels"].shape) for it in items}) == 1:
            names = None  # unnamed labels of one width: stacked as they are
        else:
            self._say_mixed(items, None)
            return None, None, None
        labels = torch.stack([it["labels"].float() for it in items])
        mask = (
            torch.stack([it["label_mask"] for it in items])
            if "label_mask" in items[0]
            else labels.new_ones(labels.shape, dtype=torch.bool)
        )
        return labels, mask, names

    def _say_mixed(self, items: Sequence[dict], names) -> None:
        if self.warned_mixed_labels:
            return
        self.warned_mixed_labels = True
        widths = sorted({len(it["labels"]) for it in items})
        if names is None:
            log.warning(
                "a batch mixes datasets with different label lists (label widths %s) and no label names to align "
                "them by: its label sets are left out, so label-aware targets use the plain diagonal for it",
                widths,
            )
        else:
            log.warning(
                "a batch mixes datasets with different label lists (label widths %s): labels aligned by name over "
                "their union of %d; a label a row's dataset does not have is unknown for that row",
                widths,
                len(names),
            )

    def __call__(self, items: Sequence[dict]) -> Batch:
        labels, mask, names = self._labels(items)
        batch = Batch(
            images=torch.stack([it["image"] for it in items]),
            labels=labels,
            label_mask=mask,
            label_names=names,
        )
        if "image_view" in items[0]:
            batch.image_views = torch.stack([it["image_view"] for it in items])
        for key, text_field, token_field in (("text", "texts", "tokens"), ("text2", "texts2", "tokens2")):
            if key in items[0]:
                texts = [it[key] for it in items]
                setattr(batch, text_field, texts)
                if self.tokenizer is not None and any(texts):
                    setattr(batch, token_field, self.tokenize(texts))
        if "index" in items[0]:
            batch.index = torch.tensor([it["index"] for it in items])
        return batch
