"""Pruning in dollars: a trial is judged on its FID at the same spend as its peers.

The controller follows a running trial and, at each dollar rung (or the end of a masked phase):

    report_fid(trial, fid, spent_usd, rung_usd=r)                 # or phase="masked-pretrain"
    if should_prune(trial): ...                                   # STOP the run; tell PRUNED

Intermediate FIDs are not passed through Optuna's `Trial.report`: Optuna refuses it (and
`should_prune`) in multi-objective studies, and `pareto` is one; its integer step is also too
coarse a unit of money for CPU trials that cost a fraction of a cent. `report_fid` keeps them in
the trial's user attribute `fid_reports` instead, where `DollarRungPruner` (an Optuna pruner)
and the report read them.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna

from budget_lab.errors import check
from budget_lab.sweep.spec import SweepSpec

__all__ = [
    "FID_REPORTS_ATTR",
    "resolve_rungs",
    "report_fid",
    "fid_reports",
    "should_prune",
    "DollarRungPruner",
    "make_pruner",
]

#: The trial user attribute holding its intermediate FIDs (see `report_fid`).
FID_REPORTS_ATTR = "fid_reports"


def resolve_rungs(spec: SweepSpec, trial_cost_usd: float | None = None) -> list[float]:
    """The spends ($) at which a trial's FID is judged: rungs_usd, or rung_fractions of
    trial_budget_usd, or of `trial_cost_usd` (the controller's estimate of the base trial's cost,
    one number per sweep so that every trial is judged at the same dollars)."""
    if spec.rungs_usd:
        return list(spec.rungs_usd)
    if not spec.rung_fractions:
        return []
    reference = spec.trial_budget_usd or trial_cost_usd
    if reference is None or not reference > 0:
        raise ValueError(
            "rung_fractions are fractions of a trial's spend: pass trial_cost_usd (the estimated "
            "cost of the base trial) when the sweep has no trial_budget_usd"
        )
    return [f * reference for f in spec.rung_fractions]


def report_fid(
    trial: optuna.Trial,
    fid: float,
    spent_usd: float,
    *,
    rung_usd: float | None = None,
    phase: str | None = None,
    se: float | None = None,
) -> None:
    """Record an intermediate FID of a running trial, judged by `should_prune` next.

    Exactly one of: `rung_usd`, the rung (one of `resolve_rungs(spec)`) the trial just passed,
    with the FID of its first checkpoint at or after that spend; `phase`, the name of the masked
    phase that just ended (one of `phase_rung_phases(cfg)`). `spent_usd` is what the trial had
    spent when that checkpoint was written; `se` the FID's standard error (its interval's
    noise). A non-finite FID is stored as null and judged worst.
    """
    check(
        (rung_usd is None) != (phase is None),
        "report_fid",
        (rung_usd, phase),
        "give rung_usd or phase, not both",
    )
    entry = {
        "rung_usd": None if rung_usd is None else float(rung_usd),
        "phase": phase,
        "spent_usd": float(spent_usd),
        "fid": float(fid) if math.isfinite(fid) else None,
        "fid_se": None if se is None or not math.isfinite(se) else float(se),
    }
    trial.set_user_attr(FID_REPORTS_ATTR, [*trial.user_attrs.get(FID_REPORTS_ATTR, []), entry])


def fid_reports(trial: optuna.Trial | optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """A trial's intermediate FIDs in the order reported: {rung_usd, phase, spent_usd, fid}."""
    return list(trial.user_attrs.get(FID_REPORTS_ATTR, []))


def should_prune(trial: optuna.Trial) -> bool:
    """Ask the study's pruner about the trial's latest report (works in multi-objective studies,
    where Optuna's own `Trial.should_prune` refuses)."""
    study = trial.study
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    return study.pruner.prune(study, frozen)


class DollarRungPruner(optuna.pruners.BasePruner):
    """Cut a trial whose FID lags its peers' at the same spend by more than the noise.

    The trial is judged on its latest `report_fid`:
      * at a dollar rung, its peers are the other trials' FIDs at the same rung: every trial
        spent the same money there, so a lower FID is simply better;
      * at the end of masked phase P (phase_rung), its peers are the other trials' FIDs at the
        end of P that cost at most as much: a trial that reached the phase's end more cheaply
        (a higher mask ratio) is never cut for lagging trials that paid more.
    With F its FID, se its standard error, P the `percentile`-th percentile (50: the median) of
    the peers' FIDs and se_P the median of their standard errors, it is cut when at least
    `min_peers` peers exist and

        F - P > z * sqrt(se^2 + se_P^2),   z = the one-sided normal quantile of `confidence`

    i.e. only when it lags by more than the noise of the two FIDs (confidence 0.5: z = 0, any
    lag; reports without an se count as exact). Peers come from every other trial, running,
    finished, pruned or failed. A missing (non-finite) FID counts as the worst.
    """

    def __init__(
        self,
        percentile: float = 50.0,
        min_peers: int = 2,
        phase_rung: bool = True,
        confidence: float = 0.95,
    ):
        self.percentile = percentile
        self.min_peers = min_peers
        self.phase_rung = phase_rung
        self.confidence = confidence
        self.z = statistics.NormalDist().inv_cdf(confidence)  # one-sided

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        reports = fid_reports(trial)
        if not reports:
            return False
        last = reports[-1]
        if last["phase"] is not None and not self.phase_rung:
            return False
        peers: list[float] = []
        peer_ses: list[float] = []
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number:
                continue
            for r in fid_reports(other):
                same_rung = (
                    last["rung_usd"] is not None
                    and r["rung_usd"] is not None
                    and math.isclose(r["rung_usd"], last["rung_usd"], rel_tol=1e-9)
                )
                same_phase = (
                    last["phase"] is not None
                    and r["phase"] == last["phase"]
                    and r["spent_usd"] <= last["spent_usd"]
                )
                if same_rung or same_phase:
                    peers.append(math.inf if r["fid"] is None else r["fid"])
                    peer_ses.append(r.get("fid_se") or 0.0)
                    break
        if len(peers) < self.min_peers:
            return False
        fid = math.inf if last["fid"] is None else last["fid"]
        reference = _percentile(peers, self.percentile)
        if math.isinf(fid) or math.isinf(reference):
            return fid > reference
        noise = math.hypot(last.get("fid_se") or 0.0, statistics.median(peer_ses))
        return fid - reference > max(self.z * noise, 0.0)


def _percentile(values: list[float], q: float) -> float:
    """numpy.percentile's linear interpolation, but exact with infinite values (numpy: nan)."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if v[lo] == v[hi]:
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """NopPruner for pruner none; DollarRungPruner with the spec's settings for dollar_rungs."""
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return DollarRungPruner(
        spec.prune_percentile, spec.prune_min_peers, spec.phase_rung, spec.prune_confidence
    )
