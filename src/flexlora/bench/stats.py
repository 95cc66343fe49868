"""Means with Student-t confidence intervals, and paired differences, with no SciPy.

A bench has a handful of seeds, so the interval must use Student's t, not the normal: with
3 seeds the 95 % factor is 4.30, not 1.96. The t distribution's CDF has a closed form for an
integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4); its quantile is found by
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Estimate",
    "mean_ci",
    "paired_diff",
    "paired_t_test",
    "t_cdf_two_sided",
    "t_quantile",
]


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        # (2/pi) * (theta + sin(theta) * (cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...))
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total)
    # sin(theta) * (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (p in (0.5, 1)), e.g. ``t_quantile(0.975, 2)`` = 4.303."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    target = 2 * p - 1  # P(|T| <= q)
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values and the half-width of its confidence interval (NaN when n < 2)."""

    mean: float
    half_width: float
    n: int
    std: float

    def format(self, digits: int = 4, signed: bool = False) -> str:
        if self.n == 0:
            return "—"
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        if self.n > 1:
            text += f" ± {self.half_width:.{digits}f}"
        return text


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean and the Student-t CI half-width ``t_{(1+level)/2, n-1} * s / sqrt(n)``."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, math.nan, 1, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Estimate(mean, half, n, std)


def paired_diff(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> tuple[Estimate, int]:
    """Mean of ``a[s] - b[s]`` over the seeds both have, its CI, and how many seeds a wins."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return mean_ci(diffs, level), sum(d > 0 for d in diffs)


def paired_t_test(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int]:
    """Paired two-sided t-test of ``a[s] - b[s]`` over the shared seeds: (t, p, n).

    NaN for fewer than 2 pairs. With no spread in the differences, p is 0 when their mean is
    not zero and 1 when every pair is equal (two runs that are the same computation).
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan, n
    mean = sum(diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0:
        return (math.copysign(math.inf, mean) if mean else 0.0), (0.0 if mean else 1.0), n
    t = mean / (std / math.sqrt(n))
    return t, 1.0 - t_cdf_two_sided(abs(t), n - 1), n
