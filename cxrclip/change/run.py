"""``cxrclip compare``: both models on the reviewed cases of a CSV (``cxrclip reviews export``'s reviewed_test.csv, or
any CSV with an image column and 0/1 label columns; a blank cell is not reviewed), judged by the plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrclip.change.compare import ModelScores, compare
from cxrclip.change.plan import ChangePlan
from cxrclip.data.cells import image_csv
from cxrclip.data.schema import csv_line
from cxrclip.exceptions import InputError
from cxrclip.infer import predict_files
from cxrclip.predict.factory import PredictorOptions, open_predictor

MAX_LISTED = 10


def reviewed_labels(rows: Sequence[dict], names: Sequence[str], path: Path) -> np.ndarray:
    """Rows × labels: 1, 0, or NaN for a blank cell (not reviewed, or the reader could not tell)."""
    y = np.full((len(rows), len(names)), np.nan)
    for i, row in enumerate(rows):
        for j, name in enumerate(names):
            cell = (row.get(name) or "").strip()
            if cell in ("1", "1.0"):
                y[i, j] = 1.0
            elif cell in ("0", "0.0"):
                y[i, j] = 0.0
            elif cell:
                raise InputError(f"{path}:{csv_line(i)}: column {name!r}: {cell!r} is not 0, 1 or blank")
    return y


def scores_of(options: PredictorOptions, images: Sequence[Path], names: Sequence[str]) -> tuple[ModelScores, str]:
    """One model's probabilities and thresholds on the images, and its SHA-256."""
    predictor = open_predictor(options)
    unknown = sorted(set(names) - set(predictor.label_names))
    if unknown:
        raise InputError(f"{options.model_path}: does not answer {unknown}")
    results, failed = predict_files(predictor, images, None, 32)
    if failed:
        raise InputError(f"{len(failed)} image(s) cannot be read: {failed[0][0]}: {failed[0][1]}")
    p = np.array([[r.labels[n].probability for n in names] for r in results])
    t = np.array([results[0].labels[n].threshold for n in names])
    return ModelScores(str(options.model_path), p, t), predictor.card()["checkpoint_sha256"]


def compare_models(plan_path: str, test_csv: str, champion: str, challenger: str, *, device: str | None = None,
                   patient_column: str | None = None) -> dict:  # fmt: skip
    """The plan's verdict on ``challenger`` against ``champion`` on the reviewed cases of ``test_csv``; every input is
    checked (plan, CSV cells, images on disk) before a model is loaded."""
    plan = ChangePlan.load(plan_path)
    path = Path(test_csv)
    rows, images = image_csv(path)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED])
        raise InputError(f"{path}: {len(missing)} image(s) not found:\n  {listed}")
    columns = [c for c in rows[0] if c not in ("image", "text", patient_column)]
    names = [n for n in (plan.labels or columns) if n in columns]
    if not names:
        raise InputError(f"{path}: none of the plan's labels {list(plan.labels or [])} is a column")
    if patient_column and patient_column not in rows[0]:
        raise InputError(f"{path}: no column {patient_column!r} (--patient-column)")
    y = reviewed_labels(rows, names, path)
    groups = [r[patient_column] for r in rows] if patient_column else None
    options = dict(device=device, gate=False)  # reviewed cases are judged whatever the gate says of them
    a, a_sha = scores_of(PredictorOptions(champion, **options), images, names)
    b, b_sha = scores_of(PredictorOptions(challenger, **options), images, names)
    out = compare(y, names, a, b, plan, groups)
    out["champion_sha256"], out["challenger_sha256"] = a_sha, b_sha
    out["cases"] = {"csv": str(path), "rows": len(rows), "by": patient_column or "image"}
    return out


def verdict_lines(out: dict) -> list[str]:
    lines = [
        f"plan {out['plan']['path']} (sha256 {out['plan']['sha256'][:12]}…), one-sided alpha "
        f"{out['plan']['per_test_alpha']:.4g} per test ({out['plan']['correction']})",  # fmt: skip
        f"{'label':34s} {'metric':12s} {'champion':>9s} {'challenger':>10s} {'diff':>7s} {'bound':>7s}  holds",
    ]
    for r in out["rows"]:
        lines.append(f"{r['label'][:34]:34s} {r['metric']:12s} {r['champion']:9.3f} {r['challenger']:10.3f} "
                     f"{r['difference']:+7.3f} {r['bound']:+7.3f}  {'yes' if r['holds'] else 'no'}")  # fmt: skip
    lines += [f"{'holds' if v['holds'] else 'FAILS'}: {v['criterion']}" for v in out["criteria"]]
    lines.append(f"decision: {out['decision'].upper()}" + ("".join(f"\n  {r}" for r in out["reasons"])))
    return lines
