"""Confidence intervals of proportions, for every place that reports a rate (the gate's evidence, the monitor)."""

from __future__ import annotations

import math

Z95 = 1.959964  # the two-sided 95 % normal quantile


def wilson(k: int, n: int, digits: int | None = None, z: float = Z95) -> list[float] | None:
    """The Wilson score interval (95 % by default) of ``k`` successes in ``n``, ``[low, high]``, rounded to ``digits``
    when given; None when n = 0."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return [round(low, digits), round(high, digits)] if digits is not None else [low, high]
