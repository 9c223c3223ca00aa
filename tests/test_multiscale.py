"""``model.image_encoder.scales``: one backbone run at several sizes, the pooled features concatenated — checked
against a hand computation, through training, checkpoint loading, the linear-probe encoder and the ONNX bundle."""

import pytest
import torch
import torch.nn.functional as F

from cxrclip.exceptions import ConfigError
from cxrclip.model.encoders import TimmImageEncoder, build_image_encoder

TINY = {"source": "timm", "name": "test_resnet", "pretrained": False}


def test_features_are_the_backbone_at_each_size_concatenated_with_the_same_weights():
    torch.manual_seed(0)
    single = build_image_encoder(TINY).eval()
    multi = build_image_encoder({**TINY, "scales": [1.0, 0.7]}).eval()
    multi.load_state_dict(single.state_dict(), strict=True)  # the same parameter names: no new weights
    assert multi.out_dim == 2 * single.out_dim and multi.feature_dim == single.out_dim
    x = torch.randn(3, 3, 40, 40)
    small = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)  # 40 · 0.7 = 28
    expected = torch.cat([single.model(x), single.model(small)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(multi(x), expected)
        torch.testing.assert_close(single(x), single.model(x))  # one scale: the plain backbone


@pytest.mark.parametrize("bad", [[], [0.0], [1.0, 1.0], ["big"], 0.7, [True], [3.0]])
def test_bad_scales_are_refused_when_the_model_is_built(bad):
    with pytest.raises(ConfigError, match="scales"):
        build_image_encoder({**TINY, "scales": bad})


def test_transformers_vision_models_refuse_several_scales():
    cfg = {"source": "huggingface", "name": "microsoft/swin-tiny-patch4-window7-224", "scales": [1.0, 0.7]}
    with pytest.raises(ConfigError, match="convolutional encoder"):
        build_image_encoder(cfg)


@pytest.fixture(scope="module")
def multiscale_checkpoint(demo_data, minilm_tokenizer, tmp_path_factory):
    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    out = tmp_path_factory.mktemp("multiscale")
    overrides = [
        "model=clip_tiny",
        "model.image_encoder.scales=[1.0,0.5]",
        "dataloader=dataloader_cpu",
        "base.image_size=48",
        "scheduler.config.total_epochs=1",
        f"data_train.cgmh.data_path={demo_data / 'train.csv'}",
        f"data_valid.cgmh.data_path={demo_data / 'valid.csv'}",
        "dataloader.train.batch_size=8",
        "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0",
        f"base.output.checkpoint={out}/checkpoints",
        f"base.output.tensorboard={out}/tb",
    ]
    train(compose("train", overrides))
    return out / "checkpoints" / "model-best.tar"


def test_a_multiscale_checkpoint_loads_and_exports_as_trained(multiscale_checkpoint, demo_data, tmp_path):
    from cxrclip.bundle import Bundle, BundlePredictor, export_bundle
    from cxrclip.data.images import read_image
    from cxrclip.infer import Predictor
    from cxrclip.model.loading import load_image_encoder, load_model

    loaded = load_model(multiscale_checkpoint)
    encoder = loaded.model.image_encoder
    assert isinstance(encoder, TimmImageEncoder) and encoder.scales == (1.0, 0.5)
    assert loaded.model.image_projection.projection.in_features == 2 * encoder.feature_dim

    probe_encoder, cfg = load_image_encoder(multiscale_checkpoint)  # what the linear probe trains on
    assert list(cfg["scales"]) == [1.0, 0.5] and probe_encoder.out_dim == encoder.out_dim
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(probe_encoder.eval()(x), encoder(x))

    images = sorted((demo_data / "images").glob("test_*.png"))[:4]
    reference = Predictor.create(str(multiscale_checkpoint), device="cpu")
    inputs = [reference.transform(read_image(p)).numpy() for p in images]
    bundle = export_bundle(multiscale_checkpoint, tmp_path / "bundle")
    assert Bundle(bundle).manifest["onnx_max_abs_difference"] < 1e-4  # the resize exports to ONNX faithfully
    for device in (None, "cpu"):
        predictor = BundlePredictor.create(bundle, device=device)
        torch.testing.assert_close(
            torch.from_numpy(predictor.embed(inputs)), torch.from_numpy(reference.embed(inputs)), atol=1e-5, rtol=0
        )
    cam = reference.heatmap(torch.from_numpy(inputs[0]), reference.label_names[0])
    assert cam.shape == (48, 48) and 0.0 <= cam.min() <= cam.max() <= 1.0
