"""The report in a terminal: a summary line, the trials table and the spend tables (rich)."""

from __future__ import annotations

import datetime as dt

from rich.console import Console
from rich.table import Table

from budget_lab.report.data import ReportData, best_trials, spend_by

__all__ = ["print_report", "trials_table", "spend_table"]

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _param(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(data: ReportData) -> Table:
    """One row per trial: state, FID, cost, wasted, GPU-hours, Pareto star and parameters."""
    table = Table(title=f"Trials ({len(data.trials)})", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("FID", justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("wasted", justify="right", no_wrap=True)
    table.add_column("GPU-h", justify="right", no_wrap=True)
    table.add_column("★", justify="center", no_wrap=True)  # on the Pareto front
    table.add_column("params", ratio=1)  # the only column that wraps on a narrow terminal
    for t in sorted(data.trials, key=lambda t: t.number):
        table.add_row(
            str(t.number),
            f"[{_STATE_STYLE[t.state]}]{t.state}[/]",
            "—" if t.fid is None else f"{t.fid:.2f}",
            _usd(t.cost_usd),
            _usd(t.wasted_usd) if t.wasted_usd else "—",
            f"{t.gpu_hours:.2f}",
            "★" if t.pareto else "",
            ", ".join(f"{k}={_param(v)}" for k, v in sorted(t.params.items())),
        )
    return table


def spend_table(data: ReportData, key: str) -> Table:
    """Spend grouped by `key` (phase, cluster, trial or run): useful, wasted, total, share."""
    total = data.total_usd
    table = Table(title=f"Spend by {key}", title_justify="left")
    table.add_column(key)
    table.add_column("useful", justify="right")
    table.add_column("wasted", justify="right", style="red")
    table.add_column("total", justify="right", style="bold")
    table.add_column("share", justify="right")
    for label, (useful, wasted) in spend_by(data.spend, key).items():
        share = (useful + wasted) / total if total else 0.0
        table.add_row(label, _usd(useful), _usd(wasted), _usd(useful + wasted), f"{share:.0%}")
    return table


def print_report(data: ReportData, console: Console | None = None) -> None:
    """Print the summary, the trials table and spend by phase and cluster to `console`."""
    console = console or Console()
    when = dt.datetime.fromtimestamp(data.generated_at, tz=dt.timezone.utc)
    console.print(f"[bold]{data.title}[/]  [dim]{when:%Y-%m-%d %H:%M UTC}[/]")
    facts = []
    if data.objective_formula or data.objective:
        facts.append(f"objective {data.objective_formula or data.objective}")
    if data.stop_reason:
        facts.append(f"stopped: {data.stop_reason}")
    elif data.sweep:
        facts.append("still running")
    if facts:
        console.print(" · ".join(facts))

    budget = f" of {_usd(data.budget_usd)} budget" if data.budget_usd is not None else ""
    console.print(
        f"spent [bold]{_usd(data.total_usd)}[/]{budget}: useful {_usd(data.useful_usd)}, "
        f"wasted [red]{_usd(data.wasted_usd)}[/], {data.gpu_hours:.2f} GPU-hours"
    )
    best = best_trials(data.trials, 1)
    if best:
        b = best[0]
        console.print(f"best FID {b.fid:.2f}: trial #{b.number} ({b.run}) for {_usd(b.cost_usd)}")

    if data.trials:
        console.print(trials_table(data))
    if data.spend:
        console.print(spend_table(data, "phase"))
        console.print(spend_table(data, "cluster"))
    else:
        console.print("[dim]no spend recorded in the ledger yet[/]")
