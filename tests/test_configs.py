"""Every config composes, with every option of every group it uses, and its data configs type-check."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cxrclip.config import compose, data_configs
from cxrclip.paths import CONFIG_DIR
from cxrclip.synthetic import CGMH_LABELS

TOP = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
RUN_DIR = ["hydra.run.dir=/tmp/x"]


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def resolve(cfg):
    """Resolve everything but ``base.output`` (its ${hydra:runtime.output_dir} needs a running app)."""
    OmegaConf.set_struct(cfg, False)
    cfg.get("base", {}).pop("output", None)
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_expected_configs_exist():
    assert {"train", "eval_clip", "finetune_10", "finetune_100", "eval_finetune"} <= set(TOP)
    for group in (
        "data_train",
        "data_valid",
        "data_test",
        "dataloader",
        "tokenizer",
        "transform",
        "model",
        "optimizer",
        "scheduler",
        "loss",
    ):
        assert group in GROUPS
    assert {"clahe", "default"} <= set(options("transform"))
    assert {"cxr_clip", "clip"} <= set(options("loss"))
    assert {"clip_resnet_clinical", "clip_swin_clinical", "clip_cpu_offline", "clip_tiny"} <= set(options("model"))


@pytest.mark.parametrize("name", TOP)
def test_top_level_config_composes(name):
    overrides = ["test.checkpoint=x.tar"] if name.startswith("eval") else []
    overrides += ["model.load_backbone_weights=x.tar"] if name.startswith("finetune") else []
    cfg = compose(name, overrides)
    plain = resolve(cfg)
    for group in ("data_train", "data_valid", "data_test"):
        for dc in data_configs(cfg, group):
            assert dc.label_names == CGMH_LABELS
    assert "base" in plain


@pytest.mark.parametrize("group", ["dataloader", "transform", "model", "optimizer", "scheduler", "loss"])
def test_every_group_option_composes_into_train(group):
    for option in options(group):
        if option.endswith("classification"):
            continue  # used by the finetune configs, checked below
        resolve(compose("train", [f"{group}={option}"]))


@pytest.mark.parametrize("option", options("data_train"))
def test_every_data_option_composes(option):
    data_type = OmegaConf.load(CONFIG_DIR / "data_train" / f"{option}.yaml")[option].data_type
    config = "finetune_10" if data_type == "image_classification" else "train"
    extra = ["model.load_backbone_weights=x"] if config.startswith("finetune") else []
    cfg = compose(config, [f"data_train={option}", f"data_valid={option}", *extra])
    (dc,) = data_configs(cfg, "data_train")
    assert dc.name == option


@pytest.mark.parametrize("option", options("data_test"))
def test_every_test_data_option_composes(option):
    cfg = compose("eval_clip", ["test.checkpoint=x", f"data_test={option}"])
    (dc,) = data_configs(cfg, "data_test")
    assert dc.name == option and (dc.label_names or dc.label_source == "none")


def test_user_overrides_as_in_the_original():
    cfg = compose(
        "train",
        [
            "data_train.cgmh.data_path=/data/tr.csv",
            "base.image_size=128",
            "data_train.cgmh.num_negs=3",
            "dataloader.train.num_workers=0",
            "scheduler.config.total_epochs=2",
            "model=clip_tiny",
        ],
    )
    (dc,) = data_configs(cfg, "data_train")
    assert dc.data_path == "/data/tr.csv" and cfg.base.image_size == 128 and dc.num_negs == 3
    assert not hasattr(dc, "image_size")  # the original's key is accepted; the size belongs to the model
    assert cfg.dataloader.train.num_workers == 0
    assert set(cfg.dataloader.train) == {
        "batch_size",
        "num_workers",
        "shuffle",
        "drop_last",
        "pin_memory",
        "prefetch_factor",
    }
    assert cfg.tokenizer.pretrained_model_name_or_path == cfg.model.text_encoder.name
    assert cfg.transform.train.RandomResizedCrop.size == 128


def test_label_list_comes_from_config():
    labels_file = CONFIG_DIR / "labels" / "cgmh.yaml"
    assert "Pigtail malpositon" in Path(labels_file).read_text()
    cfg = compose("train", ["labels.names=[A,B]"])
    (dc,) = data_configs(cfg, "data_train")
    assert dc.label_names == ("A", "B")


def test_the_small_data_recipe_locks_the_towers_and_sets_what_it_says(minilm_tokenizer):
    from cxrclip.config import to_plain
    from cxrclip.model.clip import build_model

    cfg = compose("train", ["+recipe=small_data", "model=clip_tiny", "base.seed=7"])
    assert cfg.base.image_size == 288 and cfg.base.ema_decay == 0.99 and cfg.base.seed == 7
    assert cfg.optimizer.config.lr == 1e-3 and cfg.loss.cxr_clip.targets == "label_set"
    assert cfg.data_train.cgmh.image_size == 288  # the data follows base.image_size
    assert cfg.transform.test.Resize.size == 288
    model = build_model(to_plain(cfg.model))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_projection", "text_projection", "logit_scale"}
    later = compose("train", ["+recipe=small_data", "base.image_size=224"])  # a command-line value still wins
    assert later.base.image_size == 224
