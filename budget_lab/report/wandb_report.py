"""The cost report on W&B: a summary run holding the report's tables, and a W&B report over it.

Two pieces, both built from the same `summary_tables`:

1. The *summary run* (`open_summary_run` + `log_sweep_summary`): one W&B run per sweep (job type
   ``cost-summary``) that logs the trials table, the Pareto front as a table and as a plot, FID
   vs $ as a scatter plot, spend tables and bar/line plots, and the totals in its summary. A sweep
   logs it when it ends (offline without an API key; `wandb sync` uploads it later).
   Every score carries its noise: the trials table has fid_lo / fid_hi (95 % interval), fid_n,
   kid ± kid_std and alignment with alignment_lo / alignment_hi; the FID-vs-$ data
   (``scored_trials``) has fid_lo / fid_hi, and since W&B's charts draw no error bars, the
   intervals are also a line plot with one vertical segment per trial (``fid_intervals_plot``).
   Where the money went: ``cost_split`` ($ per phase x activity, from the ledger's split of each
   segment over the job's own clock; its rows sum to total_usd), ``spend_by_phase`` and
   ``spend_by_activity`` (with bar plots); what each trial was estimated to cost before launch
   against what the ledger settled: ``estimate_vs_settled`` (and estimate_usd / estimate_error
   in the trials table).
2. The *report* (`build_report_spec` -> `build_wandb_report` -> ``Report.save()``): a "Cost
   report" page with panels over the summary run's tables. `build_report_spec` is plain data
   (JSON) and needs no network; `build_wandb_report` turns it into ``wandb_workspaces`` objects,
   still offline; only `push_wandb_report` talks to W&B. When it cannot (no API key, no
   network), it raises `WandbUnavailableError` after writing the spec as
   ``wandb_report_spec.json``: what it would have created.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from budget_lab.errors import UserError
from budget_lab.io import atomic_write_text
from budget_lab.report.data import (
    ReportData,
    TrialRow,
    best_trials,
    cumulative_spend,
    fid_text,
    spend_by,
    split_by,
    split_parts,
    usd,
)
from budget_lab.report.wandb_log import service_reachable, wandb_mode

__all__ = [
    "WandbUnavailableError",
    "SPEC_FILE",
    "summary_run_name",
    "summary_run_id",
    "summary_tables",
    "open_summary_run",
    "log_sweep_summary",
    "build_report_spec",
    "build_wandb_report",
    "write_report_spec",
    "push_wandb_report",
]

SPEC_FILE = "wandb_report_spec.json"  # written beside the HTML report by push_wandb_report

_TRIAL_COLUMNS = [
    "trial",
    "state",
    "fid",
    "fid_lo",  # the FID's 95 % interval; None for a trial without one (an older study)
    "fid_hi",
    "fid_n",  # generated images the FID was computed from
    "kid",
    "kid_std",
    "alignment",
    "alignment_lo",
    "alignment_hi",
    "cost_usd",
    "estimate_usd",  # estimated before launch; None for a trial without an estimate
    "estimate_error",  # cost_usd / estimate_usd - 1
    "wasted_usd",
    "gpu_hours",
    "pareto",
    "run",
]
# Plots logged by the summary run: key -> (wandb.plot function, table, its fields, title).
# wandb stores each plot's data under "<key>_table"; the report's custom charts read that key.
_PLOTS: dict[str, tuple[str, str, dict[str, str], str]] = {
    "fid_vs_usd": ("scatter", "scored_trials", {"x": "cost_usd", "y": "fid"}, "FID vs $"),
    "pareto_front_plot": (
        "line",
        "pareto_steps",
        {"x": "cost_usd", "y": "fid"},
        "Pareto front (FID vs $)",
    ),
    "fid_intervals_plot": (
        "line",
        "fid_intervals",
        {"x": "cost_usd", "y": "fid", "stroke": "trial"},
        "FID 95% intervals vs $",
    ),
    "spend_over_time_plot": (
        "line",
        "spend_over_time",
        {"x": "hours", "y": "usd", "stroke": "series"},
        "Cumulative spend",
    ),
    "spend_by_phase_plot": (
        "bar",
        "spend_by_phase",
        {"label": "phase", "value": "total_usd"},
        "Spend by phase",
    ),
    "spend_by_activity_plot": (
        "bar",
        "spend_by_activity",
        {"label": "activity", "value": "total_usd"},
        "Spend by activity",
    ),
    "spend_by_cluster_plot": (
        "bar",
        "spend_by_cluster",
        {"label": "cluster", "value": "total_usd"},
        "Spend by cluster",
    ),
    "spend_by_trial_plot": (
        "bar",
        "spend_by_trial",
        {"label": "trial", "value": "total_usd"},
        "Spend by trial",
    ),
    "useful_vs_wasted_plot": (
        "bar",
        "useful_vs_wasted",
        {"label": "kind", "value": "usd"},
        "Useful vs wasted",
    ),
}
_VEGA_SPECS = {"scatter": "wandb/scatter/v0", "line": "wandb/line/v0", "bar": "wandb/bar/v0"}


class WandbUnavailableError(UserError):
    """W&B cannot be reached (no API key, no network, refused); the spec was written instead."""


# --------------------------------------------------------------------------------------------
# What the summary run holds (also embedded in the spec, so an offline run shows it)
# --------------------------------------------------------------------------------------------


def summary_run_name(data: ReportData) -> str:
    """Display name of the summary run: ``<sweep>-summary``, or ``cost-summary``."""
    return f"{data.sweep}-summary" if data.sweep else "cost-summary"


def summary_run_id(data: ReportData, project: str) -> str:
    """A stable W&B run id per (project, sweep): logging again resumes the same run."""
    key = f"{project}/{data.sweep or data.title}"
    return "bl-summary-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _param_columns(data: ReportData) -> list[tuple[str, str]]:
    """(parameter name, column name) pairs; a name that clashes with a base column is prefixed."""
    keys = sorted({k for t in data.trials for k in t.params})
    return [(k, f"param_{k}" if k in _TRIAL_COLUMNS else k) for k in keys]


def _trial_row(t: TrialRow, params: list[tuple[str, str]]) -> list[Any]:
    base = [t.number, t.state, t.fid, t.fid_lo, t.fid_hi, t.fid_n, t.kid, t.kid_std]
    base += [t.alignment, t.alignment_lo, t.alignment_hi]
    base += [t.cost_usd, t.estimate_usd, t.estimate_error, t.wasted_usd, t.gpu_hours]
    base += [t.pareto, t.run]
    return base + [t.params.get(k) for k, _ in params]


def _scalars(data: ReportData) -> dict[str, Any]:
    best = best_trials(data.trials, 1)
    estimated = [t for t in data.trials if t.estimate_usd is not None]
    estimate = sum(t.estimate_usd or 0.0 for t in estimated)
    settled = sum(t.cost_usd for t in estimated)
    return {
        "total_usd": data.total_usd,
        "useful_usd": data.useful_usd,
        "wasted_usd": data.wasted_usd,
        "gpu_hours": data.gpu_hours,
        "n_trials": len(data.trials),
        **{f"n_{s.lower()}": data.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
        "best_fid": best[0].fid if best else None,
        "best_fid_lo": best[0].fid_lo if best else None,
        "best_fid_hi": best[0].fid_hi if best else None,
        "best_fid_n": best[0].fid_n if best else None,
        "best_trial": best[0].number if best else None,
        "best_cost_usd": best[0].cost_usd if best else None,
        # The trials that had an estimate: what they were expected to cost, and the error.
        "estimate_usd": estimate if estimated else None,
        "estimate_error": settled / estimate - 1 if estimate > 0 else None,
        "budget_usd": data.budget_usd,
        "stop_reason": data.stop_reason,
        "verdict": data.verdict,
    }


def summary_tables(data: ReportData) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Every table of the summary run: ``{name: (columns, rows)}``.

    trials / pareto_front: one row per trial (parameters as extra columns); scored_trials: the
    trials with an FID (the scatter plot), with fid_lo / fid_hi / fid_n; fid_intervals: each
    such trial's interval as two points (cost, lo) and (cost, hi) of its own series, a vertical
    segment in a line plot (W&B draws no error bars); pareto_steps: the front as a step line (a
    corner point is added between two front trials); spend: the ledger rows; spend_over_time: the
    cumulative total, useful and wasted spend (one series each); cost_split: $ per phase x
    activity (the ledger's split; sums to the total); spend_by_phase / activity / cluster / trial
    and useful_vs_wasted: the bar charts; estimate_vs_settled: each trial with an estimate, what
    was expected before launch and what the ledger settled.
    """
    params = _param_columns(data)
    trial_columns = _TRIAL_COLUMNS + [col for _, col in params]
    trials = sorted(data.trials, key=lambda t: t.number)
    front = sorted((t for t in trials if t.pareto), key=lambda t: (t.cost_usd, t.number))

    steps: list[list[Any]] = []
    for i, t in enumerate(front):
        if i > 0:  # the corner of the step: this trial's cost at the previous trial's FID
            steps.append([t.cost_usd, front[i - 1].fid, None])
        steps.append([t.cost_usd, t.fid, t.number])

    t0 = min((r.start for r in data.spend), default=0.0)
    times, total, wasted = cumulative_spend(data.spend)
    over_time = []
    for t, tot, was in zip(times, total, wasted, strict=True):
        hours = (t - t0) / 3600.0
        over_time += [[hours, tot, "total"], [hours, tot - was, "useful"], [hours, was, "wasted"]]

    def by(key: str) -> tuple[list[str], list[list[Any]]]:
        split = key in ("phase", "activity")
        groups = split_by(data, key) if split else spend_by(data.spend, key)
        rows = [[label, u, w, u + w] for label, (u, w) in groups.items()]
        return [key, "useful_usd", "wasted_usd", "total_usd"], rows

    split: dict[tuple[str, str], list[float]] = {}
    for part in split_parts(data):
        acc = split.setdefault((part.phase or "(no phase)", part.activity), [0.0, 0.0, 0.0])
        acc[0] += part.cost_usd
        acc[1] += part.wasted_usd
        acc[2] += part.gpu_seconds / 3600.0
    phases, activities = list(split_by(data, "phase")), list(split_by(data, "activity"))
    order = {k: (phases.index(k[0]), activities.index(k[1])) for k in split}

    return {
        "trials": (trial_columns, [_trial_row(t, params) for t in trials]),
        "pareto_front": (trial_columns, [_trial_row(t, params) for t in front]),
        "scored_trials": (
            ["cost_usd", "fid", "trial", "state", "fid_lo", "fid_hi", "fid_n"],
            [
                [t.cost_usd, t.fid, t.number, t.state, t.fid_lo, t.fid_hi, t.fid_n]
                for t in trials
                if t.fid is not None
            ],
        ),
        "fid_intervals": (
            ["cost_usd", "fid", "trial", "bound"],
            [
                [t.cost_usd, value, f"#{t.number}", bound]
                for t in trials
                if t.fid is not None and t.fid_lo is not None and t.fid_hi is not None
                for bound, value in (("lo", t.fid_lo), ("hi", t.fid_hi))
            ],
        ),
        "pareto_steps": (["cost_usd", "fid", "trial"], steps),
        "spend": (
            [
                "run",
                "trial",
                "phase",
                "cluster",
                "start",
                "end",
                "cost_usd",
                "wasted_usd",
                "gpu_hours",
            ],
            [
                [r.run, r.trial, r.phase, r.cluster, r.start, r.end]
                + [r.cost_usd, r.wasted_usd, r.gpu_seconds / 3600.0]
                for r in data.spend
            ],
        ),
        "spend_over_time": (["hours", "usd", "series"], over_time),
        "cost_split": (
            ["phase", "activity", "cost_usd", "wasted_usd", "gpu_hours"],
            [[*key, *split[key]] for key in sorted(split, key=order.__getitem__)],
        ),
        "spend_by_phase": by("phase"),
        "spend_by_activity": by("activity"),
        "spend_by_cluster": by("cluster"),
        "spend_by_trial": by("trial"),
        "useful_vs_wasted": (
            ["kind", "usd"],
            [["useful", data.useful_usd], ["wasted", data.wasted_usd]],
        ),
        "estimate_vs_settled": (
            ["trial", "run", "state", "estimate_usd", "settled_usd", "error"],
            [
                [t.number, t.run, t.state, t.estimate_usd, t.cost_usd, t.estimate_error]
                for t in trials
                if t.estimate_usd is not None
            ],
        ),
    }


# --------------------------------------------------------------------------------------------
# The summary run
# --------------------------------------------------------------------------------------------


def open_summary_run(
    data: ReportData,
    project: str,
    entity: str | None = None,
    mode: str = "auto",
    dir: str | os.PathLike[str] | None = None,
) -> Any:
    """``wandb.init`` the sweep's summary run (resumed when it exists; offline without a key).

    `mode` is auto, online or offline; `dir` is where wandb keeps its files (e.g. the sweep
    folder). Does not finish other active runs of the process.
    """
    import wandb

    if mode not in ("auto", "online", "offline"):
        raise UserError(f"W&B mode {mode!r} is invalid: expected auto, online or offline")
    mode = wandb_mode(mode)  # WANDB_MODE=offline/disabled in the environment wins
    if mode == "online" and not service_reachable():
        warnings.warn(
            "W&B service unreachable: the sweep's summary run is logged offline (`wandb sync` "
            "it later)",
            stacklevel=2,
        )
        mode = "offline"
    return wandb.init(
        project=project,
        entity=entity,
        id=summary_run_id(data, project),
        name=summary_run_name(data),
        group=data.sweep,
        job_type="cost-summary",
        resume="allow",
        reinit="create_new",
        mode=mode,
        dir=str(dir) if dir is not None else None,
        config={
            "sweep": data.sweep,
            "objective": data.objective,
            "objective_formula": data.objective_formula,
            "budget_usd": data.budget_usd,
        },
        settings=wandb.Settings(silent=True, console="off"),
    )


def log_sweep_summary(data: ReportData, run: Any) -> None:
    """Log the report's tables, plots and totals to `run` (a wandb run, online or offline).

    Logs every table of `summary_tables` under its name, the plots of the report (FID vs $
    scatter, the Pareto front, spend over time and by phase / activity / cluster / trial, useful
    vs wasted)
    as W&B custom charts, and the totals (total_usd, wasted_usd, best_fid, ...) in the summary.
    """
    import wandb

    content = summary_tables(data)

    def table(name: str) -> Any:
        columns, rows = content[name]
        return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)

    tables = {name: table(name) for name in content}
    plots = {}
    for key, (kind, name, fields, title) in _PLOTS.items():
        # A plot gets its own copy of the table: wandb stores it under "<key>_table", the key
        # the report's custom charts read (a shared Table object would be stored once only).
        if kind == "scatter":
            plots[key] = wandb.plot.scatter(table(name), fields["x"], fields["y"], title=title)
        elif kind == "line":
            plots[key] = wandb.plot.line(
                table(name), fields["x"], fields["y"], stroke=fields.get("stroke"), title=title
            )
        else:
            plots[key] = wandb.plot.bar(table(name), fields["label"], fields["value"], title=title)
    run.log({**tables, **plots})
    run.summary.update({k: v for k, v in _scalars(data).items() if v is not None})


# --------------------------------------------------------------------------------------------
# The report: a JSON spec, then wandb_workspaces objects
# --------------------------------------------------------------------------------------------


def _layout(x: int, y: int, w: int, h: int) -> dict[str, int]:
    return {"x": x, "y": y, "w": w, "h": h}


def _chart(key: str, layout: dict[str, int]) -> dict[str, Any]:
    kind, _table, fields, title = _PLOTS[key]
    return {
        "type": "custom_chart",
        "chart": _VEGA_SPECS[kind],
        "table_key": f"{key}_table",  # where wandb.plot.* stored the plot's table
        "fields": {k: v for k, v in fields.items() if v is not None},
        "strings": {"title": title},
        "layout": layout,
    }


def _description(data: ReportData) -> str:
    lines = [
        f"- **Spent:** {usd(data.total_usd)}"
        + (f" of a {usd(data.budget_usd)} budget" if data.budget_usd is not None else ""),
        f"- **Useful / wasted:** {usd(data.useful_usd)} / {usd(data.wasted_usd)} "
        f"({data.gpu_hours:,.2f} GPU-hours)",
        f"- **Trials:** {len(data.trials)} ("
        + ", ".join(
            f"{data.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        )
        + ")",
    ]
    best = best_trials(data.trials, 1)
    if best:
        b = best[0]
        n = f" N={b.fid_n}" if b.fid_n is not None else ""
        lines.append(
            f"- **Lowest FID:** {fid_text(b)}{n}, trial #{b.number} ({b.run}) for {usd(b.cost_usd)}"
        )
    activities = split_by(data, "activity")
    if activities:
        lines.append(
            "- **By activity:** "
            + ", ".join(f"{a} {usd(u + w)}" for a, (u, w) in activities.items())
        )
    scalars = _scalars(data)
    if scalars["estimate_error"] is not None:
        lines.append(
            f"- **Estimated before launch:** {usd(scalars['estimate_usd'])}, settled "
            f"{usd(sum(t.cost_usd for t in data.trials if t.estimate_usd is not None))} "
            f"({scalars['estimate_error']:+.0%})"
        )
    if data.objective_formula or data.objective:
        lines.append(f"- **Objective:** `{data.objective_formula or data.objective}`")
    if data.stop_reason:
        lines.append(f"- **Stopped:** {data.stop_reason}")
    elif data.sweep:
        lines.append("- Still running")
    if data.verdict:
        lines += ["", "**Verdict.** " + data.verdict.replace("\n", "  \n")]
    return "\n".join(lines)


def build_report_spec(data: ReportData, entity: str | None, project: str) -> dict[str, Any]:
    """The W&B "Cost report" as plain JSON-ready data; no network, no wandb import.

    Keys: entity, project, title, description, width, summary_run ({name, id, summary, tables}:
    what the summary run holds) and blocks: a list of ``{"type": "h1"|"h2"|"p"|"markdown",
    "text"}`` and ``{"type": "panel_grid", "runset": {name, query}, "panels": [...]}``, each
    panel one of ``custom_chart`` (chart, table_key, fields, strings), ``table`` (table) or
    ``scalar`` (metric), with a layout ``{x, y, w, h}`` on W&B's 24-column grid.
    """
    title = f"Cost report: {data.sweep}" if data.sweep else f"Cost report: {project}"
    run_name = summary_run_name(data)
    runset = {"name": run_name, "query": run_name}
    tables = summary_tables(data)
    return {
        "entity": entity,
        "project": project,
        "title": title,
        "description": (
            f"What {f'sweep {data.sweep}' if data.sweep else f'the runs of {project}'} cost and "
            "what it bought, written by budget-lab."
        ),
        "width": "fluid",
        "summary_run": {
            "name": run_name,
            "id": summary_run_id(data, project),
            "summary": _scalars(data),
            "tables": {name: {"columns": c, "rows": r} for name, (c, r) in tables.items()},
        },
        "blocks": [
            {"type": "markdown", "text": _description(data)},
            {"type": "h2", "text": "FID vs $"},
            {
                "type": "panel_grid",
                "runset": runset,
                "panels": [
                    _chart("fid_vs_usd", _layout(0, 0, 12, 9)),
                    _chart("pareto_front_plot", _layout(12, 0, 12, 9)),
                    _chart("fid_intervals_plot", _layout(0, 9, 12, 9)),
                    {"type": "table", "table": "scored_trials", "layout": _layout(12, 9, 12, 9)},
                    {"type": "table", "table": "pareto_front", "layout": _layout(0, 18, 24, 7)},
                ],
            },
            {"type": "h2", "text": "Spend"},
            {
                "type": "panel_grid",
                "runset": runset,
                "panels": [
                    {"type": "scalar", "metric": "total_usd", "layout": _layout(0, 0, 8, 4)},
                    {"type": "scalar", "metric": "useful_usd", "layout": _layout(8, 0, 8, 4)},
                    {"type": "scalar", "metric": "wasted_usd", "layout": _layout(16, 0, 8, 4)},
                    _chart("spend_over_time_plot", _layout(0, 4, 16, 8)),
                    _chart("useful_vs_wasted_plot", _layout(16, 4, 8, 8)),
                    _chart("spend_by_phase_plot", _layout(0, 12, 8, 8)),
                    _chart("spend_by_cluster_plot", _layout(8, 12, 8, 8)),
                    _chart("spend_by_trial_plot", _layout(16, 12, 8, 8)),
                    _chart("spend_by_activity_plot", _layout(0, 20, 8, 8)),
                    {"type": "table", "table": "cost_split", "layout": _layout(8, 20, 16, 8)},
                ],
            },
            {"type": "h2", "text": "Trials"},
            {
                "type": "panel_grid",
                "runset": runset,
                "panels": [
                    {"type": "table", "table": "trials", "layout": _layout(0, 0, 24, 10)},
                    {"type": "table", "table": "spend", "layout": _layout(0, 10, 24, 8)},
                    {
                        "type": "table",
                        "table": "estimate_vs_settled",
                        "layout": _layout(0, 18, 24, 7),
                    },
                ],
            },
        ],
    }


def _import_wr() -> Any:
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise UserError(
            "W&B reports need the wandb-workspaces package: pip install wandb-workspaces"
        ) from None
    return wr


def build_wandb_report(spec: dict[str, Any]) -> Any:
    """A ``wandb_workspaces.reports.v2.Report`` from a `build_report_spec` dict (not saved).

    Builds and validates the objects offline; ``Report.save()`` is what needs W&B.
    """
    wr = _import_wr()
    if not spec.get("entity"):
        raise UserError("a W&B report needs an entity (user or team): pass --entity NAME")
    entity, project = spec["entity"], spec["project"]

    def panel(p: dict[str, Any]) -> Any:
        layout = wr.Layout(**p["layout"])
        if p["type"] == "custom_chart":
            return wr.CustomChart(
                query={"summaryTable": {"tableKey": p["table_key"]}},
                chart_name=p["chart"],
                chart_fields=p["fields"],
                chart_strings=p["strings"],
                layout=layout,
            )
        if p["type"] == "table":
            return wr.WeavePanelSummaryTable(table_name=p["table"], layout=layout)
        if p["type"] == "scalar":
            return wr.ScalarChart(
                title=p["metric"], metric=wr.SummaryMetric(p["metric"]), layout=layout
            )
        raise ValueError(f"unknown panel type {p['type']!r} in the report spec")

    def block(b: dict[str, Any]) -> Any:
        simple = {"h1": wr.H1, "h2": wr.H2, "p": wr.P, "markdown": wr.MarkdownBlock}
        if b["type"] in simple:
            return simple[b["type"]](text=b["text"])
        if b["type"] == "panel_grid":
            runset = wr.Runset(entity=entity, project=project, **b["runset"])
            return wr.PanelGrid(runsets=[runset], panels=[panel(p) for p in b["panels"]])
        raise ValueError(f"unknown block type {b['type']!r} in the report spec")

    return wr.Report(
        entity=entity,
        project=project,
        title=spec["title"],
        description=spec["description"],
        width=spec["width"],
        blocks=[block(b) for b in spec["blocks"]],
    )


def write_report_spec(spec: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write `spec` as ``out_dir/wandb_report_spec.json``; returns its path."""
    return atomic_write_text(Path(out_dir) / SPEC_FILE, json.dumps(spec, indent=2) + "\n")


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _has_api_key() -> bool:
    """WANDB_API_KEY is set, or ~/.netrc has an entry for the W&B host (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc().authenticators(urlparse(_base_url()).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def push_wandb_report(
    data: ReportData,
    entity: str | None,
    project: str,
    out_dir: str | os.PathLike[str],
    timeout: float = 5.0,
) -> str:
    """Log the summary run and save the "Cost report" on W&B; returns the report's URL.

    Writes the spec to ``out_dir/wandb_report_spec.json`` first. Without an API key, without
    network (W&B's host does not answer within `timeout` s) or when W&B refuses, raises
    `WandbUnavailableError` saying so and where the spec is. `entity` None: the key's default.
    """
    spec_path = write_report_spec(build_report_spec(data, entity, project), out_dir)
    kept = (
        f"Nothing was uploaded; the report it would have created (blocks, panels and the "
        f"summary run's tables) is in {spec_path}."
    )
    if not _has_api_key():
        raise WandbUnavailableError(
            f"no W&B API key (WANDB_API_KEY or `wandb login`). {kept} "
            "Log in and run the same command again."
        )
    url = _base_url()
    if not _reachable(url, timeout):
        raise WandbUnavailableError(
            f"cannot reach W&B at {url} (no network?). {kept} "
            "Run the same command again on a machine with network access."
        )

    import wandb

    try:
        entity = entity or wandb.Api().default_entity
        run = open_summary_run(data, project, entity, mode="online", dir=out_dir)
        log_sweep_summary(data, run)
        run.finish()
        report = build_wandb_report(build_report_spec(data, entity, project))
        report.save()
        return str(report.url)
    except UserError:
        raise
    except Exception as err:  # wandb and wandb_workspaces raise many kinds; the spec is kept
        raise WandbUnavailableError(f"W&B failed: {type(err).__name__}: {err}. {kept}") from err
