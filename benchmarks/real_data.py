"""Pre-train on real radiographs and show what it bought: zero-shot per-label AUROC and retrieval for the
untrained model (ImageNet + MiniLM) vs the trained one, and a linear probe on each frozen image encoder.

    python benchmarks/real_data.py --data ../shared/data/cxr_real_dev --epochs 20 --out /tmp/real

DIR needs train.csv / valid.csv (image, text_label), test.csv (image, one 0/1 column per label, text),
prompts.json and labels.json (the label list). Prints a markdown table and JSON lines.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def base_overrides(data: Path, args, out: Path) -> list[str]:
    return [
        f"model={args.model}",
        "dataloader=dataloader_cpu",
        f"base.image_size={args.image_size}",
        f"data_train.cgmh.data_path={data / 'train.csv'}",
        f"data_valid.cgmh.data_path={data / 'valid.csv'}",
        f"data_train.cgmh.prompt_path={data / 'prompts.json'}",
        f"data_valid.cgmh.prompt_path={data / 'prompts.json'}",
        f"scheduler.config.total_epochs={args.epochs}",
        f"optimizer.config.lr={args.lr}",
        f"base.seed={args.seed}",
        f"data_train.cgmh.num_negs={args.num_negs}",
        f"loss.cxr_clip.targets={args.targets}",
        f"base.amp={args.bf16}",
        "base.amp_dtype=bf16",
        "scheduler=cosine_epoch10_warmup1",
        f"base.output.checkpoint={out}/checkpoints",
        f"base.output.tensorboard={out}/tensorboard",
        "data_train.cgmh.normal_sentence='no acute cardiopulmonary abnormality.'",
        "data_valid.cgmh.normal_sentence='no acute cardiopulmonary abnormality.'",
        *args.override,
    ]


def with_labels(cfg, names):
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "labels.names", list(names))
    return cfg


def zero_shot(ckpt: Path, data: Path, names, image_size: int, out: Path) -> dict:
    from cxrclip.config import compose
    from cxrclip.eval.evaluate import evaluate

    cfg = compose(
        "eval_clip",
        [
            f"test.checkpoint={ckpt}",
            f"data_test.cgmh.data_path={data / 'test.csv'}",
            f"data_test.cgmh.prompt_path={data / 'prompts.json'}",
            f"test.output_dir={out}",
            f"base.image_size={image_size}",
            "dataloader=dataloader_cpu",
        ],
    )
    return evaluate(with_labels(cfg, names))["cgmh"][str(ckpt)]


def cls_csv(src: Path, names, dst: Path) -> Path:
    """text_label rows → one 0/1 column per label (the probe's format); image paths made absolute."""
    with src.open() as f, dst.open("w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["image", *names])
        for row in csv.DictReader(f):
            labels = set(ast.literal_eval(row["text_label"]))
            images = [str(src.parent / p) for p in ast.literal_eval(row["image"])]
            writer.writerow([str(images), *(int(n in labels) for n in names)])
    return dst


def probe(ckpt: Path, data: Path, names, args, out: Path) -> dict:
    from cxrclip.config import compose
    from cxrclip.engine.finetune import finetune
    from cxrclip.eval.finetune import evaluate_finetune

    out.mkdir(parents=True, exist_ok=True)
    train_csv = cls_csv(data / "train.csv", names, out / "probe_train.csv")
    valid_csv = cls_csv(data / "valid.csv", names, out / "probe_valid.csv")
    cfg = compose(
        "finetune_100",
        [
            f"model.load_backbone_weights={ckpt}",
            f"data_train.cgmh_cls.data_path={train_csv}",
            f"data_valid.cgmh_cls.data_path={valid_csv}",
            f"base.image_size={args.image_size}",
            "dataloader=dataloader_cpu",
            f"scheduler.config.total_epochs={args.probe_epochs}",
            "optimizer.config.lr=1e-3",
            "scheduler=cosine_epoch10_warmup1",
            f"base.output.checkpoint={out}/checkpoints",
            f"base.output.tensorboard={out}/tb",
            f"base.seed={args.seed}",
        ],
    )
    finetune(with_labels(cfg, names))
    eval_cfg = compose(
        "eval_finetune",
        [
            f"test.checkpoint={out}/checkpoints/model-best.tar",
            f"data_test.cgmh_cls.data_path={data / 'test.csv'}",
            f"base.image_size={args.image_size}",
            "dataloader=dataloader_cpu",
            f"test.output_dir={out}",
        ],
    )
    result = evaluate_finetune(with_labels(eval_cfg, names))["cgmh_cls"]
    return next(iter(result.values()))["multilabel_classification"]


def untrained_checkpoint(args, data: Path, out: Path, names) -> Path:
    import torch

    from cxrclip.config import compose, to_plain
    from cxrclip.model.checkpoint import save_checkpoint
    from cxrclip.model.clip import build_model

    cfg = with_labels(compose("train", base_overrides(data, args, out)), names)
    torch.manual_seed(args.seed)
    model = build_model(to_plain(cfg.model))
    plain = to_plain(cfg)
    return save_checkpoint(out / "untrained.tar", {"model": model.state_dict(), "config": plain, "epoch": 0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="real_data_out")
    p.add_argument("--model", default="clip_cpu_offline")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--probe-epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-negs", type=int, default=2)
    p.add_argument("--targets", default="diagonal")
    p.add_argument("--bf16", default="true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for training")
    args = p.parse_args()
    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = json.loads((data / "labels.json").read_text())
    start = time.perf_counter()
    rows = {
        "untrained": zero_shot(
            untrained_checkpoint(args, data, out / "untrained", names), data, names, args.image_size, out / "untrained"
        )
    }
    t0 = time.perf_counter()
    train(with_labels(compose("train", base_overrides(data, args, out / "trained")), names))
    train_s = time.perf_counter() - t0
    trained = out / "trained" / "checkpoints" / "model-best.tar"
    rows["trained"] = zero_shot(trained, data, names, args.image_size, out / "trained")
    probes = {}
    if not args.skip_probe:
        probes["probe (untrained encoder)"] = probe(
            out / "untrained" / "untrained.tar", data, names, args, out / "probe_untrained"
        )
        probes["probe (trained encoder)"] = probe(trained, data, names, args, out / "probe_trained")
    header = ["label", *[f"zero-shot {k}" for k in rows], *probes]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))

    def cell(d, name):
        v = d.get(name, {})
        return "–" if not isinstance(v, dict) or v.get("AUROC") is None else f"{v['AUROC']:.3f}"

    for name in [*names, "AUROC(Avg)"]:
        if name == "AUROC(Avg)":
            vals = [f"{r['zeroshot_binary']['AUROC(Avg)']:.3f}" for r in rows.values()]
            vals += [f"{pr['AUROC(Avg)']:.3f}" for pr in probes.values()]
        else:
            vals = [cell(r["zeroshot_binary"], name) for r in rows.values()] + [
                cell(pr, name) for pr in probes.values()
            ]
        print(f"| {name} | " + " | ".join(vals) + " |")
    for k, r in rows.items():
        print(f"retrieval {k}: i2t {json.dumps(r.get('retrieval_i2t'))} t2i {json.dumps(r.get('retrieval_t2i'))}")
    print(
        json.dumps(
            {
                "benchmark": "real_data",
                "train_seconds": round(train_s, 1),
                "total_seconds": round(time.perf_counter() - start, 1),
                "epochs": args.epochs,
                "image_size": args.image_size,
                "lr": args.lr,
                "targets": args.targets,
                "zero_shot": {k: r["zeroshot_binary"]["AUROC(Avg)"] for k, r in rows.items()},
                "probe": {k: pr["AUROC(Avg)"] for k, pr in probes.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
