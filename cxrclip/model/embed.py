"""Embeddings for evaluation, and zero-shot scores from the prompt file's sentences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.prompts import PromptBank
from cxrclip.model.clip import CXRClip
from cxrclip.scoring.zeroshot import label_logits


@torch.no_grad()
def embed_images(model: CXRClip, loader: DataLoader, device: torch.device, desc: str = "images") -> torch.Tensor:
    """L2-normalized image embeddings, in dataset order, as float32 on the CPU."""
    out = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        out.append(model.encode_image(batch.images.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model: CXRClip, tokenizer, texts: Sequence[str], device: torch.device, batch_size: int = 256, max_length: int = 256
) -> torch.Tensor:
    """L2-normalized text embeddings; each batch padded to its own longest text."""
    collate = ImageTextCollator(tokenizer, max_length)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = collate.tokenize(texts[start : start + batch_size])
        out.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def label_prompts(bank: PromptBank, names: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Per label its positive sentences and its negative ones (``no <label>.`` when the file has none)."""
    pos = [list(bank[n].pos) for n in names]
    neg = [list(bank[n].neg) or [f"no {n.lower()}."] for n in names]
    return pos, neg


def class_embeddings(model: CXRClip, tokenizer, groups: Sequence[Sequence[str]], device) -> torch.Tensor:
    """One embedding per group of sentences: the normalized mean of their normalized embeddings."""
    flat = [s for g in groups for s in g]
    emb = embed_texts(model, tokenizer, flat, device)
    sizes = [len(g) for g in groups]
    return F.normalize(torch.stack([chunk.mean(0) for chunk in emb.split(sizes)]), dim=-1)


@dataclass
class LabelScorer:
    """Each label's positive and negative prompt embeddings, computed once, and the model's scale."""

    names: list[str]
    pos_emb: torch.Tensor
    neg_emb: torch.Tensor
    scale: float

    @classmethod
    def create(cls, model: CXRClip, tokenizer, bank: PromptBank, names: Sequence[str], device) -> LabelScorer:
        pos, neg = label_prompts(bank, names)
        pos_emb = class_embeddings(model, tokenizer, pos, device)
        neg_emb = class_embeddings(model, tokenizer, neg, device)
        return cls(list(names), pos_emb, neg_emb, float(model.scale.detach()))

    def logits(self, image_emb: torch.Tensor) -> np.ndarray:
        return label_logits(image_emb.float().cpu().numpy(), self.pos_emb.numpy(), self.neg_emb.numpy(), self.scale)
