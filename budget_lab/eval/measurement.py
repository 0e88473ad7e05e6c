"""A score with its uncertainty, and how k repeats of one score combine. Light (numpy and scipy
only): sweeps and reports decide with these without importing torch; `budget_lab.eval.stats`
makes them from features."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.stats

from budget_lab.errors import ConfigError

__all__ = ["Measurement", "mean_over_repeats", "normal_quantile"]


def normal_quantile(confidence: float, two_sided: bool = True) -> float:
    """z such that a standard normal lies within ±z (two-sided) or below z with `confidence`."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence={confidence!r} is invalid: expected a value in (0, 1)")
    p = (1 + confidence) / 2 if two_sided else confidence
    return statistics.NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class Measurement:
    """A score with its uncertainty: `value` in [`lo`, `hi`] at `confidence`, from `n` samples.

    `se` is the standard error of `value`; `method` says how the interval was made
    (jackknife-20, bootstrap-500, t over 3 repeats, ...).
    """

    value: float
    lo: float
    hi: float
    se: float
    n: int
    method: str
    confidence: float = 0.95

    def overlaps(self, other: Measurement) -> bool:
        """Whether the two intervals share a point: the two scores are not told apart."""
        return self.lo <= other.hi and other.lo <= self.hi

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(**{k: d[k] for k in ("value", "lo", "hi", "se", "n", "method", "confidence")})

    def text(self, digits: int = 1) -> str:
        """``212.4 [205.1, 219.7] N=256``."""
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] N={self.n}"


def mean_over_repeats(measurements: Sequence[Measurement], confidence: float = 0.95) -> Measurement:
    """The mean of k repeats (seeds) of one configuration, with an interval that holds both the
    seed-to-seed spread and each score's own sampling noise: se^2 = max(s^2, mean se_i^2) / k,
    with Student's t at k - 1 degrees of freedom (k = 1: the one measurement as it is)."""
    if not measurements:
        raise ValueError("mean_over_repeats needs at least one measurement")
    k = len(measurements)
    if k == 1:
        return measurements[0]
    values = np.array([m.value for m in measurements])
    spread = float(values.var(ddof=1))
    own = float(np.mean([m.se**2 for m in measurements]))
    se = math.sqrt(max(spread, own) / k)
    t = float(scipy.stats.t.ppf((1 + confidence) / 2, k - 1))
    mean = float(values.mean())
    n = sum(m.n for m in measurements)
    return Measurement(mean, mean - t * se, mean + t * se, se, n, f"t over {k} repeats", confidence)
