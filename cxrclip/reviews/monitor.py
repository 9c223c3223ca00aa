"""What ``/monitor`` shows, computed from the prediction log and the reviews (plain Python, no plotting here — the page
draws it from ``/v1/monitor``):

- per label and per day (or week): how many images were analysed, the share called YES, the mean probability (a
  score shift shows here before it crosses a threshold), and the band that share is
  expected to stay in — the validation prevalence ± its binomial 95 % range for that many images; a period whose share
  leaves the band is flagged;
- per day: the share refused by the input gate and the mean gate score (a shift in what arrives);
- per label, from the reviews nobody corrected: sensitivity and PPV of the model's calls against the reviewers'
  verdicts (``unsure`` left out), with Wilson 95 % intervals.
"""

from __future__ import annotations

import datetime
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from cxrclip.scoring.intervals import Z95, wilson


def expected_band(prevalence: float, n: int) -> tuple[float, float]:
    """Where the share of YES among n images is expected to fall if it matches the validation prevalence: the
    binomial 95 % range (normal approximation, at least one image's worth wide)."""
    half = max(Z95 * math.sqrt(prevalence * (1 - prevalence) / max(n, 1)), 1.0 / max(n, 1))
    return max(0.0, prevalence - half), min(1.0, prevalence + half)


def period_of(when: str, period: str) -> str:
    day = datetime.datetime.fromisoformat(when).astimezone(datetime.timezone.utc).date()
    if period == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return day.isoformat()


def monitor_report(
    predictions: Sequence[Mapping],
    reviews: Sequence[Mapping],
    labels: Sequence[str],
    prevalence: Mapping[str, float | None],
    period: str = "day",
) -> dict:
    """The monitor's numbers. ``predictions``: the log (``created_at``, ``analysed``, ``gate_score``, ``labels``:
    {label: [probability, present]}); ``reviews``: the current reviews (``shown``, ``verdicts``); ``prevalence``: per
    label the validation prevalence (None: unknown, no band)."""
    if period not in ("day", "week"):
        raise ValueError(f"period must be day or week, not {period!r}")
    by_period: dict[str, list[Mapping]] = defaultdict(list)
    for p in predictions:
        by_period[period_of(p["created_at"], period)].append(p)
    periods = sorted(by_period)
    intake = []
    for key in periods:
        rows = by_period[key]
        scores = [r["gate_score"] for r in rows if r.get("gate_score") is not None]
        intake.append({
            "period": key, "images": len(rows), "refused": sum(not r["analysed"] for r in rows),
            "mean_gate_score": round(sum(scores) / len(scores), 4) if scores else None,
        })  # fmt: skip
    per_label = {}
    for label in labels:
        series, flagged = [], []
        p0 = prevalence.get(label)
        for key in periods:
            seen = [r["labels"][label] for r in by_period[key] if r["analysed"] and label in r["labels"]]
            n, yes = len(seen), sum(bool(called) for _, called in seen)
            point = {"period": key, "analysed": n, "yes": yes, "share": round(yes / n, 4) if n else None,
                     "mean_probability": round(sum(p for p, _ in seen) / n, 4) if n else None}  # fmt: skip
            if n and p0 is not None:
                low, high = expected_band(p0, n)
                point["band"] = [round(low, 4), round(high, 4)]
                point["flag"] = not (low <= yes / n <= high)
                if point["flag"]:
                    flagged.append(key)
            series.append(point)
        per_label[label] = {
            "prevalence": p0,
            "series": series,
            "flagged": flagged,
            "agreement": agreement(reviews, label),
        }
    return {"period": period, "periods": periods, "intake": intake, "labels": per_label,
            "reviews": len(reviews), "predictions": len(predictions)}  # fmt: skip


def agreement(reviews: Sequence[Mapping], label: str) -> dict:
    """The model's call against the reviewers' verdicts for one label: counts, sensitivity and PPV with intervals."""
    tp = fp = fn = tn = 0
    for r in reviews:
        verdict = (r.get("verdicts") or {}).get(label)
        shown = (r.get("shown") or {}).get(label)
        if verdict not in ("present", "absent") or shown is None:
            continue
        called, truth = bool(shown["present"]), verdict == "present"
        tp += called and truth
        fp += called and not truth
        fn += truth and not called
        tn += not called and not truth
    out = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "reviewed": tp + fp + fn + tn}
    for name, k, n in (("sensitivity", tp, tp + fn), ("ppv", tp, tp + fp)):
        interval = wilson(k, n)
        out[name] = None if interval is None else {"value": round(k / n, 4), "ci95": [round(x, 4) for x in interval]}
    return out


def validation_prevalence(calibration) -> dict[str, float | None]:
    """Per label n_pos / (n_pos + n_neg) of the validation data the calibration was fitted on (None when unknown)."""
    out = {}
    for name, c in calibration.labels.items():
        total = c.n_pos + c.n_neg
        out[name] = round(c.n_pos / total, 4) if total else None
    return out


def shadow_report(answers: Sequence[Mapping], shadows: Sequence[Mapping], reviews: Sequence[Mapping],
                  labels: Sequence[str]) -> dict:  # fmt: skip
    """The champion against a challenger answering in shadow, on the images both answered: per label how often they
    agree (with a Wilson interval), each one's YES share, and on the reviewed images each one's agreement with the
    reviewers (the champion's call as shown; the challenger's as it would have been)."""
    champion = {p["image_sha256"]: p for p in answers if p["analysed"]}
    shadow = {p["image_sha256"]: p for p in shadows if p["analysed"]}
    both = sorted(set(champion) & set(shadow))
    verdicts = {r["image_sha256"]: r.get("verdicts") or {} for r in reviews}
    out = {"images": len(both), "model": shadows[0]["model_sha256"] if shadows else None, "labels": {}}
    for label in labels:
        pairs = [(bool(champion[s]["labels"][label][1]), bool(shadow[s]["labels"][label][1]), s) for s in both
                 if label in champion[s]["labels"] and label in shadow[s]["labels"]]  # fmt: skip
        n, agree = len(pairs), sum(a == b for a, b, _ in pairs)
        judged = [(a, b, verdicts[s][label] == "present") for a, b, s in pairs
                  if verdicts.get(s, {}).get(label) in ("present", "absent")]  # fmt: skip
        row = {"images": n, "agree": agree, "agreement": _rate(agree, n),
               "champion_yes": _rate(sum(a for a, _, _ in pairs), n),
               "challenger_yes": _rate(sum(b for _, b, _ in pairs), n), "reviewed": len(judged),
               "champion_agrees_with_reviewers": _rate(sum(a == t for a, _, t in judged), len(judged)),
               "challenger_agrees_with_reviewers": _rate(sum(b == t for _, b, t in judged), len(judged))}  # fmt: skip
        out["labels"][label] = row
    return out


def _rate(k: int, n: int) -> dict | None:
    interval = wilson(k, n)
    return None if interval is None else {"value": round(k / n, 4), "ci95": [round(x, 4) for x in interval]}
