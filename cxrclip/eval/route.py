"""``cxrclip route --candidates A B … --data VALID.csv``: choose, per label, the member of a routed model on validation
data — the default (first) candidate unless another is better beyond the 95 % interval of the paired DeLong
difference — and write the routed model with the choice and its evidence in its card. The test split never
chooses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrclip.data.images import read_image
from cxrclip.data.records import load_records
from cxrclip.eval.calibrate import label_matrix
from cxrclip.eval.metrics import delong_covariance
from cxrclip.io import file_sha256
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.routed import Member, RoutingError, write_routed


def validation_scores(path: str | Path, images: Sequence[Path], names: Sequence[str], device=None) -> np.ndarray:
    """Zero-shot label logits (images × names) of one candidate, each image preprocessed as that model was."""
    predictor = Predictor.create(str(path), labels=list(names), device=device, gate=False, precision="fp32")
    out = []
    for start in range(0, len(images), 32):
        batch = [predictor.transform(read_image(p)) for p in images[start : start + 32]]
        out.append(predictor.logits(predictor.embed(batch)))
    return np.concatenate(out)


def paired_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray, z: float = 1.959964) -> dict:
    """AUROC of ``a`` and ``b`` on the same rows, each with its DeLong 95 % interval, and of ``a − b``."""
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    half = [z * float(np.sqrt(max(cov[k, k], 0.0))) for k in range(2)]
    return {
        "auroc": [round(float(aucs[0]), 4), round(float(aucs[1]), 4)],
        "ci95": [[round(max(0.0, aucs[k] - half[k]), 4), round(min(1.0, aucs[k] + half[k]), 4)] for k in range(2)],
        "difference": round(diff, 4),
        "difference_ci95": [round(diff - z * se, 4), round(diff + z * se, 4)],
    }


def choose_members(
    candidates: Sequence[str | Path], images: Sequence[Path], labels: np.ndarray, names: Sequence[str], device=None
) -> tuple[dict[str, int], dict]:
    """Per label, the candidate to answer it: the first candidate (the default) unless another one's validation
    AUROC is higher beyond the 95 % interval of the paired (DeLong) difference; labels with fewer than 2 positives
    or negatives stay with the default. ``labels``: images × names of 1 / 0 / -1 (-1 = left out for that label).
    Returns {label: candidate index} and the evidence per label."""
    scores = [validation_scores(c, images, names, device) for c in candidates]
    choice, evidence = {}, {}
    for j, name in enumerate(names):
        rows = labels[:, j] >= 0
        y = labels[rows, j]
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        entry: dict = {"n_pos": n_pos, "n_neg": n_neg, "candidates": {}}
        choice[name] = 0
        if min(n_pos, n_neg) < 2:
            entry["why"] = f"too few validation positives/negatives ({n_pos}/{n_neg}) to compare: the default"
            evidence[name] = entry
            continue
        best, best_auc = 0, None
        for k in range(len(candidates)):
            compared = paired_delong(y, scores[k][rows, j], scores[0][rows, j])
            entry["candidates"][str(candidates[k])] = {
                "auroc": compared["auroc"][0],
                "ci95": compared["ci95"][0],
                "minus_default": compared["difference"],
                "minus_default_ci95": compared["difference_ci95"],
            }
            if k and compared["difference_ci95"][0] > 0 and (best_auc is None or compared["auroc"][0] > best_auc):
                best, best_auc = k, compared["auroc"][0]
        choice[name] = best
        entry["chosen"] = str(candidates[best])
        entry["why"] = (
            "better than the default beyond the 95 % interval of the paired difference"
            if best
            else "no candidate beats the default beyond the 95 % interval: the default"
        )
        evidence[name] = entry
    return choice, evidence


def route_by_validation(
    candidates: Sequence[str],
    data_csv: str,
    out: str | Path,
    *,
    data_config,
    device=None,
    overwrite: bool = False,
) -> Path:
    """``cxrclip route --candidates … --data VALID.csv``: choose each label's member on validation data and write
    the routed model, with the evidence in its card."""
    if len(candidates) < 2:
        raise RoutingError("--candidates needs at least two checkpoints or bundles (the first is the default)")
    names = list(data_config.label_names)
    records = load_records(data_config)
    images = [r.images[0] for r in records]
    labels = label_matrix(records, names)
    choice, evidence = choose_members(candidates, images, labels, names, device)
    members, used = [], {}
    for k, path in enumerate(candidates):
        mine = tuple(n for n in names if choice[n] == k)
        if not mine:
            continue
        stem = Path(path).stem if Path(path).is_file() else Path(path).name
        name = stem if stem not in used else f"{stem}-{k}"
        used[name] = k
        members.append(Member(name, str(path), mine))
    card = {
        "chosen_on": {"path": str(Path(data_csv).resolve()), "sha256": file_sha256(data_csv), "rows": len(records)},
        "rule": "per label: the default (first candidate) unless another candidate's validation AUROC is higher "
        "beyond the 95 % interval of the paired DeLong difference",
        "candidates": [str(c) for c in candidates],
        "evidence": evidence,
    }
    return write_routed(out, members, default=members[0].name, card=card, overwrite=overwrite)
