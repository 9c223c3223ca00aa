"""The batch that travels from the collator to the model and the loss: one typed object, the same keys all the way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """A collated batch.

    ``labels`` holds 0/1 per row and label (``label_names`` says which labels, when known); ``label_mask`` says
    which of those entries are known: ``False`` for an uncertain or excluded label, for every label of a free-text
    report row (it has no label set), and for a label the row's dataset does not have. The value under a ``False``
    mask is 0 and means nothing.
    """

    images: torch.Tensor
    image_views: torch.Tensor | None = None  # the second view of each row (training)
    tokens: dict[str, torch.Tensor] | None = None  # tokenized ``texts``: input_ids, attention_mask
    tokens2: dict[str, torch.Tensor] | None = None  # tokenized ``texts2`` (a second caption per row)
    texts: list[str] | None = None
    texts2: list[str] | None = None
    labels: torch.Tensor | None = None  # (rows, labels) float 0/1
    label_mask: torch.Tensor | None = None  # (rows, labels) bool, True where the label is known
    label_names: tuple[str, ...] | None = None
    index: torch.Tensor | None = None  # dataset row of each item (evaluation)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_label_set(self) -> torch.Tensor | None:
        """Per row: whether it has a label set at all (a free-text report row has none)."""
        return None if self.label_mask is None else self.label_mask.any(dim=1)

    def to(self, device: torch.device | str, channels_last: bool = False) -> Batch:
        """Every tensor onto ``device`` (non-blocking); with ``channels_last``, the image batches in NHWC."""

        def move(value):
            if isinstance(value, torch.Tensor):
                if channels_last and value.ndim == 4:
                    return value.to(device, memory_format=torch.channels_last, non_blocking=True)
                return value.to(device, non_blocking=True)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def labels_from_values(values: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A record's label values (1, 0, or -1 = uncertain / left out) → (0/1 labels, known-mask)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    mask = values >= 0
    return values.clamp(min=0), mask
