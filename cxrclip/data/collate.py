"""Batching: stack images, tokenize texts padded to the longest in the batch (never a fixed 256)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from cxrclip.exceptions import ConfigError

log = logging.getLogger(__name__)


class ImageTextCollator:
    """Turns dataset items into a batch; texts are tokenized once per batch with dynamic padding."""

    def __init__(self, tokenizer, text_max_length: int = 256, padding: str = "longest"):
        if padding not in ("longest", "max_length"):
            raise ConfigError("padding must be 'longest' or 'max_length' (the original's fixed 256, for comparison)")
        self.tokenizer = tokenizer
        self.text_max_length = text_max_length
        self.padding = padding
        self.warned_mixed_labels = False

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(texts), padding=self.padding, truncation=True, max_length=self.text_max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = {"images": torch.stack([it["image"] for it in items])}
        widths = {tuple(it["labels"].shape) for it in items}
        if len(widths) == 1:
            batch["labels"] = torch.stack([it["labels"] for it in items])
        elif not self.warned_mixed_labels:  # datasets with other label lists in one batch: said once, not silent
            self.warned_mixed_labels = True
            log.warning(
                "a batch mixes datasets with different label lists (label widths %s): its label sets are left out, "
                "so label-aware targets (loss.cxr_clip.targets) use the plain diagonal for such batches",
                sorted(w[0] if w else 0 for w in widths),
            )
        if "image_view" in items[0]:
            batch["image_views"] = torch.stack([it["image_view"] for it in items])
        for key, name, out in (("text", "texts", "text_tokens"), ("text2", "texts2", "text_tokens2")):
            if key in items[0]:
                texts = [it[key] for it in items]
                batch[name] = texts
                if self.tokenizer is not None and any(texts):
                    batch[out] = self.tokenize(texts)
        if "index" in items[0]:
            batch["index"] = torch.tensor([it["index"] for it in items])
        return batch
