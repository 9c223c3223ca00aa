"""Checkpoints written as the original CXR-CLIP trainer writes them load safely; code in a pickle never runs."""

import datetime
import json
import os

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from cxrclip.model.checkpoint import CheckpointError, convert_checkpoint, load_checkpoint
from cxrclip.predict import load_predictor

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")


def original_config(text_encoder: str) -> dict:
    """The original's ``config`` entry: its Hydra config after ``OmegaConf.resolve`` and a DictConfig → dict
    conversion that leaves ListConfig values (with their parent chain and resolver cache) in place."""
    if not OmegaConf.has_resolver("now"):  # Hydra registers it the same way (cached)
        OmegaConf.register_new_resolver("now", lambda p: datetime.datetime.now().strftime(p), use_cache=True)
    cfg = OmegaConf.create(
        {
            "base": {"image_size": 224, "output": {"checkpoint": "./outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}/ckpt/"}},
            "transform": {
                "train": {"RandomResizedCrop": {"size": "${base.image_size}", "scale": [0.8, 1.1]}},
                "valid": {"Resize": {"size": "${base.image_size}"}},
            },
            "model": {
                "name": "clip_custom",
                "temperature": 0.07,
                "image_encoder": {"source": "torchvision", "name": "resnet", "pretrained": True},
                "text_encoder": {"source": "huggingface", "name": text_encoder, "pretrained": True, "pooling": "eos"},
                "projection_head": {"name": "linear", "dropout": 0.1, "proj_dim": 512},
            },
            "optimizer": {"name": "adamw", "config": {"lr": 5e-5, "betas": [0.9, 0.999]}},
        }
    )
    OmegaConf.resolve(cfg)

    def to_dict(node):
        return {k: to_dict(v) for k, v in node.items()} if isinstance(node, DictConfig) else node

    plain = to_dict(cfg)
    scale = plain["transform"]["train"]["RandomResizedCrop"]["scale"]
    assert type(scale).__name__ == "ListConfig" and scale._get_root()._metadata.resolver_cache["now"]
    return plain


def write_original_checkpoint(tmp_path, extra_config=None):
    """ResNet-50 + BERT in the original's key layout, AdamW + scheduler state, the original's keys."""
    from tests.test_eval import published_style_checkpoint

    own_path, state = published_style_checkpoint(tmp_path)
    text_encoder = load_checkpoint(own_path)["config"]["model"]["text_encoder"]["name"]
    config = original_config(text_encoder)
    config.update(extra_config or {})
    head = [torch.nn.Parameter(state["image_projection.projection.weight"].clone())]
    optimizer = torch.optim.AdamW(head, lr=5e-5)
    head[0].grad = torch.ones_like(head[0])
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    path = tmp_path / "model-last.tar"
    ckpt = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config,
        "epoch": 3,
        "train_loss": 1.25,
    }
    torch.save(ckpt, path)
    return path


def test_the_original_trainers_checkpoint_needs_more_than_weights_only(tmp_path):
    path = write_original_checkpoint(tmp_path)
    with pytest.raises(Exception, match="defaultdict|Weights only"):
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["transform"]["train"]["RandomResizedCrop"]["scale"] == [0.8, 1.1]
    assert type(ckpt["config"]["transform"]["train"]["RandomResizedCrop"]["scale"]) is list  # plain data, once
    assert ckpt["epoch"] == 3 and "state" in ckpt["optimizer"]


def test_inference_evaluation_and_probing_work_and_match_the_converted_checkpoint(tmp_path, demo_data, capsys):
    from cxrclip.cli import main
    from cxrclip.eval.evaluate import evaluate
    from tests.test_eval import eval_cfg, infer_json

    path = write_original_checkpoint(tmp_path)
    images = sorted((demo_data / "images").glob("test_*.png"))[:2]
    original = [r.to_json() for r in load_predictor(str(path), image_size=64).predict(images)]
    assert main(["convert", "--checkpoint", str(path), "--out", str(tmp_path / "converted.tar")]) == 0
    assert "loads with weights_only=True" in capsys.readouterr().out
    converted = torch.load(tmp_path / "converted.tar", weights_only=True)  # no allowlist needed
    assert "optimizer" not in converted and converted["converted_from"]["path"] == str(path.resolve())
    ours = [r.to_json() for r in load_predictor(str(tmp_path / "converted.tar"), image_size=64).predict(images)]
    for a, b in zip(original, ours):
        assert a["labels"] == b["labels"] and a["ranking"] == b["ranking"]

    infer_json(path, images[0])
    assert len(json.loads(capsys.readouterr().out)["labels"]) == 13
    results = evaluate(eval_cfg(demo_data, path, tmp_path / "ev"))["cgmh"][str(path)]
    assert results["zeroshot_binary"]["AUROC(Avg)"] is not None

    from cxrclip.engine.finetune import finetune
    from tests.test_finetune import probe_cfg

    finetune(probe_cfg(demo_data, path, tmp_path / "probe", "scheduler.config.total_epochs=1"))
    probe = load_checkpoint(tmp_path / "probe" / "checkpoints" / "model-best.tar")
    assert probe["probe"]["image_encoder"]["name"] == "resnet50"
    for key, value in load_checkpoint(path)["model"].items():
        if key.startswith("image_encoder."):
            assert torch.equal(probe["model"][key], value), key  # frozen encoder = the original's weights


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_config_carrying_code_is_refused_by_name_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_original_checkpoint(tmp_path, {"callback": RunsCode(marker)})
    with pytest.raises(CheckpointError, match=r"names '(posix|os|nt)\.system'.*nothing in it was run"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        convert_checkpoint(path, tmp_path / "x.tar")
    assert not marker.exists() and not (tmp_path / "x.tar").exists()


def test_resuming_from_the_original_trainer_says_what_to_do(tmp_path):
    from cxrclip.model.checkpoint import require_training_state

    path = write_original_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not written by cxrclip's trainer.*convert"):
        require_training_state(load_checkpoint(path), path)
