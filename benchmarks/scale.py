"""How cost grows with the work: `validate-data` on 1k → 100k rows (header checks, and --deep decoding), and
evaluation's image-embedding throughput as the test set grows.

    python benchmarks/scale.py --rows 1000 10000 100000 --deep-rows 1000 10000 --embed 128 512 2048

Rows point at a pool of distinct synthetic 256-px PNGs (``--pool``), repeated, so a 100k-row CSV costs no
100k-image disk; each `validate-data` run is its own process (wall time and peak RSS are its own).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def big_csv(pool: Path, rows: int, out: Path) -> Path:
    with (pool / "train.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, base = reader.fieldnames, list(reader)
    path = out / f"train_{rows}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i in range(rows):
            writer.writerow(base[i % len(base)])
    return path


def timed_process(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def embed_rows(pool: Path, sizes: list[int], model: str) -> list[dict]:
    import torch
    from omegaconf import OmegaConf
    from train_speed import MODELS

    from cxrclip.config import compose
    from cxrclip.data.records import load_records
    from cxrclip.data.schema import DataConfig
    from cxrclip.data.transforms import spec_transform
    from cxrclip.engine.loader import image_loader
    from cxrclip.eval.calibrate import as_labeled
    from cxrclip.model.clip import build_model
    from cxrclip.model.embed import embed_images
    from cxrclip.model.loading import stored_preprocess

    cfg = compose("train", [*MODELS[model], "base.output.checkpoint=/tmp/x", "base.output.tensorboard=/tmp/x"])
    config = OmegaConf.to_container(cfg, resolve=True)
    net = build_model(config["model"]).eval()
    transform = spec_transform(stored_preprocess({"config": config}, config["model"]["image_encoder"]["normalize"]))
    from cxrclip.synthetic import CGMH_LABELS, DEFAULT_PROMPTS

    dc = DataConfig("pool", "imagetext", str(pool / "train.csv"), CGMH_LABELS, prompt_path=str(DEFAULT_PROMPTS))
    records = as_labeled(load_records(dc))
    out = []
    for n in sizes:
        subset = [records[i % len(records)] for i in range(n)]
        loader = image_loader(subset, transform, {"batch_size": 32, "num_workers": 2, "prefetch_factor": 2})
        start = time.perf_counter()
        emb = embed_images(net, loader, torch.device("cpu"))
        seconds = time.perf_counter() - start
        out.append({"benchmark": "embed", "model": model, "images": n, "s": round(seconds, 2),
                    "images_per_s": round(n / seconds, 1), "dim": int(emb.shape[1])})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    p.add_argument("--deep-rows", type=int, nargs="*", default=[1_000, 10_000])
    p.add_argument("--embed", type=int, nargs="*", default=[128, 512, 2048])
    p.add_argument("--model", default="clip_cpu_offline")
    p.add_argument("--pool", type=int, default=1000, help="distinct images the rows point at")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cxrclip.synthetic import generate_demo_data

    work = Path(tempfile.mkdtemp(prefix="scale_"))
    start = time.perf_counter()
    generate_demo_data(work, n_train=args.pool, n_valid=1, n_test=1, image_size=256)
    rows = [{"benchmark": "demo-data", "images": args.pool, "s": round(time.perf_counter() - start, 2)}]
    for n in sorted(set(args.rows) | set(args.deep_rows)):
        csv_path = big_csv(work, n, work)
        for deep in ([False, True] if n in args.deep_rows else []) + ([False] if n not in args.deep_rows else []):
            argv = [sys.executable, "-m", "cxrclip.cli", "validate-data", str(csv_path), "--split", "train"]
            r = timed_process(argv + (["--deep"] if deep else []))
            rows.append({"benchmark": "validate-data", "rows": n, "deep": deep, **r,
                         "rows_per_s": round(n / r["wall_s"])})  # fmt: skip
    rows += embed_rows(work, args.embed, args.model)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
