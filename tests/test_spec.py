"""The typed run spec: read once from the Hydra config; the engine, the evaluators and inference read it (or the
checkpoint's stored config) and never the raw Hydra config."""

import re
from pathlib import Path

import pytest

from cxrclip.config import compose, to_plain
from cxrclip.data.preprocess import NAMED_NORMALIZATION, resolve_normalization
from cxrclip.exceptions import ConfigError
from cxrclip.spec import EvalSpec, LoaderSpec, OptimizerSpec, RunSpec, ScheduleSpec

ROOT = Path(__file__).resolve().parents[1]
RAW_READ = re.compile(r"\bcfg\s*(\.|\[)")


def test_engine_evaluators_and_inference_never_read_the_raw_config():
    files = [*sorted((ROOT / "cxrclip" / "engine").glob("*.py")), *sorted((ROOT / "cxrclip" / "eval").glob("*.py"))]
    files += [ROOT / "cxrclip" / "infer.py", ROOT / "cxrclip" / "bundle.py"]
    reads = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if RAW_READ.search(line)
    ]
    assert reads == []


def test_the_spec_of_each_job_config_is_typed():
    train = RunSpec.from_config(compose("train", ["base.output.checkpoint=/x", "base.output.tensorboard=/x"]))
    assert isinstance(train.loader("train"), LoaderSpec) and train.loader("train").batch_size == 128
    assert isinstance(train.optimizer, OptimizerSpec) and train.optimizer.options["lr"] == pytest.approx(5e-5)
    assert train.optimizer.lr_scale == {"image_encoder": 1.0, "text_encoder": 1.0}
    assert isinstance(train.schedule, ScheduleSpec) and train.schedule.total_epochs == 15
    assert [dc.name for dc in train.data["data_train"]] == ["cgmh"] and train.test is None
    assert resolve_normalization(train.normalize) == NAMED_NORMALIZATION["imagenet"]  # clip_resnet_clinical states it
    assert train.plain["base"]["image_size"] == 224  # what checkpoints store, unchanged
    evaluation = RunSpec.from_config(compose("eval_clip", ["test.checkpoint=/x.tar"]))
    assert isinstance(evaluation.test, EvalSpec) and evaluation.test.checkpoint == "/x.tar"
    assert evaluation.test.auroc_ci == "delong" and evaluation.test.output_dir is None
    assert evaluation.optimizer is None and evaluation.image_size is None  # each checkpoint's own test transform
    sized = RunSpec.from_config(compose("eval_clip", ["test.checkpoint=/x.tar", "base.image_size=288"]))
    assert sized.image_size == 288 and sized.transform_steps("test")["Resize"] == {"size": 288}
    with pytest.raises(ConfigError, match="base.image_size is null"):  # training needs a size
        RunSpec.from_config(compose("train", ["base.output.checkpoint=/x", "base.output.tensorboard=/x",
                                              "base.image_size=null"]))  # fmt: skip


def test_a_missing_or_bad_value_names_its_key():
    plain = to_plain(compose("train", ["base.output.checkpoint=/x", "base.output.tensorboard=/x"]))
    del plain["dataloader"]["valid"]["batch_size"]
    with pytest.raises(ConfigError, match="dataloader.valid.batch_size is not set"):
        RunSpec.from_config(plain)
    plain = to_plain(compose("train", ["base.output.checkpoint=/x", "base.output.tensorboard=/x"]))
    del plain["scheduler"]["config"]["total_epochs"]
    with pytest.raises(ConfigError, match="scheduler.config.total_epochs"):
        RunSpec.from_config(plain)
    spec = RunSpec.from_config(compose("eval_clip", ["test.checkpoint=/x.tar"]))
    with pytest.raises(ConfigError, match="dataloader.nope is not configured"):
        spec.loader("nope")


def test_loader_spec_drops_prefetch_without_workers():
    assert LoaderSpec.from_mapping({"batch_size": 4, "prefetch_factor": 2}, "d").prefetch_factor is None
    assert LoaderSpec.from_mapping({"batch_size": 4, "num_workers": 2, "prefetch_factor": 2}, "d").prefetch_factor == 2
