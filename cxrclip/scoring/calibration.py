"""Calibrated probabilities and operating points per label, fitted on held-apart (validation) data.

The zero-shot score of a label is the logit of "positive prompts vs negative prompts":
``scale · (cos(image, pos) − cos(image, neg))``; its sigmoid is the uncalibrated P(yes) the model has
always reported. A :class:`Calibration` maps that logit to a calibrated probability (Platt scaling, or
isotonic regression when there are enough rows) and holds an operating point per label, chosen on the same
validation rows by a rule (``mcc`` by default, ``youden``, ``f1``, ``sensitivity=0.95``, ``specificity=0.9``,
``fixed=0.5``). It is stored in the checkpoint under ``calibration`` as plain data (no pickled objects).
A label with too few validation positives or negatives keeps the uncalibrated sigmoid and a fixed
threshold, and says so (``calibrated: false``) wherever it is shown.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.special import expit as sigmoid  # noqa: F401 (the logistic function, used across eval)

from cxrclip.exceptions import UserError
from cxrclip.io import file_sha256

VERSION = 1
METHODS = ("platt", "isotonic")
RULE_NAMES = ("mcc", "youden", "f1", "sensitivity", "specificity", "fixed")


class CalibrationError(UserError, ValueError):
    """A calibration that cannot be fitted or read (bad rule, no labels, wrong version)."""


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``"mcc"`` → ("mcc", None); ``"sensitivity=0.95"`` → ("sensitivity", 0.95)."""
    name, _, value = str(rule).partition("=")
    name = name.strip()
    if name not in RULE_NAMES:
        raise CalibrationError(
            f"unknown operating-point rule {rule!r}; use one of mcc, youden, f1, "
            "sensitivity=0.95, specificity=0.9, fixed=0.5"
        )
    needs_value = name in ("sensitivity", "specificity", "fixed")
    if needs_value != bool(value):
        raise CalibrationError(f"rule {rule!r}: {name} {'needs' if needs_value else 'takes no'} '=value'")
    if not needs_value:
        return name, None
    target = float(value)
    if not 0.0 <= target <= 1.0:
        raise CalibrationError(f"rule {rule!r}: the value must lie in [0, 1]")
    return name, target


def confusion_by_threshold(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each distinct score t (descending) the counts of ``p >= t``: (t, TP, FP, FN, TN)."""
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order].astype(np.int64)
    last_of_value = np.r_[np.nonzero(np.diff(p_sorted))[0], p_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_value]
    fp = (last_of_value + 1) - tp
    n_pos, n_neg = int(y_sorted.sum()), int(y_sorted.size - y_sorted.sum())
    return p_sorted[last_of_value], tp, fp, n_pos - tp, n_neg - fp


def _mcc(tp, fp, fn, tn) -> np.ndarray:
    tp, fp, fn, tn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(denom), where=denom > 0)


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str) -> float:
    """The threshold on ``p`` (predict yes when ``p >= threshold``) that the rule picks on these rows.

    ``mcc`` / ``youden`` / ``f1``: the best value of the criterion (ties: the highest threshold, i.e. the
    fewest YES). ``sensitivity=s``: the highest threshold whose sensitivity is at least ``s`` (so the best
    specificity there); ``specificity=s``: the lowest threshold whose specificity is at least ``s``.
    """
    name, target = parse_rule(rule)
    if name == "fixed":
        return float(target)
    y, p = np.asarray(y).astype(np.int64), np.asarray(p, dtype=np.float64)
    t, tp, fp, fn, tn = confusion_by_threshold(y, p)
    sens = tp / max(tp[-1] + fn[-1], 1)
    spec = tn / max(tn[0] + fp[0], 1)
    if name == "sensitivity":
        return float(t[np.argmax(sens >= target - 1e-12)])
    if name == "specificity":
        ok = np.nonzero(spec >= target - 1e-12)[0]
        # no threshold reaches it (every score is shared by positives and negatives): say no to everything
        return float(t[ok[-1]]) if ok.size else float(np.nextafter(t[0], np.inf))
    if name == "youden":
        score = sens + spec - 1
    elif name == "f1":
        score = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=(2 * tp + fp + fn) > 0)
    else:
        score = _mcc(tp, fp, fn, tn)
    return float(t[np.argmax(score >= score.max() - 1e-12)])


def fit_platt(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """P(yes) = sigmoid(a · logit + b), fitted by (lightly regularized) logistic regression."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
    lr.fit(np.asarray(logits, dtype=np.float64).reshape(-1, 1), y.astype(int))
    return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}


def fit_isotonic(logits: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """A non-decreasing step map logit → P(yes), stored as its knots (applied by linear interpolation)."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logits, y.astype(float))
    return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}


@dataclass(frozen=True)
class LabelCalibration:
    """One label's map logit → probability and its operating point (on the probability)."""

    method: str  # platt | isotonic | none (uncalibrated: the model's own sigmoid)
    params: dict
    threshold: float
    rule: str
    n_pos: int = 0
    n_neg: int = 0
    note: str = ""

    @classmethod
    def fallback(cls, threshold: float, note: str, n_pos: int = 0, n_neg: int = 0) -> LabelCalibration:
        """No calibration: the model's own sigmoid and a fixed threshold, flagged by ``note``."""
        return cls("none", {}, threshold, f"fixed={threshold:g}", n_pos, n_neg, note)

    @property
    def calibrated(self) -> bool:
        return self.method != "none"

    def probability(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if self.method == "platt":
            return sigmoid(self.params["a"] * logits + self.params["b"])
        if self.method == "isotonic":
            return np.interp(logits, self.params["x"], self.params["y"])
        return sigmoid(logits)


@dataclass(frozen=True)
class CalibrationSettings:
    """The ``calibration`` config section."""

    enabled: bool = True
    method: str = "platt"
    rule: str = "mcc"
    rules: Mapping[str, str] = field(default_factory=dict)  # per-label overrides, e.g. {Pneumothorax: sensitivity=0.95}
    min_positives: int = 5
    min_negatives: int = 5
    isotonic_min_positives: int = 50  # isotonic steps need many rows; below this Platt is used (and noted)
    fallback_threshold: float = 0.5
    precision: str = "fp32"  # the image encoder's while the logits are computed: calibrate as the model will answer

    @classmethod
    def from_mapping(cls, section: Mapping | None) -> CalibrationSettings:
        """From the ``calibration`` config section (plain data)."""
        section = dict(section or {})
        unknown = set(section) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise CalibrationError(f"calibration: unknown keys {sorted(unknown)}")
        settings = cls(**{**section, "rules": dict(section.get("rules") or {})})
        if settings.method not in METHODS:
            raise CalibrationError(f"calibration.method must be one of {METHODS}, got {settings.method!r}")
        if settings.precision not in ("fp32", "bf16"):
            raise CalibrationError(f"calibration.precision must be fp32 or bf16, got {settings.precision!r}")
        for rule in [settings.rule, *settings.rules.values()]:
            parse_rule(rule)
        return settings

    def rule_for(self, label: str) -> str:
        return self.rules.get(label, self.rule)


@dataclass(frozen=True)
class Calibration:
    """Per-label calibration of one checkpoint, with the facts of the data it was fitted on."""

    labels: dict[str, LabelCalibration]
    fitted_on: dict = field(default_factory=dict)  # path, sha256, rows, dataset; empty = never fitted
    prompts_sha256: str | None = None
    created: str = ""
    version: int = VERSION

    @property
    def precision(self) -> str | None:
        """The image encoder's precision the calibration was fitted under (fp32 before it was recorded); None when
        never fitted."""
        return (self.fitted_on.get("precision") or "fp32") if self.fitted_on else None

    # -- (de)serialization: plain data, loadable with weights_only=True ------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "created": self.created,
            "score": "scale * (cos(image, mean positive prompt) - cos(image, mean negative prompt))",
            "fitted_on": dict(self.fitted_on),
            "prompts_sha256": self.prompts_sha256,
            "labels": {name: asdict(c) for name, c in self.labels.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Calibration:
        if int(data.get("version", 0)) != VERSION:
            raise CalibrationError(f"calibration version {data.get('version')!r} is not supported (expected {VERSION})")
        labels = {name: LabelCalibration(**c) for name, c in data["labels"].items()}
        return cls(labels, dict(data.get("fitted_on") or {}), data.get("prompts_sha256"), data.get("created", ""))

    @classmethod
    def uncalibrated(cls, names: Sequence[str], threshold: float = 0.5, note: str = "no calibration") -> Calibration:
        """The explicit fallback: the model's own sigmoid, a fixed threshold, every label flagged."""
        return cls({n: LabelCalibration.fallback(threshold, note) for n in names})

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted_on)

    def for_labels(self, names: Sequence[str], fallback_threshold: float = 0.5) -> Calibration:
        """The same calibration over ``names``; labels it does not know get the flagged fallback."""
        missing = LabelCalibration.fallback(fallback_threshold, "not in the calibration")
        labels = {n: self.labels.get(n, missing) for n in names}
        return Calibration(labels, self.fitted_on, self.prompts_sha256, self.created, self.version)

    def over(self, base: Calibration) -> Calibration:
        """A site's calibration on top of the model's own: a label the site has too few reviewed cases to
        calibrate keeps ``base``'s calibration and operating point (said in its note), instead of falling back to
        the raw score."""
        labels = {}
        for name, c in self.labels.items():
            kept = base.labels.get(name)
            if c.calibrated or kept is None or not kept.calibrated:
                labels[name] = c
            else:
                note = f"the model's own calibration kept: {c.note or 'too few reviewed cases at the site'}"
                labels[name] = replace(kept, note=note)
        return Calibration(labels, self.fitted_on, self.prompts_sha256, self.created, self.version)

    # -- use --------------------------------------------------------------------------------------------
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(rows, labels) logits in this calibration's label order → calibrated probabilities."""
        logits = np.asarray(logits, dtype=np.float64)
        return np.stack([c.probability(logits[:, j]) for j, c in enumerate(self.labels.values())], axis=1)

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([c.threshold for c in self.labels.values()], dtype=np.float64)

    def fitted_on_file(self, path: str | Path) -> bool:
        """Whether ``path`` holds the very data this calibration was fitted on (same content hash)."""
        digest = self.fitted_on.get("sha256")
        return bool(digest) and Path(path).is_file() and file_sha256(path) == digest


def fit_label(logits: np.ndarray, y: np.ndarray, rule: str, settings: CalibrationSettings) -> LabelCalibration:
    """Calibrate one label on rows with y in {0, 1} (others are left out)."""
    keep = (y == 0) | (y == 1)
    logits, y = np.asarray(logits, dtype=np.float64)[keep], y[keep].astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos < settings.min_positives or n_neg < settings.min_negatives:
        note = (
            f"uncalibrated: {n_pos} positive / {n_neg} negative validation rows "
            f"(needs {settings.min_positives} / {settings.min_negatives})"
        )
        return LabelCalibration.fallback(settings.fallback_threshold, note, n_pos, n_neg)
    method, note = settings.method, ""
    if method == "isotonic" and n_pos < settings.isotonic_min_positives:
        method, note = "platt", f"isotonic needs {settings.isotonic_min_positives} positives; Platt used"
    params = fit_platt(logits, y) if method == "platt" else fit_isotonic(logits, y)
    if method == "platt" and params["a"] <= 0:
        note = "the score does not rank this label on the validation data (Platt slope <= 0)"
    probe = LabelCalibration(method, params, 0.5, rule, n_pos, n_neg, note)
    threshold = choose_threshold(y, probe.probability(logits), rule)
    return LabelCalibration(method, params, threshold, rule, n_pos, n_neg, note)


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    settings: CalibrationSettings,
    fitted_on: Mapping | None = None,
    prompts_sha256: str | None = None,
) -> Calibration:
    """Calibrate every label on validation logits (rows × labels) and labels (1, 0, -1 = left out)."""
    if logits.shape != labels.shape or logits.shape[1] != len(names):
        raise CalibrationError(f"logits {logits.shape} and labels {labels.shape} do not match {len(names)} labels")
    per_label = {
        name: fit_label(logits[:, j], labels[:, j], settings.rule_for(name), settings) for j, name in enumerate(names)
    }
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Calibration(per_label, dict(fitted_on or {"rows": int(labels.shape[0])}), prompts_sha256, created)


# -- how good a probability is --------------------------------------------------------------------------
def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean probability, observed rate, rows) of each non-empty equal-width probability bin."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [(float(p[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]  # fmt: skip


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE: the row-weighted mean |observed rate − mean probability| over the reliability bins."""
    return float(sum(n * abs(rate - mean) for mean, rate, n in reliability_bins(y, p, bins)) / max(np.size(y), 1))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)))


SITE_CALIBRATIONS = "site_calibrations"  # the key, in a checkpoint and a bundle, of {site: calibration}


def site_calibrations(stored: Mapping | None) -> dict:
    """``{site: calibration dict}`` stored beside a model's own calibration (``cxrclip calibrate --site``)."""
    return dict((stored or {}).get(SITE_CALIBRATIONS) or {})


def with_site_calibration(stored: Mapping, site: str, calibration: Calibration) -> dict:
    """A copy of a checkpoint's entries with ``site``'s calibration stored (the model's own is untouched)."""
    return {**stored, SITE_CALIBRATIONS: {**site_calibrations(stored), site: calibration.to_dict()}}


def stored_calibration(checkpoint: Mapping, names: Sequence[str], fallback_threshold: float = 0.5) -> Calibration:
    """The checkpoint's calibration over ``names``, or the flagged uncalibrated fallback."""
    data = checkpoint.get("calibration")
    if not data:
        note = "the checkpoint has no calibration: run `cxrclip calibrate`"
        return Calibration.uncalibrated(names, fallback_threshold, note=note)
    return Calibration.from_dict(data).for_labels(names, fallback_threshold)
