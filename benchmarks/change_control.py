"""What a site's reviews buy under change control: retrain a challenger on N reviewed films of a new site and let the
plan judge it against the champion on the site's other patients.

    python benchmarks/change_control.py --data ../shared/data/cxr_real_dev --out /tmp/cc --new-site "view=AP Supine"

The champion: `clip_cpu_offline` with `+recipe=small_data` (both towers locked) trained on every film that is not the
new site's, calibrated on their valid split. Then, for N reviewed films and each draw: reviewed new-site patients
(whole patients, until ≥ N films) — at random, or in the review queue's order (the champion's probability nearest
its operating point first, as `GET /v1/review-queue` orders them, among the films of a random 80 % of the patients:
those that have "arrived", so that queue draws vary too) — go into a review store exactly as the server
would keep them; `cxrclip retrain` trains, calibrates and gates a challenger from them (its own rules: ≥ 5 reviewed
positives and negatives per label in scope in fit and in validation, else it refuses — a result, counted); the
plan (`benchmarks/change_control_plan.yaml`, its SHA-256 printed first) judges the challenger against the champion
on the new site's remaining patients, as `cxrclip compare` does. Per label: AUROC and ECE of both, mean and
[2.5 %, 97.5 %] over the draws, and how often the plan promoted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import site_recalibration as sites  # noqa: E402

PLAN = Path(__file__).with_name("change_control_plan.yaml")


def train_champion(args, site_a: Path, names, out: Path) -> Path:
    from real_data import base_overrides, with_labels

    from cxrclip.config import compose
    from cxrclip.jobs import pretrain

    ckpt = out / "checkpoints" / "model-best.tar"
    if ckpt.is_file():
        print(f"reusing {ckpt}", flush=True)
        return ckpt
    settings = argparse.Namespace(model="clip_cpu_offline", image_size=288, epochs=args.epochs, lr=1e-3,
                                  seed=args.seed, num_negs=2, targets="label_set", bf16="false",
                                  override=[])  # fmt: skip
    overrides = [*base_overrides(site_a, settings, out), "+recipe=small_data", "base.image_size=288",
                 "optimizer.config.lr=1e-3", "base.overwrite=true"]  # fmt: skip
    pretrain(with_labels(compose("train", overrides), names))
    return ckpt


def probabilities(ckpt: Path, images: list[Path], names) -> tuple[np.ndarray, np.ndarray]:
    from cxrclip.change.run import scores_of
    from cxrclip.predict.factory import PredictorOptions

    scores, _ = scores_of(PredictorOptions(str(ckpt), device="cpu", gate=False), images, names)
    return scores.probability, scores.threshold


def queue_order(p: np.ndarray, t: np.ndarray, patients: list[str]) -> list[str]:
    """Patients by their most uncertain film: the smallest |probability − threshold| over the labels, as the
    review queue scores a film (without a challenger yet to disagree with)."""
    margin = np.abs(p - t).min(axis=1)
    order = []
    for i in np.argsort(margin, kind="stable"):
        if patients[i] not in order:
            order.append(patients[i])
    return order


def reviewed_patients(order: list[str], patients: list[str], n: int) -> set[str]:
    chosen, films = set(), 0
    for pt in order:
        if films >= n:
            break
        chosen.add(pt)
        films += patients.count(pt)
    return chosen


def one_draw(champion: Path, films: list[Path], y: np.ndarray, patients: list[str], names, chosen: set[str],
             base_scores, plan, args, seed: int) -> dict:  # fmt: skip
    from cxrclip.change.compare import ModelScores, compare
    from cxrclip.change.retrain import RetrainRefused, retrain
    from cxrclip.reviews.store import ReviewStore

    reviewed = [i for i, pt in enumerate(patients) if pt in chosen]
    rest = np.array([i for i, pt in enumerate(patients) if pt not in chosen])
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        store = ReviewStore(Path(tmp) / "reviews.sqlite")
        for i in reviewed:
            verdicts = {n: "present" if y[i, j] else "absent" for j, n in enumerate(names)}
            store.add(reviewer="benchmark", image_sha256=hashlib.sha256(films[i].read_bytes()).hexdigest(),
                      model_sha256="0" * 64, calibration="model", shown={}, verdicts=verdicts, labels=names,
                      image_path=str(films[i]), image_name=films[i].name)  # fmt: skip
        patients_csv = Path(tmp) / "patients.csv"
        patients_csv.write_text("image,patient\n" + "".join(f"{films[i].resolve()},{patients[i]}\n" for i in reviewed))
        try:
            manifest = retrain(store, champion, Path(tmp) / "challenger", scope=args.scope, patients=str(patients_csv),
                               epochs=args.epochs, seed=seed)  # fmt: skip
        except RetrainRefused as e:
            return {"reviewed": len(reviewed), "retrain": "refused", "reason": str(e).splitlines()[1:]}
        p, t = probabilities(Path(manifest["challenger"]["path"]), [films[i] for i in rest], names)
    pa, ta = base_scores
    out = compare(y[rest].astype(float), names, ModelScores("champion", pa[rest], ta), ModelScores("challenger", p, t),
                  plan, [patients[i] for i in rest])  # fmt: skip
    return {"reviewed": len(reviewed), "scored": len(rest), "retrain": "trained", "decision": out["decision"],
            "reasons": out["reasons"], "rows": out["rows"]}  # fmt: skip


def interval(values) -> str:
    v = np.array([x for x in values if np.isfinite(x)])
    if not len(v):
        return "—"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} [{np.percentile(v, 2.5):.3f}, {np.percentile(v, 97.5):.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="change_control_out")
    p.add_argument("--new-site", default="url=github.com", help="FIELD=TEXT: metadata rows whose FIELD contains TEXT")
    p.add_argument("--reviewed", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--draws", type=int, default=10, help="draws per N and order")
    p.add_argument("--orders", nargs="+", default=["queue", "random"], choices=["queue", "random"],
                   help="queue: reviews in the review queue's order (of the films of a random 80 %% of the patients); "
                   "random: whole patients at random")  # fmt: skip
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scope", nargs="+", default=["Endotracheal tube", "COVID-19"])
    p.add_argument("--plan", default=str(PLAN))
    args = p.parse_args()
    field, _, text = args.new_site.partition("=")
    sites.NEW_SITE = (field, text)
    from cxrclip.change.plan import ChangePlan

    plan = ChangePlan.load(args.plan)  # declared before any challenger exists
    print(f"plan {args.plan}: SHA-256 {plan.sha256}", flush=True)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = json.loads((data / "labels.json").read_text())
    meta = sites.read_rows(data)
    labels = sites.label_rows(data, names)
    start = time.perf_counter()
    champion = train_champion(args, sites.site_a_csvs(data, meta, out / "site_a"), names, out / "champion")
    print(f"champion {champion} ({time.perf_counter() - start:.0f} s)", flush=True)
    new = sorted(i for i, r in meta.items() if sites.is_new_site(r))
    films = [data / i for i in new]
    y = np.stack([labels[i] for i in new])
    patients = [meta[i]["patient_id"] for i in new]
    base = probabilities(champion, films, names)
    print(f"new site {args.new_site}: {len(films)} films, {len(set(patients))} patients; positives " +
          ", ".join(f"{n} {int(y[:, j].sum())}" for j, n in enumerate(names)), flush=True)  # fmt: skip
    results = []
    rng = np.random.default_rng(args.seed)
    for n in args.reviewed:
        if n >= len(films) - 10:
            results.append({"n": n, "order": "any", "skipped": f"the site has {len(films)} films: reviewing {n} "
                            "leaves fewer than 10 to judge on"})  # fmt: skip
            print(results[-1], flush=True)
            continue
        unique = sorted(set(patients))
        orders = []
        if "queue" in args.orders:  # each draw: the films of a random 80 % of the patients have arrived; the queue
            for _ in range(args.draws):  # orders those (so queue draws vary as random draws do)
                arrived = set(rng.permutation(unique)[: int(0.8 * len(unique))])
                mask = np.array([pt in arrived for pt in patients])
                ranked = queue_order(base[0][mask], base[1], [pt for pt in patients if pt in arrived])
                orders.append(("queue", ranked))
        if "random" in args.orders:
            orders += [("random", list(rng.permutation(unique))) for _ in range(args.draws)]
        for d, (kind, order) in enumerate(orders):
            t0 = time.perf_counter()
            r = one_draw(champion, films, y, patients, names, reviewed_patients(order, patients, n), base, plan, args,
                         seed=args.seed + d)  # fmt: skip
            r.update(n=n, order=kind, seconds=round(time.perf_counter() - t0, 1))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "rows"}), flush=True)
    (out / "results.json").write_text(json.dumps({"plan_sha256": plan.sha256, "results": results}, indent=1))
    print()
    print("| N | order | draws | retrain refused | plan: promote / refuse | label | AUROC champion → challenger "
          "| ECE champion → challenger |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---|---|---|")
    for n in args.reviewed:
        for kind in ("queue", "random"):
            rs = [r for r in results if r["n"] == n and r["order"] == kind]
            if not rs:
                continue
            trained = [r for r in rs if r["retrain"] == "trained"]
            promoted = sum(r["decision"] == "promote" for r in trained)
            for label in args.scope:
                rows = [x for r in trained for x in r["rows"] if x["label"] == label and x["kind"] == "non_inferiority"]
                auc = [x for x in rows if x["metric"] == "auroc"]
                ece = [x for x in rows if x["metric"] == "ece"]
                print(f"| {n} | {kind} | {len(rs)} | {len(rs) - len(trained)} | {promoted} / "
                      f"{len(trained) - promoted} | {label} | {interval([x['champion'] for x in auc])} → "
                      f"{interval([x['challenger'] for x in auc])} | {interval([x['champion'] for x in ece])} → "
                      f"{interval([x['challenger'] for x in ece])} |")  # fmt: skip
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
