"""Pre-train on real radiographs and show what it bought: zero-shot per-label AUROC and retrieval for the
untrained model (ImageNet + MiniLM) vs the trained one, and a linear probe on each frozen image encoder.

    python benchmarks/real_data.py --data ../shared/data/cxr_real_dev --epochs 20 --out /tmp/real
    python benchmarks/real_data.py --data ../shared/data/cxr_real_dev --out /tmp/rd --epochs 10 --probes none \
        --unknown-tube --recipe small_data --seeds 1 2 3 -- base.ema_decay=0.999   # Hydra overrides after `--`

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

import numpy as np

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
    """text_label rows → one 1/0/-1 column per label (the probe's format; -1 = unknown, left out of its loss);
    image paths made absolute. A ``[[pos], [neg], [unc]]`` triplet cell gives -1 for its uncertain labels."""
    with src.open() as f, dst.open("w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["image", *names])
        for row in csv.DictReader(f):
            cell = ast.literal_eval(row["text_label"])
            triplet = len(cell) == 3 and all(isinstance(c, list) for c in cell)
            positives, unknown = (set(cell[0]), set(cell[2])) if triplet else (set(cell), set())
            images = [str(src.parent / p) for p in ast.literal_eval(row["image"])]
            writer.writerow([str(images), *(1 if n in positives else -1 if n in unknown else 0 for n in names)])
    return dst


TUBE = "Endotracheal tube"


def notes_csv(data: Path, out: Path) -> Path:
    """The training split's real clinical notes (metadata.csv ``note``) as a second caption source: one report row per
    training image that has a note (a report row has no label set: label-aware targets keep it on the diagonal)."""
    notes = {}
    with (data / "metadata.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == "train" and row["note"].strip():
                notes[row["image"]] = row["note"].strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as g:
        writer = csv.writer(g)
        writer.writerow(["image", "text"])
        for image, note in sorted(notes.items()):
            writer.writerow([str([str(data / image)]), note])
    return out


def unknown_tube_data(data: Path, out: Path) -> Path:
    """A copy of ``data`` whose train/valid rows carry ``Endotracheal tube`` as *unknown* where the source's
    intubation field is blank (metadata.csv ``intubation_present_raw``), instead of the set's 0.

    Rows are written as ``[[pos], [neg], [unc]]`` triplets: an unknown tube is never drawn as a "no endotracheal
    tube" sentence, and the prompt copy has no ``unc`` sentence for the tube, so such captions say nothing about it;
    the probes leave it out of their loss. Test labels are untouched (the benchmark scores the set as published)."""
    out.mkdir(parents=True, exist_ok=True)
    field = {}
    with (data / "metadata.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            field[row["image"]] = row["intubation_present_raw"].strip()
    for split in ("train", "valid"):
        with (
            (data / f"{split}.csv").open(newline="", encoding="utf-8") as f,
            (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as g,
        ):
            writer = csv.writer(g)
            writer.writerow(["image", "text_label"])
            for row in csv.DictReader(f):
                images = [str(data / p) for p in ast.literal_eval(row["image"])]
                positives = list(ast.literal_eval(row["text_label"]))
                blank = field[ast.literal_eval(row["image"])[0]] == "" and TUBE not in positives
                unc = [TUBE] if blank else []
                neg = [TUBE] if TUBE not in positives and not blank else []
                writer.writerow([str(images), str([positives, neg, unc])])
    prompts = json.loads((data / "prompts.json").read_text(encoding="utf-8"))
    prompts[TUBE]["unc"] = []
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1), encoding="utf-8")
    for name in ("test.csv", "labels.json"):
        text = (data / name).read_text(encoding="utf-8")
        (out / name).write_text(text, encoding="utf-8")
    if not (out / "images").exists():
        (out / "images").symlink_to(data / "images")
    return out


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
            "base.overwrite=true",  # a rerun into the same --out replaces its probe
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


def test_labels(data: Path, names) -> np.ndarray:
    with (data / "test.csv").open(newline="", encoding="utf-8") as f:
        return np.array([[int(row[n]) for n in names] for row in csv.DictReader(f)])


def test_images(data: Path) -> list[Path]:
    with (data / "test.csv").open(newline="", encoding="utf-8") as f:
        return [data / ast.literal_eval(row["image"])[0] for row in csv.DictReader(f)]


def zero_shot_logits(ckpt: Path, data: Path, names) -> np.ndarray:
    """Test-set zero-shot logits (images × labels) of a checkpoint: its stored test transform, the data's prompts."""
    from cxrclip.data.images import read_image
    from cxrclip.predict.checkpoint import Predictor

    predictor = Predictor.create(str(ckpt), prompts=str(data / "prompts.json"), labels=names, device="cpu")
    images = test_images(data)
    emb = np.concatenate(
        [
            predictor.embed([predictor.transform(read_image(p)) for p in images[i : i + 32]])
            for i in range(0, len(images), 32)
        ]
    )
    return predictor.logits(emb)


def per_label(y: np.ndarray, scores: np.ndarray, names) -> dict:
    from sklearn.metrics import roc_auc_score

    from cxrclip.eval.metrics import auroc_ci

    out = {}
    for j, n in enumerate(names):
        if 0 < y[:, j].sum() < len(y):
            out[n] = {
                "AUROC": float(roc_auc_score(y[:, j], scores[:, j])),
                "CI95": list(auroc_ci(y[:, j], scores[:, j])),
            }
    return out


def paired_bootstrap(y: np.ndarray, a: list[np.ndarray], b: list[np.ndarray], cols: list[int], n_boot: int = 2000):
    """95 % interval of mean-over-seeds [avg AUROC over ``cols`` of b − of a], resampling test images (paired:
    one resample serves every model, so correlation between them and between labels is kept)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yy = y[idx]
        if any(yy[:, j].min() == yy[:, j].max() for j in cols):
            continue

        def avg(s, idx=idx, yy=yy):
            return np.mean([roc_auc_score(yy[:, j], s[idx, j]) for j in cols])

        diffs.append(np.mean([avg(sb) - avg(sa) for sa, sb in zip(a, b)]))
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def run_seed(args, data: Path, names, out: Path) -> dict:
    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    untrained = untrained_checkpoint(args, data, out / "untrained", names)
    result = {"seed": args.seed, "logits": {"untrained": zero_shot_logits(untrained, data, names)}}
    start = time.perf_counter()
    train(with_labels(compose("train", [*base_overrides(data, args, out / "trained"), "base.overwrite=true"]), names))
    result["train_seconds"] = round(time.perf_counter() - start, 1)
    trained = out / "trained" / "checkpoints" / "model-best.tar"
    result["logits"]["trained"] = zero_shot_logits(trained, data, names)
    result["probes"] = {}
    if args.probes in ("both", "imagenet"):
        result["probes"]["ImageNet encoder"] = probe(untrained, data, names, args, out / "probe_untrained")
    if args.probes in ("both", "trained"):
        result["probes"]["pre-trained encoder"] = probe(trained, data, names, args, out / "probe_trained")
    return result


def label_counts(y: np.ndarray, names) -> dict:
    """Per label its (positives, negatives) in the test split."""
    return {n: (int(y[:, j].sum()), int(len(y) - y[:, j].sum())) for j, n in enumerate(names)}


def headline_labels(y: np.ndarray, names, min_count: int) -> list:
    """The labels with at least ``min_count`` test positives and negatives (the rest are reported apart)."""
    counts = label_counts(y, names)
    return [n for n in names if min(counts[n]) >= min_count]


def spread(per_seed: dict, headline: list) -> dict:
    """Per-seed headline AUROCs ({seed: {label: AUROC}}) with their average's mean ± sd and each label's mean."""
    avg = [float(np.mean(list(v.values()))) for v in per_seed.values()]
    return {
        "per_seed": per_seed,
        "headline_average": {"mean": float(np.mean(avg)), "sd": float(np.std(avg, ddof=1)) if len(avg) > 1 else 0.0},
        "per_seed_average": avg,
        "per_label_mean": {n: float(np.mean([v[n] for v in per_seed.values()])) for n in headline},
    }


def aurocs_line(aurocs: dict) -> str:
    return ", ".join(f"{n} {v:.3f}" for n, v in aurocs.items())


def untrained_spread(args, data: Path, names, out: Path) -> dict:
    """The untrained model's zero-shot AUROC over many seeds: its projection heads are random, so each seed's
    "before" is one draw; this shows how far a 3-seed baseline can sit from its expectation. With
    ``--probes imagenet`` also a linear probe on the same (ImageNet) encoder per seed: what a supervised read-out of
    the features a locked-encoder recipe keeps can reach, a yardstick for its zero-shot head (on cxr_real_dev at
    288 px the zero-shot head is above it: RESULTS round 4)."""
    y = test_labels(data, names)
    headline = headline_labels(y, names, args.min_count)
    per_seed, probes = {}, {}
    for seed in args.seeds:
        args.seed = seed
        ckpt = untrained_checkpoint(args, data, out / f"untrained{seed}", names)
        scores = per_label(y, zero_shot_logits(ckpt, data, names), names)
        per_seed[seed] = {n: scores[n]["AUROC"] for n in headline}
        print(f"seed {seed}: {aurocs_line(per_seed[seed])}", flush=True)
        if args.probes == "imagenet":
            result = probe(ckpt, data, names, args, out / f"probe{seed}")
            probes[seed] = {n: result[n]["AUROC"] for n in headline}
            print(f"seed {seed} ImageNet probe: {aurocs_line(probes[seed])}", flush=True)
    summary = {
        "benchmark": "real_data untrained spread",
        "overrides": args.override,
        "image_size": args.image_size,
        "headline_labels": headline,
        **spread(per_seed, headline),
    }
    print(f"untrained zero-shot headline average, {len(per_seed)} seeds: {mean_sd(summary['per_seed_average'])}")
    if probes:
        summary["imagenet_probe"] = spread(probes, headline)
        print(f"ImageNet-encoder probe headline average: {mean_sd(summary['imagenet_probe']['per_seed_average'])}")
    print(json.dumps(summary))
    return summary


def report(results: list[dict], y: np.ndarray, names, args) -> dict:
    counts = label_counts(y, names)
    headline = headline_labels(y, names, args.min_count)
    cols = [names.index(n) for n in headline]
    aurocs = {k: [per_label(y, r["logits"][k], names) for r in results] for k in ("untrained", "trained")}
    probes = {k: [r["probes"][k] for r in results] for k in (results[0]["probes"] if results else {})}

    def cell(kind, n):
        runs = aurocs[kind]
        values = [r[n]["AUROC"] for r in runs if n in r]
        lo = np.mean([r[n]["CI95"][0] for r in runs if n in r]) if values else None
        hi = np.mean([r[n]["CI95"][1] for r in runs if n in r]) if values else None
        return f"{mean_sd(values)} [{lo:.2f}, {hi:.2f}]" if values else "–"

    def probe_cell(kind, n):
        return mean_sd([(p.get(n) or {}).get("AUROC") for p in probes[kind]])

    header = ["label (pos/neg)", "zero-shot untrained", "zero-shot trained", *[f"probe, {k}" for k in probes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, members in (("headline", headline), ("apart", [n for n in names if n not in headline])):
        for n in members:
            row = [f"{n} ({counts[n][0]}/{counts[n][1]})", cell("untrained", n), cell("trained", n)]
            lines.append("| " + " | ".join(row + [probe_cell(k, n) for k in probes]) + " |")
        if group == "headline":
            avg = {k: [np.mean([r[n]["AUROC"] for n in headline]) for r in aurocs[k]] for k in aurocs}
            pavg = {k: [np.mean([p[n]["AUROC"] for n in headline]) for p in probes[k]] for k in probes}
            row = [f"**average of these {len(headline)}**", mean_sd(avg["untrained"]), mean_sd(avg["trained"])]
            lines.append("| " + " | ".join(row + [mean_sd(v) for v in pavg.values()]) + " |")
    untrained = [r["logits"]["untrained"] for r in results]
    trained = [r["logits"]["trained"] for r in results]
    diff = float(np.mean([np.mean([r[n]["AUROC"] for n in headline]) for r in aurocs["trained"]])) - float(
        np.mean([np.mean([r[n]["AUROC"] for n in headline]) for r in aurocs["untrained"]])
    )
    ci = paired_bootstrap(y, untrained, trained, cols) if cols else [None, None]
    lines.append("")
    lines.append(
        f"trained − untrained, average AUROC over {headline}: {diff:+.3f}, 95 % paired-bootstrap interval "
        f"[{ci[0]:+.3f}, {ci[1]:+.3f}] ({len(results)} seed(s); test images resampled)"
    )
    print("\n".join(lines))
    summary = {
        "benchmark": "real_data",
        "seeds": [r["seed"] for r in results],
        "overrides": args.override,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "recipe": args.recipe,
        "lr": args.lr,
        "targets": args.targets,
        "unknown_tube": args.unknown_tube,
        "notes": args.notes,
        "headline_labels": headline,
        "difference": round(diff, 4),
        "difference_ci95": ci,
        "train_seconds": [r["train_seconds"] for r in results],
        "zero_shot": {k: {n: [r[n]["AUROC"] if n in r else None for r in v] for n in names} for k, v in aurocs.items()},
        "probe": {k: {n: [(p.get(n) or {}).get("AUROC") for p in v] for n in names} for k, v in probes.items()},
    }
    print(json.dumps(summary))
    return summary


def trained_checkpoint(run: Path, seed: int) -> Path:
    path = Path(run) / f"seed{seed}" / "trained" / "checkpoints" / "model-best.tar"
    if not path.is_file():
        raise SystemExit(f"{path}: no trained checkpoint for seed {seed} in run {run} (run it with the same --seeds)")
    return path


def routed_logits(routed: Path, data: Path, names) -> np.ndarray:
    """Test-set zero-shot logits of a routed model: each label from its member, each member's own preprocessing."""
    from cxrclip.data.images import read_image
    from cxrclip.predict import load_predictor

    predictor = load_predictor(routed, device="cpu")
    images = [read_image(p) for p in test_images(data)]
    out = np.zeros((len(images), len(names)))
    for member in predictor.members.values():
        cols = [names.index(n) for n in member.label_names]
        emb = np.concatenate(
            [member.embed([member.transform(a) for a in images[i : i + 32]]) for i in range(0, len(images), 32)]
        )
        out[:, cols] = member.logits(emb)
    return out


def valid_split(data: Path, names, unknown_tube: bool):
    """The validation rows' first images and their labels (1 / 0 / -1 = unknown), as ``cxrclip route`` reads them."""
    from cxrclip.data.records import load_records
    from cxrclip.data.schema import DataConfig
    from cxrclip.eval.calibrate import label_matrix

    dc = DataConfig(
        name="valid", data_type="imagetext", data_path=str(data / "valid.csv"), label_names=tuple(names),
        label_format="triplet" if unknown_tube else "list", prompt_path=str(data / "prompts.json"),
    )  # fmt: skip
    records = load_records(dc)
    return [r.images[0] for r in records], label_matrix(records, names)


def routed_runs(args, data: Path, names, out: Path, results: list[dict], y: np.ndarray) -> dict:
    """The routed models of each seed, scored as one model: the --take routing (its logits must equal the
    --take assembly), and the routing ``cxrclip route`` chooses on the validation split among this run and the
    --route-candidates runs (the test split only reports it)."""
    from cxrclip.eval.route import choose_members
    from cxrclip.predict.routed import Member, write_routed

    headline = headline_labels(y, names, args.min_count)
    summary: dict = {"take": {}, "valid_chosen": {}}
    valid_images, valid_labels = valid_split(data, names, args.unknown_tube)
    for r in results:
        seed = r["seed"]
        own = trained_checkpoint(out, seed)
        if args.take:
            taken = [t.partition("=") for t in args.take]
            members = [Member("own", str(own))]
            members += [Member(f"take{i}", str(trained_checkpoint(run, seed)), (label,)) for i, (label, _, run) in
                        enumerate(taken)]  # fmt: skip
            folder = write_routed(out / f"seed{seed}" / "routed_take", members, overwrite=True)
            logits = routed_logits(folder, data, names)
            difference = float(np.abs(logits - r["logits"]["trained"]).max())
            summary["take"][seed] = {"max_abs_difference_to_take": difference}
            print(
                f"seed {seed}: the --take routing as a routed model vs the --take logits: max |diff| {difference:.2e}"
            )
        if args.route_candidates:
            candidates = [str(own)] + [str(trained_checkpoint(run, seed)) for run in args.route_candidates]
            choice, evidence = choose_members(candidates, valid_images, valid_labels, names, device="cpu")
            members = []
            for k, path in enumerate(candidates):
                mine = tuple(n for n in names if choice[n] == k)
                if mine or k == 0:
                    members.append(Member(f"c{k}", path, mine or None))
            folder = write_routed(out / f"seed{seed}" / "routed_valid", members, overwrite=True,
                                  card={"evidence": evidence})  # fmt: skip
            logits = routed_logits(folder, data, names)
            aurocs = per_label(y, logits, names)
            chosen = {n: ("own" if choice[n] == 0 else args.route_candidates[choice[n] - 1]) for n in names}
            summary["valid_chosen"][seed] = {
                "chosen": chosen,
                "auroc": {n: aurocs[n]["AUROC"] for n in names if n in aurocs},
                "headline_average": float(np.mean([aurocs[n]["AUROC"] for n in headline])),
            }
            picked = ", ".join(f"{n} → {c}" for n, c in chosen.items() if c != "own") or "the default everywhere"
            print(f"seed {seed}: chosen on validation: {picked}; test headline average "
                  f"{summary['valid_chosen'][seed]['headline_average']:.3f}")  # fmt: skip
    if summary["valid_chosen"]:
        values = [v["headline_average"] for v in summary["valid_chosen"].values()]
        print(f"routing chosen on validation, test headline average over seeds: {mean_sd(values)}")
        for n in headline:
            print(f"  {n}: {mean_sd([v['auroc'][n] for v in summary['valid_chosen'].values()])}")
    return summary


def apply_recipe(args) -> None:
    """Fill --image-size / --lr / --targets from ``--recipe`` (they are passed to training as overrides, which
    would otherwise beat the recipe's values) or from the plain defaults; the recipe goes first in the overrides."""
    defaults = {"image_size": 224, "lr": 1e-4, "targets": "diagonal"}
    if args.recipe:
        from cxrclip.config import compose

        cfg = compose("train", [f"+recipe={args.recipe}"])
        defaults = {
            "image_size": int(cfg.base.image_size),
            "lr": float(cfg.optimizer.config.lr),
            "targets": str(cfg.loss.cxr_clip.targets),
        }
        args.override = [f"+recipe={args.recipe}", *args.override]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="real_data_out")
    p.add_argument("--model", default="clip_cpu_offline")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--probe-epochs", type=int, default=15)
    p.add_argument("--recipe", help="a configs/recipe/ preset (e.g. small_data); it sets the three below")
    p.add_argument("--image-size", type=int, help="default: the recipe's, else 224")
    p.add_argument("--lr", type=float, help="default: the recipe's, else 1e-4")
    p.add_argument("--num-negs", type=int, default=2)
    p.add_argument("--targets", help="default: the recipe's, else diagonal")
    p.add_argument("--bf16", default="true")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--min-count", type=int, default=10, help="headline labels: ≥ this many test positives and negatives"
    )
    p.add_argument("--probes", choices=["both", "trained", "imagenet", "none"],
                   help="linear probes on the ImageNet (untrained) and/or the pre-trained encoder (default: both; "
                        "with --untrained-only: none, or imagenet)")  # fmt: skip
    p.add_argument(
        "--unknown-tube",
        action="store_true",
        help="train on a copy where a blank source intubation field is 'unknown', not 0 (see unknown_tube_data)",
    )
    p.add_argument(
        "--notes",
        action="store_true",
        help="add the training images' clinical notes (metadata.csv) as a second training dataset of report captions",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the seeds' logits.npz already in --out (e.g. with --take)",
    )
    p.add_argument(
        "--take",
        action="append",
        default=[],
        metavar="LABEL=RUN",
        help="score LABEL with another run's logits (same seeds; its untrained model too): a model per label family",
    )
    p.add_argument(
        "--routed",
        action="store_true",
        help="also build each seed's --take routing as a routed model and check it gives the --take logits",
    )
    p.add_argument(
        "--route-candidates",
        nargs="+",
        default=[],
        metavar="RUN",
        help="choose each label's member on the validation split among this run and these runs (same seeds) and "
        "report what that routed model scores on the test split",
    )
    p.add_argument(
        "--untrained-only",
        action="store_true",
        help="train nothing: the untrained model's zero-shot AUROCs over --seeds (how much the baseline varies)",
    )
    p.add_argument("override", nargs="*", help="extra Hydra overrides for training (the recipe under test)")
    args = p.parse_args()
    if args.probes is None:
        args.probes = "none" if args.untrained_only else "both"
    elif args.untrained_only and args.probes not in ("none", "imagenet"):
        p.error("--untrained-only trains nothing: --probes can only be none or imagenet")
    apply_recipe(args)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = json.loads((data / "labels.json").read_text())
    if args.unknown_tube:
        data = unknown_tube_data(data, out / "data")
        args.override = [
            *args.override,
            "data_train.cgmh.label_format=triplet",
            "data_valid.cgmh.label_format=triplet",
        ]
    if args.notes:
        notes = notes_csv(Path(args.data).resolve(), out / "notes_train.csv")
        spec = (
            f"{{name:notes,data_type:imagetext,data_path:'{notes}',text_source:report,"
            f"label_names:{json.dumps(names)},image_size:{args.image_size}}}"
        )
        args.override = [*args.override, f"+data_train.notes={spec}"]
    if args.untrained_only:
        summary = untrained_spread(args, data, names, out)
        (out / "summary-untrained.json").write_text(json.dumps(summary, indent=2) + "\n")
        return
    results = []
    for seed in args.seeds:
        args.seed = seed
        if args.report_only:
            logits = dict(np.load(out / f"seed{seed}" / "logits.npz"))
            results.append({"seed": seed, "logits": logits, "probes": {}, "train_seconds": None})
        else:
            results.append(run_seed(args, data, names, out / f"seed{seed}"))
            np.savez(out / f"seed{seed}" / "logits.npz", **results[-1]["logits"])
    for take in args.take:
        label, _, run = take.partition("=")
        if label not in names or not run:
            p.error(f"--take {take!r}: expected LABEL=RUN with LABEL one of {names}")
        for r in results:
            other = np.load(Path(run) / f"seed{r['seed']}" / "logits.npz")
            for kind in r["logits"]:
                r["logits"][kind] = r["logits"][kind].copy()
                r["logits"][kind][:, names.index(label)] = other[kind][:, names.index(label)]
    summary = report(results, test_labels(data, names), names, args)
    summary["taken"] = args.take
    if args.routed or args.route_candidates:
        summary["routed"] = routed_runs(args, data, names, out, results, test_labels(data, names))
    name = "summary-report.json" if args.report_only or args.take else "summary.json"  # a run's own stays
    (out / name).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
