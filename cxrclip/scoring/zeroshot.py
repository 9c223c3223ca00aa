"""Zero-shot scores from embeddings, in NumPy (no torch): shared by evaluation, inference and the bundle."""

from __future__ import annotations

import numpy as np


def label_logits(image_emb: np.ndarray, pos: np.ndarray, neg: np.ndarray, scale: float) -> np.ndarray:
    """The zero-shot score per image and label: ``scale · (cos(image, pos) − cos(image, neg))``, float64.
    Its sigmoid is the softmax over (positive, negative) prompts, the model's uncalibrated P(yes)."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    return (image_emb @ np.asarray(pos).T - image_emb @ np.asarray(neg).T).astype(np.float64) * scale


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
