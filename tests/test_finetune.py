import json
import sys

import pytest
import torch

from cxrclip.config import compose
from cxrclip.data.records import stratified_subset
from cxrclip.data.schema import LabeledRecord
from cxrclip.engine.finetune import finetune
from cxrclip.eval.finetune import evaluate_finetune
from cxrclip.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")


@pytest.fixture
def clip_ckpt(tiny_clip_checkpoint):
    return tiny_clip_checkpoint


def probe_cfg(demo_data, clip_ckpt, out, *extra, name="finetune_10"):
    # the demo's test CSV has the classification format (image + one 0/1 column per label)
    return compose(
        name,
        [
            f"model.load_backbone_weights={clip_ckpt}",
            f"data_train.cgmh_cls.data_path={demo_data / 'test.csv'}",
            f"data_valid.cgmh_cls.data_path={demo_data / 'test.csv'}",
            "base.image_size=32",
            "dataloader=dataloader_cpu",
            "dataloader.train.batch_size=4",
            "dataloader.train.num_workers=0",
            "dataloader.valid.num_workers=0",
            "scheduler.config.total_epochs=2",
            "optimizer.config.lr=1e-2",
            f"base.output.checkpoint={out}/checkpoints",
            f"base.output.tensorboard={out}/tb",
            *extra,
        ],
    )


def test_stratified_subset_is_deterministic_and_keeps_rare_labels():
    rows = [LabeledRecord(i, (), (1, 0, 0) if i < 90 else (0, 1, 0) if i < 99 else (0, 0, 1)) for i in range(100)]
    a, b = stratified_subset(rows, 0.1, seed=1), stratified_subset(rows, 0.1, seed=1)
    assert a == b and len(a) == 11
    assert sum(r.labels[1] for r in a) == 1 and sum(r.labels[2] for r in a) == 1
    assert stratified_subset(rows, 0.1, seed=2) != a
    assert stratified_subset(rows, 1.0, seed=1) == rows


def test_data_frac_means_the_same_stratified_subset_for_training_rows():
    """Pre-training rows (label names, free-text reports) are subset by the same rule as classification rows."""
    from pathlib import Path

    from cxrclip.data.schema import ImageTextRecord

    img = (Path("x.png"),)
    rows = [ImageTextRecord(i, img, positives=("A",) if i < 90 else ("B",) if i < 99 else ()) for i in range(100)]
    rows += [ImageTextRecord(100 + i, img, texts=("a report.",)) for i in range(20)]
    as_labels = [LabeledRecord(r.line, img, (int("A" in r.positives), int("B" in r.positives))) for r in rows]
    a = stratified_subset(rows, 0.1, seed=1)
    assert [r.line for r in a] == [r.line for r in stratified_subset(as_labels, 0.1, seed=1)]
    assert (
        len(a) == 9 + 1 + 2 and sum(r.positives == ("B",) for r in a) == 1
    )  # A 90→9, B 9→1, none 21→2: round(), ≥ 1 each


def test_frozen_probe_changes_only_the_head(demo_data, clip_ckpt, tmp_path):
    finetune(probe_cfg(demo_data, clip_ckpt, tmp_path, name="finetune_100"))
    probe = load_checkpoint(tmp_path / "checkpoints/model-last.tar")
    clip = load_checkpoint(clip_ckpt)["model"]
    encoder = {k: v for k, v in probe["model"].items() if k.startswith("image_encoder.")}
    assert encoder and all(torch.equal(v, clip[k]) for k, v in encoder.items())  # BN running stats included
    head = probe["model"]["classifier.weight"]
    assert head.shape[0] == 13 and probe["probe"]["label_names"][9] == "Pneumothorax"
    assert probe["step"] > 0


def test_full_finetuning_trains_the_encoder(demo_data, clip_ckpt, tmp_path):
    finetune(probe_cfg(demo_data, clip_ckpt, tmp_path, "model.freeze_backbone_weights=false"))
    probe = load_checkpoint(tmp_path / "checkpoints/model-last.tar")["model"]
    clip = load_checkpoint(clip_ckpt)["model"]
    changed = [k for k, v in probe.items() if k.startswith("image_encoder.") and not torch.equal(v, clip[k])]
    assert len(changed) > 10


def test_evaluate_finetune_writes_results(demo_data, clip_ckpt, tmp_path):
    from cxrclip.jobs import probe

    assert probe(probe_cfg(demo_data, clip_ckpt, tmp_path, "calibration.min_positives=2"))["calibrated"]
    ckpt = tmp_path / "checkpoints/model-best.tar"
    assert load_checkpoint(ckpt)["calibration"]["fitted_on"]["path"].endswith("test.csv")
    out = evaluate_finetune(
        compose(
            "eval_finetune",
            [
                f"test.checkpoint={ckpt}",
                f"data_test.cgmh_cls.data_path={demo_data / 'test.csv'}",
                "base.image_size=32",
                "dataloader.test.num_workers=0",
                "dataloader.test.batch_size=8",
                f"test.output_dir={tmp_path}",
            ],
        )
    )
    result = out["cgmh_cls"][str(ckpt)]
    ml = result["multilabel_classification"]
    assert {"AUROC(Avg)", "F1(Avg)", "Accuracy(Avg)", "Pneumothorax"} <= set(ml)
    assert json.loads((tmp_path / "results-cgmh_cls.json").read_text())[str(ckpt)] == json.loads(json.dumps(result))
    assert "AUROC(Avg)" in (tmp_path / "results-cgmh_cls.md").read_text()
    # calibrated on the very CSV it is evaluated on (the demo has no separate classification valid split): flagged
    assert ml["calibration"]["optimistic"] is True
    per_label = [v for v in ml.values() if isinstance(v, dict) and "rule" in v]
    assert len(per_label) == 13 and any(v["calibrated"] for v in per_label)


def test_a_clip_checkpoint_is_not_a_probe(demo_data, clip_ckpt, tmp_path):
    from cxrclip.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a fine-tuned checkpoint"):
        evaluate_finetune(
            compose(
                "eval_finetune",
                [f"test.checkpoint={clip_ckpt}", f"data_test.cgmh_cls.data_path={demo_data / 'test.csv'}"],
            )
        )


def test_the_users_commands(demo_data, clip_ckpt, tmp_path):
    from tests.test_trainer import run_script

    run = tmp_path / "ft"
    done = run_script(
        [
            sys.executable,
            "finetune.py",
            "--config-name",
            "finetune_10",
            f"hydra.run.dir={run}",
            "data_train=cgmh_cls",
            "data_valid=cgmh_cls",
            f"model.load_backbone_weights={clip_ckpt}",
            f"data_train.cgmh_cls.data_path={demo_data / 'test.csv'}",
            f"data_valid.cgmh_cls.data_path={demo_data / 'test.csv'}",
            "base.image_size=32",
            "dataloader=dataloader_cpu",
            "scheduler.config.total_epochs=1",
            "dataloader.train.batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.valid.num_workers=0",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script(
        [
            sys.executable,
            "evaluate_finetune.py",
            "data_test=cgmh_cls",
            f"test.checkpoint={run / 'checkpoints/model-best.tar'}",
            f"hydra.run.dir={tmp_path / 'ev'}",
            f"data_test.cgmh_cls.data_path={demo_data / 'test.csv'}",
            "base.image_size=32",
            "dataloader.test.num_workers=0",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "results-cgmh_cls.json").is_file()


def test_cxrclip_finetune_and_evaluate_finetune_subcommands_run_in_process(demo_data, clip_ckpt, tmp_path):
    from cxrclip.cli import main

    common = [
        f"data_train.cgmh_cls.data_path={demo_data / 'test.csv'}",
        f"data_valid.cgmh_cls.data_path={demo_data / 'test.csv'}",
        "base.image_size=32",
        "dataloader=dataloader_cpu",
        "scheduler.config.total_epochs=1",
        "dataloader.train.batch_size=4",
        "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0",
        f"base.output.checkpoint={tmp_path}/checkpoints",
        f"base.output.tensorboard={tmp_path}/tb",
    ]
    argv = ["finetune", "--config-name", "finetune_10", f"model.load_backbone_weights={clip_ckpt}", *common]
    assert main(argv) == 0
    ckpt = tmp_path / "checkpoints" / "model-best.tar"
    assert load_checkpoint(ckpt)["config"]["base"]["data_frac"] == 0.1  # finetune_10 was used
    test_csv = demo_data / "test.csv"
    argv = ["evaluate-finetune", f"test.checkpoint={ckpt}", f"data_test.cgmh_cls.data_path={test_csv}",
            "base.image_size=32", "dataloader.test.num_workers=0", f"test.output_dir={tmp_path}"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "results-cgmh_cls.json").is_file()


def test_a_probe_keeps_the_last_partial_batch(demo_data, clip_ckpt, tmp_path):
    """12 rows with batch 256: one (partial) batch per epoch, not 'no full batch' (contrastive pre-training, whose
    in-batch negatives need full batches, still drops it)."""
    finetune(probe_cfg(demo_data, clip_ckpt, tmp_path, "dataloader.train.batch_size=256", name="finetune_100"))
    assert load_checkpoint(tmp_path / "checkpoints/model-last.tar")["step"] == 2  # 2 epochs × 1 batch
