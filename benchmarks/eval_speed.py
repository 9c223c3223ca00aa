"""Evaluation speed: retrieval/zero-shot metric time at N = 10k and 100k (vs. the bare matrix product and a
Python-loop reference at small N), and single-image inference latency (cold process and warm).

    python benchmarks/eval_speed.py --n 10000 100000 --loop-n 2000 --checkpoint RUN/checkpoints/model-best.tar
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def loop_retrieval(img: torch.Tensor, txt: torch.Tensor, gt: torch.Tensor) -> list[int]:
    """The original's way: a Python loop over images, sorting every text by similarity for each."""
    ranks = []
    for i in range(img.shape[0]):
        row = (img[i] @ txt.t()).tolist()
        order = sorted(range(len(row)), key=lambda j: -row[j])
        ranks.append(order.index(int(gt[i])) + 1)
    return ranks


def bare_product(
    img: torch.Tensor, txt: torch.Tensor, rows: int = 4096, cols: int | None = None, reuse: bool = True
) -> None:
    """The floor: the similarity matrix product alone, in row chunks (or ``rows``×``cols`` tiles), results dropped;
    ``reuse``: written into one buffer (no allocation per tile), else a new tensor per tile."""
    cols = cols or txt.shape[0]
    out = torch.empty(min(rows, img.shape[0]) * min(cols, txt.shape[0]), dtype=img.dtype)
    for r in range(0, img.shape[0], rows):
        for c in range(0, txt.shape[0], cols):
            a, b = img[r : r + rows], txt[c : c + cols]
            if reuse:
                torch.mm(a, b.t(), out=out[: len(a) * len(b)].view(len(a), len(b)))
            else:
                a @ b.t()


def parse_size(text: str) -> tuple[int, int]:
    """``10000`` → 10k images and 10k texts; ``1000000x10000`` → 1M images, 10k distinct texts."""
    n, _, m = text.partition("x")
    return int(n), int(m or n)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def profile_tiles(n: int, dim: int) -> list[dict]:
    """Where the retrieval metric's time goes, per candidate tile: the product, the two comparison passes and
    their two int16 sums, each summed over the whole N × N (the same steps as ``retrieval_metrics``)."""
    from cxrclip.eval.metrics import tile_candidates
    from cxrclip.hardware import this_cpu

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    limit = torch.full((n,), 0.1)
    rows = []
    for rows_, cols in tile_candidates(this_cpu()):
        parts = dict.fromkeys(("product", "compare_texts", "sum_texts", "compare_images", "sum_images"), 0.0)
        buffer = torch.empty(rows_ * cols, dtype=torch.bool)
        product = torch.empty(rows_ * cols)
        above, i2t = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
        for r in range(0, n, rows_):
            for c in range(0, n, cols):
                t0 = time.perf_counter()
                a, b = img[r : r + rows_], txt[c : c + cols]
                sim = torch.mm(a, b.t(), out=product[: len(a) * len(b)].view(len(a), len(b)))
                t1 = time.perf_counter()
                mask = buffer[: sim.numel()].view(sim.shape)
                torch.gt(sim, limit[None, c : c + cols], out=mask)
                t2 = time.perf_counter()
                above[c : c + cols] += mask.view(torch.uint8).sum(dim=0, dtype=torch.int16)
                t3 = time.perf_counter()
                torch.gt(sim, limit[r : r + rows_, None], out=mask)
                t4 = time.perf_counter()
                i2t[r : r + rows_] += mask.view(torch.uint8).sum(dim=1, dtype=torch.int16)
                t5 = time.perf_counter()
                for key, a, b in (("product", t0, t1), ("compare_texts", t1, t2), ("sum_texts", t2, t3),
                                  ("compare_images", t3, t4), ("sum_images", t4, t5)):  # fmt: skip
                    parts[key] += b - a
        total = sum(parts.values())
        rows.append({"benchmark": "tile_profile", "n": n, "tile": f"{rows_}x{cols}",
                     **{k: round(v, 3) for k, v in parts.items()},
                     "passes_over_product": round((total - parts["product"]) / parts["product"], 2)})  # fmt: skip
    return rows


def metric_rows(ns: list[int], loop_n: int, dim: int, n_labels: int) -> list[dict]:
    from cxrclip.eval import metrics
    from cxrclip.eval.metrics import binary_metrics, retrieval_metrics, tile_candidates
    from cxrclip.hardware import this_cpu

    cpu = this_cpu()
    candidates = tile_candidates(cpu)
    print(f"CPU: {cpu.describe()}; retrieval tile candidates (rows, texts): {candidates}", flush=True)
    rows = []
    for size in ns:
        n, m = parse_size(size)
        g = torch.Generator().manual_seed(0)
        img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        txt = F.normalize(torch.randn(m, dim, generator=g), dim=-1)
        gt = torch.arange(n) % m
        repeat = 1 if n * m > 4e8 else 5
        key = (dim, img.element_size())  # what retrieval_metrics remembers its tile by
        metrics._CHOSEN.clear()
        retrieval_metrics(img[: min(n, 8192)], txt, gt[: min(n, 8192)])  # the once-per-process probe
        chosen = metrics._CHOSEN.get(key, candidates[0])
        # interleaved, best of `repeat` each. floor: every way of running the product alone (4096-row chunks or
        # each candidate tile, into a reused buffer or a new tensor); beside ours, each candidate tile forced
        floor, tile_product, forced, ours = [], {t: [] for t in candidates}, {t: [] for t in candidates}, []
        before = rss_mb()
        for _ in range(repeat):
            for reuse in (True, False):
                floor.append(timed(lambda img=img, txt=txt, reuse=reuse: bare_product(img, txt, reuse=reuse), 1))
                for t in candidates:
                    tile_product[t].append(
                        timed(lambda img=img, txt=txt, t=t, reuse=reuse: bare_product(img, txt, *t, reuse=reuse), 1)
                    )
            ours.append(timed(lambda img=img, txt=txt, gt=gt: retrieval_metrics(img, txt, gt), 1))
            if n * m <= 4e8:
                for t in candidates:
                    metrics._CHOSEN[key] = t
                    forced[t].append(timed(lambda img=img, txt=txt, gt=gt: retrieval_metrics(img, txt, gt), 1))
                metrics._CHOSEN[key] = chosen
        extra_mb = rss_mb() - before
        bare = min(floor + [x for v in tile_product.values() for x in v])
        best = min(ours)
        labels = np.random.default_rng(0).integers(0, 2, (n, n_labels))
        probs = np.random.default_rng(1).random((n, n_labels))
        zs = timed(lambda labels=labels, probs=probs: binary_metrics(probs, labels, [str(i) for i in range(n_labels)]))
        rows.append(
            {
                "benchmark": "metrics",
                "cpu": cpu.model,
                "n": n,
                "texts": m,
                "dim": dim,
                "tile_chosen": list(chosen),
                "matmul_s": round(bare, 3),
                "retrieval_s": round(best, 3),
                "ratio_to_matmul": round(best / bare, 2),  # the fastest product of all ways timed (conservative)
                "ratio_to_same_tile_product": round(best / min(tile_product[chosen]), 2),  # what the passes add
                "ratio_per_tile": {f"{t[0]}x{t[1]}": round(min(forced[t]) / bare, 2) for t in candidates if forced[t]},
                "zeroshot_binary_s": round(zs, 3),
                "peak_rss_mb": round(rss_mb()),
                "retrieval_extra_peak_mb": round(extra_mb),
            }
        )
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(loop_n, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(loop_n, dim, generator=g), dim=-1)
    loop = timed(lambda: loop_retrieval(img, txt, torch.arange(loop_n)), repeat=1)
    ours = timed(lambda: retrieval_metrics(img, txt, torch.arange(loop_n)))
    rows.append(
        {
            "benchmark": "metrics_vs_loop",
            "n": loop_n,
            "loop_s": round(loop, 3),
            "retrieval_s": round(ours, 4),
            "speedup": round(loop / ours, 1),
        }
    )
    return rows


def inference_rows(checkpoint: str, image: str, warm: int) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "inference.py"), "--model_path", checkpoint, "--image_path", image, "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    cold = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cxrclip.infer, torch, transformers"], check=True)
    imports = time.perf_counter() - start
    from cxrclip.predict.checkpoint import Predictor

    start = time.perf_counter()
    predictor = Predictor.create(checkpoint)
    setup = time.perf_counter() - start
    predictor.predict([image])
    per_image = timed(lambda: predictor.predict([image]), repeat=warm)
    return [
        {
            "benchmark": "inference",
            "cold_process_s": round(cold, 2),
            "imports_s": round(imports, 2),
            "load_and_prompts_s": round(setup, 2),
            "warm_per_image_s": round(per_image, 4),
        }
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", nargs="+", default=["10000", "100000"], help="N, or NxM: N images, M distinct texts")
    p.add_argument("--loop-n", type=int, default=10_000, help="N for the Python-loop reference")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--labels", type=int, default=13)
    p.add_argument("--checkpoint", help="a checkpoint for the inference latency rows")
    p.add_argument("--image", help="an image for the inference rows (default: a synthetic one)")
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--profile", type=int, default=10_000, help="N for the per-part profile of each tile (0: none)")
    args = p.parse_args()
    rows = metric_rows(args.n, args.loop_n, args.dim, args.labels)
    if args.profile:
        rows += profile_tiles(args.profile, args.dim)
    if args.checkpoint:
        image = args.image
        if image is None:
            import tempfile

            from cxrclip.synthetic import generate_demo_data

            folder = Path(tempfile.mkdtemp())
            generate_demo_data(folder, n_train=1, n_valid=1, n_test=1)
            image = str(next((folder / "images").glob("test_*.png")))
        rows += inference_rows(args.checkpoint, image, args.warm)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
