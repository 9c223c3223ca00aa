"""Single-image inference in a fresh process: a checkpoint vs its exported bundle, same run, same image.

    python benchmarks/cold_start.py --model r50_minilm --repeats 5

Builds a checkpoint of the named set-up (random image weights: the speed does not depend on them), exports its
bundle (`cxrclip export`), then alternates fresh ``inference.py --json`` processes on one 1024×1024 PNG and reports
the median wall time and peak RSS of each, and the warm per-image latency in one process. The original's
same-machine figure (SPEC §6: 7.7 s, 1.7 GB for ResNet-50 + MiniLM) is quoted, not re-run: the original is not
installed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
ORIGINAL = {"wall_s": 7.7, "peak_rss_mb": 1700, "warm_s": 0.22, "source": "SPEC §6, ResNet-50 + MiniLM, same machine"}


def make_checkpoint(model: str, image_size: int, folder: Path) -> Path:
    from omegaconf import OmegaConf
    from train_speed import MODELS

    from cxrclip.config import compose
    from cxrclip.model.checkpoint import save_checkpoint
    from cxrclip.model.clip import build_model

    cfg = compose(
        "train",
        [
            *MODELS[model],
            f"base.image_size={image_size}",
            f"base.output.checkpoint={folder}",
            f"base.output.tensorboard={folder}",
        ],
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    model_ = build_model(config["model"])
    return save_checkpoint(folder / "model.tar", {"model": model_.state_dict(), "config": config, "epoch": 0})


def timed_process(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def warm_latency(path: Path, image: Path, n: int) -> float:
    from cxrclip.predict.checkpoint import Predictor

    predictor = Predictor.create(str(path), device="cpu")
    predictor.predict([image])
    times = []
    for _ in range(n):
        start = time.perf_counter()
        predictor.predict([image])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="r50_minilm", help="a set-up of benchmarks/train_speed.py")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warm", type=int, default=20, help="warm predictions timed in one process")
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    if args.prepare:  # in a child process, so that this one stays small (a child's peak RSS counts its parent's)
        from cxrclip.bundle import export_bundle

        ckpt = make_checkpoint(args.model, args.image_size, Path(args.prepare))
        start = time.perf_counter()
        export_bundle(ckpt, Path(args.prepare) / "bundle")
        print(f"EXPORT {time.perf_counter() - start:.1f}")
        return
    work = Path(tempfile.mkdtemp(prefix="cold_start_"))
    prepare = [sys.executable, __file__, "--prepare", str(work), "--model", args.model]
    done = subprocess.run([*prepare, "--image-size", str(args.image_size)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    export_s = float(done.stdout.split("EXPORT ")[-1])
    ckpt, bundle = work / "model.tar", work / "bundle"
    yy, xx = np.mgrid[0:1024, 0:1024]
    image = work / "image.png"
    Image.fromarray(((xx + yy) % 256).astype(np.uint8)).save(image)

    runs = {"checkpoint": [], "bundle": []}
    for _ in range(args.repeats):  # alternate, so load on the machine hits both alike
        for kind, path in (("checkpoint", ckpt), ("bundle", bundle)):
            argv = [sys.executable, "inference.py", "--model_path", str(path), "--image_path", str(image), "--json"]
            runs[kind].append(timed_process(argv))
    rows = {}
    for kind, path in (("checkpoint", ckpt), ("bundle", bundle)):
        walls, rss = zip(*runs[kind])
        rows[kind] = {
            "wall_s": round(statistics.median(walls), 2),
            "wall_min_s": round(min(walls), 2),
            "peak_rss_mb": round(statistics.median(rss)),
            "warm_s": round(warm_latency(path, image, args.warm), 4),
        }
    sizes = {
        "checkpoint_mb": round(ckpt.stat().st_size / 2**20, 1),
        "bundle_mb": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20, 1),
        "export_s": round(export_s, 1),
    }
    print(f"model {args.model}, {args.image_size} px, {args.repeats} fresh processes each (median)\n")
    print("| | wall s | peak RSS MB | warm s/image | vs original wall | vs original RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| original (quoted) | {ORIGINAL['wall_s']} | {ORIGINAL['peak_rss_mb']} | {ORIGINAL['warm_s']} | 1 | 1 |")
    for kind, r in rows.items():
        print(
            f"| {kind} | {r['wall_s']} | {r['peak_rss_mb']} | {r['warm_s']} | "
            f"{r['wall_s'] / ORIGINAL['wall_s']:.2f}× | {r['peak_rss_mb'] / ORIGINAL['peak_rss_mb']:.2f}× |"
        )
    print(json.dumps({"model": args.model, **rows, **sizes, "original": ORIGINAL}))


if __name__ == "__main__":
    main()
