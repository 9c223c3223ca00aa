"""Calibration, operating-point rules and AUROC intervals against brute-force / slow references, and the
calibration's way through checkpoints, evaluation and inference."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

from cxrclip.eval.metrics import auroc_ci, delong_covariance, operating_point
from cxrclip.scoring.calibration import (
    Calibration,
    CalibrationError,
    CalibrationSettings,
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    sigmoid,
)


# -- calibration maps ------------------------------------------------------------------------------------
def known_mapping(n, seed, a=1.5, b=-0.7):
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 2, n)
    return s, (rng.random(n) < sigmoid(a * s + b)).astype(int)


def test_platt_recovers_a_known_score_to_probability_mapping():
    s, y = known_mapping(20000, 0)
    cal = fit_calibration(s[:, None], y[:, None], ["x"], CalibrationSettings())
    params = cal.labels["x"].params
    assert params["a"] == pytest.approx(1.5, abs=0.08) and params["b"] == pytest.approx(-0.7, abs=0.08)
    grid = np.linspace(-4, 4, 41)
    assert np.abs(cal.labels["x"].probability(grid) - sigmoid(1.5 * grid - 0.7)).max() < 0.03
    fresh_s, fresh_y = known_mapping(20000, 1)
    p = cal.probabilities(fresh_s[:, None])[:, 0]
    assert expected_calibration_error(fresh_y, p) < 0.02
    assert expected_calibration_error(fresh_y, sigmoid(fresh_s)) > 0.05  # the raw sigmoid is not calibrated


def test_isotonic_recovers_the_mapping_and_needs_enough_positives():
    s, y = known_mapping(20000, 2)
    cal = fit_calibration(s[:, None], y[:, None], ["x"], CalibrationSettings(method="isotonic"))
    assert cal.labels["x"].method == "isotonic"
    grid = np.linspace(-3, 3, 25)
    assert np.abs(cal.labels["x"].probability(grid) - sigmoid(1.5 * grid - 0.7)).max() < 0.06
    few = fit_calibration(s[:300, None], y[:300, None], ["x"], CalibrationSettings(method="isotonic"))
    if y[:300].sum() < 50:
        assert few.labels["x"].method == "platt" and "isotonic needs" in few.labels["x"].note


def test_too_few_positives_keep_an_explicit_flagged_fallback():
    s = np.linspace(-2, 2, 100)
    y = np.zeros(100, dtype=int)
    y[[10, 50, 90]] = 1
    cal = fit_calibration(s[:, None], y[:, None], ["rare"], CalibrationSettings(min_positives=5))
    label = cal.labels["rare"]
    assert not label.calibrated and label.threshold == 0.5 and label.rule == "fixed=0.5"
    assert "3 positive" in label.note
    assert np.allclose(label.probability(s), sigmoid(s))  # the model's own score, said to be uncalibrated


def test_calibration_round_trips_as_plain_data_through_a_safe_checkpoint(tmp_path):
    s, y = known_mapping(400, 3)
    logits = np.stack([s, -s, s], 1)
    labels = np.stack([y, y, np.zeros_like(y)], 1)
    settings = CalibrationSettings(rules={"b": "sensitivity=0.9"})
    cal = fit_calibration(logits, labels, ["a", "b", "c"], settings, {"path": "v.csv", "sha256": "x", "rows": 400})
    torch.save({"calibration": cal.to_dict()}, tmp_path / "c.tar")
    back = Calibration.from_dict(torch.load(tmp_path / "c.tar", weights_only=True)["calibration"])
    assert back == cal
    assert np.array_equal(back.probabilities(logits), cal.probabilities(logits))
    assert back.labels["b"].rule == "sensitivity=0.9" and not back.labels["c"].calibrated
    with pytest.raises(CalibrationError, match="version"):
        Calibration.from_dict({**cal.to_dict(), "version": 99})


def test_settings_reject_unknown_rules_and_keys():
    with pytest.raises(CalibrationError, match="unknown operating-point rule"):
        CalibrationSettings.from_mapping({"rule": "accuracy"})
    with pytest.raises(CalibrationError, match="needs '=value'"):
        CalibrationSettings.from_mapping({"rules": {"x": "sensitivity"}})
    with pytest.raises(CalibrationError, match="unknown keys"):
        CalibrationSettings.from_mapping({"rulez": "mcc"})


# -- operating-point rules against a brute-force search --------------------------------------------------
def brute_force_threshold(y, p, rule):
    """Every distinct score as a threshold; the criterion from scikit-learn; ties → the highest threshold."""
    candidates = sorted(set(p.tolist()), reverse=True)

    def sens(t):
        return ((p >= t) & (y == 1)).sum() / (y == 1).sum()

    def spec(t):
        return ((p < t) & (y == 0)).sum() / (y == 0).sum()

    if rule.startswith("sensitivity="):
        return next(t for t in candidates if sens(t) >= float(rule.split("=")[1]))
    if rule.startswith("specificity="):
        return [t for t in candidates if spec(t) >= float(rule.split("=")[1])][-1]
    crit = {
        "mcc": lambda t: matthews_corrcoef(y, p >= t),
        "f1": lambda t: f1_score(y, p >= t, zero_division=0),
        "youden": lambda t: sens(t) + spec(t) - 1,
    }[rule]
    values = [crit(t) for t in candidates]
    best = max(values)
    return candidates[next(i for i, v in enumerate(values) if v >= best - 1e-12)]


@pytest.mark.parametrize("rule", ["mcc", "youden", "f1", "sensitivity=0.9", "sensitivity=0.95", "specificity=0.8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_rule_matches_a_brute_force_search(rule, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(120) < 0.2).astype(int)
    p = np.round(np.clip(0.25 * y + rng.random(120) * 0.75, 0, 1), 2)  # rounded: ties between rows
    assert choose_threshold(y, p, rule) == pytest.approx(brute_force_threshold(y, p, rule))


def test_mcc_says_yes_less_often_than_youden_on_a_rare_label():
    rng = np.random.default_rng(5)
    y = (rng.random(2000) < 0.05).astype(int)
    s = rng.normal(0, 1, 2000) + 1.5 * y
    yes = {rule: (s >= choose_threshold(y, s, rule)).mean() for rule in ("mcc", "youden")}
    assert yes["mcc"] < yes["youden"]


def test_operating_point_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.1, 0.3, 0.05])
    m = operating_point(y, p, 0.5)  # TP 2, FN 1, FP 1, TN 4
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(4 / 5)
    assert m["PPV"] == pytest.approx(2 / 3) and m["NPV"] == pytest.approx(4 / 5)
    assert m["F1"] == pytest.approx(4 / 6) and m["Accuracy"] == pytest.approx(6 / 8)
    assert operating_point(y, p, 2.0)["PPV"] is None  # no YES at all: PPV undefined, not 0


def test_ece_and_brier_by_hand():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 0.75])
    # bins: [0, .1): rate .5 vs .05 (2 rows); [.9, 1]: 1 vs .95; [.7, .8): 1 vs .75
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.45 + 0.05 + 0.25) / 4)
    assert brier_score(y, p) == pytest.approx((0.95**2 + 0.05**2 + 0.05**2 + 0.25**2) / 4)


# -- AUROC intervals -------------------------------------------------------------------------------------
def slow_delong(y, scores):
    """DeLong's structural components from the O(m·n) pairwise placements (ties count half)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    aucs = psi.mean(axis=(1, 2))
    cov = np.array(
        [[np.cov(v10[a], v10[b])[0, 1] / m + np.cov(v01[a], v01[b])[0, 1] / n for b in range(2)] for a in range(2)]
    )
    return aucs, cov


def test_delong_matches_a_slow_reference_with_ties_and_two_paired_scores():
    rng = np.random.default_rng(0)
    y = (rng.random(90) < 0.35).astype(int)
    scores = np.stack([np.round(y + rng.normal(0, 1, 90), 1), np.round(0.5 * y + rng.normal(0, 1, 90), 1)])
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = slow_delong(y, scores)
    assert np.allclose(aucs, ref_aucs) and np.allclose(cov, ref_cov)
    assert aucs[0] == pytest.approx(roc_auc_score(y, scores[0]))


def test_delong_interval_covers_the_true_auroc_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    shift = 1.0
    true_auc = norm.cdf(shift / math.sqrt(2))
    hits, trials = 0, 300
    for _ in range(trials):
        y = np.r_[np.ones(40), np.zeros(80)].astype(int)
        s = rng.normal(0, 1, 120) + shift * y
        low, high = auroc_ci(y, s)
        hits += low <= true_auc <= high
    assert 0.90 <= hits / trials <= 0.99


def test_bootstrap_interval_is_close_to_delong():
    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.3).astype(int)
    s = rng.normal(0, 1, 300) + y
    d_low, d_high = auroc_ci(y, s)
    b_low, b_high = auroc_ci(y, s, method="bootstrap", n_boot=400)
    assert abs(d_low - b_low) < 0.03 and abs(d_high - b_high) < 0.03
    assert auroc_ci(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2])) == (0.0, 1.0)  # one positive: no estimate


# -- through checkpoints, evaluation and inference --------------------------------------------------------


@pytest.fixture
def calibrated_ckpt(tiny_clip_checkpoint, demo_data, tmp_path):
    """The tiny checkpoint calibrated on the demo's test CSV (8-row valid.csv has too few positives), so the
    evaluation below runs on the calibration data itself and must say so."""
    from cxrclip.cli import main

    out = tmp_path / "calibrated.tar"
    argv = ["calibrate", "--checkpoint", str(tiny_clip_checkpoint), "--data", str(demo_data / "test.csv")]
    assert main([*argv, "--min-positives", "2", "--label-rule", "Pneumothorax:sensitivity=0.9", "--out", str(out)]) == 0
    return out


@pytest.mark.usefixtures("minilm_tokenizer")
def test_calibrate_stores_a_safe_calibration_and_leaves_the_weights(calibrated_ckpt, tiny_clip_checkpoint):
    from cxrclip.model.checkpoint import load_checkpoint

    before, after = load_checkpoint(tiny_clip_checkpoint), load_checkpoint(calibrated_ckpt)
    assert "calibration" not in before and after["calibration"]["version"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    cal = Calibration.from_dict(after["calibration"])
    assert cal.labels["Pneumothorax"].rule == "sensitivity=0.9"
    assert cal.fitted_on["path"].endswith("test.csv") and len(cal.fitted_on["sha256"]) == 64


@pytest.mark.usefixtures("minilm_tokenizer")
def test_evaluation_flags_calibration_data_and_missing_calibration(
    calibrated_ckpt, tiny_clip_checkpoint, demo_data, tmp_path
):
    from cxrclip.eval.evaluate import evaluate
    from tests.test_eval import eval_cfg

    zb = evaluate(eval_cfg(demo_data, calibrated_ckpt, tmp_path))["cgmh"][str(calibrated_ckpt)]["zeroshot_binary"]
    assert zb["calibration"]["optimistic"] is True and "optimistic" in zb["calibration"]["note"]
    cal = Calibration.from_dict(torch.load(calibrated_ckpt, weights_only=True)["calibration"])
    for name, c in cal.labels.items():
        entry = zb[name]
        if entry.get("AUROC") is None:
            continue
        assert entry["threshold"] == pytest.approx(c.threshold) and entry["rule"] == c.rule
        assert {"sensitivity", "specificity", "PPV", "NPV", "F1", "AUROC_CI95", "ECE", "Brier"} <= set(entry)
        low, high = entry["AUROC_CI95"]
        assert low <= entry["AUROC"] <= high
    assert {"ECE(Avg)", "at_0.5", "YES_per_image"} <= set(zb)
    report = (tmp_path / "results-cgmh.md").read_text()
    assert "optimistic" in report and "AUROC [95% CI]" in report

    plain = evaluate(eval_cfg(demo_data, tiny_clip_checkpoint, tmp_path / "u"))["cgmh"][str(tiny_clip_checkpoint)]
    zb = plain["zeroshot_binary"]
    assert len(zb["uncalibrated_labels"]) == 13 and zb["calibration"]["optimistic"] is False
    assert all(zb[n]["rule"] == "fixed=0.5" and zb[n]["calibrated"] is False for n in zb["uncalibrated_labels"])
    assert "Uncalibrated labels" in (tmp_path / "u" / "results-cgmh.md").read_text()


@pytest.mark.usefixtures("minilm_tokenizer")
def test_inference_uses_the_stored_operating_points(calibrated_ckpt, demo_data, capsys):
    from tests.test_eval import infer_json

    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    infer_json(calibrated_ckpt, image)
    labels = json.loads(capsys.readouterr().out)["labels"]
    cal = Calibration.from_dict(torch.load(calibrated_ckpt, weights_only=True)["calibration"])
    for name, v in labels.items():
        assert {"probability", "present", "threshold", "rule", "calibrated"} <= set(v)
        assert v["threshold"] == pytest.approx(cal.labels[name].threshold, abs=1e-4)
        if abs(v["probability"] - v["threshold"]) > 1e-3:  # the JSON rounds both to 4 decimals
            assert v["present"] == (v["probability"] >= v["threshold"])
    infer_json(calibrated_ckpt, image, "--threshold", "0.0")  # --threshold still overrides
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert all(v["present"] and v["rule"] == "fixed=0" for v in labels.values())


@pytest.mark.usefixtures("minilm_tokenizer")
def test_training_ends_by_calibrating_the_best_checkpoint(demo_data, tmp_path):
    from cxrclip.config import compose
    from cxrclip.jobs import pretrain
    from cxrclip.model.checkpoint import load_checkpoint

    overrides = [
        "model=clip_tiny",
        "dataloader=dataloader_cpu",
        "base.image_size=32",
        "scheduler.config.total_epochs=1",
        f"data_train.cgmh.data_path={demo_data / 'train.csv'}",
        f"data_valid.cgmh.data_path={demo_data / 'train.csv'}",  # 24 rows: enough positives for some labels
        "dataloader.train.batch_size=8",
        "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0",
        "calibration.min_positives=3",
        f"base.output.checkpoint={tmp_path}/checkpoints",
        f"base.output.tensorboard={tmp_path}/tb",
    ]
    assert pretrain(compose("train", overrides))["calibrated"]
    stored = load_checkpoint(tmp_path / "checkpoints" / "model-best.tar")["calibration"]
    assert stored["fitted_on"]["path"].endswith("train.csv") and stored["fitted_on"]["rows"] == 24
    assert "calibration" not in load_checkpoint(tmp_path / "checkpoints" / "model-last.tar")
    cal = Calibration.from_dict(stored)
    assert any(c.calibrated for c in cal.labels.values()) and any(not c.calibrated for c in cal.labels.values())
