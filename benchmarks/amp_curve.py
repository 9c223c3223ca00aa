"""Does bf16 autocast on CPU keep the loss curve? Train the same model on the same batches in fp32 and in
bf16 and print both curves and the validation loss.

    python benchmarks/amp_curve.py --model clip_cpu_offline --steps 60 --image-size 160
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def curve(data: str, model: str, amp: str, steps: int, image_size: int, seed: int) -> dict:
    import torch

    from cxrclip.config import compose
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    out = tempfile.mkdtemp()
    cfg = compose(
        "train",
        [
            f"model={model}",
            "dataloader=dataloader_cpu",
            f"data_train.cgmh.data_path={data}/train.csv",
            f"data_valid.cgmh.data_path={data}/valid.csv",
            f"base.image_size={image_size}",
            f"base.seed={seed}",
            f"base.amp={amp == 'bf16'}",
            "base.amp_dtype=bf16",
            "optimizer.config.lr=5e-4",
            "data_train.cgmh.num_negs=2",
            f"base.output.checkpoint={out}/c",
            f"base.output.tensorboard={out}/tb",
            "dataloader.train.num_workers=2",
        ],
    )
    trainer = Trainer(cfg, DistEnv())
    trainer.model.train()
    losses, start = [], time.perf_counter()
    batches = iter(trainer.train_loader)
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.train_loader)
            batch = next(batches)
        loss = trainer.forward_loss(batch)["loss"]
        loss.backward()
        trainer.optimizer_step()
        losses.append(round(float(loss.detach()), 4))
    seconds = time.perf_counter() - start
    torch.manual_seed(0)
    return {
        "amp": amp,
        "steps": steps,
        "seconds": round(seconds, 1),
        "losses": losses,
        "mean_last_10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "valid_loss": round(trainer.validate(), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip_cpu_offline")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", help="folder with train.csv/valid.csv (default: synthetic)")
    args = p.parse_args()
    data = args.data
    if data is None:
        from cxrclip.synthetic import generate_demo_data

        data = tempfile.mkdtemp()
        generate_demo_data(data, n_train=400, n_valid=64, n_test=1)
    rows = [
        {**curve(data, args.model, amp, args.steps, args.image_size, seed), "seed": seed}
        for seed in args.seeds
        for amp in ("fp32", "bf16")
    ]
    for r in rows:
        print(
            f"seed {r['seed']} {r['amp']:5s} {r['seconds']:7.1f} s  mean loss of last 10 steps "
            f"{r['mean_last_10']:.4f}  valid loss {r['valid_loss']:.4f}"
        )
    # is bf16 within the seed-to-seed spread of fp32? (the seed changes the initialization and the data order)
    for key in ("mean_last_10", "valid_loss"):
        by = {amp: [r[key] for r in rows if r["amp"] == amp] for amp in ("fp32", "bf16")}
        gaps = [abs(b - f) for f, b in zip(by["fp32"], by["bf16"])]
        spread = max(by["fp32"]) - min(by["fp32"])
        print(
            f"{key}: fp32 {by['fp32']} (spread {spread:.4f}); bf16 {by['bf16']}; "
            f"largest same-seed |bf16 - fp32| {max(gaps):.4f} -> {'within' if max(gaps) <= spread else 'outside'}"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
