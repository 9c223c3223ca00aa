"""The typed run spec: read once from the Hydra config; the engine, the evaluators and inference read it (or the
checkpoint's stored config) and never the raw Hydra config."""

import re
from pathlib import Path

import pytest

from cxrclip.config import compose, to_plain
from cxrclip.data.preprocess import NAMED_NORMALIZATION, resolve_normalization
from cxrclip.exceptions import ConfigError
from cxrclip.predict.bundle import BundlePredictor
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
    with pytest.raises(ConfigError, match="base.image_size is null or not set"):  # training needs a size
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


def test_no_image_size_default_and_no_transform_probing_outside_the_config_tree():
    """The image size has one home (the config tree, then the checkpoint's stored preprocessing spec): no literal
    224 in the package, and nothing recovers a size by pushing a dummy image through a transform."""
    import re
    from pathlib import Path

    import cxrclip

    root = Path(cxrclip.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<![\d.])224(?!\d)", line) or re.search(r"np\.zeros\(\(\d+, \d+\)", line):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert found == []


def test_the_preprocessing_spec_is_stored_at_training_and_read_everywhere(tiny_clip_checkpoint, demo_data, tmp_path):
    """Training stores one PreprocessSpec; the checkpoint predictor, the bundle and /v1/model read it; a checkpoint
    without it (an older one) gets the same spec from its config."""
    import numpy as np

    from cxrclip.bundle import export_bundle
    from cxrclip.data.images import read_image
    from cxrclip.data.preprocess import PreprocessSpec
    from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint
    from cxrclip.model.loading import load_model_and_transforms
    from cxrclip.predict import load_predictor

    state = load_checkpoint(tiny_clip_checkpoint)
    stored = PreprocessSpec.from_dict(state["preprocess"])
    assert stored.size == 32 and stored.step_dict["Resize"] == {"size": 32} and len(stored.mean) == 3
    loaded, transform = load_model_and_transforms(tiny_clip_checkpoint)
    assert loaded.preprocess_spec() == stored
    image = read_image(sorted((demo_data / "images").glob("test_*.png"))[0])
    old = tmp_path / "old.tar"  # as written before the spec existed
    save_checkpoint(old, {k: v for k, v in state.items() if k not in ("format", "preprocess")})
    from_config = load_predictor(str(old), device="cpu")
    assert from_config.preprocess == stored
    np.testing.assert_array_equal(from_config.transform(image).numpy(), transform(image).numpy())
    bundle = BundlePredictor.create(export_bundle(tiny_clip_checkpoint, tmp_path / "b"))
    assert bundle.preprocess == stored
    np.testing.assert_allclose(bundle.transform(image), transform(image).numpy(), atol=1e-6)
    assert load_predictor(str(old), device="cpu", image_size=48).preprocess.size == 48
