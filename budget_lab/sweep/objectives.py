"""Sweep objectives: how a finished trial is scored, written as the formulas they compute.

Notation, for one trial:

    F    its FID: eval.fid_samples images generated with its EMA weights (the sweep's sampler
         steps and guidance) against the validation split
    C    its cost in dollars: every segment of its run, priced by the ledger
    B    the per-trial budget, trial_budget_usd
    F0   the FID of the untrained model with the same N, reference and sampler settings; the
         controller computes it once per sweep, from the sweep's base trial config

| objective        | directions         | value(s)              | read it as                      |
|------------------|--------------------|-----------------------|---------------------------------|
| `pareto`         | minimize, minimize | (F, C)                | the front of quality vs cost    |
| `fid_at_budget`  | minimize           | F, every trial at C≈B | the paper's equal-cost contest  |
| `fid_per_dollar` | maximize           | (F0 − F) / C          | FID points bought per dollar    |

`pareto` minimises F and C together (NSGA-II or multi-objective TPE). Its answer is the Pareto
front, the trials no other trial beats on both: trial i dominates trial j when F_i <= F_j and
C_i <= C_j with at least one of the two strict (`pareto_front`).

`fid_at_budget` gives every trial the same money: the controller sizes each trial's phases to
spend B and stops it there, so a cheaper configuration (a higher mask ratio) trains for more
steps. Then only F decides, which is the comparison of the paper's tables.

`fid_per_dollar` is (F0 − F) / C: how many FID points the trial's money bought, starting from
the untrained model. Why this form: it is in plain units (FID points per $); a trial that is no
better than noise scores 0 and one that made things worse scores below 0; and small-N FID is
biased upwards by roughly the same amount for every trial of a sweep (same N, same reference),
a bias that the difference F0 − F cancels to first order, where a ratio such as F0 / F would
not. Beware that FID gains shrink as training goes on: the first dollars buy the most points, so
this objective favours configurations that become decent cheaply, not the best FID. Use
`pareto` to see the whole trade-off.

Intermediate FIDs (the dollar-rung pruner) are always plain F, whatever the objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from budget_lab.errors import ConfigError

__all__ = [
    "OBJECTIVES",
    "FORMULAS",
    "objective_formula",
    "directions",
    "metric_names",
    "objective_values",
    "fid_per_dollar",
    "fid_at_budget",
    "pareto_front",
]

#: Objective name -> Optuna directions of its values.
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "pareto": ("minimize", "minimize"),
    "fid_at_budget": ("minimize",),
    "fid_per_dollar": ("maximize",),
}

# Objective name -> names of its values (Optuna metric names, report columns).
_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "pareto": ("fid", "cost_usd"),
    "fid_at_budget": ("fid",),
    "fid_per_dollar": ("fid_points_per_usd",),
}


def _objective_name(spec: Any) -> str:
    name = spec if isinstance(spec, str) else spec.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"objective={name!r} is invalid: expected one of {', '.join(OBJECTIVES)}")
    return name


#: One line per objective, as reports print it (F: FID, C: dollars spent, F0: untrained FID).
FORMULAS: dict[str, str] = {
    "pareto": "minimise (F, C) together: the Pareto front of FID against $",
    "fid_at_budget": "minimise F, every trial spending the same C = trial_budget_usd",
    "fid_per_dollar": "maximise (F0 - F) / C: FID points bought per dollar",
}


def objective_formula(spec: Any) -> str:
    """The objective's formula in words (reports, sweep.json)."""
    return FORMULAS[_objective_name(spec)]


def directions(spec: Any) -> list[str]:
    """Optuna study directions of an objective (a SweepSpec or the objective's name)."""
    return list(OBJECTIVES[_objective_name(spec)])


def metric_names(spec: Any) -> list[str]:
    """Names of the objective's values, in order (for `study.set_metric_names` and reports)."""
    return list(_METRIC_NAMES[_objective_name(spec)])


def fid_per_dollar(fid: float, cost_usd: float, fid_ref: float) -> float:
    """(F0 − F) / C: FID points gained over the untrained model, per dollar spent."""
    if not cost_usd > 0:
        raise ConfigError(
            f"cost_usd={cost_usd!r}: fid_per_dollar needs a positive cost; give the cluster a "
            f"price (clusters/<name>.yaml) or use the objective fid_at_budget"
        )
    return (fid_ref - fid) / cost_usd


def fid_at_budget(fid: float) -> float:
    """F: the trial's FID after it spent trial_budget_usd (the controller enforces the spend)."""
    return float(fid)


def objective_values(
    spec: Any, fid: float, cost_usd: float, fid_baseline: float | None = None
) -> list[float]:
    """The values to `study.tell` for a finished trial: (F, C), (F,) or ((F0 − F) / C,).

    `spec` is a SweepSpec or an objective name; `fid_baseline` is F0 (needed by fid_per_dollar).
    A trial without a finite FID has no value: tell Optuna it FAILED instead.
    """
    name = _objective_name(spec)
    if not math.isfinite(fid):
        raise ValueError(f"FID={fid!r} is not finite: mark the trial FAILED instead of scoring it")
    if not (math.isfinite(cost_usd) and cost_usd >= 0):
        raise ValueError(f"cost_usd={cost_usd!r} is invalid: expected a finite spend >= 0")
    if name == "pareto":
        return [float(fid), float(cost_usd)]
    if name == "fid_at_budget":
        return [fid_at_budget(fid)]
    if fid_baseline is None or not math.isfinite(fid_baseline):
        raise ValueError(
            f"fid_per_dollar needs the untrained model's FID as fid_baseline, got {fid_baseline!r}"
        )
    return [fid_per_dollar(fid, cost_usd, fid_baseline)]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (fid, cost) points, both minimised, cheapest first.

    i dominates j when fid_i <= fid_j and cost_i <= cost_j with one of them strict, so equal
    points do not dominate each other and are all on the front. O(n log n): sorted by FID, a
    point is on the front when it is the cheapest of its FID and cheaper than every point with a
    lower FID.
    """
    for k, (f, c) in enumerate(points):
        if math.isnan(f) or math.isnan(c):
            raise ValueError(f"points[{k}]=({f}, {c}) has a NaN; leave failed trials out")
    order = sorted(range(len(points)), key=lambda k: (points[k][0], points[k][1]))
    front: list[int] = []
    best_lower = math.inf  # the lowest cost among points with a strictly lower FID
    start = 0
    while start < len(order):
        # One group of equal FID, sorted by cost: only its cheapest points can be on the front.
        end = start
        fid = points[order[start]][0]
        while end < len(order) and points[order[end]][0] == fid:
            end += 1
        group_min = points[order[start]][1]
        if group_min < best_lower:
            front += [k for k in order[start:end] if points[k][1] == group_min]
        best_lower = min(best_lower, group_min)
        start = end
    return sorted(front, key=lambda k: (points[k][1], points[k][0], k))
