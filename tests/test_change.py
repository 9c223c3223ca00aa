"""Change control: the plan's rules, the paired DeLong difference against a brute-force reference, the bootstrap
that keeps a patient's films together, and the verdict — a better challenger promoted, a worse or a noisy one and
too little evidence refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrclip.change.compare import ModelScores, compare, metric, patient_resamples
from cxrclip.change.plan import ChangePlan
from cxrclip.exceptions import ConfigError

PLAN = {
    "labels": ["A", "B"], "min_cases": {"positives": 20, "negatives": 20}, "alpha": 0.05,
    "bootstrap": {"resamples": 400, "seed": 1},
    "criteria": [{"metric": "auroc", "non_inferiority": 0.02}, {"metric": "auroc", "superiority": 0.0, "labels": "any"},
                 {"metric": "sensitivity", "non_inferiority": 0.1}, {"metric": "ece", "non_inferiority": 0.05}],
}  # fmt: skip


def site(n: int = 400, seed: int = 0):
    """Two labels; the champion sees each finding weakly, a 'better' challenger strongly (calibrated-ish scores)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.3).astype(float)
    weak = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1.2, y.shape))))
    strong = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(0, 1.2, y.shape))))
    patients = np.repeat(np.arange(n // 2), 2)  # two films per patient
    return y, weak, strong, patients


def scores(name, p):
    return ModelScores(name, p, np.full(p.shape[1], 0.5))


def test_a_plan_is_read_with_its_hash_and_wrong_plans_say_where(tmp_path):
    import yaml

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    plan = ChangePlan.load(path)
    import hashlib

    assert plan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and plan.labels == ("A", "B")
    assert [c.kind for c in plan.criteria] == ["non_inferiority", "superiority", "non_inferiority", "non_inferiority"]
    for bad, message in [({**PLAN, "criteria": []}, "at least one criterion"),
                         ({**PLAN, "criteria": [{"metric": "f1", "superiority": 0}]}, "needs a metric"),
                         ({**PLAN, "criteria": [{"metric": "auroc"}]}, "exactly one of"),
                         ({**PLAN, "alpha": 0.7}, "alpha"), ({**PLAN, "typo": 1}, "unknown key")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            ChangePlan.from_mapping(bad)


def test_the_paired_delong_difference_matches_a_brute_force_reference():
    from cxrclip.eval.metrics import delong_covariance

    y, weak, strong, _ = site(120, seed=3)
    a, b, t = weak[:, 0], strong[:, 0], y[:, 0].astype(bool)

    def psi(x):  # the structural components, by the definition (pairs of a positive and a negative)
        pos, neg = x[t], x[~t]
        kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return kernel.mean(), kernel.mean(axis=1), kernel.mean(axis=0)

    (auc_a, va10, va01), (auc_b, vb10, vb01) = psi(a), psi(b)
    m, n = t.sum(), (~t).sum()
    var_diff = (np.var(vb10 - va10, ddof=1) / m) + (np.var(vb01 - va01, ddof=1) / n)
    aucs, cov = delong_covariance(y[:, 0], np.stack([a, b]))
    assert np.allclose(aucs, [auc_a, auc_b])
    assert np.isclose(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], var_diff)


def test_the_bootstrap_draws_whole_patients():
    groups = ["p1", "p1", "p2", "p3", "p3", "p3"]
    for rows in patient_resamples(groups, 50, seed=0):
        drawn = [groups[r] for r in rows]
        for patient in set(drawn):  # a patient's films come together, all of them, each time it is drawn
            assert drawn.count(patient) % groups.count(patient) == 0


def test_a_better_challenger_is_promoted_and_a_worse_one_refused():
    y, weak, strong, patients = site()
    plan = ChangePlan.from_mapping(PLAN, sha256="ab" * 32)
    better = compare(y, ["A", "B"], scores("champion", weak), scores("challenger", strong), plan, patients)
    assert better["decision"] == "promote", better["reasons"]
    auroc = [r for r in better["rows"] if r["metric"] == "auroc" and r["kind"] == "superiority"]
    assert all(r["difference"] > 0.05 and r["bound"] > 0 for r in auroc)
    assert np.isclose(auroc[0]["champion"], metric("auroc", y[:, 0], weak[:, 0], 0.5))
    assert better["plan"]["per_test_alpha"] == pytest.approx(0.05 / 8)  # Bonferroni: 2 labels × 4 criteria
    worse = compare(y, ["A", "B"], scores("champion", strong), scores("challenger", weak), plan, patients)
    assert worse["decision"] == "refuse" and any("auroc not worse" in r for r in worse["reasons"])
    same = compare(y, ["A", "B"], scores("champion", strong), scores("challenger", strong), plan, patients)
    assert same["decision"] == "refuse"  # non-inferior, but not superior anywhere
    assert [v["holds"] for v in same["criteria"]] == [True, False, True, True]


def test_too_few_reviewed_cases_is_a_refusal_that_says_how_many_are_needed():
    y, weak, strong, patients = site(60)
    y[10:, 1] = np.nan  # label B: barely reviewed
    plan = ChangePlan.from_mapping(PLAN)
    out = compare(y, ["A", "B"], scores("champion", weak), scores("challenger", strong), plan, patients)
    assert out["decision"] == "refuse"
    assert any(r.startswith("B: ") and "the plan needs 20 and 20" in r for r in out["reasons"])


def test_promotion_only_by_the_plan_and_rollback_are_append_only_audit_rows(tmp_path, capsys):
    import hashlib
    import json

    from sqlalchemy import text

    from cxrclip.change.promote import PromotionRefused, champion, promote, rollback
    from cxrclip.cli import main as cli_main
    from cxrclip.reviews.store import ReviewStore

    champ, chall = tmp_path / "champion.tar", tmp_path / "challenger.tar"
    champ.write_bytes(b"champion weights")
    chall.write_bytes(b"challenger weights")
    plan = tmp_path / "plan.yaml"
    plan.write_text("criteria: [{metric: auroc, non_inferiority: 0.02}]\n")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    verdict = {"decision": "promote", "reasons": [], "plan": {"sha256": sha(plan)}, "champion": str(champ),
               "champion_sha256": sha(champ), "challenger": str(chall), "challenger_sha256": sha(chall)}  # fmt: skip
    path = tmp_path / "verdict.json"
    store = ReviewStore(tmp_path / "reviews.sqlite")

    def refused(change: dict, message: str) -> None:
        path.write_text(json.dumps({**verdict, **change}))
        with pytest.raises(PromotionRefused, match=message):
            promote(store, path, plan, chall, "Dr. Chen")

    refused({"decision": "refuse", "reasons": ["B: 3 positives"]}, "is 'refuse', not promote: B: 3 positives")
    refused({"plan": {"sha256": "0" * 64}}, "another plan")
    refused({"challenger_sha256": "0" * 64}, "is not the challenger the verdict compared")
    assert champion(store) is None and store.model_changes() == []  # nothing written by a refusal
    path.write_text(json.dumps(verdict))
    row = promote(store, path, plan, chall, "Dr. Chen")
    assert row["action"] == "promote" and row["plan_sha256"] == sha(plan) and json.loads(row["evidence"]) == verdict
    assert champion(store)["sha256"] == sha(chall) and champion(store)["by"] == "Dr. Chen"
    with pytest.raises(PromotionRefused, match="another champion"):  # the same verdict again: stale now
        promote(store, path, plan, chall, "Dr. Chen")
    back = rollback(store, "Dr. Lin", "sensitivity fell on the ward's films")
    assert (back["from_sha256"], back["to_sha256"], back["to_path"]) == (sha(chall), sha(champ), str(champ))
    assert champion(store)["sha256"] == sha(champ)
    with pytest.raises(PromotionRefused, match="no promotion in effect"):
        rollback(store, "Dr. Lin", "again")
    with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
        conn.execute(text("UPDATE cxrclip_model_changes SET by = 'someone else'"))
    assert [r["action"] for r in store.model_changes()] == ["promote", "rollback"]
    assert cli_main(["champion", "--db", str(tmp_path / "reviews.sqlite")]) == 0
    assert f"champion: {champ}" in capsys.readouterr().out


def test_the_server_serves_the_champion_the_audit_rows_name(tiny_clip_checkpoint, tmp_path, minilm_tokenizer):
    from cxrclip.change.promote import promote
    from cxrclip.predict import PredictorOptions
    from cxrclip.reviews.store import ReviewStore
    from cxrclip.serve.app import ServeSettings, Service
    from tests.models import challenger_checkpoint, promotion_verdict, sha256

    challenger = challenger_checkpoint(tiny_clip_checkpoint, tmp_path / "challenger.tar")
    verdict, plan = promotion_verdict(tmp_path, tiny_clip_checkpoint, challenger)
    reviews = tmp_path / "reviews.sqlite"
    promote(ReviewStore(reviews), verdict, plan, challenger, "Dr. Chen")
    settings = ServeSettings(model=PredictorOptions("", device="cpu"), db=str(reviews), champion_db=str(reviews))
    assert Service(settings).card["checkpoint_sha256"] == sha256(challenger)


KILLED_MID_PROMOTION = """
import sys, time, datetime
from cxrclip.reviews import store as s

def stalled(self, **row):  # the audit row inserted, the transaction not yet committed: where kill -9 lands
    with self.engine.begin() as conn:
        conn.execute(s.model_changes.insert().values(**row, created_at=datetime.datetime.now(datetime.timezone.utc)))
        print("inserted", flush=True)
        time.sleep(120)

s.ReviewStore.add_model_change = stalled
from cxrclip.cli import main
main(sys.argv[1:])
"""


def test_kill_9_during_a_promotion_leaves_the_champion_answering(tiny_clip_checkpoint, tmp_path, minilm_tokenizer):
    import os
    import signal
    import subprocess
    import sys

    from cxrclip.change.promote import champion, promote
    from cxrclip.predict import PredictorOptions
    from cxrclip.reviews.store import ReviewStore
    from cxrclip.serve.app import ServeSettings, Service
    from tests.models import challenger_checkpoint, promotion_verdict, sha256

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    one = challenger_checkpoint(tiny_clip_checkpoint, first / "challenger.tar")
    db = tmp_path / "reviews.sqlite"
    promote(ReviewStore(db), *promotion_verdict(first, tiny_clip_checkpoint, one), one, "Dr. Chen")
    two = challenger_checkpoint(one, second / "challenger.tar")  # the next challenger, judged against the first
    verdict, plan = promotion_verdict(second, one, two)
    cmd = [sys.executable, "-c", KILLED_MID_PROMOTION, "promote", "--db", str(db), "--verdict", str(verdict),
           "--plan", str(plan), "--challenger", str(two), "--by", "Dr. Lin"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "inserted"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = ReviewStore(db)
    assert champion(store)["sha256"] == sha256(one)  # the half-made promotion left no row
    assert [r["action"] for r in store.model_changes()] == ["promote"]
    settings = ServeSettings(model=PredictorOptions("", device="cpu"), db=str(db), champion_db=str(db))
    assert Service(settings).card["checkpoint_sha256"] == sha256(one)  # a restarted server answers with it
    promote(store, verdict, plan, two, "Dr. Lin")  # nothing locked: the promotion can be made again, whole
    assert champion(store)["sha256"] == sha256(two)


def test_compare_db_judges_films_whose_images_were_not_kept_by_both_models_logged_answers(tiny_clip_checkpoint,
                                                                                           tmp_path):  # fmt: skip
    """A site that keeps no images: the champion's logged answers and the shadow challenger's, on the reviewed films,
    are the evidence — their probabilities, and the decisions as they were given."""
    from cxrclip.change.run import compare_on_reviews
    from cxrclip.reviews.store import ReviewStore
    from tests.models import challenger_checkpoint, sha256

    challenger = challenger_checkpoint(tiny_clip_checkpoint, tmp_path / "challenger.tar")
    store = ReviewStore(tmp_path / "reviews.sqlite")
    rng = np.random.default_rng(2)
    y = (np.arange(80) % 3 == 0).astype(int)
    pa = np.clip(0.4 * y + rng.random(80) * 0.6, 0, 1)  # the champion: weak
    pb = np.clip(0.7 * y + rng.random(80) * 0.3, 0, 1)  # the challenger: strong

    def answer(p: float, cut: float) -> dict:
        return {"labels": {"Pneumothorax": {"probability": p, "present": p >= cut}}}

    champion_sha, challenger_sha = sha256(tiny_clip_checkpoint), sha256(challenger)
    for i in range(80):
        image, verdict = f"{i:064x}", "present" if y[i] else "absent"
        store.add(reviewer="Dr. Lin", image_sha256=image, model_sha256=champion_sha, calibration="m", shown={},
                  labels=["Pneumothorax"], verdicts={"Pneumothorax": verdict})  # fmt: skip
        store.log_prediction(image, champion_sha, "m", answer(pa[i], 0.7))
        if i < 70:  # the last ten: the challenger was not shadowing yet — not evidence
            store.log_prediction(image, challenger_sha, "m", answer(pb[i], 0.5), role="shadow")
    plan = tmp_path / "plan.yaml"
    plan.write_text("labels: [Pneumothorax]\nmin_cases: {positives: 5, negatives: 5}\nbootstrap: {resamples: 200}\n"
                    "criteria: [{metric: auroc, non_inferiority: 0.05}, {metric: sensitivity, "
                    "non_inferiority: 0.1}]\n")  # fmt: skip
    out = compare_on_reviews(str(plan), str(tmp_path / "reviews.sqlite"), str(challenger), str(tiny_clip_checkpoint))
    assert out["cases"]["from_logs"] == 70 and out["cases"]["answered_now"] == 0 and out["cases"]["not_kept"] == 80
    rows = {r["metric"]: r for r in out["rows"]}
    assert np.isclose(rows["auroc"]["champion"], metric("auroc", y[:70], pa[:70], 0.5))
    assert np.isclose(rows["auroc"]["challenger"], metric("auroc", y[:70], pb[:70], 0.5))
    truth = y[:70].astype(bool)  # the sensitivity of the decisions given (the champion called YES from 0.7)
    assert rows["sensitivity"]["champion"] == pytest.approx((pa[:70][truth] >= 0.7).mean())
    assert rows["sensitivity"]["challenger"] == pytest.approx((pb[:70][truth] >= 0.5).mean())
    assert out["decision"] == "promote" and out["challenger_sha256"] == sha256(challenger)
