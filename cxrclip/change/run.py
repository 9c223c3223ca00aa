"""``cxrclip compare``: both models on the reviewed cases of a CSV (``cxrclip reviews export``'s reviewed_test.csv, or
any CSV with an image column and 0/1 label columns; a blank cell is not reviewed), judged by the plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrclip.change.compare import ModelScores, compare
from cxrclip.change.plan import ChangePlan
from cxrclip.change.promote import champion as champion_in_effect
from cxrclip.change.promote import model_sha256
from cxrclip.change.retrain import ReviewedFilm, latest_reviews, patient_of, read_patients, reviewed_films, trained_on
from cxrclip.data.cells import image_csv
from cxrclip.data.schema import csv_line
from cxrclip.exceptions import InputError
from cxrclip.infer import predict_files
from cxrclip.io import database_url
from cxrclip.model.checkpoint import load_checkpoint
from cxrclip.predict.factory import PredictorOptions, open_predictor
from cxrclip.reviews.store import ReviewStore

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
    require_images(images, str(path))
    columns = [c for c in rows[0] if c not in ("image", "text", patient_column)]
    names = [n for n in (plan.labels or columns) if n in columns]
    if not names:
        raise InputError(f"{path}: none of the plan's labels {list(plan.labels or [])} is a column")
    if patient_column and patient_column not in rows[0]:
        raise InputError(f"{path}: no column {patient_column!r} (--patient-column)")
    y = reviewed_labels(rows, names, path)
    groups = [r[patient_column] for r in rows] if patient_column else None
    out = judge(plan, images, y, names, groups, champion, challenger, device)
    out["cases"] = {"csv": str(path), "rows": len(rows), "by": patient_column or "image"}
    return out


def compare_on_reviews(plan_path: str, db: str, challenger: str, champion: str | None = None, *,
                       device: str | None = None, patients: str | None = None) -> dict:  # fmt: skip
    """``cxrclip compare --db``: the plan's verdict on the store's reviewed films, less every film either model trained
    or was calibrated on (``cxrclip retrain`` records them); a patient's films resampled together. A film whose image
    was kept is answered now by both models; one whose image was not kept counts when the prediction log holds both
    models' answers to it — the champion's as given, the challenger's from ``--shadow`` — with their decisions as
    given. The champion: ``champion``, else the one the audit rows name, else the challenger's base."""
    plan = ChangePlan.load(plan_path)
    store = ReviewStore(database_url(db, must_exist=True))
    try:
        table = read_patients(patients)
        films, seen = reviewed_films(store, table)
        unkept = [ReviewedFilm(None, r["image_sha256"], patient_of(r, table), dict(r["verdicts"]))
                  for r in latest_reviews(store) if not r["image_path"]]  # fmt: skip
        logs: dict[tuple[str, str], dict] = {}
        for role in ("answer", "shadow"):
            for row in store.predictions(role=role):
                logs.setdefault((row["model_sha256"], row["image_sha256"]), row["labels"])
        now = champion_in_effect(store)
    finally:
        store.close()
    state = load_checkpoint(challenger) if Path(challenger).is_file() else {}
    seen_in_training = trained_on(state, challenger)
    champion = champion or (now or {}).get("path") or ((state.get("retrain") or {}).get("base") or {}).get("path")
    if not champion:
        raise InputError("no champion: give --champion MODEL (no promotion recorded, no base in the challenger)")
    if Path(champion).is_file():  # a champion that was once a challenger: the films it learnt from are not evidence
        seen_in_training |= trained_on(load_checkpoint(champion), champion)
    shas = model_sha256(champion), model_sha256(challenger)
    films = [f for f in films if f.sha256 not in seen_in_training]
    logged = [f for f in unkept if f.sha256 not in seen_in_training and all((m, f.sha256) in logs for m in shas)]
    if not films and not logged:
        raise InputError(f"{db}: no reviewed film that neither model trained on, with its image kept or both models' "
                         "answers logged (cxrclip serve --keep-images, --shadow)")  # fmt: skip
    names = list(plan.labels or dict.fromkeys(n for f in films + logged for n in f.verdicts))
    value = {"present": 1.0, "absent": 0.0}
    y = np.array([[value.get(f.verdicts.get(n), np.nan) for n in names] for f in films + logged])
    scores = []
    for path, sha in zip((champion, challenger), shas):
        now_scores = None
        if films:
            now_scores, _ = scores_of(PredictorOptions(path, device=device, gate=False), [f.image for f in films],
                                      names)  # fmt: skip
        scores.append(with_logged(now_scores, [logs[sha, f.sha256] for f in logged], names, str(path)))
    out = compare(y, names, scores[0], scores[1], plan, [f.patient for f in films + logged])
    out["champion_sha256"], out["challenger_sha256"] = shas
    out["cases"] = {"db": db, "rows": len(films) + len(logged), "answered_now": len(films), "from_logs": len(logged),
                    "by": "patient", "left_out_trained_on": len(seen_in_training),
                    "reviewed_images": seen["images_reviewed"], "not_kept": seen["not_kept"]}  # fmt: skip
    return out


def with_logged(now: ModelScores | None, logged: Sequence[dict], names: Sequence[str], name: str) -> ModelScores:
    """One model's scores on the films answered now (``now``), followed by those of the prediction log (per film
    ``{label: [probability, YES]}``; a label it did not answer then is NaN, and left out of that label)."""
    p_log = np.array([[float((a.get(n) or [np.nan])[0]) for n in names] for a in logged]).reshape(-1, len(names))
    c_log = np.array([[bool((a.get(n) or [0, False])[1]) for n in names] for a in logged]).reshape(-1, len(names))
    if now is None:
        return ModelScores(name, p_log, np.full(len(names), np.nan), c_log)
    return ModelScores(name, np.concatenate([now.probability, p_log]), now.threshold,
                       np.concatenate([now.calls(), c_log]))  # fmt: skip


def require_images(images: Sequence[Path], where: str) -> None:
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED])
        raise InputError(f"{where}: {len(missing)} image(s) not found:\n  {listed}")


def judge(plan: ChangePlan, images: Sequence[Path], y: np.ndarray, names: Sequence[str], groups, champion: str,
          challenger: str, device: str | None) -> dict:  # fmt: skip
    options = dict(device=device, gate=False)  # reviewed cases are judged whatever the gate says of them
    a, a_sha = scores_of(PredictorOptions(champion, **options), images, names)
    b, b_sha = scores_of(PredictorOptions(challenger, **options), images, names)
    out = compare(y, names, a, b, plan, groups)
    out["champion_sha256"], out["challenger_sha256"] = a_sha, b_sha
    return out


def verdict_lines(out: dict) -> list[str]:
    lines = [
        f"plan {out['plan']['path']} (sha256 {out['plan']['sha256'][:12]}…), one-sided alpha "
        f"{out['plan']['per_test_alpha']:.4g} per test ({out['plan']['correction']})",  # fmt: skip
        f"{'label':34s} {'criterion':20s} {'champion':>9s} {'challenger':>10s} {'diff':>7s} {'bound':>7s}  holds",
    ]
    for r in out["rows"]:
        test = f"{r['metric']} {'non-inf' if r['kind'] == 'non_inferiority' else 'superior'} {r['margin']:g}"
        lines.append(f"{r['label'][:34]:34s} {test:20s} {r['champion']:9.3f} {r['challenger']:10.3f} "
                     f"{r['difference']:+7.3f} {r['bound']:+7.3f}  {'yes' if r['holds'] else 'no'}")  # fmt: skip
    lines += [f"{'holds' if v['holds'] else 'FAILS'}: {v['criterion']}" for v in out["criteria"]]
    lines.append(f"decision: {out['decision'].upper()}" + ("".join(f"\n  {r}" for r in out["reasons"])))
    return lines
