"""The report in a terminal: a summary line, the verdict, the trials table and the spend tables
(rich). Scores show their noise: FID ``212.4 [205.1, 219.7]`` (95 % interval) with its N, KID
± std, alignment with its interval; dollars keep their sub-cent digits (`data.usd`)."""

from __future__ import annotations

import datetime as dt

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from budget_lab.report.data import (
    ReportData,
    TrialRow,
    alignment_text,
    best_trials,
    fid_text,
    kid_text,
    spend_by,
    split_by,
    usd,
)

__all__ = ["print_report", "trials_table", "scores_table", "spend_table"]

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def _param(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fid_header(trials: list[TrialRow]) -> tuple[str, bool]:
    """(FID column header, whether N needs a column of its own): one N for every FID (the
    usual case: FIDs compare only at equal N) goes into the header."""
    ns = {t.fid_n for t in trials if t.fid is not None and t.fid_n is not None}
    header = "FID [95% CI]" if any(t.fid_lo is not None for t in trials) else "FID"
    if len(ns) == 1:
        return f"{header}\nN={ns.pop()}", False
    return header, len(ns) > 1


def _score_cells(t: TrialRow, n_column: bool, kid: bool, alignment: bool) -> list[str]:
    cells = [fid_text(t)]
    if n_column:
        cells.append("—" if t.fid_n is None else str(t.fid_n))
    if kid:
        cells.append(kid_text(t))
    if alignment:
        cells.append(alignment_text(t))
    return [escape(c) for c in cells]  # an interval's "[" is not rich markup


def trials_table(data: ReportData, scores: bool = True) -> Table:
    """One row per trial: state, FID [95% CI] with its N (in the header when every FID has
    the same N), KID ± std and alignment [95% CI] when some trial has them and `scores`, cost,
    wasted, GPU-hours, front star and parameters."""
    trials = sorted(data.trials, key=lambda t: t.number)
    fid_header, n_column = _fid_header(trials)
    kid = scores and any(t.kid is not None for t in trials)
    alignment = scores and any(t.alignment is not None for t in trials)
    table = Table(title=f"Trials ({len(data.trials)})", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column(fid_header, justify="right", no_wrap=True)
    if n_column:
        table.add_column("N", justify="right", no_wrap=True)  # generated images of the FID
    if kid:
        table.add_column("KID ± std", justify="right", no_wrap=True)
    if alignment:
        table.add_column("alignment [95% CI]", justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("wasted", justify="right", no_wrap=True)
    table.add_column("GPU-h", justify="right", no_wrap=True)
    table.add_column("★", justify="center", no_wrap=True)  # on the front within the noise
    table.add_column("params", ratio=1)  # the only column that wraps on a narrow terminal
    for t in trials:
        table.add_row(
            str(t.number),
            f"[{_STATE_STYLE[t.state]}]{t.state}[/]",
            *_score_cells(t, n_column, kid, alignment),
            usd(t.cost_usd),
            usd(t.wasted_usd) if t.wasted_usd else "—",
            f"{t.gpu_hours:.2f}",
            "★" if t.pareto else "",
            escape(", ".join(f"{k}={_param(v)}" for k, v in sorted(t.params.items()))),
        )
    return table


def scores_table(data: ReportData) -> Table:
    """The scores of the trials that have an FID: FID [95% CI] (N), KID ± std, alignment
    [95% CI]; what `print_report` shows beside a trials table without them when the terminal
    is too narrow for both in one."""
    trials = [t for t in sorted(data.trials, key=lambda t: t.number) if t.fid is not None]
    fid_header, n_column = _fid_header(trials)
    kid = any(t.kid is not None for t in trials)
    alignment = any(t.alignment is not None for t in trials)
    table = Table(title="Scores", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column(fid_header, justify="right", no_wrap=True)
    if n_column:
        table.add_column("N", justify="right", no_wrap=True)
    if kid:
        table.add_column("KID ± std", justify="right", no_wrap=True)
    if alignment:
        table.add_column("alignment [95% CI]", justify="right", no_wrap=True)
    for t in trials:
        table.add_row(str(t.number), *_score_cells(t, n_column, kid, alignment))
    return table


def spend_table(data: ReportData, key: str) -> Table:
    """Spend grouped by `key` (phase, activity, cluster, trial or run): useful, wasted, total,
    share. Phase and activity come from the ledger's split of each segment (`split_by`)."""
    total = data.total_usd
    table = Table(title=f"Spend by {key}", title_justify="left")
    table.add_column(key)
    table.add_column("useful", justify="right")
    table.add_column("wasted", justify="right", style="red")
    table.add_column("total", justify="right", style="bold")
    table.add_column("share", justify="right")
    groups = split_by(data, key) if key in ("phase", "activity") else spend_by(data.spend, key)
    for label, (useful, wasted) in groups.items():
        share = (useful + wasted) / total if total else 0.0
        table.add_row(label, usd(useful), usd(wasted), usd(useful + wasted), f"{share:.0%}")
    return table


def _min_width(table: Table, wrapped: int = 12) -> int:
    """Columns a table needs without cutting a cell: every no-wrap column at its widest
    cell, a wrapping one at `wrapped`, plus rich's padding and borders."""
    total = 1
    for column in table.columns:
        if not column.no_wrap:
            total += wrapped + 3
            continue
        texts = [column.header, *column.cells]
        lines = [line for c in texts for line in Text.from_markup(str(c)).split()]
        total += max(line.cell_len for line in lines) + 3
    return total


def print_report(data: ReportData, console: Console | None = None) -> None:
    """Print the summary, the verdict, the trials table (and the scores table on a narrow
    terminal) and spend by phase, activity and cluster to `console`."""
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

    budget = f" of {usd(data.budget_usd)} budget" if data.budget_usd is not None else ""
    console.print(
        f"spent [bold]{usd(data.total_usd)}[/]{budget}: useful {usd(data.useful_usd)}, "
        f"wasted [red]{usd(data.wasted_usd)}[/], {data.gpu_hours:.2f} GPU-hours"
    )
    best = best_trials(data.trials, 1)
    if best:
        b = best[0]
        n = f" N={b.fid_n}" if b.fid_n is not None else ""
        console.print(
            f"lowest FID {fid_text(b)}{n}: trial #{b.number} ({b.run}) for {usd(b.cost_usd)}",
            highlight=False,
            markup=False,
        )
    if data.verdict:
        console.print(data.verdict, highlight=False, markup=False)

    if data.trials:
        table = trials_table(data)
        if _min_width(table) <= console.width:
            console.print(table)
        else:  # too narrow for every score in one table: KID and alignment on their own
            console.print(trials_table(data, scores=False))
            console.print(scores_table(data))
    if data.spend:
        console.print(spend_table(data, "phase"))
        console.print(spend_table(data, "activity"))
        console.print(spend_table(data, "cluster"))
    else:
        console.print("[dim]no spend recorded in the ledger yet[/]")
