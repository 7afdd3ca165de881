"""Stage 5e: how sure a val top-1 is. MAMe's val split has 50 images per class (1,450): near 80% top-1 a single
run's 95% interval is about +-2 points, so a 1-point difference between two runs is noise. Every val top-1
the records show comes with its interval, and comparisons say whether a difference is conclusive.

- one run: the Wilson score interval of a binomial proportion (k right of n);
- two runs: the interval of the difference of two proportions (Newcombe's method from the two Wilson
  intervals); conclusive when it excludes 0;
- several seeds of one setting: mean +- the t interval of the seeds' values.
"""

from __future__ import annotations

import math

Z95 = 1.959964
# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); above 30 the normal's is close enough.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of a proportion ``p`` measured on ``n`` samples."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """(p2 - p1, low, high): the difference of two proportions with its 95% interval (Newcombe's hybrid score)."""
    l1, u1 = wilson(p1, n1)
    l2, u2 = wilson(p2, n2)
    d = p2 - p1
    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval); the half-width is inf for a single value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.inf
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, (_T95[n - 2] if n - 1 <= len(_T95) else Z95) * sd / math.sqrt(n)


def pct(p: float | None, n: int | None = None) -> str:
    """'71.3%' or, with the sample count, '71.3% [68.9, 73.6]'."""
    if p is None:
        return "-"
    if not n:
        return f"{100 * p:.1f}%"
    lo, hi = wilson(p, n)
    return f"{100 * p:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def verdict(p1: float, n1: int, p2: float, n2: int) -> str:
    """A sentence on whether the second value differs from the first beyond noise."""
    d, lo, hi = difference(p1, n1, p2, n2)
    span = f"{100 * d:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if lo > 0 or hi < 0:
        return f"{span}: conclusive ({'better' if d > 0 else 'worse'})"
    return f"{span}: not conclusive (the interval includes 0)"
