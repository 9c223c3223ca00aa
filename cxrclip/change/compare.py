"""The champion and a challenger on the same reviewed cases, judged by a :class:`~cxrclip.change.plan.ChangePlan`:
per label and criterion the two values, their difference and its one-sided confidence bound — AUROC by the paired
DeLong test (the two models' AUROCs and their covariance on the same rows), sensitivity, specificity and ECE by a
paired bootstrap that resamples whole patients (both models see the same resampled rows). A criterion holds when
its bound clears the plan's margin; a label with fewer reviewed positives or negatives than the plan asks is
*insufficient*, and then the plan refuses — too little evidence is a result, not a pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrclip.change.plan import LOWER_IS_BETTER, ChangePlan, Criterion
from cxrclip.eval.metrics import delong_covariance
from cxrclip.scoring.calibration import expected_calibration_error


@dataclass(frozen=True)
class ModelScores:
    """One model's answers on the reviewed cases: calibrated probabilities (rows × labels) and its thresholds; or,
    where its answers come from the prediction log, the decisions it gave (``called``, rows × labels)."""

    name: str
    probability: np.ndarray
    threshold: np.ndarray
    called: np.ndarray | None = None  # the YES/NO it gave; None: probability ≥ threshold

    def calls(self) -> np.ndarray:
        return self.probability >= self.threshold[None, :] if self.called is None else self.called


def metric(name: str, y: np.ndarray, p: np.ndarray, threshold: float, called: np.ndarray | None = None) -> float:
    """One metric of one model on one label (``y`` 0/1, no missing rows); ``called``: its decisions, when they are
    known (else probability ≥ threshold)."""
    if name == "auroc":
        return float(delong_covariance(y, p[None, :])[0][0])
    if name == "ece":
        return expected_calibration_error(y, p)
    called = p >= threshold if called is None else called.astype(bool)
    truth = y.astype(bool) if name == "sensitivity" else ~y.astype(bool)
    hits = called[truth] if name == "sensitivity" else ~called[truth]
    return float(hits.mean()) if truth.any() else float("nan")


def patient_resamples(groups: Sequence, resamples: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``resamples`` bootstrap samples that draw whole patients (``groups``: one id per row) with
    replacement — a patient's films stay together, as they are not independent."""
    ids, which = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    rows_of = [np.flatnonzero(which == g) for g in range(len(ids))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([rows_of[g] for g in rng.integers(0, len(ids), len(ids))]) for _ in range(resamples)]


def _bound(plan: ChangePlan, alpha: float, criterion: Criterion, diffs: np.ndarray) -> float:
    """The one-sided bound of a bootstrapped difference on the side that matters (lower for higher-is-better)."""
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return float("nan")
    return float(np.quantile(diffs, 1 - alpha if criterion.metric in LOWER_IS_BETTER else alpha))


def _holds(criterion: Criterion, bound: float) -> bool:
    if not np.isfinite(bound):
        return False
    if criterion.metric in LOWER_IS_BETTER:  # the difference must stay below +margin (or below −target)
        return bool(bound < (criterion.margin if criterion.kind == "non_inferiority" else -criterion.margin))
    return bool(bound > (-criterion.margin if criterion.kind == "non_inferiority" else criterion.margin))


def compare(y: np.ndarray, labels: Sequence[str], champion: ModelScores, challenger: ModelScores, plan: ChangePlan,
            groups: Sequence | None = None) -> dict:  # fmt: skip
    """``y``: rows × labels, 1 / 0 / NaN (not reviewed or can't tell); ``groups``: a patient id per row (None: each
    row its own). Returns the plan's verdict, per criterion and label, with the evidence."""
    from scipy.stats import norm

    labels = list(labels)
    scope = [n for n in (plan.labels or labels) if n in labels]
    missing = sorted(set(plan.labels or ()) - set(labels))
    tests = max(1, len(scope) * len(plan.criteria)) if plan.correction == "bonferroni" else 1
    alpha = plan.alpha / tests
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    resamples = patient_resamples(groups, plan.resamples, plan.seed)
    calls_a, calls_b = champion.calls(), challenger.calls()
    rows_out, insufficient = [], []
    for name in scope:
        j = labels.index(name)
        # reviewed, and answered by both (a logged answer may lack a label the model did not answer then)
        known = (
            np.isfinite(y[:, j]) & np.isfinite(champion.probability[:, j]) & np.isfinite(challenger.probability[:, j])
        )
        yj = y[known, j].astype(int)
        positives, negatives = int(yj.sum()), int(yj.size - yj.sum())
        if positives < plan.min_positives or negatives < plan.min_negatives:
            insufficient.append(f"{name}: {positives} positives and {negatives} negatives reviewed, the plan needs "
                                f"{plan.min_positives} and {plan.min_negatives}")  # fmt: skip
            continue
        pa, pb = champion.probability[known, j], challenger.probability[known, j]
        ta, tb = float(champion.threshold[j]), float(challenger.threshold[j])
        ca, cb = calls_a[known, j], calls_b[known, j]
        position = np.full(len(y), -1)
        position[known] = np.arange(int(known.sum()))  # a row of y → its row among this label's reviewed ones
        draws = [r[r >= 0] for r in (position[rows] for rows in resamples)]
        draws = [r for r in draws if r.size and yj[r].min() != yj[r].max()]  # both classes, or no AUROC / rate
        for criterion in plan.criteria:
            a, b = metric(criterion.metric, yj, pa, ta, ca), metric(criterion.metric, yj, pb, tb, cb)
            if criterion.metric == "auroc":  # paired DeLong: var(b − a) = var a + var b − 2 cov(a, b)
                _, cov = delong_covariance(yj, np.stack([pa, pb]))
                se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
                bound = float((b - a) - norm.ppf(1 - alpha) * se)
                method = "paired DeLong"
            else:
                diffs = [metric(criterion.metric, yj[r], pb[r], tb, cb[r])
                         - metric(criterion.metric, yj[r], pa[r], ta, ca[r]) for r in draws]  # fmt: skip
                bound = _bound(plan, alpha, criterion, np.asarray(diffs))
                method = f"paired bootstrap by patient ({len(diffs)} resamples)"
            rows_out.append({
                "label": name, "metric": criterion.metric, "kind": criterion.kind, "margin": criterion.margin,
                "champion": a, "challenger": b, "difference": b - a, "bound": bound, "method": method,
                "holds": _holds(criterion, bound), "positives": positives, "negatives": negatives,
            })  # fmt: skip
    verdicts = []
    for criterion in plan.criteria:
        mine = [r for r in rows_out if r["metric"] == criterion.metric and r["kind"] == criterion.kind
                and r["margin"] == criterion.margin]  # fmt: skip
        held = [r["holds"] for r in mine]
        ok = bool(held) and (all(held) if criterion.labels == "all" else any(held))
        verdicts.append({"criterion": criterion.describe(), "holds": ok and not insufficient})
    reasons = [f"label {n!r} is not answered by both models" for n in missing] + insufficient
    reasons += [v["criterion"] + ": not shown" for v in verdicts if not v["holds"] and not insufficient]
    return {
        "plan": {"path": plan.path, "sha256": plan.sha256, "alpha": plan.alpha, "per_test_alpha": alpha,
                 "correction": plan.correction},
        "champion": champion.name, "challenger": challenger.name, "labels": scope, "rows": rows_out,
        "criteria": verdicts, "decision": "promote" if not reasons else "refuse", "reasons": reasons,
    }  # fmt: skip
