"""Metrics: retrieval (vectorized, chunked), per-label binary and multi-class classification."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cxrclip.exceptions import ConfigError
from cxrclip.hardware import CpuInfo, this_cpu
from cxrclip.scoring.calibration import Calibration, brier_score, expected_calibration_error, sigmoid

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


# A tile's similarities (float32) and its comparison mask (bool): 5 bytes per image × text pair.
TILE_BYTES_PER_PAIR = 5
# Below this many pairs the whole product is a few tiles: no probe, the cache-derived tile.
PROBE_MIN_PAIRS = 16 * 2048 * 2048
_CHOSEN: dict[tuple[int, int], tuple[int, int]] = {}  # (dim, dtype size) → the tile the probe chose, per process


def _pow2_floor(x: float) -> int:
    return 1 << max(int(math.log2(max(x, 1.0))), 0)


def tile_candidates(cpu: CpuInfo) -> list[tuple[int, int]]:
    """(rows, cols) tiles of the similarity matrix to try, first the one the caches suggest.

    Each tile is one matrix product followed by two comparison passes over its result, so the passes are cheap
    when the tile is still in a cache: a **L3 tile** (square, its similarities + mask within 2/3 of the L3: 2048²
    for 32 MB, what was tuned on the AMD EPYC) and an **L2 tile** (1024 text columns, as many image rows as keep it
    within ~75 % of one core's L2: 128 rows for 1 MB, 256 for 2 MB), whose passes stay in the core's own cache — on
    a CPU whose product is fast and whose L3 is shared over a mesh (Intel Xeon) the passes weigh more, and there
    the L2 tile comes first. The caches come from the OS (:func:`cxrclip.hardware.this_cpu`); unknown sizes count
    as 1 MB of L2 and 32 MB of L3."""
    l2 = cpu.l2_bytes or 2**20
    l3 = cpu.l3_bytes or 32 * 2**20
    side = min(max(_pow2_floor(math.sqrt(2 / 3 * l3 / TILE_BYTES_PER_PAIR)), 1024), 4096)
    l3_tile = (side, side)
    l2_tile = (min(max(_pow2_floor(0.75 * l2 / (TILE_BYTES_PER_PAIR * 1024)), 64), 2048), 1024)
    first, second = (l2_tile, l3_tile) if cpu.vendor == "intel" else (l3_tile, l2_tile)
    return list(dict.fromkeys([first, second, (1024, 1024)]))


def choose_tile(timings: dict[tuple[int, int], float]) -> tuple[int, int]:
    """The tile with the least seconds per image × text pair (``timings``: tile → seconds per pair)."""
    return min(timings, key=lambda tile: (timings[tile], -tile[0] * tile[1]))


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    gt: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk: int | None = None,
    cpu: CpuInfo | None = None,
) -> dict[str, dict[str, float]]:
    """Image→text and text→image retrieval with identical texts merged.

    ``text_emb`` holds the unique texts; ``gt[i]`` is image i's text. A rank is 1 + the number of
    candidates scoring higher than the correct one (by more than ``TIE_TOLERANCE``); text→image uses
    the best-scoring matching image. One pass over the image×text similarity in tiles, each a matrix product and
    two comparison passes counted in int16; memory is one tile, whatever N is. ``chunk``: square tiles of that
    side; else the tile is chosen once per process (:func:`tile_candidates` from ``cpu``'s caches, this machine's
    by default; for large inputs each candidate counts one block of rows and the fastest per pair does the rest —
    the probe's work is part of the answer, and the counts do not depend on the tile).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    step = min(chunk or 2048, 32767)  # the correct-pair scores, in chunks (no N×dim copy of the texts)
    correct = torch.cat([(image_emb[r : r + step] * text_emb[gt[r : r + step]]).sum(dim=1) for r in range(0, n, step)])
    best = torch.full((m,), -torch.inf, dtype=correct.dtype).scatter_reduce(0, gt, correct, "amax")
    i2t = torch.ones(n, dtype=torch.int32)
    above = torch.ones(m, dtype=torch.int32)
    row_limit, col_limit = correct + TIE_TOLERANCE, best + TIE_TOLERANCE
    key = (image_emb.shape[1], image_emb.element_size())
    if chunk:
        candidates = [(step, step)]
    elif key in _CHOSEN:
        candidates = [_CHOSEN[key]]
    else:
        candidates = tile_candidates(cpu or this_cpu())
    probe = len(candidates) > 1 and n * m >= PROBE_MIN_PAIRS
    if not probe:
        candidates = candidates[:1]
    largest = max(min(r, n) * min(c, m) for r, c in candidates)
    buffer = torch.empty(largest, dtype=torch.bool)  # comparisons land here, counted as uint8 → int16
    product = torch.empty(largest, dtype=image_emb.dtype)  # every tile's similarities, in one warm allocation

    def count(r0: int, r1: int, cols: int) -> None:
        """Rows r0:r1 against every text, ``cols`` texts at a time (tile sides ≤ 32767: int16 sums fit)."""
        rows = image_emb[r0:r1]
        for c in range(0, m, cols):
            block = text_emb[c : c + cols]
            sim = torch.mm(rows, block.t(), out=product[: len(rows) * len(block)].view(len(rows), len(block)))
            mask = buffer[: sim.numel()].view(sim.shape)
            torch.gt(sim, col_limit[None, c : c + cols], out=mask)
            above[c : c + cols] += mask.view(torch.uint8).sum(dim=0, dtype=torch.int16)
            torch.gt(sim, row_limit[r0:r1, None], out=mask)
            i2t[r0:r1] += mask.view(torch.uint8).sum(dim=1, dtype=torch.int16)

    r = 0
    if probe:  # a warm-up block, then one timed block per candidate
        count(r, r + candidates[0][0], candidates[0][1])
        r += candidates[0][0]
        timings = {}
        for rows, cols in candidates:
            if r + rows > n:
                break
            start = time.perf_counter()
            count(r, r + rows, cols)
            timings[(rows, cols)] = (time.perf_counter() - start) / (rows * m)
            r += rows
        _CHOSEN[key] = choose_tile(timings) if timings else candidates[0]
        candidates = [_CHOSEN[key]]
    rows, cols = candidates[0]
    for r0 in range(r, n, rows):
        count(r0, min(r0 + rows, n), cols)
    present = torch.isfinite(best)  # texts that some image has
    return {"retrieval_i2t": _summary(i2t.long(), ks), "retrieval_t2i": _summary(above[present].long(), ks)}


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score rows (k × n) on the same rows, and their DeLong covariance (k × k).

    The fast midrank form (Sun & Xu, 2014) of DeLong, DeLong & Clarke-Pearson (1988): O(k·n log n).
    """
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    rank_all = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    rank_pos, rank_neg = rankdata(pos, axis=1), rankdata(neg, axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v_pos = (rank_all[:, :m] - rank_pos) / n  # each positive: share of negatives it beats (ties count half)
    v_neg = 1.0 - (rank_all[:, m:] - rank_neg) / m  # each negative: share of positives that beat it
    cov = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return aucs, cov


def auroc_ci(
    y: np.ndarray, scores: np.ndarray, *, method: str = "delong", level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A confidence interval of the AUROC: DeLong's (normal approximation, clipped to [0, 1]) or the
    percentile bootstrap over rows (resamples with a single class are skipped)."""
    from scipy.stats import norm

    y, scores = np.asarray(y).astype(int), np.asarray(scores, dtype=np.float64)
    if method == "delong":
        if min(y.sum(), y.size - y.sum()) < 2:  # one positive (or negative) row: no variance estimate
            return 0.0, 1.0
        auc, cov = delong_covariance(y, scores[None, :])
        half = norm.ppf(0.5 + level / 2) * math.sqrt(max(float(cov[0, 0]), 0.0))
        return max(0.0, float(auc[0]) - half), min(1.0, float(auc[0]) + half)
    if method != "bootstrap":
        raise ConfigError(f"AUROC interval method must be delong or bootstrap, got {method!r}")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        rows = rng.integers(0, y.size, y.size)
        if 0 < y[rows].sum() < y.size:
            samples.append(roc_auc_score(y[rows], scores[rows]))
    low, high = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of ``p >= threshold`` (None where undefined)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(p) >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "PPV": _ratio(tp, tp + fp),
        "NPV": _ratio(tn, tn + fn),
        "F1": _ratio(2 * tp, 2 * tp + fp + fn) or 0.0,
        "Accuracy": float((tp + tn) / max(y.size, 1)),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def binary_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    calibration=None,
    *,
    ci: str = "delong",
    n_boot: int = 1000,
) -> dict[str, object]:
    """Per-label metrics of scores (logits; rows × labels) against labels (1, 0, -1 = excluded).

    AUROC and its 95 % interval come from the score itself. Decisions use the calibration's probability and
    operating point per label (``calibration``: a :class:`~cxrclip.scoring.calibration.Calibration`; None =
    uncalibrated sigmoid at 0.5, flagged); ``at_0.5`` keeps the figures of the uncalibrated sigmoid at 0.5.
    ECE and Brier score are given before (``*_uncalibrated``) and after calibration. A label with no
    positive or no negative row is ``None`` ("undefined") and left out of the averages.
    """

    calibration = (calibration or Calibration.uncalibrated(names)).for_labels(names)
    raw, probs, thresholds = sigmoid(scores), calibration.probabilities(scores), calibration.thresholds
    out: dict[str, object] = {}
    defined = []
    for j, name in enumerate(names):
        keep = labels[:, j] >= 0
        y = labels[keep, j].astype(int)
        cal = calibration.labels[name]
        facts = {"threshold": float(thresholds[j]), "rule": cal.rule, "calibrated": cal.calibrated}
        if cal.note:
            facts["calibration_note"] = cal.note
        if y.size == 0 or y.min() == y.max():
            out[name] = {
                "AUROC": None,
                "F1": None,
                "Accuracy": None,
                "n_pos": int(y.sum()),
                "n": int(y.size),
                **facts,
                "note": "undefined: needs positive and negative rows",
            }
            continue
        p, p_raw = probs[keep, j], raw[keep, j]
        at_half = operating_point(y, p_raw, 0.5)
        out[name] = {
            "AUROC": float(roc_auc_score(y, scores[keep, j])),
            "AUROC_CI95": list(auroc_ci(y, scores[keep, j], method=ci, n_boot=n_boot)),
            **operating_point(y, p, thresholds[j]),
            **facts,
            "ECE": expected_calibration_error(y, p),
            "ECE_uncalibrated": expected_calibration_error(y, p_raw),
            "Brier": brier_score(y, p),
            "Brier_uncalibrated": brier_score(y, p_raw),
            "n_pos": int(y.sum()),
            "n": int(y.size),
            "at_0.5": {"F1": at_half["F1"], "Accuracy": at_half["Accuracy"]},
        }
        defined.append(out[name])
    for metric in ("AUROC", "F1", "Accuracy", "sensitivity", "specificity", "ECE", "ECE_uncalibrated", "Brier"):
        out[f"{metric}(Avg)"] = _mean(d[metric] for d in defined)
    decided = labels >= 0
    out["YES_per_image"] = float(((probs >= thresholds) & decided).sum(axis=1).mean()) if len(labels) else None
    out["true_per_image"] = float((labels == 1).sum(axis=1).mean()) if len(labels) else None
    out["at_0.5"] = {
        "F1(Avg)": _mean(d["at_0.5"]["F1"] for d in defined),
        "Accuracy(Avg)": _mean(d["at_0.5"]["Accuracy"] for d in defined),
        "YES_per_image": float(((raw >= 0.5) & decided).sum(axis=1).mean()) if len(labels) else None,
    }
    out["uncalibrated_labels"] = [n for n in names if not calibration.labels[n].calibrated]
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
