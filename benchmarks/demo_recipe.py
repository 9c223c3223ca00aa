"""Choose the demo's recipe on validation data, never on its test split (issue 36 item 1).

Each candidate is the demo's training (``cxrclip.demo.demo_train_config``: its data, seed, frozen layers, bf16 where
the CPU has it natively, calibration on the validation split) with some settings changed. It is judged on

- the trainer's own criterion, the best validation loss (the demo's 100 validation rows), and
- a *selection set*: 400 more synthetic rows drawn with another seed (``--select-seed``) — the same generator, never
  the demo's test split, which this script does not read —

where it reports zero-shot AUROC(Avg) (with a bootstrap interval over images), F1(Avg) and YES per image at the
operating points the run fitted on its validation split, ECE, and the training time. One process per candidate, one
after another, so that timings are comparable within a run (they are not across machines)::

    python benchmarks/demo_recipe.py --out /tmp/recipes \\
        --candidate "before epochs=6 size=224 optimizer.config.lr=5e-4" \\
        --candidate "s192lr1e-3 epochs=6 size=192 optimizer.config.lr=1e-3"

(unnamed settings are the demo's: ``cxrclip.demo.DEMO_OVERRIDES``; name the learning rate and the size to compare
with a past run). The issue-36 sweep, in docs/RESULTS.md, is ``benchmarks/demo_recipe.sh``.
A line of JSON per candidate goes to ``OUT/recipes.jsonl`` (appended: a run stopped halfway keeps what it did).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def parse_candidate(text: str) -> dict:
    name, *rest = text.split()
    spec = {"name": name, "epochs": 6, "size": 224, "extra": []}
    for token in rest:
        key, _, value = token.partition("=")
        if key == "epochs":
            spec["epochs"] = int(value)
        elif key == "size":
            spec["size"] = int(value)
        else:
            spec["extra"].append(token)
    return spec


def bootstrap_auroc(probs, truth, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A 95 % interval of the mean over labels of the AUROC, images resampled whole."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        rows = rng.integers(0, len(truth), len(truth))
        per = [roc_auc_score(truth[rows, j], probs[rows, j]) for j in range(truth.shape[1])
               if 0 < truth[rows, j].sum() < len(rows)]  # fmt: skip
        values.append(float(np.mean(per)))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def one(args, spec: dict) -> dict:
    """Train one candidate in this process and judge it on the selection set."""
    import numpy as np

    from cxrclip.config import compose, data_configs
    from cxrclip.data.records import load_labeled_records
    from cxrclip.demo import demo_train_config
    from cxrclip.eval.evaluate import evaluate
    from cxrclip.jobs import pretrain
    from cxrclip.predict import load_predictor

    out = Path(args.out)
    paths = {"train": out / "data" / "train.csv", "valid": out / "data" / "valid.csv"}
    run = out / spec["name"]
    cfg = demo_train_config(paths, run, epochs=spec["epochs"], seed=args.seed, image_size=spec["size"],
                            extra=spec["extra"])  # fmt: skip
    start = time.perf_counter()
    fit = pretrain(cfg)
    train_s = time.perf_counter() - start
    ckpt = run / "checkpoints" / "model-best.tar"
    select = out / "select" / "test.csv"
    eval_cfg = compose("eval_clip", [f"test.checkpoint={ckpt}", f"data_test.cgmh.data_path={select}",
                                     f"test.output_dir={run}", "dataloader=dataloader_cpu"])  # fmt: skip
    results = evaluate(eval_cfg)["cgmh"][str(ckpt)]
    binary = results["zeroshot_binary"]
    # the interval: the calibrated probabilities of the selection set, images resampled
    predictor = load_predictor(ckpt)
    records = load_labeled_records(data_configs(eval_cfg, "data_test")[0], need_text=True)
    answers = predictor.predict([r.images[0] for r in records])
    names = predictor.label_names
    probs = np.array([[a.labels[n].probability for n in names] for a in answers])
    truth = np.array([[int(v == 1) for v in r.labels] for r in records])
    low, high = bootstrap_auroc(probs, truth)
    return {
        "name": spec["name"], "epochs": spec["epochs"], "size": spec["size"], "extra": spec["extra"],
        "train_s": round(train_s, 1), "best_val_loss": fit["best_val_loss"],
        "select_auroc": binary["AUROC(Avg)"], "select_auroc_95": [low, high], "select_f1": binary["F1(Avg)"],
        "select_ece": binary["ECE(Avg)"], "select_yes_per_image": binary["YES_per_image"],
        "select_true_per_image": binary["true_per_image"], "select_i2t_r5": results["retrieval_i2t"]["Recall@5"],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--candidate", action="append", default=[], help='"NAME [epochs=N] [size=PX] [OVERRIDE ...]"')
    p.add_argument("--seed", type=int, default=0, help="the demo's seed (its data and training)")
    p.add_argument("--select-seed", type=int, default=1, help="the selection set's seed (never the demo's)")
    p.add_argument("--n-select", type=int, default=400)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.child:
        print("RESULT " + json.dumps(one(args, parse_candidate(args.child))), flush=True)
        return
    from cxrclip.hardware import cpu_has_bf16
    from cxrclip.synthetic import generate_demo_data

    if args.select_seed == args.seed:
        sys.exit("--select-seed must differ from --seed: the selection set is not the demo's data")
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {os.cpu_count()} cores, native bf16: {cpu_has_bf16()}", flush=True)
    if not (out / "data" / "train.csv").exists():
        generate_demo_data(out / "data", n_train=600, n_valid=100, n_test=0, seed=args.seed)
    if not (out / "select" / "test.csv").exists():
        generate_demo_data(out / "select", n_train=0, n_valid=0, n_test=args.n_select, seed=args.select_seed)
    for text in args.candidate:
        cmd = [sys.executable, __file__, "--out", str(out), "--seed", str(args.seed), "--child", text]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{text}: failed (rc {done.returncode})\n{done.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(lines[-1][len("RESULT ") :])
        with open(out / "recipes.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        lo, hi = row["select_auroc_95"]
        print(f"{row['name']:>12}: train {row['train_s']:.0f} s, best valid loss {row['best_val_loss']:.4f}, "
              f"selection AUROC(Avg) {row['select_auroc']:.3f} [{lo:.3f}, {hi:.3f}], F1 {row['select_f1']:.3f}, "
              f"ECE {row['select_ece']:.3f}, YES/img {row['select_yes_per_image']:.2f} "
              f"(true {row['select_true_per_image']:.2f}), i2t R@5 {row['select_i2t_r5']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
