"""A routed model answers each label with its member, with the member's own preprocessing (32 px and 48 px here),
calibration and operating point: the routed answer equals the member's, label by label, through inference,
the server, evaluation and a routed bundle; a member whose file changed is refused; members are chosen on
validation data by a paired DeLong interval."""

import json

import numpy as np
import pytest

from cxrclip.eval.route import paired_delong
from cxrclip.predict import PredictorOptions
from cxrclip.predict.routed import Member, RoutingError, assign_labels

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
TUBES = ["Endotracheal tube in place", "Endotracheal tube malposition", "Chest tube in place"]


@pytest.fixture(scope="module")
def ckpt48(demo_data, tmp_path_factory):
    """A second clip_tiny checkpoint, trained at 48 px with another seed."""
    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    out = tmp_path_factory.mktemp("clip48")
    overrides = [
        "model=clip_tiny",
        "dataloader=dataloader_cpu",
        "base.image_size=48",
        "base.seed=7",
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


@pytest.fixture(scope="module")
def routed(tiny_clip_checkpoint, ckpt48, tmp_path_factory):
    from cxrclip.cli import main as cli_main

    out = tmp_path_factory.mktemp("routed")
    argv = ["route", "--member", f"tube={ckpt48}:{','.join(TUBES)}", "--member", f"rest={tiny_clip_checkpoint}"]
    assert cli_main([*argv, "--default", "rest", "--out", str(out)]) == 0
    return out


def test_labels_are_assigned_explicitly_first_then_to_the_first_member():
    available = {"a": ["x", "y", "z"], "b": ["x", "y"], "c": ["z"]}
    got = assign_labels([Member("a", "A"), Member("b", "B", ("y",))], available)
    assert got == {"a": ["x", "z"], "b": ["y"]}
    assert assign_labels([Member("c", "C"), Member("a", "A")], available) == {"c": ["z"], "a": ["x", "y"]}
    with pytest.raises(RoutingError, match=r"\['c'\] answer no label"):
        assign_labels([Member("a", "A"), Member("b", "B", ("y",)), Member("c", "C")], available)
    with pytest.raises(RoutingError, match="given to two members"):
        assign_labels([Member("a", "A", ("x",)), Member("b", "B", ("x",))], available)
    with pytest.raises(RoutingError, match="not one of its labels"):
        assign_labels([Member("c", "C", ("x",))], available)
    assert Member.parse("tube=/r/m.tar:A,B c") == Member("tube", "/r/m.tar", ("A", "B c"))
    assert Member.parse("all=/r/m.tar") == Member("all", "/r/m.tar", None)


def test_routed_equals_each_member_label_by_label(routed, tiny_clip_checkpoint, ckpt48, demo_data):
    from cxrclip.predict import load_predictor

    images = sorted((demo_data / "images").glob("test_*.png"))[:4]
    model = load_predictor(str(routed), device="cpu")
    got = [r.to_json() for r in model.predict(images)]
    rest = [n for n in model.label_names if n not in TUBES]
    tube_answers = [r.to_json() for r in load_predictor(str(ckpt48), labels=TUBES, device="cpu").predict(images)]
    rest_answers = [
        r.to_json() for r in load_predictor(str(tiny_clip_checkpoint), labels=rest, device="cpu").predict(images)
    ]
    assert model.label_names == TUBES + rest
    for g, t, r in zip(got, tube_answers, rest_answers):
        for name in TUBES:
            assert g["labels"][name]["member"] == "tube"
            assert g["labels"][name]["probability"] == pytest.approx(t["labels"][name]["probability"], abs=1e-6)
            assert g["labels"][name]["threshold"] == t["labels"][name]["threshold"]
        for name in rest:
            assert g["labels"][name]["member"] == "rest"
            assert g["labels"][name]["probability"] == pytest.approx(r["labels"][name]["probability"], abs=1e-6)
        assert g["ranking"] == r["ranking"]  # the default member ranks the candidates
    sizes = {m["name"]: m["image_size"] for m in model.routing()["members"]}
    assert sizes == {"tube": 48, "rest": 32}


def test_the_server_and_its_card_treat_a_routed_model_as_one(routed, demo_data):
    from fastapi.testclient import TestClient

    from cxrclip.predict import load_predictor
    from cxrclip.serve.app import ServeSettings, create_app

    client = TestClient(create_app(ServeSettings(model=PredictorOptions(str(routed)))))
    card = client.get("/v1/model").json()
    assert card["routing"]["default"] == "rest" and [m["name"] for m in card["routing"]["members"]] == ["tube", "rest"]
    assert card["routing"]["members"][0]["labels"] == TUBES and len(card["labels"]) == 13
    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    body = client.post(
        "/v1/predict", files={"file": ("a.png", image.read_bytes(), "image/png")}, data={"heatmap": TUBES[0]}
    ).json()
    want = load_predictor(str(routed), device="cpu").predict([image])[0].to_json()
    assert body["labels"] == want["labels"] and body["heatmap"]["png"].startswith("data:image/png;base64,")


def test_a_routed_bundle_answers_as_the_routed_checkpoints_and_refuses_a_changed_member(routed, tmp_path, demo_data):
    from cxrclip.cli import main as cli_main
    from cxrclip.predict import load_predictor

    manifest = json.loads((routed / "routed.json").read_text())
    argv = ["export", "--out", str(tmp_path / "rb"), "--default", "rest"]
    for m in manifest["members"]:
        argv += ["--member", f"{m['name']}={m['path']}:{','.join(m['labels'])}"]
    assert cli_main(argv) == 0
    images = sorted((demo_data / "images").glob("test_*.png"))[:3]
    got = [r.to_json() for r in load_predictor(str(tmp_path / "rb")).predict(images)]
    want = [r.to_json() for r in load_predictor(str(routed), device="cpu").predict(images)]
    for g, w in zip(got, want):
        assert list(g["labels"]) == list(w["labels"])
        for name in g["labels"]:
            assert g["labels"][name]["probability"] == pytest.approx(w["labels"][name]["probability"], abs=1e-4)
            assert g["labels"][name]["member"] == w["labels"][name]["member"]
    member_manifest = tmp_path / "rb" / "members" / "tube" / "bundle.json"
    member_manifest.write_text(member_manifest.read_text() + " ")
    with pytest.raises(RoutingError, match="member tube .* changed since the routed model was written"):
        load_predictor(str(tmp_path / "rb"))


def test_a_plain_routed_model_refuses_a_changed_checkpoint(tiny_clip_checkpoint, tmp_path):
    import shutil

    from cxrclip.predict import load_predictor
    from cxrclip.predict.routed import write_routed

    copy = tmp_path / "m.tar"
    shutil.copy(tiny_clip_checkpoint, copy)
    write_routed(tmp_path / "r", [Member("only", str(copy))])
    load_predictor(str(tmp_path / "r"), device="cpu")
    with copy.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(RoutingError, match="changed since"):
        load_predictor(str(tmp_path / "r"), device="cpu")


def test_paired_delong_matches_the_unpaired_aurocs_and_a_known_difference():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(80), np.zeros(120)].astype(int)
    a = y + rng.normal(0, 0.5, 200)
    b = y + rng.normal(0, 2.0, 200)
    out = paired_delong(y, a, b)
    assert out["auroc"] == [round(roc_auc_score(y, a), 4), round(roc_auc_score(y, b), 4)]
    assert out["difference"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-4)
    assert out["difference_ci95"][0] > 0  # a is clearly better
    # the paired interval's width against a brute-force bootstrap of the difference
    diffs = []
    for _ in range(400):
        rows = rng.integers(0, 200, 200)
        diffs.append(roc_auc_score(y[rows], a[rows]) - roc_auc_score(y[rows], b[rows]))
    half = (out["difference_ci95"][1] - out["difference_ci95"][0]) / 2
    assert half == pytest.approx(1.96 * np.std(diffs), rel=0.25)
    same = paired_delong(y, a, a)
    assert same["difference"] == 0 and same["difference_ci95"] == [0.0, 0.0]


def test_route_by_validation_keeps_the_default_unless_beaten_beyond_the_interval(
    tiny_clip_checkpoint, ckpt48, demo_data, tmp_path, capsys
):
    from cxrclip.cli import main as cli_main

    out = tmp_path / "chosen"
    argv = ["route", "--candidates", str(tiny_clip_checkpoint), str(ckpt48), "--data", str(demo_data / "valid.csv")]
    assert cli_main([*argv, "--out", str(out)]) == 0
    manifest = json.loads((out / "routed.json").read_text())
    evidence = manifest["card"]["evidence"]
    assert set(evidence) == set(manifest["labels"]) and manifest["card"]["chosen_on"]["rows"] == 8
    for e in evidence.values():
        if "chosen" not in e:  # too few positives: stays with the default
            assert "too few" in e["why"]
            continue
        other = e["candidates"][str(ckpt48)]
        assert (e["chosen"] == str(ckpt48)) == (other["minus_default_ci95"][0] > 0)
    assert "wrote" in capsys.readouterr().out


def test_evaluation_of_a_routed_model_scores_each_label_as_its_member(routed, tiny_clip_checkpoint, ckpt48, demo_data,
                                                                      tmp_path):  # fmt: skip
    from cxrclip.eval.evaluate import evaluate
    from tests.test_eval import eval_cfg

    own_size = ["base.image_size=null"]  # each checkpoint preprocessed as it was trained (32 and 48 px)
    got = evaluate(eval_cfg(demo_data, routed, tmp_path / "r", *own_size))["cgmh"][str(routed)]
    tube = evaluate(eval_cfg(demo_data, ckpt48, tmp_path / "t", *own_size))["cgmh"][str(ckpt48)]
    rest = evaluate(eval_cfg(demo_data, tiny_clip_checkpoint, tmp_path / "s", *own_size))["cgmh"][
        str(tiny_clip_checkpoint)
    ]
    names = [
        n
        for n in got["zeroshot_binary"]
        if isinstance(got["zeroshot_binary"][n], dict) and "AUROC" in got["zeroshot_binary"][n]
    ]
    assert len(names) == 13
    for name in names:
        member = tube if name in TUBES else rest
        mine, theirs = got["zeroshot_binary"][name], member["zeroshot_binary"][name]
        for key in ("AUROC", "F1", "threshold"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (name, key)
    assert got["retrieval_i2t"] == rest["retrieval_i2t"]  # the default member retrieves


def test_calibrating_a_routed_model_calibrates_each_member_and_keeps_the_hashes_true(
    tiny_clip_checkpoint, ckpt48, demo_data, tmp_path, capsys
):
    import shutil

    from cxrclip.cli import main as cli_main
    from cxrclip.model.checkpoint import load_checkpoint
    from cxrclip.predict import load_predictor

    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    shutil.copy(ckpt48, a)
    shutil.copy(tiny_clip_checkpoint, b)
    argv = ["route", "--member", f"tube={a}:{','.join(TUBES)}", "--member", f"rest={b}", "--out", str(tmp_path / "r")]
    assert cli_main(argv) == 0
    assert cli_main(["calibrate", "--checkpoint", str(tmp_path / "r"), "--data", str(demo_data / "valid.csv")]) == 0
    assert "calibration stored in" in capsys.readouterr().out
    tube = load_checkpoint(a)["calibration"]["labels"]
    assert set(TUBES) <= set(tube) and load_checkpoint(b)["calibration"]["labels"]
    routed = load_predictor(tmp_path / "r", device="cpu")  # the manifest's hashes follow the rewritten members
    for name in TUBES:
        assert routed.calibration.labels[name].threshold == tube[name]["threshold"]
