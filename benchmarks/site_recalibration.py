"""What a site's reviewed cases buy: recalibrate a model on N reviewed cases of a new hospital and score the rest of
that hospital's films, against the first site's calibration.

    python benchmarks/site_recalibration.py --data ../shared/data/cxr_real_dev --out /tmp/site --epochs 10

The new site: the films of cxr_real_dev whose metadata url is on github.com (one hospital's own radiographs, Hannover
Medical School: 79 films, 37 patients). Site A: every other film. The model is trained on site A's train split and
calibrated on site A's valid split (the Hannover films never seen). Then, R times: draw reviewed Hannover patients
until at least N films (whole patients, so the reviewed and the scored films never share a patient), fit the site
calibration on them exactly as `cxrclip calibrate --site` does (same rules and minimum counts: a label with too
few reviewed positives or negatives keeps site A's calibration), and score both calibrations on the remaining
Hannover films: F1, sensitivity, specificity at each one's operating point, and ECE of its probabilities. Intervals
are the 2.5th and 97.5th percentiles over the R draws (the uncertainty of which cases happened to be reviewed, on
this one site).
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


NEW_SITE = ("url", "github.com")  # --new-site FIELD=TEXT: metadata rows whose FIELD contains TEXT


def is_new_site(row: dict) -> bool:
    field, text = NEW_SITE
    return text in (row.get(field) or "")


def read_rows(data: Path) -> dict[str, dict]:
    """image path (as in the CSVs) → metadata row."""
    with (data / "metadata.csv").open(newline="", encoding="utf-8") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def label_rows(data: Path, names) -> dict[str, np.ndarray]:
    """image → 0/1 per label, from every split (train/valid: text_label lists; test: 0/1 columns)."""
    out = {}
    for split in ("train", "valid"):
        with (data / f"{split}.csv").open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                present = set(ast.literal_eval(row["text_label"]))
                out[ast.literal_eval(row["image"])[0]] = np.array([int(n in present) for n in names])
    with (data / "test.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[ast.literal_eval(row["image"])[0]] = np.array([int(row[n]) for n in names])
    return out


def site_a_csvs(data: Path, meta: dict, out: Path) -> Path:
    """train.csv and valid.csv without the new site's films (absolute image paths), prompts and labels beside."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        with (data / f"{split}.csv").open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if not is_new_site(meta[ast.literal_eval(r["image"])[0]])]
            fields = reader.fieldnames
        with (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "image": repr([str(data / ast.literal_eval(r["image"])[0])])})
    for name in ("prompts.json", "labels.json"):
        (out / name).write_text((data / name).read_text())
    return out


def train_site_a(args, site_a: Path, names, out: Path) -> Path:
    from real_data import base_overrides, with_labels

    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    ckpt = out / "checkpoints" / "model-best.tar"
    if ckpt.is_file():
        print(f"reusing {ckpt}", flush=True)
        return ckpt
    settings = argparse.Namespace(model="clip_cpu_offline", image_size=224, epochs=args.epochs, lr=1e-4, seed=args.seed,
                                  num_negs=2, targets="diagonal", bf16=args.bf16, override=[])  # fmt: skip
    train(with_labels(compose("train", [*base_overrides(site_a, settings, out), "base.overwrite=true"]), names))
    return ckpt


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from cxrclip.scoring.calibration import expected_calibration_error

    called = p >= threshold
    tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
    fn, tn = int((~called & (y == 1)).sum()), int((~called & (y == 0)).sum())
    sens = tp / (tp + fn) if tp + fn else np.nan
    spec = tn / (tn + fp) if tn + fp else np.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    return {"f1": f1, "sensitivity": sens, "specificity": spec, "ece": expected_calibration_error(y, p)}


def summary(values) -> str:
    v = np.array([x for x in values if not np.isnan(x)])
    if not len(v):
        return "—"
    return f"{v.mean():.2f} [{np.percentile(v, 2.5):.2f}, {np.percentile(v, 97.5):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="site_recalibration_out")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bf16", default="false")
    p.add_argument("--reviewed", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--min-count", type=int, default=5, help="report labels with ≥ this many new-site positives and "
                   "negatives (the others are listed as too small to tell)")  # fmt: skip
    p.add_argument("--new-site", default="url=github.com", help="FIELD=TEXT: the metadata.csv rows whose FIELD "
                   "contains TEXT are the new site (default: the Hannover films)")  # fmt: skip
    args = p.parse_args()
    global NEW_SITE
    field, _, text = args.new_site.partition("=")
    NEW_SITE = (field, text)
    from cxrclip.data.images import read_image
    from cxrclip.eval.calibrate import calibrate_checkpoint
    from cxrclip.predict.checkpoint import Predictor
    from cxrclip.scoring.calibration import CalibrationSettings, fit_calibration

    data, out = Path(args.data).resolve(), Path(args.out)
    names = json.loads((data / "labels.json").read_text())
    meta = read_rows(data)
    truth = label_rows(data, names)
    site_a = site_a_csvs(data, meta, out / "site_a_data")
    ckpt = train_site_a(args, site_a, names, out / "site_a_model")

    from cxrclip.cli import _data_config  # the same data config `cxrclip calibrate` builds

    cal_args = argparse.Namespace(image_root=None, labels=None, prompts=str(site_a / "prompts.json"))
    valid = _data_config(str(site_a / "valid.csv"), "valid", cal_args)
    valid = dataclasses.replace(valid, label_names=tuple(names))
    settings = CalibrationSettings()
    site_a_cal = calibrate_checkpoint(ckpt, [valid], settings, device="cpu")

    new = sorted(img for img, row in meta.items() if is_new_site(row))
    patients = np.array([meta[img]["patient_id"] for img in new])
    y = np.stack([truth[img] for img in new])
    predictor = Predictor.create(str(ckpt), prompts=str(data / "prompts.json"), labels=names, device="cpu")
    emb = np.concatenate([predictor.embed([predictor.transform(read_image(data / img)) for img in new[i : i + 16]])
                          for i in range(0, len(new), 16)])  # fmt: skip
    logits = predictor.logits(emb)
    counts = {n: (int(y[:, j].sum()), int(len(y) - y[:, j].sum())) for j, n in enumerate(names)}
    shown = [n for n in names if min(counts[n]) >= args.min_count]
    print(f"new site: {len(new)} films, {len(set(patients))} patients; positives/negatives per label: "
          + ", ".join(f"{n} {a}/{b}" for n, (a, b) in counts.items()), flush=True)  # fmt: skip
    print(f"too small to tell (< {args.min_count} positives or negatives): "
          + (", ".join(n for n in names if n not in shown) or "none"), flush=True)  # fmt: skip

    rng = np.random.default_rng(args.seed)
    unique = np.unique(patients)
    rows = []
    for n_reviewed in args.reviewed:
        draws = {n: {"A": [], "site": [], "fitted": 0} for n in shown}
        for _ in range(args.draws):
            order = rng.permutation(unique)
            chosen, taken = [], 0
            for pid in order:
                if taken >= n_reviewed:
                    break
                chosen.append(pid)
                taken += int((patients == pid).sum())
            reviewed = np.isin(patients, chosen)
            scored = ~reviewed
            fitted = fit_calibration(logits[reviewed], y[reviewed], names, settings)
            site_cal = fitted.over(site_a_cal)
            for n in shown:
                j = names.index(n)
                a_cal, s_cal = site_a_cal.labels[n], site_cal.labels[n]
                draws[n]["A"].append(metrics(y[scored, j], a_cal.probability(logits[scored, j]), a_cal.threshold))
                draws[n]["site"].append(metrics(y[scored, j], s_cal.probability(logits[scored, j]), s_cal.threshold))
                draws[n]["fitted"] += fitted.labels[n].calibrated  # the site's own fit, before site A fills in
        for n in shown:
            row = {"label": n, "reviewed": n_reviewed, "site_fitted_share": draws[n]["fitted"] / args.draws}
            for key in ("f1", "sensitivity", "specificity", "ece"):
                a = np.array([d[key] for d in draws[n]["A"]])
                s = np.array([d[key] for d in draws[n]["site"]])
                row[key] = {"site_a": summary(a), "site": summary(s), "difference": summary(s - a)}
            rows.append(row)
    print("\n| label | reviewed N | site calibration fitted | metric | site A calibration | site recalibrated | "
          "difference (site − A) |")  # fmt: skip
    print("|---|---:|---:|---|---|---|---|")
    for row in rows:
        for key in ("f1", "sensitivity", "specificity", "ece"):
            print(f"| {row['label']} | {row['reviewed']} | {row['site_fitted_share']:.0%} | {key} | "
                  f"{row[key]['site_a']} | {row[key]['site']} | {row[key]['difference']} |")  # fmt: skip
    (out / "site_recalibration.json").write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
