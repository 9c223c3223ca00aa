"""Data-loading throughput (decode + CLAHE + augmentation + prompt generation + tokenization), samples/s,
with 0, 1 and 2 workers, and evaluation embedding throughput (images/s) for a model preset.

    python benchmarks/data_speed.py --workers 0 1 2 --batches 20
    python benchmarks/data_speed.py --embed clip_cpu_offline --embed-images 256
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def loader_rows(data: Path, workers: list[int], batches: int, batch_size: int, image_size: int) -> list[dict]:
    from cxrclip.config import compose
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.loader import make_loader
    from cxrclip.engine.settings import RunSettings
    from cxrclip.engine.tasks import clip_task
    from cxrclip.spec import LoaderSpec, RunSpec

    rows = []
    for w in workers:
        cfg = compose(
            "train",
            [
                "model=clip_cpu_offline",
                f"data_train.cgmh.data_path={data}/train.csv",
                f"data_valid.cgmh.data_path={data}/valid.csv",
                f"base.image_size={image_size}",
                "data_train.cgmh.num_negs=2",
                "base.output.checkpoint=/tmp/unused",
                "base.output.tensorboard=/tmp/unused",
                "transform=clahe",
            ],
        )
        spec = RunSpec.from_config(cfg)
        task = clip_task(spec, RunSettings.from_cfg(spec.base), DistEnv())
        prefetch = 4 if w else None
        loader_spec = LoaderSpec(batch_size, shuffle=True, num_workers=w, drop_last=True, prefetch_factor=prefetch)
        loader = make_loader(task.train_set, loader_spec, task.collate, DistEnv(), 0)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "benchmark": "data_loading",
                "workers": w,
                "batch_size": batch_size,
                "image_size": image_size,
                "samples_per_s": round(batches * batch_size / seconds, 1),
            }
        )
    return rows


def embed_row(data: Path, preset: str, n: int, image_size: int, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cxrclip.config import compose, to_plain
    from cxrclip.data.collate import ImageTextCollator
    from cxrclip.data.dataset import LabeledImageDataset
    from cxrclip.data.records import load_labeled_records
    from cxrclip.data.schema import DataConfig
    from cxrclip.data.transforms import build_transform
    from cxrclip.model.clip import build_model
    from cxrclip.model.embed import embed_images
    from cxrclip.synthetic import CGMH_LABELS

    cfg = compose("train", [f"model={preset}"])
    model = build_model(to_plain(cfg.model)).eval()
    dc = DataConfig(name="t", data_type="imagetext_eval", data_path=str(data / "test.csv"), label_names=CGMH_LABELS)
    records = load_labeled_records(dc, need_text=True)[:n]
    steps = {"Resize": {"size": image_size}, "CenterCrop": {"size": image_size}}
    ds = LabeledImageDataset(records, build_transform(steps, to_plain(cfg.model.image_encoder.normalize)))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=2, collate_fn=ImageTextCollator(None))
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            embed_images(model, loader, torch.device("cpu"))
        out[f"{name}_images_per_s"] = round(len(ds) / (time.perf_counter() - start), 1)
    return {"benchmark": "embed_images", "model": preset, "images": len(ds), "image_size": image_size, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--embed", help="a model preset: also measure image-embedding throughput")
    p.add_argument("--embed-images", type=int, default=256)
    p.add_argument("--data", help="folder with train/valid/test CSVs (default: synthetic, 512 px)")
    args = p.parse_args()
    data = Path(args.data) if args.data else None
    if data is None:
        from cxrclip.synthetic import generate_demo_data

        data = Path(tempfile.mkdtemp())
        generate_demo_data(
            data, n_train=(args.batches + 2) * args.batch_size, n_valid=2, n_test=args.embed_images, image_size=512
        )
    rows = loader_rows(data, args.workers, args.batches, args.batch_size, args.image_size)
    if args.embed:
        rows.append(embed_row(data, args.embed, args.embed_images, args.image_size, 32))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
