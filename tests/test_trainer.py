import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from cxrclip.config import compose, to_plain
from cxrclip.data.batch import Batch
from cxrclip.data.schema import DataValidationError
from cxrclip.engine import trainer as trainer_mod
from cxrclip.engine.loader import EpochSampler
from cxrclip.engine.trainer import train
from cxrclip.loss import CXRClipLoss
from cxrclip.model.checkpoint import load_checkpoint
from cxrclip.model.clip import build_model
from cxrclip.model.encoders import build_tokenizer
from cxrclip.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")  # clip_tiny uses MiniLM's vocabulary


def tiny_overrides(demo_data, out, epochs=2):
    return [
        "model=clip_tiny",
        "dataloader=dataloader_cpu",
        "base.image_size=32",
        "optimizer.config.lr=1e-3",
        f"data_train.cgmh.data_path={demo_data / 'train.csv'}",
        f"data_valid.cgmh.data_path={demo_data / 'valid.csv'}",
        f"scheduler.config.total_epochs={epochs}",
        "dataloader.train.batch_size=8",
        "dataloader.valid.batch_size=8",
        "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0",
        "data_train.cgmh.num_negs=2",
    ]


def tiny_cfg(demo_data, out, *extra, epochs=2):
    overrides = [
        *tiny_overrides(demo_data, out, epochs),
        f"base.output.checkpoint={out}/checkpoints",
        f"base.output.tensorboard={out}/tb",
        *extra,
    ]
    return compose("train", overrides)


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_epoch_sampler_splits_pads_and_skips():
    full = list(EpochSampler(10, shuffle=True, seed=1))
    assert sorted(full) == list(range(10))
    parts = [list(EpochSampler(10, shuffle=True, seed=1, rank=r, world=3)) for r in range(3)]
    assert all(len(p) == 4 for p in parts) and set(sum(parts, [])) == set(range(10))
    s = EpochSampler(10, shuffle=True, seed=1)
    s.set_epoch(0, skip=4)
    assert list(s) == full[4:]
    s.set_epoch(1)
    assert list(s) != full


def test_every_trainable_parameter_gets_a_gradient(demo_data, tmp_path):
    cfg = tiny_cfg(demo_data, tmp_path)
    model = build_model(to_plain(cfg.model))
    for m in model.modules():  # timm zero-inits each block's last BN gamma, which blocks gradients at init
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    t = build_tokenizer(cfg.tokenizer)
    tok = lambda texts: dict(t(texts, padding="longest", return_tensors="pt"))  # noqa: E731
    batch = Batch(
        images=torch.randn(4, 3, 32, 32),
        image_views=torch.randn(4, 3, 32, 32),
        tokens=tok(["a b", "c", "d e f", "g"]),
        tokens2=tok(["x", "y z", "w", "v u"]),
    )
    CXRClipLoss()(model(batch))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_writes_checkpoints_with_the_original_keys(demo_data, tmp_path):
    result = train(tiny_cfg(demo_data, tmp_path))
    assert result["epoch"] == 2 and result["step"] == 6
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "model-last.tar")
    assert {"model", "optimizer", "scheduler", "config", "epoch", "train_loss", "scaler", "step", "rng"} <= set(ckpt)
    assert ckpt["config"]["dataloader"]["train"]["batch_size"] == 8  # the global batch, as configured
    assert (tmp_path / "checkpoints" / "model-best.tar").is_file()
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("extra", [[], ["base.ema_decay=0.9"]], ids=["plain", "ema"])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(demo_data, tmp_path, monkeypatch, extra):
    train(tiny_cfg(demo_data, tmp_path / "full", *extra, epochs=3))
    saved = trainer_mod.Trainer.save

    def save_and_keep_epoch_1(self, name, *args):
        saved(self, name, *args)
        if name == "model-last.tar" and self.epoch == 1:
            shutil.copy(self.run.checkpoint_dir / name, tmp_path / "epoch1.tar")

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_and_keep_epoch_1)
    train(tiny_cfg(demo_data, tmp_path / "first", *extra, epochs=3))
    monkeypatch.undo()
    resume = f"base.resume={tmp_path / 'epoch1.tar'}"
    result = train(tiny_cfg(demo_data, tmp_path / "resumed", resume, *extra, epochs=3))
    assert result["epoch"] == 3
    resumed = load_checkpoint(tmp_path / "resumed/checkpoints/model-last.tar")
    full = load_checkpoint(tmp_path / "full/checkpoints/model-last.tar")
    assert_same_weights(resumed["model"], full["model"])  # with EMA: the average, and below the raw weights
    assert ("train_model" in full) == bool(extra)
    if extra:
        assert_same_weights(resumed["train_model"], full["train_model"])


def test_ema_weights_are_what_gets_saved_and_evaluated(demo_data, tmp_path, monkeypatch):
    from cxrclip.model.loading import load_model

    decay, raw = 0.7, []
    original = trainer_mod.Trainer.optimizer_step

    def step_and_record(self):
        original(self)
        raw.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(trainer_mod.Trainer, "optimizer_step", step_and_record)
    train(tiny_cfg(demo_data, tmp_path, f"base.ema_decay={decay}", "base.ema_warmup=false"))
    last = load_checkpoint(tmp_path / "checkpoints/model-last.tar")
    # by hand: the first update copies the weights, then ema ← d·ema + (1 − d)·w (integer buffers are copied)
    ema = dict(raw[0])
    for w in raw[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in w.items()}
    assert len(raw) == 6 and last["ema_decay"] == decay
    for k, v in ema.items():
        torch.testing.assert_close(last["model"][k], v, rtol=0, atol=1e-6)
    assert_same_weights(last["train_model"], raw[-1])
    moved = [k for k, v in raw[-1].items() if v.is_floating_point() and not torch.allclose(v, last["model"][k])]
    assert moved  # the average really differs from the last weights
    best = load_checkpoint(tmp_path / "checkpoints/model-best.tar")
    assert_same_weights(load_model(tmp_path / "checkpoints/model-best.tar").model.state_dict(), best["model"])
    with pytest.raises(ValueError, match="ema_decay must be between 0 and 1"):
        train(tiny_cfg(demo_data, tmp_path / "bad", "base.ema_decay=1.5"))


def test_sigterm_mid_epoch_saves_and_resume_finishes_the_epoch(demo_data, tmp_path, monkeypatch):
    original = trainer_mod.Trainer.optimizer_step
    calls = {"n": 0}

    def step_then_signal(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 4:  # second batch of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_mod.Trainer, "optimizer_step", step_then_signal)
    result = train(tiny_cfg(demo_data, tmp_path / "cut"))
    monkeypatch.undo()
    assert result["stopped"] and result["step"] == 4
    ckpt = load_checkpoint(tmp_path / "cut/checkpoints/model-last.tar")
    assert (ckpt["epoch"], ckpt["batches_done"]) == (1, 1)
    # the rest of epoch 2 is the batches not yet seen (same order); augmentation draws may differ mid-epoch
    result = train(tiny_cfg(demo_data, tmp_path / "cut", f"base.resume={tmp_path / 'cut/checkpoints/model-last.tar'}"))
    assert (result["epoch"], result["step"]) == (2, 6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    original = CXRClipLoss.forward
    calls = {"n": 0}

    def nan_in_epoch_2(self, out, batch=None):
        calls["n"] += 1
        losses = original(self, out, batch)
        if calls["n"] > 6:  # 3 train + 1 valid batches in epoch 1, then NaN
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(CXRClipLoss, "forward", nan_in_epoch_2)
    with pytest.raises(FloatingPointError, match="non-finite loss.*epoch 2"):
        train(tiny_cfg(demo_data, tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints/model-last.tar")["epoch"] == 1


def test_a_report_dataset_beside_a_label_dataset_trains_without_a_prompt_file(demo_data, tmp_path, caplog):
    """Label captions plus free-text reports in one run (label-aware targets): the report rows need no prompt
    file, carry no label set, and the report dataset's own (shorter) label list is aligned onto the run's."""
    import csv

    from cxrclip.data.cells import literal_list

    with (demo_data / "train.csv").open() as f, (tmp_path / "reports.csv").open("w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["image", "text"])
        for i, row in enumerate(csv.DictReader(f)):
            images = [str(demo_data / p) for p in literal_list(row["image"])]
            writer.writerow([str(images), f"Report {i}: portable chest radiograph."])
    path = tmp_path / "reports.csv"
    report = f"+data_train.reports={{name:reports,data_type:imagetext,data_path:'{path}',text_source:report,"
    report += "label_names:[Pneumothorax]}"
    with caplog.at_level("WARNING"):
        result = train(tiny_cfg(demo_data, tmp_path, report, "loss.cxr_clip.targets=label_set"))
    assert result["epoch"] == 2 and result["step"] == 12  # 24 label rows + 24 report rows, batches of 8
    assert any("different label lists (cgmh: 13; reports: 1; cgmh: 13)" in r.message for r in caplog.records)


def test_bad_data_stops_before_the_model_is_built(demo_data, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be built when the data is bad")

    from cxrclip.engine import tasks

    monkeypatch.setattr(tasks, "build_model", no_model)
    (tmp_path / "bad.csv").write_text("image,text_label\nnope.png,\"['Nope']\"\n")
    with pytest.raises(DataValidationError, match=r"bad.csv:2: image file not found"):
        train(tiny_cfg(demo_data, tmp_path, f"data_train.cgmh.data_path={tmp_path / 'bad.csv'}"))
    assert not (tmp_path / "checkpoints").exists()


def run_script(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_train_py_then_resume_to_a_later_epoch(demo_data, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "train.py", f"hydra.run.dir={run}", *tiny_overrides(demo_data, run)]
    done = run_script(base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints/model-best.tar").is_file()
    more = run_script(
        [
            sys.executable,
            "train.py",
            f"hydra.run.dir={run}",
            *tiny_overrides(demo_data, run, epochs=3),
            f"base.resume={run / 'checkpoints/model-last.tar'}",
        ]
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints/model-last.tar")["epoch"] == 3


def test_train_py_reports_a_bad_csv_clearly(tmp_path, demo_data):
    done = run_script(
        [
            sys.executable,
            "train.py",
            f"hydra.run.dir={tmp_path}",
            "model=clip_tiny",
            f"data_train.cgmh.data_path={tmp_path / 'missing.csv'}",
            f"data_valid.cgmh.data_path={demo_data / 'valid.csv'}",
        ]
    )
    assert done.returncode == 2
    assert "missing.csv: file not found" in done.stderr and "Traceback" not in done.stderr


def test_torchrun_two_cpu_processes(demo_data, tmp_path):
    run = tmp_path / "ddp"
    done = run_script(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            f"hydra.run.dir={run}",
            *tiny_overrides(demo_data, run),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoints/model-last.tar")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and ckpt["step"] == 6


def test_gradient_accumulation_and_clipping(demo_data, tmp_path):
    # 3 batches per epoch, accumulating 2: steps after batch 2 and after the epoch's last batch
    result = train(tiny_cfg(demo_data, tmp_path, "base.grad_accum_steps=2", "base.grad_clip_norm=0.5"))
    assert result["step"] == 4
    assert load_checkpoint(tmp_path / "checkpoints/model-last.tar")["scheduler"]["last_epoch"] == 4


def test_channels_last_trains_the_same_and_compile_keeps_the_checkpoint_keys(demo_data, tmp_path):
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    losses = {}
    for layout in ("false", "true", "auto"):  # auto, the default: NHWC for this CNN on the CPU
        torch.manual_seed(0)
        ema = ["base.ema_decay=0.9"] if layout == "auto" else []  # the EMA copy takes the same layout
        trainer = Trainer(tiny_cfg(demo_data, tmp_path / layout, f"base.channels_last={layout}", *ema), DistEnv())
        conv = next(m for m in trainer.model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (layout != "false")
        assert trainer.channels_last == (layout != "false")
        if ema:
            ema_conv = next(m for m in trainer.ema.module.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
            assert ema_conv.weight.is_contiguous(memory_format=torch.channels_last) == (layout != "false")
        batch = next(iter(trainer.train_loader))
        losses[layout] = float(trainer.forward_loss(batch)["loss"].detach())
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["auto"] == losses["true"]

    trainer = Trainer(tiny_cfg(demo_data, tmp_path / "compiled", "base.compile=true"), DistEnv())
    plain = build_model(trainer.spec.model)
    assert list(trainer.model.state_dict()) == list(plain.state_dict())  # no `_orig_mod.` prefixes
    assert trainer.model.image_encoder._compiled_call_impl is not None


def test_fused_adamw_from_the_config(demo_data, tmp_path):
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg(demo_data, tmp_path, "+optimizer.config.fused=true"), DistEnv())
    assert trainer.optimizer.defaults["fused"] is True


def test_bf16_autocast_keeps_normalization_similarities_and_loss_in_fp32(demo_data, tmp_path):
    """Under CPU bf16 autocast the encoders run in bf16, but the embeddings are normalized in fp32 and the loss
    (and the similarity logits inside it) runs outside autocast, in fp32."""
    from cxrclip.engine.dist import DistEnv
    from cxrclip.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg(demo_data, tmp_path, "base.amp=true", "base.amp_dtype=bf16"), DistEnv())
    assert trainer.autocast and trainer.amp_dtype == torch.bfloat16
    seen = {}
    loss_fn = trainer.loss_fn

    def probe(out, batch):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["dtypes"] = {k: v.dtype for k, v in out.items()}
        return loss_fn(out, batch)

    trainer.loss_fn = probe
    losses = trainer.forward_loss(next(iter(trainer.train_loader)))
    assert seen["autocast"] is False
    assert set(seen["dtypes"].values()) == {torch.float32}
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
