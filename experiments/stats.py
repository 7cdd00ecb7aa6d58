"""Paired statistics for the experiment reports: paired t-test, its 95% CI, Bonferroni.

The reports compare an arm with the control over the same fine-tuning seeds (same seed = same
data order and augmentation), so each seed gives one paired difference d_i. With n seeds:

* mean and sample SD (n - 1 in the denominator) of the d_i,
* t = mean / (SD / sqrt(n)) on n - 1 degrees of freedom, the two-sided p-value
  P(|T| >= |t|),
* the 95% confidence interval mean ± t_{0.975, n-1} * SD / sqrt(n).

The t distribution's CDF is computed from the closed forms for an integer number of degrees of
freedom (Abramowitz & Stegun 26.7.3-26.7.4, a finite sum in theta = atan(t / sqrt(df))), so the
p-values are exact to float precision without scipy; quantiles by bisection on it. Only integer
degrees of freedom occur here (n - 1 seeds).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_within(t: float, df: int) -> float:
    """P(|T| < |t|) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return min(1.0, s * total)
    if df == 1:
        return 2 * theta / math.pi
    # (2/pi) * (theta + sin(theta) cos(theta) (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return min(1.0, 2 / math.pi * (theta + s * math.cos(theta) * total))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|)."""
    return max(0.0, 1.0 - t_within(t, df))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on :func:`t_within`."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    target = abs(2 * q - 1)  # P(|T| < x) = |2q - 1| for the q-quantile x
    lo, hi = 0.0, 1.0
    while t_within(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_within(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    x = (lo + hi) / 2
    return x if q > 0.5 else -x


@dataclass(frozen=True)
class Paired:
    """Summary of n paired differences: mean, sample SD, t, two-sided p, 95% CI."""

    diffs: tuple[float, ...]
    mean: float
    sd: float
    t: float
    p: float
    ci: tuple[float, float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def better(self) -> int:
        """How many differences are above zero."""
        return sum(d > 0 for d in self.diffs)

    @property
    def two_sd(self) -> bool:
        """The pre-registered round-two rule: mean > 2 SD (t > 2 sqrt(n), p < 0.074 at n = 3)."""
        return self.mean > 2 * self.sd


def paired(a: list[float], b: list[float], level: float = 0.95) -> Paired:
    """Paired t-test of ``a - b`` (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return from_diffs([x - y for x, y in zip(a, b)], level)


def from_diffs(diffs: list[float], level: float = 0.95) -> Paired:
    """Paired t-test of given differences (at least 2)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences, got {n}")
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    if se == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    p = t_two_sided_p(t, n - 1)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return Paired(tuple(diffs), mean, sd, t, p, (mean - half, mean + half))


def bonferroni(alpha: float, comparisons: int) -> float:
    """The per-comparison threshold that keeps the family-wise error at ``alpha``."""
    if comparisons < 1:
        raise ValueError(f"need at least one comparison, got {comparisons}")
    return alpha / comparisons


def fmt_p(p: float) -> str:
    """p with two significant digits (0.046, 0.030, 0.11, 0.00017); below 1e-4 '< 0.0001'."""
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:#.2g}" if p < 0.1 else f"{p:.2f}"


def fmt_ci(ci: tuple[float, float], digits: int = 2) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
