"""The change-control plan: a YAML file declared before the challenger exists, its SHA-256 recorded with every
comparison. What may change (the labels in scope), how a challenger is judged (the metrics, each a non-inferiority
margin or a superiority target), how much evidence is needed (reviewed positives and negatives per label), and the
test (one-sided at ``alpha``, Bonferroni over labels × criteria unless ``correction: none``)::

    labels: [Endotracheal tube in place, Pneumothorax]   # in scope; "all": every label both models answer
    min_cases: {positives: 10, negatives: 10}            # per label, on cases the challenger never trained on
    alpha: 0.05
    correction: bonferroni                               # or none
    bootstrap: {resamples: 2000, seed: 0}                # paired, by patient (by image where no patient is known)
    criteria:
      - {metric: auroc, non_inferiority: 0.02}           # challenger − champion > −0.02 (paired DeLong)
      - {metric: auroc, superiority: 0.0, labels: any}   # > 0 for at least one label
      - {metric: sensitivity, non_inferiority: 0.05}     # at each model's own operating point
      - {metric: specificity, non_inferiority: 0.05}
      - {metric: ece, non_inferiority: 0.02}             # lower is better: challenger − champion < +0.02
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cxrclip.exceptions import ConfigError

METRICS = ("auroc", "sensitivity", "specificity", "ece")
LOWER_IS_BETTER = {"ece"}


@dataclass(frozen=True)
class Criterion:
    metric: str
    kind: str  # non_inferiority | superiority
    margin: float  # non-inferiority: the loss allowed; superiority: the gain required
    labels: str = "all"  # all: every label in scope must pass; any: at least one

    def describe(self) -> str:
        better = "lower" if self.metric in LOWER_IS_BETTER else "higher"
        if self.kind == "non_inferiority":
            return f"{self.metric} not worse by more than {self.margin:g} ({better} is better), {self.labels} labels"
        return f"{self.metric} better by more than {self.margin:g} ({better} is better), {self.labels} labels"


@dataclass(frozen=True)
class ChangePlan:
    labels: tuple[str, ...] | None  # None: every label both models answer
    criteria: tuple[Criterion, ...]
    min_positives: int = 10
    min_negatives: int = 10
    alpha: float = 0.05
    correction: str = "bonferroni"
    resamples: int = 2000
    seed: int = 0
    sha256: str = ""
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> ChangePlan:
        import yaml

        path = Path(path)
        try:
            raw = path.read_bytes()
            data = yaml.safe_load(raw)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--plan {path}: cannot read a YAML change-control plan ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--plan {path}: expected a mapping (labels, criteria, ...), see docs/USER_GUIDE.md")
        return cls.from_mapping(data, sha256=hashlib.sha256(raw).hexdigest(), path=str(path))

    @classmethod
    def from_mapping(cls, data: dict, sha256: str = "", path: str = "plan") -> ChangePlan:
        known = {"labels", "criteria", "min_cases", "alpha", "correction", "bootstrap"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        labels = data.get("labels", "all")
        if labels != "all" and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"{path}: labels must be a list of label names or 'all'")
        criteria = [_criterion(c, path, i) for i, c in enumerate(data.get("criteria") or [])]
        if not criteria:
            raise ConfigError(f"{path}: a plan needs at least one criterion (metric + non_inferiority or superiority)")
        cases = data.get("min_cases") or {}
        boot = data.get("bootstrap") or {}
        alpha = float(data.get("alpha", 0.05))
        if not 0 < alpha < 0.5:
            raise ConfigError(f"{path}: alpha {alpha} must be between 0 and 0.5 (one-sided)")
        correction = str(data.get("correction", "bonferroni"))
        if correction not in ("bonferroni", "none"):
            raise ConfigError(f"{path}: correction must be bonferroni or none, got {correction!r}")
        return cls(
            labels=None if labels == "all" else tuple(labels), criteria=tuple(criteria),
            min_positives=int(cases.get("positives", 10)), min_negatives=int(cases.get("negatives", 10)),
            alpha=alpha, correction=correction, resamples=int(boot.get("resamples", 2000)),
            seed=int(boot.get("seed", 0)), sha256=sha256, path=path,
        )  # fmt: skip


def _criterion(c, path: str, i: int) -> Criterion:
    where = f"{path}: criteria[{i}]"
    if not isinstance(c, dict) or c.get("metric") not in METRICS:
        raise ConfigError(f"{where}: needs a metric, one of {list(METRICS)}")
    kinds = [k for k in ("non_inferiority", "superiority") if k in c]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of non_inferiority (a margin) or superiority (a target)")
    margin = float(c[kinds[0]])
    if margin < 0:
        raise ConfigError(f"{where}: {kinds[0]} {margin} must be ≥ 0")
    labels = str(c.get("labels", "all"))
    if labels not in ("all", "any"):
        raise ConfigError(f"{where}: labels must be all or any, got {labels!r}")
    return Criterion(c["metric"], kinds[0], margin, labels)
