"""Read a report's data from a workspace: the sweep's Optuna study and the dollar ledger.

A trial's scores are its Optuna user attributes (`budget_lab.sweep.controller._SCORE_ATTRS`):
fid with fid_ci95 ([lo, hi]) and fid_n, kid and kid_std, alignment with alignment_ci95; a trial of
an older study has only fid (its interval fields stay None). The sweep's settings (objective,
cost_tolerance, ...) come from ``sweeps/<name>/sweep.json`` when the sweep wrote one.
"""

from __future__ import annotations

import time
from typing import Any

import optuna

from budget_lab.errors import UserError
from budget_lab.ledger import Ledger
from budget_lab.report.data import (
    COST_TOLERANCE,
    CostPart,
    ReportData,
    SpendRow,
    TrialRow,
    mark_pareto,
    sweep_verdict,
)
from budget_lab.rundir import RunDir, SweepDir, read_json
from budget_lab.sweep.storage import default_storage, open_storage, study_exists

__all__ = ["load_report_data", "list_sweeps_in"]


def list_sweeps_in(workspace) -> list[str]:
    root = workspace.sweeps_dir
    if not root.is_dir():
        return []

    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and study_exists(default_storage(workspace, p.name))
    )


def _grid(run_dir: str | None) -> str | None:
    if not run_dir:
        return None
    files = RunDir(run_dir)
    if files.eval_grid().is_file():
        return str(files.eval_grid())
    samples = files.samples
    pngs = sorted(samples.glob("*.png")) if samples.is_dir() else []
    return str(pngs[-1]) if pngs else None


def _pair(value) -> tuple[float | None, float | None]:
    """(lo, hi) of a stored ``[lo, hi]`` interval; (None, None) when absent or malformed."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and None not in value:
        return float(value[0]), float(value[1])
    return None, None


def _scores(attrs: dict) -> dict:
    """TrialRow's score fields from a trial's user attributes (None where absent)."""
    fid_lo, fid_hi = _pair(attrs.get("fid_ci95"))
    alignment_lo, alignment_hi = _pair(attrs.get("alignment_ci95"))
    n = attrs.get("fid_n")
    return {
        "fid": attrs.get("fid"),
        "fid_lo": fid_lo,
        "fid_hi": fid_hi,
        "fid_n": int(n) if n is not None else None,
        "kid": attrs.get("kid"),
        "kid_std": attrs.get("kid_std"),
        "alignment": attrs.get("alignment"),
        "alignment_lo": alignment_lo,
        "alignment_hi": alignment_hi,
    }


def _cost_tolerance(state: dict) -> float:
    """The sweep's cost_tolerance: sweep.json's own key, or its frozen spec's; else the default."""
    spec = state.get("spec") if isinstance(state.get("spec"), dict) else {}
    value = state.get("cost_tolerance", spec.get("cost_tolerance"))
    return float(value) if isinstance(value, (int, float)) else COST_TOLERANCE


def _fid_baseline(folder: SweepDir) -> float | None:
    """fid_per_dollar's untrained-model FID from the sweep's fid_ref.json, when it holds one."""
    values = list((read_json(folder.fid_ref) or {}).values())
    return float(values[0]) if len(values) == 1 else None


def load_report_data(workspace, sweep: str | None = None, storage: str | None = None) -> ReportData:
    """Trials of `sweep` (all runs' spend when None) and the ledger's priced segments."""

    ledger = Ledger.for_workspace(workspace)
    segments = ledger.segments(sweep=sweep, with_parts=True)
    spend = [
        SpendRow(
            run=s.run,
            trial=s.trial,
            phase=s.phase,
            cluster=s.cluster,
            start=s.start,
            end=max(s.end, s.start),
            cost_usd=s.cost_usd,
            wasted_usd=s.wasted_usd,
            gpu_seconds=s.gpu_seconds,
        )
        for s in segments
    ]
    parts = _parts(segments)
    trials: list[TrialRow] = []
    objective = formula = stop_reason = verdict = None
    budget = None
    tolerance = COST_TOLERANCE
    if sweep is not None:
        known = list_sweeps_in(workspace)
        if storage is None and sweep not in known:
            raise UserError(
                f"no sweep {sweep!r} in {workspace.sweeps_dir}; sweeps there: "
                f"{', '.join(known) or 'none yet (run `budget-lab sweep mask_ratio`)'}"
            )

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name=sweep, storage=open_storage(storage or default_storage(workspace, sweep))
        )
        by_run: dict[str, list] = {}
        for s in segments:
            by_run.setdefault(s.run, []).append(s)
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get("not_started"):
                continue
            run = t.user_attrs.get("run")
            segs = by_run.get(run, [])
            trials.append(
                TrialRow(
                    number=t.number,
                    state=t.state.name
                    if t.state.name in ("COMPLETE", "PRUNED", "FAIL")
                    else "RUNNING",
                    params=dict(t.params),
                    cost_usd=sum(s.cost_usd for s in segs) or t.user_attrs.get("cost_usd", 0.0),
                    gpu_hours=sum(s.gpu_seconds for s in segs) / 3600,
                    wasted_usd=sum(s.wasted_usd for s in segs),
                    run=run,
                    run_dir=t.user_attrs.get("run_dir"),
                    grid_path=_grid(t.user_attrs.get("run_dir")),
                    objective_values=list(t.values) if t.values else None,
                    **_scores(t.user_attrs),
                    **_estimate(t.user_attrs, sum(s.cost_usd for s in segs)),
                )
            )
        folder = SweepDir(workspace.sweep_dir(sweep))
        state = read_json(folder.state) or {}
        objective, formula = state.get("objective"), state.get("objective_formula")
        stop_reason, budget = state.get("stop_reason"), state.get("budget_usd")
        tolerance = _cost_tolerance(state)
        # The verdict from these trials (as the sweep decides); the sweep's own words otherwise.
        verdict = (
            sweep_verdict(trials, objective, tolerance, _fid_baseline(folder))
            or state.get("verdict")
            or (read_json(folder.summary) or {}).get("verdict")
        )
    data = ReportData(
        title=f"Sweep {sweep}" if sweep else f"Spend in {workspace.root}",
        sweep=sweep,
        objective=objective,
        objective_formula=formula,
        trials=mark_pareto(trials, tolerance),
        spend=spend,
        stop_reason=stop_reason,
        budget_usd=budget,
        generated_at=time.time(),
        verdict=verdict,
        cost_tolerance=tolerance,
        parts=parts,
    )
    return data


def _parts(segments: list) -> list[CostPart]:
    """The ledger's split of the segments, summed per (run, trial, phase, activity). A segment
    the ledger has not split (synced before activity.jsonl) is "other" in its own phase, as
    `budget-lab cost report --by activity` counts it."""
    acc: dict[tuple[Any, ...], list[float]] = {}
    for s in segments:
        pieces = [
            (p.phase, p.activity, p.cost_usd, p.wasted_usd, p.seconds * s.gpus) for p in s.parts
        ]
        if not pieces:
            pieces = [(s.phase, "other", s.cost_usd, s.wasted_usd, s.gpu_seconds)]
        for phase, activity, cost, wasted, gpu_seconds in pieces:
            entry = acc.setdefault((s.run, s.trial, phase or s.phase, activity), [0.0, 0.0, 0.0])
            entry[0] += cost
            entry[1] += wasted
            entry[2] += gpu_seconds
    return [
        CostPart(run, trial, phase, activity, cost, wasted, gpu_seconds)
        for (run, trial, phase, activity), (cost, wasted, gpu_seconds) in acc.items()
    ]


def _estimate(attrs: dict[str, Any], settled: float) -> dict[str, float | None]:
    """A trial's estimate before launch and its error against the settled dollars."""
    estimate = attrs.get("estimate_usd")
    if not isinstance(estimate, (int, float)) or estimate <= 0:
        return {}
    error = settled / estimate - 1 if settled > 0 else None
    return {"estimate_usd": float(estimate), "estimate_error": error}
