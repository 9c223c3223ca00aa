"""The input gate on real images it never saw: frontal chest films vs lateral films, CT slices and generated
negatives, split by patient; and the latency the gate adds per image (same run, with and without it).

    python benchmarks/gate.py --real ../shared/data/cxr_real_dev --other ../shared/data/cxr_gate_dev --out /tmp/gate

Splits (patients never cross): frontal films — cxr_real_dev train + valid → the gate's fit and validation parts
(``cxrclip fit-gate`` holds out 30 % of the patients to choose the threshold at 1 % false refusals), test.csv →
test; other images — gate.csv's patients, 60 % to fit-gate (which again holds out 30 %), 40 % to test; generated
negatives (noise, shapes, rotated and inverted films) made from fit films for fitting and from test films for the
test. Two gates on the same split, fitted by ``cxrclip fit-gate``: the default (logistic regression on the model's
image embedding and a 32×32 thumbnail) and the embedding alone (``--embedding-only``, the gate before issue 32).
The test adds the negative of every held-out frontal film. The checkpoint is ``--checkpoint`` or, by default, the
offline CPU model untrained (ImageNet EfficientNet-Lite0; with both towers locked — the small-data recipe — a
trained model has this same encoder).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def first_image(cell: str) -> str:
    return ast.literal_eval(cell)[0] if cell.startswith("[") else cell


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def untrained_checkpoint(out: Path, image_size: int, seed: int) -> Path:
    import torch

    from cxrclip.config import compose, to_plain
    from cxrclip.model.checkpoint import save_checkpoint
    from cxrclip.model.clip import build_model

    overrides = ["model=clip_cpu_offline", f"base.image_size={image_size}", f"base.seed={seed}"]
    overrides += [f"base.output.checkpoint={out}/checkpoints", f"base.output.tensorboard={out}/tensorboard"]
    cfg = compose("train", overrides)
    torch.manual_seed(seed)
    model = build_model(to_plain(cfg.model))
    return save_checkpoint(out / "untrained.tar", {"model": model.state_dict(), "config": to_plain(cfg), "epoch": 0})


def bootstrap_auroc(y: np.ndarray, s: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    from sklearn.metrics import roc_auc_score

    from cxrclip.eval.metrics import auroc_ci

    low, high = auroc_ci(y, s, method="bootstrap", n_boot=n_boot, seed=seed)
    return float(roc_auc_score(y, s)), [round(low, 4), round(high, 4)]


def report(name: str, scores: np.ndarray, kinds: np.ndarray, threshold: float) -> dict:
    from cxrclip.predict.gate import FRONTAL
    from cxrclip.scoring.intervals import wilson

    y = (kinds != FRONTAL).astype(int)
    auroc, ci = bootstrap_auroc(y, scores)
    refused = scores > threshold
    out = {"head": name, "threshold": round(float(threshold), 4), "auroc": round(auroc, 4), "auroc_ci95": ci}
    frontal = kinds == FRONTAL
    k, n = int(refused[frontal].sum()), int(frontal.sum())
    out["frontal_false_refusals"] = {"k": k, "n": n, "rate": round(k / n, 4), "ci95": wilson(k, n, 4)}
    for kind in sorted(set(kinds[~frontal])):
        rows = kinds == kind
        k, n = int((~refused[rows]).sum()), int(rows.sum())
        out[f"miss_{kind}"] = {"k": k, "n": n, "rate": round(k / n, 4), "ci95": wilson(k, n, 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="cxr_real_dev (frontal films, metadata.csv)")
    p.add_argument("--other", type=Path, required=True, help="cxr_gate_dev (gate.csv: image, kind, patient_id)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="default: the offline CPU model, untrained (ImageNet encoder)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-frac", type=float, default=0.4, help="share of gate.csv's patients held out for the test")
    p.add_argument("--generated", type=int, default=150)
    args = p.parse_args()
    args.real, args.other, args.out = args.real.resolve(), args.other.resolve(), args.out.resolve()

    from cxrclip.data.images import read_image
    from cxrclip.fit_gate import GateFit, fit_gate_checkpoint, generated_negatives, group_split, summary_lines
    from cxrclip.predict.checkpoint import Predictor
    from cxrclip.predict.gate import FRONTAL, InputGate, pixel_features, precheck

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    patients = {r["image"]: r["patient_id"] for r in read_csv(args.real / "metadata.csv")}
    frontal_rows = [
        {"image": str(args.real / first_image(r["image"])), "patient_id": patients[first_image(r["image"])]}
        for split in ("train", "valid")
        for r in read_csv(args.real / f"{split}.csv")
    ]
    frontal_test = [str(args.real / first_image(r["image"])) for r in read_csv(args.real / "test.csv")]
    gate_rows = read_csv(args.other / "gate.csv")
    test_mask = group_split([r["patient_id"] for r in gate_rows], args.test_frac, args.seed)
    other_fit = [
        {"image": str(args.other / r["image"]), "kind": r["kind"], "patient_id": r["patient_id"]}
        for r, t in zip(gate_rows, test_mask)
        if not t
    ]
    other_test = [(str(args.other / r["image"]), r["kind"]) for r, t in zip(gate_rows, test_mask) if t]
    fit_patients = {r["patient_id"] for r in other_fit}
    assert not fit_patients & {r["patient_id"] for r, t in zip(gate_rows, test_mask) if t}

    ckpt = args.checkpoint or untrained_checkpoint(args.out, args.image_size, args.seed)
    frontal_csv = str(write_csv(args.out / "frontal_fit.csv", frontal_rows))
    other_csv = str(write_csv(args.out / "other_fit.csv", other_fit))
    gates = {}
    for name, pixels in (("gate: embedding + 32×32 pixels (default)", True), ("gate: embedding only (before)", False)):
        target = args.out / ("gated.tar" if pixels else "gated_embedding_only.tar")
        fit = GateFit(generated=args.generated, seed=args.seed, pixels=pixels)
        gates[name] = fit_gate_checkpoint(ckpt, [frontal_csv], [other_csv], fit=fit, out=target, device="cpu")
        print(f"fit-gate, {name}, validation part:")
        for line in summary_lines(gates[name]):
            print("  " + line)
    gated = args.out / "gated.tar"
    gate = next(iter(gates.values()))

    # the held-out test: frontal test films, held-out patients' laterals and CT slices, generated negatives
    predictor = Predictor.create(str(gated), device="cpu")
    test_images = [read_image(p) for p in frontal_test] + [read_image(p) for p, _ in other_test]
    test_kinds = [FRONTAL] * len(frontal_test) + [k for _, k in other_test]
    made, made_kinds = generated_negatives(test_images[: len(frontal_test)], 60, seed=args.seed + 1000)
    test_images += made
    # every held-out frontal film's negative, as a PNG/JPEG export of a MONOCHROME1 image often is
    test_images += [255 - a for a in test_images[: len(frontal_test)]]
    test_kinds = np.asarray(test_kinds + [f"generated {k}" for k in made_kinds] + ["negative of a test film"]
                            * len(frontal_test))  # fmt: skip
    emb = np.concatenate(
        [
            predictor.embed([predictor.transform(a) for a in test_images[i : i + 32]])
            for i in range(0, len(test_images), 32)
        ]
    )
    thumbs = np.stack([pixel_features(a) for a in test_images])
    results = []
    for name, g in gates.items():
        scores, _ = g.scores(emb, thumbs if g.pixel_side else None)
        results.append(report(name, scores, test_kinds, g.threshold))
    verdicts = predictor.gate.verdicts(emb, [precheck(a, thumbnail=True) for a in test_images])
    refused_kinds = {}
    for v, k in zip(verdicts, test_kinds):
        if not v.analysed:
            refused_kinds.setdefault(str(k), {}).setdefault(v.kind, 0)
            refused_kinds[str(k)][v.kind] += 1
    results[0]["reason_given_per_true_kind"] = refused_kinds

    # latency: the same predictor with and without its gate, one image at a time, same run
    sample = [(test_images[i], None) for i in range(0, len(frontal_test), max(1, len(frontal_test) // 20))]

    def per_image(gate_obj) -> float:
        predictor.gate = gate_obj
        predictor.predict_arrays(["x"], [sample[0][0]])  # warm
        t0 = time.perf_counter()
        for a, _ in sample:
            predictor.predict_arrays(["x"], [a])
        return (time.perf_counter() - t0) / len(sample)

    with_gate_obj = predictor.gate
    timings = {}
    for _ in range(2):  # interleaved, twice: the machine's drift hits both
        timings.setdefault("without", []).append(per_image(InputGate(None)))
        timings.setdefault("with", []).append(per_image(with_gate_obj))
    t0 = time.perf_counter()
    for a, _ in sample:
        with_gate_obj.verdicts(emb[:1], [precheck(a, thumbnail=True)])
    gate_only = (time.perf_counter() - t0) / len(sample)
    latency = {
        "images": len(sample),
        "per_image_s_without_gate": round(min(timings["without"]), 4),
        "per_image_s_with_gate": round(min(timings["with"]), 4),
        "gate_alone_s": round(gate_only, 6),
    }
    summary = {
        "benchmark": "input gate",
        "checkpoint": str(ckpt),
        "image_size": args.image_size,
        "test": {str(k): int((test_kinds == k).sum()) for k in sorted(set(test_kinds))},
        "fit_gate_validation": gate.evidence.get("valid"),
        "results": results,
        "latency": latency,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheld-out test set: {summary['test']}")
    for r in results:
        print(f"\n{r['head']}: AUROC {r['auroc']:.4f} {r['auroc_ci95']}, threshold {r['threshold']}")
        f = r["frontal_false_refusals"]
        print(f"  frontal films refused: {f['k']}/{f['n']} = {f['rate']:.1%}  95 % CI {f['ci95']}")
        for key, v in r.items():
            if key.startswith("miss_"):
                print(f"  {key[5:]:<26} let through: {v['k']}/{v['n']} = {v['rate']:.1%}  95 % CI {v['ci95']}")
    print(f"\nlatency per image: {latency}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
