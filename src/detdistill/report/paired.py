"""Paired-seed verdicts: judge a method by its per-seed gains over the baseline.

In a bench, seed ``k`` gives every method the same student initialisation and the same
training crops (tested), so the per-seed difference ``g_k = m_k - b_k`` removes the
seed-to-seed swing that both runs share. The verdict uses those differences:

- mean gain ``ḡ``, its sample std ``s``, wins / losses (seeds with ``g_k > 0`` / ``< 0``);
- a one-sided paired t-test: ``t = ḡ / (s / √n)`` with ``n - 1`` degrees of freedom;
- **rule:** *beats* when the one-sided p-value of "gain > 0" is below ``alpha`` (0.05),
  i.e. the lower end of the one-sided 95 % confidence interval of the mean gain is above 0;
  *worse* when the same holds for "gain < 0"; otherwise *within noise*. Fewer than 3 paired
  seeds make no claim.

A t-test is used rather than Wilcoxon's signed-rank test because with 5 seeds the latter
reaches p < 0.05 only when all five gains are positive (one-sided p = 1/32; one small loss
makes it 2/32 = 0.0625): it can only ever say "every seed won", whatever the sizes. The
wins/losses count is printed beside the t-test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

__all__ = ["PairedResult", "paired_verdict"]


@dataclass(frozen=True)
class PairedResult:
    """The paired comparison of one method with the baseline on one metric."""

    n: int
    mean_gain: float
    std_gain: float
    wins: int
    losses: int
    t: float
    p_greater: float
    p_less: float
    verdict: str  # "beats" | "worse" | "within noise" | "no claim"
    gains: dict[int, float]

    def describe(self) -> str:
        if self.n == 0:
            return "no claim (no seed ran for both)"
        base = (f"paired gain {self.mean_gain:+.1f} ± {self.std_gain:.1f} over {self.n} seeds, "
                f"{self.wins} wins / {self.losses} losses")
        if self.verdict == "no claim":
            return f"no claim (fewer than 3 paired seeds): {base}"
        p = self.p_greater if self.mean_gain >= 0 else self.p_less
        return f"{self.verdict}: {base}, one-sided paired t-test p = {p:.3f}"


def paired_verdict(baseline: dict[int, float], method: dict[int, float], alpha: float = 0.05,
                   min_seeds: int = 3) -> PairedResult:
    """Compare ``method`` with ``baseline``, both ``{seed: metric value}``, on their common seeds.

    Seeds with a non-finite value on either side are left out (an undefined AP is no evidence).
    """
    seeds = sorted(s for s in set(baseline) & set(method)
                   if math.isfinite(baseline[s]) and math.isfinite(method[s]))
    gains = {s: method[s] - baseline[s] for s in seeds}
    g = list(gains.values())
    n = len(g)
    if n == 0:
        return PairedResult(0, math.nan, math.nan, 0, 0, math.nan, math.nan, math.nan, "no claim", gains)
    mean = sum(g) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / (n - 1)) if n > 1 else 0.0
    wins, losses = sum(x > 0 for x in g), sum(x < 0 for x in g)
    if n < 2:
        return PairedResult(n, mean, std, wins, losses, math.nan, math.nan, math.nan, "no claim", gains)
    if std == 0.0:  # identical gains on every seed: the sign decides, the test is degenerate
        t = math.copysign(math.inf, mean) if mean else 0.0
        p_gt, p_lt = (0.0, 1.0) if mean > 0 else (1.0, 0.0) if mean < 0 else (1.0, 1.0)
    else:
        t = mean / (std / math.sqrt(n))
        p_gt = float(stats.t.sf(t, df=n - 1))
        p_lt = float(stats.t.cdf(t, df=n - 1))
    if n < min_seeds:
        verdict = "no claim"
    elif p_gt < alpha:
        verdict = "beats"
    elif p_lt < alpha:
        verdict = "worse"
    else:
        verdict = "within noise"
    return PairedResult(n, mean, std, wins, losses, t, p_gt, p_lt, verdict, gains)
