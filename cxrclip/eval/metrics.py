"""Metrics: retrieval (vectorized, chunked), per-label binary and multi-class classification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

RECALL_KS = (1, 5, 10)
# Similarities closer than this count as ties, in the query's favour: the correct pair's score is computed
# once per row (not read back from the chunked product), so float rounding must not change a rank.
TIE_TOLERANCE = 1e-6


def merge_texts(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique texts (first-seen order) and, per row, the index of its text among them."""
    index: dict[str, int] = {}
    gt = [index.setdefault(t, len(index)) for t in texts]
    return list(index), torch.tensor(gt, dtype=torch.long)


def _summary(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"Recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out["MeanRank"] = float(ranks.mean())
    out["MedianRank"] = float(ranks.quantile(0.5))  # the middle two averaged, as numpy
    return out


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    gt: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk: int | None = None,
) -> dict[str, dict[str, float]]:
    """Image→text and text→image retrieval with identical texts merged.

    ``text_emb`` holds the unique texts; ``gt[i]`` is image i's text. A rank is 1 + the number of
    candidates scoring higher than the correct one (by more than ``TIE_TOLERANCE``); text→image uses
    the best-scoring matching image. One pass over the image×text similarity, in row chunks of about
    1 GiB each by default.
    """
    n_text = text_emb.shape[0]
    if chunk is None:  # ~1 GiB of similarities per chunk: few, large matrix products
        chunk = max(256, min(image_emb.shape[0], (1 << 28) // max(n_text, 1)))
    correct = (image_emb * text_emb[gt]).sum(dim=1)  # each image vs its own text
    best = torch.full((n_text,), -torch.inf, dtype=correct.dtype).scatter_reduce(0, gt, correct, "amax")
    i2t = torch.empty(image_emb.shape[0], dtype=torch.long)
    above = torch.zeros(n_text, dtype=torch.long)
    row_limit, col_limit = correct + TIE_TOLERANCE, best + TIE_TOLERANCE
    mask = torch.empty(0, dtype=torch.bool)
    for start in range(0, image_emb.shape[0], chunk):
        sim = image_emb[start : start + chunk] @ text_emb.t()
        if mask.shape != sim.shape:
            mask = torch.empty(sim.shape, dtype=torch.bool)
        # comparisons into one reused buffer, counted as uint8 → int32: ~3× less than `(sim > x).sum()`
        torch.gt(sim, col_limit[None, :], out=mask)
        above += mask.view(torch.uint8).sum(dim=0, dtype=torch.int32)
        torch.gt(sim, row_limit[start : start + chunk, None], out=mask)
        i2t[start : start + chunk] = 1 + mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)
    present = torch.isfinite(best)  # texts that some image has
    return {"retrieval_i2t": _summary(i2t, ks), "retrieval_t2i": _summary(1 + above[present], ks)}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold maximizing sensitivity + specificity − 1 (Youden's J) on these rows."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def binary_metrics(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str], threshold: float = 0.5
) -> dict[str, object]:
    """Per-label AUROC/F1/Accuracy (labels: 1, 0, -1 = excluded) and their averages over defined labels.

    A label with no positive or no negative row is reported as ``None`` ("undefined") and left out of
    the averages, never a NaN inside them.
    """
    out: dict[str, object] = {}
    defined = []
    for j, name in enumerate(names):
        keep = labels[:, j] >= 0
        y, p = labels[keep, j].astype(int), probs[keep, j]
        if y.size == 0 or y.min() == y.max():
            out[name] = {
                "AUROC": None,
                "F1": None,
                "Accuracy": None,
                "n_pos": int(y.sum()),
                "n": int(y.size),
                "note": "undefined: needs positive and negative rows",
            }
            continue
        pred = (p >= threshold).astype(int)
        out[name] = {
            "AUROC": float(roc_auc_score(y, p)),
            "F1": float(f1_score(y, pred, zero_division=0)),
            "Accuracy": float(accuracy_score(y, pred)),
            "n_pos": int(y.sum()),
            "n": int(y.size),
            "threshold_youden": youden_threshold(y, p),
        }
        defined.append(out[name])
    for metric in ("AUROC", "F1", "Accuracy"):
        out[f"{metric}(Avg)"] = float(np.mean([d[metric] for d in defined])) if defined else None
    out["labels_averaged"] = len(defined)
    return out


def multiclass_metrics(scores: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, object] | None:
    """Rows with exactly one positive label: arg-max accuracy, micro, macro (over present classes) and per class."""
    single = (labels == 1).sum(axis=1) == 1
    if not single.any():
        return None
    target = labels[single].argmax(axis=1)
    pred = scores[single].argmax(axis=1)
    out: dict[str, object] = {"Accuracy(Micro)": float((pred == target).mean()), "n": int(single.sum())}
    per_class = {}
    for j, name in enumerate(names):
        rows = target == j
        if rows.any():
            per_class[name] = float((pred[rows] == j).mean())
    out["Accuracy(Macro)"] = float(np.mean(list(per_class.values())))
    out["per_class"] = per_class
    out["confusion"] = (
        np.bincount(target * len(names) + pred, minlength=len(names) ** 2).reshape(len(names), len(names)).tolist()
    )
    return out
