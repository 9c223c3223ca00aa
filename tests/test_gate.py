"""The input gate: the DICOM-attribute stage on generated DICOMs, the pixel stage, the image stage against a hand
computation and scikit-learn, the threshold rule, fit-gate end to end, and the shape of a refusal on every path
that predicts (inference JSON / table / CSV, the server, the bundle) — never a label probability for it."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cxrclip.fit_gate import choose_threshold, fit_image_gate, generated_negatives, group_split
from cxrclip.predict import PredictorOptions
from cxrclip.predict.bundle import BundlePredictor
from cxrclip.predict.gate import (
    FRONTAL,
    GateError,
    ImageGate,
    InputGate,
    Precheck,
    dicom_check,
    pixel_check,
    pixel_features,
    precheck,
)
from cxrclip.scoring.intervals import wilson

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
PIXELS = (np.arange(64 * 64).reshape(64, 64) * 3) % 4096


def dicom_facts(tmp_path, **attrs) -> dict:
    from cxrclip.data.images import read_image
    from tests.test_images import write_dicom

    facts: dict = {}
    read_image(write_dicom(tmp_path / "x.dcm", PIXELS, **attrs), facts)
    return facts


@pytest.mark.parametrize(
    "attrs, kind, words",
    [
        ({"ViewPosition": "LL", "BodyPartExamined": "CHEST"}, "lateral", "ViewPosition LL"),
        ({"ViewPosition": "LATERAL"}, "lateral", "lateral view"),
        ({"ViewPosition": "RLD"}, "lateral_decubitus", "decubitus"),
        ({"Modality": "CT"}, "ct", "Modality CT"),
        ({"Modality": "MG"}, "not_radiograph", "Modality MG"),
        ({"BodyPartExamined": "ABDOMEN", "ViewPosition": "AP"}, "not_chest", "ABDOMEN"),
        ({"PresentationIntentType": "FOR PROCESSING", "ViewPosition": "PA"}, "unprocessed", "FOR PROCESSING"),
    ],
)
def test_dicom_attributes_that_rule_an_input_out(tmp_path, attrs, kind, words):
    check = dicom_check(dicom_facts(tmp_path, **attrs))
    assert check.refused and check.kind == kind and words in check.reason


def test_dicom_attributes_missing_or_unknown_fall_through_to_the_image_stage(tmp_path):
    facts = dicom_facts(tmp_path)  # Modality CR only: no BodyPartExamined, no ViewPosition
    check = dicom_check(facts)
    assert not check.refused
    assert "BodyPartExamined missing: the image stage decides" in check.notes
    assert "ViewPosition missing: the image stage decides" in check.notes
    odd = dicom_check(dicom_facts(tmp_path, ViewPosition="XYZ", BodyPartExamined="PORT CHEST", Modality="DX"))
    assert not odd.refused and "ViewPosition XYZ not recognised: the image stage decides" in odd.notes
    assert "BodyPartExamined PORT CHEST" in odd.notes
    good = dicom_check(dicom_facts(tmp_path, ViewPosition="PA", BodyPartExamined="CHEST", Modality="DX"))
    assert not good.refused and good.notes == ("Modality DX", "BodyPartExamined CHEST", "ViewPosition PA")
    # a PNG has no attributes: nothing against it, nothing for it
    assert dicom_check({"format": "PNG"}) == Precheck()


def test_blank_images_are_unreadable_and_a_real_one_passes():
    assert pixel_check(np.full((64, 64), 17, np.uint8)).kind == "unreadable"
    assert "blank" in pixel_check(np.zeros((300, 200), np.uint8)).reason
    assert pixel_check(np.zeros((4, 64), np.uint8)).kind == "unreadable"
    assert not pixel_check((PIXELS % 256).astype(np.uint8)).refused
    lateral = precheck(np.zeros((64, 64), np.uint8), {"format": "DICOM", "modality": "CR", "view_position": "LL"})
    assert lateral.kind == "lateral"  # the attribute stage speaks first


def test_image_stage_scores_match_a_hand_computation():
    coef = np.array([[2.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    gate = ImageGate(("frontal", "lateral", "ct"), coef, np.array([0.0, 0.0, 0.5]), 0.5, 0.01)
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    logits = emb @ coef.T + [0.0, 0.0, 0.5]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores, kinds = gate.scores(emb)
    np.testing.assert_allclose(scores, 1 - p[:, 0], rtol=1e-12)
    assert kinds == ["lateral", "lateral", "ct"]
    verdicts = InputGate(gate).verdicts(emb, [Precheck()] * 3)
    assert [v.analysed for v in verdicts] == [True, False, False]
    assert verdicts[1].reason == f"lateral view (gate score {scores[1]:.2f})" and verdicts[1].stage == "image"
    assert verdicts[2].reason.startswith("CT or other cross-sectional image")
    off = InputGate(gate, enforced=False).verdicts(emb, [Precheck()] * 3)
    assert all(v.analysed for v in off) and not off[1].enforced and off[1].reason == verdicts[1].reason
    again = ImageGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    np.testing.assert_array_equal(again.scores(emb)[0], scores)
    with pytest.raises(GateError, match="2-d embeddings"):
        gate.scores(np.zeros((1, 3)))


def test_no_fitted_gate_says_so_and_prechecks_still_refuse():
    verdicts = InputGate(None).verdicts(np.zeros((2, 4)), [Precheck(), Precheck("ct", "DICOM Modality CT")])
    assert verdicts[0].analysed and verdicts[0].stage == "none" and "no image gate" in verdicts[0].notes[-1]
    assert not verdicts[1].analysed and verdicts[1].reason == "DICOM Modality CT"


def test_threshold_rule_group_split_and_wilson():
    assert choose_threshold(np.array([0.4, 0.1, 0.3, 0.2]), 0.25) == 0.3  # refuses 1 of 4 = the target
    assert choose_threshold(np.array([0.4, 0.1, 0.3, 0.2]), 0.0) == 0.4  # refuses none
    scores = np.random.default_rng(0).uniform(size=500)
    t = choose_threshold(scores, 0.01)
    assert (scores > t).mean() <= 0.01 and (scores >= t).mean() > 0.01
    groups = ["a", "a", "b", "b", "c", "d", "d", "e"]
    mask = group_split(groups, 0.4, seed=1)
    for g in set(groups):  # a patient is on one side only
        assert len({bool(m) for m, h in zip(mask, groups) if h == g}) == 1
    assert wilson(0, 10, 4) == [0.0, 0.2775] and wilson(5, 10, 4) == [0.2366, 0.7634]


def test_fitting_folds_the_scaler_and_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (60, 5)), rng.normal(3, 1, (40, 5))])
    kinds = ["frontal"] * 60 + ["lateral"] * 40
    gate = fit_image_gate(x[::2], kinds[::2], x[1::2], kinds[1::2], target_frr=0.05)
    scaler = StandardScaler().fit(x[::2])
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(
        scaler.transform(x[::2]), np.array(kinds[::2]) == "lateral"
    )
    np.testing.assert_allclose(gate.scores(x)[0], lr.predict_proba(scaler.transform(x))[:, 1], atol=1e-9)
    frontal_valid = gate.scores(x[1::2][:30])[0]
    assert gate.threshold == choose_threshold(frontal_valid, 0.05)
    valid = gate.evidence["valid"]
    assert valid["frontal"]["n"] == 30 and valid["lateral"]["n"] == 20 and valid["auroc"] > 0.99
    with pytest.raises(GateError, match="frontal films and at least one other"):
        fit_image_gate(x, ["frontal"] * 100, x, ["frontal"] * 100)


def test_generated_negatives_are_not_blank_and_of_the_stated_kinds():
    films = [np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (80, 1))]
    images, kinds = generated_negatives(films, 10, seed=0)
    assert set(kinds) == {"not_radiograph", "rotated", "inverted"}
    assert all(a.dtype == np.uint8 and not pixel_check(a).refused for a in images)
    np.testing.assert_array_equal(images[kinds.index("inverted")], 255 - films[0])


# ------------------------------------------------------------------------------------- with a model


def with_gate(ckpt, out, intercept) -> str:
    """A copy of ``ckpt`` with a gate of known answer: zero weights, so P(frontal) = softmax(intercept)[0]."""
    from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpt)
    weights = [v for k, v in state["model"].items() if k.startswith("image_projection") and k.endswith("weight")]
    dim = weights[-1].shape[0]
    gate = ImageGate(("frontal", "lateral"), np.zeros((2, dim)), np.array(intercept, dtype=float), 0.5, 0.01)
    state["gate"] = gate.to_dict()
    return str(save_checkpoint(out, {k: v for k, v in state.items() if k != "format"}))


@pytest.fixture(scope="module")
def refusing(tiny_clip_checkpoint, tmp_path_factory):
    """Refuses every image as lateral: score 1 − softmax([0, 3])[0] ≈ 0.953 > 0.5."""
    return with_gate(tiny_clip_checkpoint, tmp_path_factory.mktemp("gate") / "refusing.tar", [0.0, 3.0])


@pytest.fixture(scope="module")
def passing(tiny_clip_checkpoint, tmp_path_factory):
    return with_gate(tiny_clip_checkpoint, tmp_path_factory.mktemp("gate") / "passing.tar", [3.0, 0.0])


def test_inference_refuses_with_the_reason_and_no_probability(refusing, passing, demo_data, tmp_path, capsys):
    from cxrclip.infer import main as infer_main

    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    expected = 1 - 1 / (1 + np.exp(3.0))
    assert infer_main(["--model_path", refusing, "--image_path", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["analysed"] is False and out["reason"] == f"lateral view (gate score {expected:.2f})"
    assert set(out) == {"image", "analysed", "reason", "gate", "answer_version"}  # the version of the JSON form
    assert "probability" not in json.dumps(out)
    assert out["gate"]["score"] == pytest.approx(expected, abs=1e-4) and out["gate"]["stage"] == "image"
    assert infer_main(["--model_path", refusing, "--image_path", str(image)]) == 0
    table = capsys.readouterr().out
    assert "NOT ANALYSED: lateral view" in table and "P(yes)" not in table
    # --no-gate: the labels, and the verdict recorded beside them
    assert infer_main(["--model_path", refusing, "--image_path", str(image), "--json", "--no-gate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["analysed"] is True and len(out["labels"]) == 13
    assert out["gate"]["enforced"] is False and out["gate"]["reason"].startswith("lateral view")
    assert "--no-gate" in out["gate"]["note"]
    # a gate that lets it through: the labels as before, with the gate's score
    assert infer_main(["--model_path", passing, "--image_path", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["analysed"] is True and len(out["labels"]) == 13 and out["gate"]["kind"] == FRONTAL


def test_a_folder_csv_has_analysed_and_reason_and_blank_label_cells(refusing, passing, demo_data, tmp_path):
    from cxrclip.infer import main as infer_main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((demo_data / "images").glob("test_*.png"))[:2]:
        shutil.copy(p, folder)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "blank.png")
    assert infer_main(["--model_path", passing, "--image_path", str(folder), "--output", str(tmp_path / "p.csv")]) == 0
    rows = {r["image"].split("/")[-1]: r for r in csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text()))}
    assert rows["blank.png"]["analysed"] == "no" and "blank" in rows["blank.png"]["reason"]
    assert rows["blank.png"]["Pneumothorax"] == "" and rows["blank.png"]["top_candidate"] == ""
    analysed = [r for name, r in rows.items() if name != "blank.png"]
    assert all(r["analysed"] == "yes" and r["Pneumothorax"] != "" for r in analysed)
    assert infer_main(["--model_path", refusing, "--image_path", str(folder), "--output", str(tmp_path / "r.csv")]) == 0
    for r in csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())):
        assert r["analysed"] == "no" and r["reason"] and r["Pneumothorax"] == "" and r["findings"] == ""


def test_a_lateral_dicom_is_refused_by_its_attributes(passing, tmp_path, capsys):
    from cxrclip.infer import main as infer_main
    from tests.test_images import write_dicom

    path = write_dicom(tmp_path / "lat.dcm", PIXELS, ViewPosition="LL", BodyPartExamined="CHEST")
    assert infer_main(["--model_path", passing, "--image_path", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["analysed"] is False and out["reason"] == "DICOM ViewPosition LL: lateral view"
    assert out["gate"]["stage"] == "dicom" and "labels" not in out


def test_the_server_refuses_on_single_and_batch_and_reports_the_gate(refusing, demo_data):
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, create_app

    client = TestClient(create_app(ServeSettings(model=PredictorOptions(refusing))))
    card = client.get("/v1/model").json()
    assert card["gate"]["fitted"] is True and card["gate"]["kinds"] == ["frontal", "lateral"]
    png = sorted((demo_data / "images").glob("test_*.png"))[0].read_bytes()
    body = client.post(
        "/v1/predict", files={"file": ("a.png", png, "image/png")}, data={"heatmap": "Pneumothorax", "texts": ["x"]}
    ).json()
    assert body["analysed"] is False and body["reason"].startswith("lateral view")
    assert not {"labels", "ranking", "texts", "heatmap"} & set(body)
    batch = client.post("/v1/predict/batch", files=[("files", ("a.png", png, "image/png"))]).json()["results"]
    assert batch[0]["analysed"] is False and "labels" not in batch[0]
    off = TestClient(create_app(ServeSettings(model=PredictorOptions(refusing, gate=False))))
    assert off.get("/v1/model").json()["gate"]["enforced"] is False
    body = off.post("/v1/predict", files={"file": ("a.png", png, "image/png")}).json()
    assert body["analysed"] is True and len(body["labels"]) == 13 and body["gate"]["enforced"] is False


def test_fit_gate_end_to_end_and_the_bundle_gives_the_same_scores(tiny_clip_checkpoint, demo_data, tmp_path, capsys):
    """fit-gate on the demo's frontal films + a folder of others + generated negatives; stored in the checkpoint
    (plain data, weights_only); the exported bundle's gate scores equal the checkpoint's to 1e-5."""
    from cxrclip.bundle import export_bundle
    from cxrclip.cli import main as cli_main
    from cxrclip.data.images import read_image
    from cxrclip.model.checkpoint import load_checkpoint
    from cxrclip.predict import load_predictor

    other = tmp_path / "other"
    (other / "lateral").mkdir(parents=True)
    films = sorted((demo_data / "images").glob("train_*.png"))
    for i, p in enumerate(films[:10]):  # "lateral": the films turned on their side and squeezed
        a = np.rot90(read_image(p))[:, ::2]
        Image.fromarray(np.ascontiguousarray(a)).save(other / "lateral" / f"l{i}.png")
    out = tmp_path / "gated.tar"
    argv = ["fit-gate", "--checkpoint", str(tiny_clip_checkpoint), "--frontal", str(demo_data / "train.csv")]
    argv += ["--frontal", str(demo_data / "valid.csv"), "--other", str(other), "--generated", "20", "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "input gate stored in" in printed and "frontal films refused" in printed
    stored = load_checkpoint(out)["gate"]
    assert stored["kinds"][0] == "frontal" and "lateral" in stored["kinds"]
    assert stored["evidence"]["fitted_on"]["generated"] == 20
    bundle = export_bundle(out, tmp_path / "bundle")
    images = sorted((demo_data / "images").glob("test_*.png"))[:4] + sorted((other / "lateral").glob("*.png"))[:2]
    ours, theirs = load_predictor(str(out), device="cpu"), BundlePredictor.create(bundle)
    got = [r.gate.score for r in theirs.predict(images)]
    want = [r.gate.score for r in ours.predict(images)]
    arrays = [read_image(p) for p in images]
    thumbs = np.stack([pixel_features(a) for a in arrays])
    assert stored["pixel_side"] == 32 and thumbs.shape == (6, 32 * 32)
    exact_ours = ours.gate.image_gate.scores(ours.embed([ours.transform(a) for a in arrays]), thumbs)[0]
    exact_theirs = theirs.gate.image_gate.scores(theirs.embed([theirs.transform(a) for a in arrays]), thumbs)[0]
    np.testing.assert_allclose(exact_theirs, exact_ours, atol=1e-5)
    assert got == want
    assert [r.analysed for r in theirs.predict(images)] == [r.analysed for r in ours.predict(images)]


def test_fit_gate_lists_bad_inputs_before_any_work(tiny_clip_checkpoint, tmp_path):
    from cxrclip.fit_gate import GateFit, fit_gate_checkpoint, gather

    (tmp_path / "f.csv").write_text("image\nmissing1.png\nmissing2.png\n")
    with pytest.raises(GateError, match="2 image\\(s\\) cannot be used"):
        fit_gate_checkpoint(tiny_clip_checkpoint, [str(tmp_path / "f.csv")], fit=GateFit(generated=10))
    with pytest.raises(GateError, match="other images"):
        fit_gate_checkpoint(tiny_clip_checkpoint, [str(tmp_path / "f.csv")], fit=GateFit(generated=0))
    (tmp_path / "o.csv").write_text("image,kind,patient_id\na.png,lateral,p1\nb.png,ct,p2\nc.png,,p2\n")
    got = gather(str(tmp_path / "o.csv"), None)
    assert [(x.kind, x.group) for x in got] == [("lateral", "p1"), ("ct", "p2"), ("not_radiograph", "p2")]
    (tmp_path / "bad.csv").write_text("image,kind\na.png,frontal\n")
    with pytest.raises(GateError, match="kind frontal in an --other set"):
        gather(str(tmp_path / "bad.csv"), None)


def test_evaluation_reports_what_the_gate_would_refuse(refusing, passing, demo_data, tmp_path):
    from cxrclip.eval.evaluate import evaluate
    from tests.test_eval import eval_cfg

    results = evaluate(eval_cfg(demo_data, refusing, tmp_path))["cgmh"][refusing]
    assert results["input_gate"]["refused"] == results["input_gate"]["of"] == results["n_images"] == 12
    assert results["input_gate"]["by_kind"] == {"lateral": 12}
    results = evaluate(eval_cfg(demo_data, passing, tmp_path))["cgmh"][passing]
    assert results["input_gate"]["refused"] == 0 and results["input_gate"]["by_kind"] == {}


def test_the_pixel_part_refuses_negatives_that_the_embedding_cannot_tell_apart():
    """A negative film embeds close to its positive; the thumbnail tells them apart at once. Here the embedding is
    made identical for both: an embedding-only gate is at chance, the gate with pixels refuses every negative."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    films, emb = [], []
    for _ in range(120):
        cx, w = rng.uniform(0.25, 0.35), rng.uniform(0.08, 0.14)
        lungs = np.exp(-(((xx - cx) / w) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        lungs += np.exp(-(((xx - 1 + cx) / w) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        films.append(np.clip(230 - 170 * lungs + rng.normal(0, 8, xx.shape), 0, 255).astype(np.uint8))
        emb.append(rng.normal(size=16))
    images = films + [255 - f for f in films]
    kinds = np.array([FRONTAL] * 120 + ["inverted"] * 120)
    x = np.concatenate([emb, emb])  # the same embedding for a film and its negative
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    thumbs = np.stack([pixel_features(a) for a in images])
    assert thumbs.shape == (240, 32 * 32) and thumbs.min() >= 0 and thumbs.max() <= 1
    np.testing.assert_allclose(thumbs[120:], 1 - thumbs[:120], atol=1 / 255 + 1e-6)  # the negative's thumbnail
    fit = np.arange(240) % 2 == 0
    blind = fit_image_gate(x[fit], kinds[fit], x[~fit], kinds[~fit], target_frr=0.05)
    seeing = fit_image_gate(x[fit], kinds[fit], x[~fit], kinds[~fit], target_frr=0.05, pixels_fit=thumbs[fit],
                            pixels_valid=thumbs[~fit])  # fmt: skip
    assert blind.evidence["valid"]["auroc"] < 0.65 and blind.evidence["valid"]["inverted"]["rate"] > 0.5
    assert seeing.pixel_side == 32 and seeing.evidence["reads"] == "image embedding + 32×32 pixels"
    assert seeing.evidence["valid"]["auroc"] == 1.0 and seeing.evidence["valid"]["inverted"]["missed"] == 0
    # every path reads the thumbnail from the prechecks; a round trip keeps the gate exactly
    checks = [precheck(a, thumbnail=True) for a in images]
    verdicts = InputGate(seeing).verdicts(x, checks)
    assert [v.kind for v, k in zip(verdicts, kinds) if k == "inverted" and not v.analysed].count("inverted") >= 115
    again = ImageGate.from_dict(seeing.to_dict())
    np.testing.assert_array_equal(again.scores(x, thumbs)[0], seeing.scores(x, thumbs)[0])
    with pytest.raises(GateError, match="also reads the image's pixels"):
        seeing.scores(x)
    old = {k: v for k, v in blind.to_dict().items() if k != "pixel_side"}  # stored before the pixel part
    assert ImageGate.from_dict(old).pixel_side == 0


def test_a_gate_fitted_only_on_synthetic_films_says_so_in_every_refusal_and_in_its_description():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (60, 8)) + 2, rng.normal(0, 1, (60, 8)) - 2])
    kinds = np.array([FRONTAL] * 60 + ["lateral"] * 60)
    demo = fit_image_gate(x[::2], kinds[::2], x[1::2], kinds[1::2], fitted_on={"synthetic_only": True})
    real = fit_image_gate(x[::2], kinds[::2], x[1::2], kinds[1::2], fitted_on={"frontal": ["valid.csv"]})
    lateral = x[60:61]
    (said,) = InputGate(demo).verdicts(lateral, [Precheck()])
    assert not said.analysed and said.reason.startswith("lateral view (gate score")
    assert "seen only the demo's synthetic films" in said.reason and "cxrclip fit-gate" in said.reason
    assert "synthetic films" in InputGate(demo).describe()["note"]
    (plain,) = InputGate(real).verdicts(lateral, [Precheck()])
    assert plain.reason == f"lateral view (gate score {plain.score:.2f})" and "note" not in InputGate(real).describe()
    assert ImageGate.from_dict(demo.to_dict()).synthetic_only  # stored with the gate
