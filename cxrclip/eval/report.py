"""Writing results: JSON (merged with what is already there), a markdown table, ROC and confusion PNGs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cxrclip.io import atomic_write, atomic_write_text  # noqa: F401 (re-exported)

COLUMNS = (
    ("zeroshot_binary", "AUROC(Avg)"),
    ("zeroshot_binary", "F1(Avg)"),
    ("zeroshot_binary", "Accuracy(Avg)"),
    ("zeroshot_multiclass", "Accuracy(Micro)"),
    ("zeroshot_multiclass", "Accuracy(Macro)"),
    ("retrieval_i2t", "Recall@1"),
    ("retrieval_i2t", "Recall@5"),
    ("retrieval_i2t", "Recall@10"),
    ("retrieval_i2t", "MeanRank"),
    ("retrieval_t2i", "Recall@5"),
)


def write_json_merged(path: Path, results: Mapping[str, dict]) -> Path:
    """Add these checkpoints' results to the file, keeping other checkpoints' results already there."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    return atomic_write_text(path, json.dumps(merged, indent=2) + "\n")


def _cell(result: Mapping, section: str, key: str) -> str:
    value = (result.get(section) or {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def markdown_table(
    dataset: str,
    results: Mapping[str, dict],
    best_by=("zeroshot_binary", "AUROC(Avg)"),
    columns: Sequence[tuple[str, str]] = COLUMNS,
) -> str:
    """One row per checkpoint; the best one (by ``best_by``) marked."""
    scores = {c: (r.get(best_by[0]) or {}).get(best_by[1]) for c, r in results.items()}
    scored = {c: s for c, s in scores.items() if s is not None}
    best = max(scored, key=scored.get) if scored else None
    header = "| checkpoint | " + " | ".join(f"{s.split('_')[-1]} {k}" for s, k in columns) + " |"
    lines = [f"# {dataset}", "", header, "|" + " --- |" * (len(columns) + 1)]
    for ckpt, result in results.items():
        name = f"**{ckpt}** (best)" if ckpt == best and len(results) > 1 else ckpt
        lines.append(f"| {name} | " + " | ".join(_cell(result, s, k) for s, k in columns) + " |")
    if best:
        lines += ["", f"Best {best_by[1]}: {scored[best]:.3f} ({best})"]
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_roc(path: Path, probs: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(7, 6))
    drawn = 0
    for j, name in enumerate(names):
        keep = labels[:, j] >= 0
        y = labels[keep, j]
        if y.size == 0 or y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, probs[keep, j])
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, probs[keep, j]):.2f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _save_figure(fig, path)


def plot_confusion(path: Path, confusion: Sequence[Sequence[int]], names: Sequence[str], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save_figure(fig, path)


def write_thresholds(out_dir: Path, dataset: str, results: Mapping[str, dict]) -> None:
    """Per checkpoint, ``<checkpoint stem>.thresholds-<dataset>.json``: each label's Youden threshold on this
    dataset, for ``inference.py --thresholds``. Fit them on a validation set, not on the set you report."""
    for ckpt, result in results.items():
        binary = result.get("zeroshot_binary") or {}
        thresholds = {
            k: v["threshold_youden"]
            for k, v in binary.items()
            if isinstance(v, dict) and v.get("threshold_youden") is not None
        }
        if thresholds:
            path = out_dir / f"{Path(ckpt).stem}.thresholds-{dataset}.json"
            atomic_write_text(path, json.dumps(thresholds, indent=2) + "\n")
