"""Inference precision: fp32 against bf16 on a checkpoint's test set, and what ``--precision auto`` picks here.

For every test image: the calibrated probability of every label in fp32 and in bf16 (bf16 runs even where the CPU
has no native bf16 — emulated, slow, the same numbers), the largest difference and the decisions that change;
then the warm time per image of fp32 (what ``--precision auto`` runs) and, where the CPU has native bf16, of bf16
(emulated bf16 is not timed), each in the NCHW (old default) and NHWC (default) layout of the image encoder.

    python benchmarks/precision.py --checkpoint demo_out/run/checkpoints/model-best.tar --data demo_out/data/test.csv \
           --valid demo_out/data/valid.csv

With ``--valid``, a copy of the checkpoint is also calibrated under bf16 (``cxrclip calibrate --precision bf16``) and
its bf16 answers are compared with themselves (a second run) and with the fp32-calibrated fp32 answers. The script
says whether this CPU's bf16 is native or emulated (emulated gives the same numbers, slowly).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def probabilities(predictor, tensors, batch: int = 32) -> np.ndarray:
    emb = np.concatenate([predictor.embed(tensors[i : i + batch]) for i in range(0, len(tensors), batch)])
    return predictor.calibration.probabilities(predictor.logits(emb))


def per_image_s(predictor, tensors, repeat: int) -> float:
    predictor.embed(tensors[:1])  # warm
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for t in tensors:
            predictor.embed([t])
        best = min(best, (time.perf_counter() - start) / len(tensors))
    return best


def bf16_calibrated(args, tensors, fp32_decisions: np.ndarray, cpu) -> dict:
    """A copy calibrated under bf16 on the validation CSV, answering in bf16: against itself and against the
    fp32-calibrated fp32 decisions."""
    import tempfile
    from pathlib import Path

    from cxrclip.cli import main as cli_main
    from cxrclip.predict.checkpoint import Predictor

    copy = Path(tempfile.mkdtemp(prefix="bf16-calibrated-")) / "model.tar"
    argv = [
        "calibrate",
        "--checkpoint",
        args.checkpoint,
        "--data",
        args.valid,
        "--precision",
        "bf16",
        "--out",
        str(copy),
    ]
    if cli_main(argv) != 0:
        raise SystemExit("calibration under bf16 failed")
    first, second = (Predictor.create(str(copy), device="cpu", precision="bf16") for _ in range(2))
    pa, pb = probabilities(first, tensors), probabilities(second, tensors)
    decided = pa >= first.calibration.thresholds[None, :]
    out = {
        "bf16": "native" if cpu.native_bf16 else "emulated",
        "decisions_changed_run_to_run": int((decided != (pb >= second.calibration.thresholds[None, :])).sum()),
        "max_abs_prob_diff_run_to_run": round(float(np.abs(pa - pb).max()), 6),
        "decisions_differing_from_fp32_calibrated_fp32": int((decided != fp32_decisions).sum()),
        "yes_per_image": round(float(decided.sum(1).mean()), 3),
    }
    print(
        f"calibrated under bf16 ({out['bf16']}): {out['decisions_changed_run_to_run']} decisions changed run to run, "
        f"{out['decisions_differing_from_fp32_calibrated_fp32']} differ from the fp32-calibrated fp32 model's"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the test CSV (image column)")
    p.add_argument("--timed", type=int, default=20, help="images timed one at a time")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--valid", help="the validation CSV: also calibrate a copy under bf16 and compare its answers")
    args = p.parse_args()

    from pathlib import Path

    from cxrclip.data.cells import image_csv
    from cxrclip.data.images import read_image
    from cxrclip.hardware import resolve_precision, this_cpu
    from cxrclip.predict.checkpoint import Predictor

    cpu = this_cpu()
    print(f"CPU: {cpu.describe()}; --precision auto → {resolve_precision('auto', 'cpu')}", flush=True)
    _, paths = image_csv(Path(args.data))
    fp32 = Predictor.create(args.checkpoint, device="cpu", precision="fp32")
    bf16 = Predictor.create(args.checkpoint, device="cpu", precision="bf16")
    tensors = [fp32.transform(read_image(path)) for path in paths]
    p32, p16 = probabilities(fp32, tensors), probabilities(bf16, tensors)
    thresholds = fp32.calibration.thresholds[None, :]
    diff = np.abs(p32 - p16)
    flips = int(((p32 >= thresholds) != (p16 >= thresholds)).sum())
    result = {
        "benchmark": "precision",
        "cpu": cpu.model,
        "native_bf16": cpu.native_bf16,
        "auto": resolve_precision("auto", "cpu"),
        "images": len(paths),
        "labels": len(fp32.label_names),
        "max_abs_prob_diff": round(float(diff.max()), 5),
        "mean_abs_prob_diff": round(float(diff.mean()), 6),
        "decisions_changed": flips,
        "decisions": int(p32.size),
        "yes_per_image_fp32": round(float((p32 >= thresholds).sum(1).mean()), 3),
        "yes_per_image_bf16": round(float((p16 >= thresholds).sum(1).mean()), 3),
    }
    if args.valid:
        result["bf16_calibrated"] = bf16_calibrated(args, tensors, p32 >= thresholds, cpu)
    timed = tensors[: args.timed]
    times = {}
    for layout in ("NCHW", "NHWC"):
        for name in ("fp32", "bf16"):
            if name == "bf16" and not cpu.native_bf16:
                continue  # emulated bf16 is never chosen: not timed
            predictor = Predictor.create(args.checkpoint, device="cpu", precision=name)
            predictor.loaded.model.set_channels_last(layout == "NHWC")
            times[f"{name}_{layout}"] = round(per_image_s(predictor, timed, args.repeat), 4)
    result["per_image_s"] = times
    print(
        f"{len(paths)} images × {len(fp32.label_names)} labels: bf16 vs fp32 calibrated probability max |Δ| "
        f"{result['max_abs_prob_diff']}, {flips} of {p32.size} decisions changed; per image (warm, one at a time): "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items())
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
