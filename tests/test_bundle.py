"""The inference bundle (`cxrclip export`): same answers as its checkpoint, torch-free preprocessing equal to the
training transform bit for bit, tampered files refused, and no torch / transformers import on its path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrclip.bundle import export_bundle
from cxrclip.data.preprocess import Preprocess, resized_shape
from cxrclip.data.transforms import build_transform
from cxrclip.predict import PredictorOptions
from cxrclip.predict.bundle import Bundle, BundleError, BundlePredictor

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calibrated(tiny_clip_checkpoint, demo_data, tmp_path_factory):
    from cxrclip.cli import main

    out = tmp_path_factory.mktemp("bundle") / "calibrated.tar"
    argv = ["calibrate", "--checkpoint", str(tiny_clip_checkpoint), "--data", str(demo_data / "test.csv")]
    assert main([*argv, "--min-positives", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(calibrated):
    return export_bundle(calibrated, calibrated.parent / "bundle")


def test_preprocess_without_torch_equals_the_transform_bit_for_bit():
    rng = np.random.default_rng(0)
    configs = [
        {"Resize": {"size": 32}, "CenterCrop": {"size": 32}},
        {"Resize": {"size": 224}, "CenterCrop": {"size": 224}},
        {"CLAHE": {"clip_limit": 2.0, "tile_grid_size": [4, 4]}, "Resize": {"size": 64}, "CenterCrop": {"size": 60}},
        {"CenterCrop": {"size": 300}},  # larger than the image: zero padding
    ]
    for steps in configs:
        for normalize in ("imagenet", "half"):
            for shape in [(97, 131), (256, 200), (50, 50), (640, 512)]:
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                expected = build_transform(steps, normalize)(image).numpy()
                got = Preprocess(steps, normalize)(image)
                assert got.dtype == np.float32 and np.array_equal(got, expected), (steps, shape)


def test_sizes_and_crops_follow_torchvisions_rules():
    from torchvision.transforms import v2

    for h, w in [(97, 131), (131, 97), (256, 200), (2048, 2500), (33, 1000)]:
        x = torch.zeros(1, h, w, dtype=torch.uint8)
        assert tuple(v2.Resize(64, antialias=True)(x).shape[-2:]) == resized_shape(h, w, 64)
        image = torch.from_numpy((np.arange(h * w).reshape(h, w) % 251).astype(np.uint8))[None]
        crop = build_transform({"CenterCrop": {"size": 40}}, "half").steps(image)
        expected = v2.CenterCrop(40)(image)
        assert torch.equal(crop, expected)


def test_bundle_answers_as_its_checkpoint(bundle, calibrated, demo_data):
    from cxrclip.predict import load_predictor

    images = sorted((demo_data / "images").glob("test_*.png"))[:6]
    reference = load_predictor(str(calibrated), device="cpu")
    manifest = Bundle(bundle).manifest
    assert manifest["labels"] == reference.label_names and manifest["onnx_max_abs_difference"] < 1e-4
    assert manifest["calibration"] == reference.calibration.to_dict()
    assert len(manifest["card"]["checkpoint_sha256"]) == 64
    from cxrclip.data.images import read_image

    ref_inputs = [reference.transform(read_image(p)).numpy() for p in images]
    ref_emb = reference.embed(ref_inputs)
    ref_prob = reference.calibration.probabilities(reference.logits(ref_emb))
    for device in (None, "cpu"):  # ONNX Runtime, then the bundle's PyTorch weights
        predictor = BundlePredictor.create(bundle, device=device)
        assert predictor.backend == ("onnxruntime" if device is None else "torch")
        inputs = [predictor.transform(read_image(p)) for p in images]
        assert all(np.array_equal(a, b) for a, b in zip(inputs, ref_inputs))
        emb = predictor.embed(inputs)
        np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
        np.testing.assert_allclose(predictor.calibration.probabilities(predictor.logits(emb)), ref_prob, atol=1e-5)
        got, want = [r.to_json() for r in predictor.predict(images)], [r.to_json() for r in reference.predict(images)]
        for g, w in zip(got, want):
            assert [r["text"] for r in g["ranking"]] == [r["text"] for r in w["ranking"]]
            for name, v in w["labels"].items():
                assert g["labels"][name]["probability"] == pytest.approx(v["probability"], abs=1e-4)
                if abs(v["probability"] - v["threshold"]) > 1e-3:  # (a tie at the threshold may go either way)
                    assert g["labels"][name]["present"] == v["present"]


def test_free_text_and_heatmaps_load_the_towers_lazily(bundle, calibrated, demo_data):
    from cxrclip.data.images import read_image
    from cxrclip.predict import load_predictor

    reference = load_predictor(str(calibrated), device="cpu")
    predictor = BundlePredictor.create(bundle)
    assert predictor._torch is None  # nothing but ONNX Runtime so far
    image = read_image(sorted((demo_data / "images").glob("test_*.png"))[0])
    texts = ["small left pneumothorax.", "endotracheal tube in place.", "no acute findings."]
    emb = predictor.embed([predictor.transform(image)])
    got = predictor.texts_similarity(emb[0], texts)
    want = reference.texts_similarity(reference.embed([reference.transform(image)])[0], texts)
    assert [g["similarity"] for g in got] == pytest.approx([w["similarity"] for w in want], abs=1e-4)
    label = predictor.label_names[0]
    np.testing.assert_allclose(
        predictor.heatmap(predictor.transform(image), label),
        reference.heatmap(reference.transform(image), label),
        atol=1e-4,
    )


@pytest.mark.parametrize("name", ["image_encoder.onnx", "prompts.safetensors", "image_encoder.safetensors"])
def test_a_tampered_file_is_refused(bundle, tmp_path, name):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: its SHA-256 does not match"):
        predictor = BundlePredictor.create(copy, device="cpu" if name.endswith("safetensors") else None)
        predictor.embed([np.zeros((3, 32, 32), np.float32)])


def test_inference_from_a_bundle_imports_neither_torch_nor_transformers(bundle, calibrated, demo_data):
    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    code = (
        "import json, sys; from cxrclip.infer import main; "
        f"rc = main(['--model_path', {str(bundle)!r}, '--image_path', {str(image)!r}, '--json']); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'torchvision', 'timm') if m in sys.modules)), "
        "file=sys.stderr); sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stderr.strip().splitlines()[-1]) == []
    result = json.loads(run.stdout)
    from cxrclip.predict import load_predictor

    want = load_predictor(str(calibrated), device="cpu").predict([image])[0].to_json()
    for name, v in want["labels"].items():
        assert result["labels"][name]["probability"] == pytest.approx(v["probability"], abs=1e-4)


def test_export_never_replaces_a_folder_silently(bundle, calibrated, tmp_path):
    from cxrclip.exceptions import OutputError

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        export_bundle(calibrated, tmp_path / "taken", onnx=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temp folder left
    with pytest.raises(BundleError, match="not an inference bundle"):
        Bundle(tmp_path / "taken")


def test_serve_accepts_a_bundle(bundle, demo_data):
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, create_app

    client = TestClient(create_app(ServeSettings(model=PredictorOptions(str(bundle)))))
    card = client.get("/v1/model").json()
    assert card["backend"] == "onnxruntime" and len(card["bundle_sha256"]) == 64
    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    reply = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert reply.status_code == 200 and set(reply.json()["labels"]) == set(card["labels"])


def test_evaluation_accepts_a_bundle_and_agrees_with_its_checkpoint(bundle, calibrated, demo_data, tmp_path):
    from cxrclip.config import compose
    from cxrclip.eval.evaluate import evaluate

    def run(model_path, out):
        cfg = compose(
            "eval_clip",
            [
                f"test.checkpoint={model_path}",
                f"data_test.cgmh.data_path={demo_data / 'test.csv'}",
                "base.image_size=32",
                "dataloader=dataloader_cpu",
                "dataloader.test.num_workers=0",
                f"test.output_dir={out}",
            ],
        )
        return evaluate(cfg)["cgmh"][str(model_path)]

    got, want = run(bundle, tmp_path / "b"), run(calibrated, tmp_path / "c")
    for name, entry in want["zeroshot_binary"].items():
        if isinstance(entry, dict) and entry.get("AUROC") is not None:
            assert got["zeroshot_binary"][name]["AUROC"] == pytest.approx(entry["AUROC"], abs=1e-6), name
    assert got["retrieval_i2t"] == pytest.approx(want["retrieval_i2t"], abs=1e-6)
