"""Read a report's data from a workspace: the sweep's Optuna study and the dollar ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

from budget_lab.errors import UserError
from budget_lab.report.data import ReportData, SpendRow, TrialRow, mark_pareto

__all__ = ["load_report_data", "list_sweeps_in"]


def list_sweeps_in(workspace) -> list[str]:
    root = workspace.sweeps_dir
    if not root.is_dir():
        return []
    from budget_lab.sweep.storage import default_storage, study_exists

    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and study_exists(default_storage(workspace, p.name))
    )


def _grid(run_dir: str | None) -> str | None:
    if not run_dir:
        return None
    samples = Path(run_dir) / "samples"
    for name in ("eval-trained.png",):
        if (samples / name).is_file():
            return str(samples / name)
    pngs = sorted(samples.glob("*.png")) if samples.is_dir() else []
    return str(pngs[-1]) if pngs else None


def load_report_data(workspace, sweep: str | None = None, storage: str | None = None) -> ReportData:
    """Trials of `sweep` (all runs' spend when None) and the ledger's priced segments."""
    import optuna

    from budget_lab.ledger import Ledger

    ledger = Ledger.for_workspace(workspace)
    segments = ledger.segments(sweep=sweep) if sweep else ledger.segments()
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
    trials: list[TrialRow] = []
    objective = formula = stop_reason = None
    budget = None
    if sweep is not None:
        known = list_sweeps_in(workspace)
        if storage is None and sweep not in known:
            raise UserError(
                f"no sweep {sweep!r} in {workspace.sweeps_dir}; sweeps there: "
                f"{', '.join(known) or 'none yet (run `budget-lab sweep mask_ratio`)'}"
            )
        from budget_lab.sweep.storage import default_storage, open_storage

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
                    fid=t.user_attrs.get("fid"),
                    cost_usd=sum(s.cost_usd for s in segs) or t.user_attrs.get("cost_usd", 0.0),
                    gpu_hours=sum(s.gpu_seconds for s in segs) / 3600,
                    wasted_usd=sum(s.wasted_usd for s in segs),
                    run=run,
                    run_dir=t.user_attrs.get("run_dir"),
                    grid_path=_grid(t.user_attrs.get("run_dir")),
                    objective_values=list(t.values) if t.values else None,
                )
            )
        state_path = workspace.sweep_dir(sweep) / "sweep.json"
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            objective, formula = state.get("objective"), state.get("objective_formula")
            stop_reason, budget = state.get("stop_reason"), state.get("budget_usd")
    data = ReportData(
        title=f"Sweep {sweep}" if sweep else f"Spend in {workspace.root}",
        sweep=sweep,
        objective=objective,
        objective_formula=formula,
        trials=mark_pareto(trials),
        spend=spend,
        stop_reason=stop_reason,
        budget_usd=budget,
        generated_at=time.time(),
    )
    return data
