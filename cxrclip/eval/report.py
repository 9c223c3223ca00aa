"""Writing results: JSON (merged with what is already there), a markdown table, ROC and confusion PNGs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cxrclip.exceptions import OutputError
from cxrclip.io import atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from cxrclip.scoring.calibration import expected_calibration_error, reliability_bins

LABEL_COLUMNS = (
    ("AUROC [95% CI]", None),
    ("threshold (rule)", None),
    ("sens", "sensitivity"),
    ("spec", "specificity"),
    ("PPV", "PPV"),
    ("NPV", "NPV"),
    ("F1", "F1"),
    ("ECE raw→cal", None),
)
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
    merged = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutputError(f"{path} exists but is not valid JSON ({e}); it is left as it is: move it away") from e
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
    for ckpt, result in results.items():  # the per-label table of the classification section
        if result.get(best_by[0]):
            lines += ["", label_table(dataset, ckpt, result[best_by[0]]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def label_table(dataset: str, checkpoint: str, binary: Mapping) -> str:
    """Per label at the stored operating points: AUROC with its interval, threshold and rule, sensitivity,
    specificity, PPV, NPV, F1 and ECE before → after calibration; flags for uncalibrated/undefined labels."""
    head = "| label | pos/n | " + " | ".join(title for title, _ in LABEL_COLUMNS) + " | flag |"
    lines = [f"## {dataset}: per label, {checkpoint}", "", head, "|" + " --- |" * (len(LABEL_COLUMNS) + 3)]
    for name, v in binary.items():
        if not isinstance(v, dict) or "n_pos" not in v:
            continue
        flags = [] if v.get("calibrated") else ["uncalibrated"]
        if v.get("AUROC") is None:
            flags.append("undefined")
            cells = ["–"] * len(LABEL_COLUMNS)
        else:
            low, high = v["AUROC_CI95"]
            cells = [f"{v['AUROC']:.3f} [{low:.3f}, {high:.3f}]", f"{v['threshold']:.3f} ({v['rule']})"]
            cells += [_fmt(v[key]) for _, key in LABEL_COLUMNS[2:-1]]
            cells.append(f"{v['ECE_uncalibrated']:.3f}→{v['ECE']:.3f}")
        lines.append(f"| {name} | {v['n_pos']}/{v['n']} | " + " | ".join(cells) + f" | {', '.join(flags)} |")
    at_half = binary.get("at_0.5") or {}
    lines += [
        "",
        f"Averages at the operating points: F1 {_fmt(binary.get('F1(Avg)'))}, accuracy "
        f"{_fmt(binary.get('Accuracy(Avg)'))}, ECE {_fmt(binary.get('ECE(Avg)'))} (uncalibrated "
        f"{_fmt(binary.get('ECE_uncalibrated(Avg)'))}); YES per image {_fmt(binary.get('YES_per_image'))} "
        f"(true labels per image {_fmt(binary.get('true_per_image'))}). At a fixed 0.5 without calibration: F1 "
        f"{_fmt(at_half.get('F1(Avg)'))}, YES per image {_fmt(at_half.get('YES_per_image'))}.",
    ]
    calibration = binary.get("calibration") or {}
    if calibration.get("note"):
        lines += ["", f"**Note:** {calibration['note']}"]
    if binary.get("uncalibrated_labels"):
        lines += [
            "",
            "Uncalibrated labels (fixed threshold, probability not calibrated): "
            + ", ".join(binary["uncalibrated_labels"]),
        ]
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


def plot_reliability(
    path: Path, raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, title: str
) -> Path | None:
    """Observed rate against predicted probability (all labels' defined rows pooled), before and after
    calibration, with the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = labels >= 0
    if not keep.any():
        return None
    y = labels[keep]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for probs, name, marker in ((raw, "uncalibrated", "s"), (calibrated, "calibrated", "o")):
        bins = reliability_bins(y, probs[keep])
        ece = expected_calibration_error(y, probs[keep])
        ax.plot([b[0] for b in bins], [b[1] for b in bins], marker=marker, label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
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
