"""The report's PNG figures, drawn with matplotlib's object API (Agg canvas, no pyplot state).

- ``pareto.png``: FID vs $ per trial. COMPLETE trials are dots with a vertical bar for their
  FID's 95 % interval, the noise-aware front (`data.pareto_numbers`) a step line through them;
  PRUNED trials are orange crosses and FAIL trials red X's, drawn at their FID when they have
  one, else in a grey "no FID" band along the top edge, at their cost. The FID axis never zooms
  in on noise: it spans every interval with a margin and at least four median interval widths
  (`fid_axis_range`), so intervals that overlap look like they overlap.
- ``spend_over_time.png``: cumulative spend, split into useful and wasted (stacked areas), with
  the budget as a dashed line.
- ``spend_by_phase.png``, ``spend_by_activity.png``, ``spend_by_cluster.png``,
  ``spend_by_trial.png``: horizontal bars, useful + wasted stacked. Phase and activity come from
  the ledger's split of each segment over what the job did in it (`data.split_by`), so a run that
  did all its phases in one job shows every phase.

Every figure is written even when there is nothing to draw (it then says so), so the page that
links them never has a broken image.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
from itertools import accumulate
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

from budget_lab.io import atomic_write
from budget_lab.report.data import (
    ReportData,
    TrialRow,
    cumulative_spend,
    spend_by,
    split_by,
    usd,
)

__all__ = [
    "FIGURES",
    "fid_axis_range",
    "pareto_figure",
    "plot_pareto",
    "plot_spend_over_time",
    "plot_spend_by",
    "write_figures",
]

# name -> file name; the HTML page and the tests use these names.
FIGURES: dict[str, str] = {
    "pareto": "pareto.png",
    "spend_over_time": "spend_over_time.png",
    "spend_by_phase": "spend_by_phase.png",
    "spend_by_activity": "spend_by_activity.png",
    "spend_by_cluster": "spend_by_cluster.png",
    "spend_by_trial": "spend_by_trial.png",
}

_DPI = 110
_USEFUL = "#2b7bba"  # blue: spend that produced kept work
_WASTED = "#d9534f"  # red: spend whose work was lost
_FRONT = "#1a9850"  # green: the Pareto front
_PRUNED = "#f0883e"
_FAIL = "#c0392b"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as a PNG, atomically (a reader never sees half a file)."""
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _usd_tick(x: float, _pos: object = None) -> str:
    """An axis tick in dollars: CPU trials cost fractions of a cent (`data.usd`)."""
    return usd(x)


def fid_axis_range(trials: list[TrialRow], top_room: float = 0.0) -> tuple[float, float] | None:
    """(bottom, top) of the FID axis for `trials` (None when none has an FID).

    The range holds every trial's FID interval (a trial without one: its FID) plus 8 % of the
    span on each side, and spans at least four median interval widths (centred on the data), so
    a spread the size of the noise does not fill the plot. `top_room`: an extra fraction of the
    span above (the "no FID" band). The bottom stays at 0 or above when every FID does.
    """
    bounds = [t.fid_interval for t in trials if t.fid is not None]
    if not bounds:
        return None
    low = min(lo for lo, _ in bounds)  # type: ignore[union-attr]
    high = max(hi for _, hi in bounds)  # type: ignore[union-attr]
    widths = [hi - lo for lo, hi in bounds if hi > lo]  # type: ignore[operator]
    span = max(high - low, 4 * statistics.median(widths) if widths else 0.0)
    if span <= 0:  # one exact FID, or several equal ones
        span = max(abs(high) * 0.1, 1.0)
    centre = (low + high) / 2
    bottom, top = centre - span / 2 - 0.08 * span, centre + span / 2 + 0.08 * span
    if bottom < 0 <= low:  # FID is never negative: shift up rather than show negative FIDs
        top, bottom = top - bottom, 0.0
    return bottom, top + top_room * span


def _n_label(trials: list[TrialRow]) -> str:
    """``N=256`` (or ``N=128-256``) of the trials' FIDs; "" when none says."""
    ns = sorted({t.fid_n for t in trials if t.fid is not None and t.fid_n is not None})
    if not ns:
        return ""
    return f"N={ns[0]}" if len(ns) == 1 else f"N={ns[0]}-{ns[-1]}"


def _error_bars(ax, trials: list[TrialRow], color: str) -> None:
    """Vertical bars over the FID's 95 % interval of each of `trials` that has one."""
    with_ci = [t for t in trials if t.fid is not None and t.fid_lo is not None]
    if not with_ci:
        return
    ax.errorbar(
        [t.cost_usd for t in with_ci],
        [t.fid for t in with_ci],
        yerr=[
            [max(t.fid - t.fid_lo, 0.0) for t in with_ci],  # type: ignore[operator]
            [max(t.fid_hi - t.fid, 0.0) for t in with_ci],  # type: ignore[operator]
        ],
        fmt="none",
        ecolor=color,
        elinewidth=1.3,
        capsize=3,
        alpha=0.8,
        zorder=2.5,
    )


def pareto_figure(data: ReportData) -> Figure:
    """The FID-vs-$ figure (what `plot_pareto` saves): one dot per trial, its FID's 95 %
    interval as a vertical bar, the noise-aware front as a step line."""
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot()
    ax.set_title("FID vs cost per trial (lower left is better)")
    trials = data.trials
    if not trials:
        _empty(ax, "no trials yet")
        return fig

    # COMPLETE trials with an FID: the candidates for the front.
    done = [t for t in trials if t.state == "COMPLETE" and t.fid is not None]
    _error_bars(ax, done, _USEFUL)
    ax.scatter(
        [t.cost_usd for t in done],
        [t.fid for t in done],
        s=36,
        color=_USEFUL,
        zorder=3,
        label=f"complete ({len(done)})",
    )
    for t in done:
        ax.annotate(
            f"#{t.number}",
            (t.cost_usd, t.fid),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )

    # The noise-aware front: no other trial is better beyond the noise (FID intervals apart, or
    # cheaper beyond the cost tolerance). Its points are ringed; the step line is their lower
    # envelope (the best FID bought so far), so a front point that is dearer and a little worse
    # than another, within the noise, sits ringed just above the line.
    front = sorted((t for t in done if t.pareto), key=lambda t: (t.cost_usd, t.fid))
    if front:
        envelope = list(accumulate((float(t.fid) for t in front), min))  # type: ignore[arg-type]
        ax.step(
            [t.cost_usd for t in front],
            envelope,
            where="post",
            color=_FRONT,
            linewidth=2,
            zorder=2,
            label=f"front within noise ({len(front)})",
        )
        ax.scatter(
            [t.cost_usd for t in front],
            [t.fid for t in front],
            s=90,
            facecolors="none",
            edgecolors=_FRONT,
            linewidths=1.5,
            zorder=4,
        )

    # PRUNED and FAIL trials: at their FID if they have one, else in a grey "no FID" band along
    # the top edge, at their cost.
    rug = blended_transform_factory(ax.transData, ax.transAxes)
    has_rug = any(t.fid is None and t.state in ("PRUNED", "FAIL") for t in trials)
    if has_rug:
        ax.add_patch(Rectangle((0, 0.92), 1, 0.08, transform=ax.transAxes, color="0.93", zorder=0))
        ax.text(
            0.995,
            0.96,
            "no FID",
            transform=ax.transAxes,
            ha="right",
            va="center",
            fontsize=8,
            color="0.4",
        )
    for state, marker, color in (("PRUNED", "x", _PRUNED), ("FAIL", "X", _FAIL)):
        group = [t for t in trials if t.state == state]
        if not group:
            continue
        with_fid = [t for t in group if t.fid is not None]
        no_fid = [t for t in group if t.fid is None]
        label = f"{state.lower()} ({len(group)})"
        if with_fid:
            _error_bars(ax, with_fid, color)
            ax.scatter(
                [t.cost_usd for t in with_fid],
                [t.fid for t in with_fid],
                marker=marker,
                s=50,
                color=color,
                zorder=3,
                label=label,
            )
            label = None
        if no_fid:
            ax.scatter(
                [t.cost_usd for t in no_fid],
                [0.96] * len(no_fid),
                marker=marker,
                s=50,
                color=color,
                transform=rug,
                clip_on=False,
                zorder=3,
                label=(label + ", no FID") if label else None,
            )
    # Axes: every trial's cost in view (from $0); every FID interval in view, the FID axis at
    # least four interval widths tall, and room above for the "no FID" band.
    y_range = fid_axis_range(trials, top_room=0.15 if has_rug else 0.0)
    if y_range is not None:
        ax.set_ylim(*y_range)
    else:
        ax.text(0.5, 0.5, "no trial has an FID yet", ha="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlim(0, max(t.cost_usd for t in trials) * 1.1 or 1.0)
    ax.set_xlabel("cost per trial (USD)")
    n = _n_label(trials)
    bars = any(t.fid_lo is not None for t in trials)
    ax.set_ylabel("FID" + (f" at {n}" if n else "") + (" (bars: 95% interval)" if bars else ""))
    ax.xaxis.set_major_formatter(_usd_tick)
    ax.grid(True, alpha=0.3)
    # Nothing lies below-left of the front (that is what the front means): the legend goes there.
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    return fig


def plot_pareto(data: ReportData, path: str | os.PathLike[str]) -> Path:
    """Save `pareto_figure` as a PNG; returns its path."""
    return _save(pareto_figure(data), path)


def plot_spend_over_time(data: ReportData, path: str | os.PathLike[str]) -> Path:
    """Cumulative spend (useful and wasted stacked) against hours since the first segment."""
    fig = Figure(figsize=(7.0, 3.8))
    ax = fig.add_subplot()
    ax.set_title("Cumulative spend")
    if not data.spend:
        _empty(ax, "no spend recorded")
        return _save(fig, path)

    times, total, wasted = cumulative_spend(data.spend)
    t0 = times[0]
    hours = [(t - t0) / 3600.0 for t in times]
    useful = [a - b for a, b in zip(total, wasted, strict=True)]
    ax.fill_between(hours, 0, useful, color=_USEFUL, alpha=0.75, label="useful", linewidth=0)
    ax.fill_between(hours, useful, total, color=_WASTED, alpha=0.75, label="wasted", linewidth=0)
    ax.plot(hours, total, color="0.2", linewidth=1.2, label=f"total {usd(total[-1])}")
    if data.budget_usd is not None:
        ax.axhline(
            data.budget_usd,
            color="0.3",
            linestyle="--",
            linewidth=1,
            label=f"budget {usd(data.budget_usd)}",
        )
        ax.set_ylim(0, max(total[-1], data.budget_usd) * 1.1)
    else:
        ax.set_ylim(0, max(total[-1], 1e-9) * 1.1)
    start = dt.datetime.fromtimestamp(t0, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ax.set_xlabel(f"hours since the first segment ({start})")
    ax.set_ylabel("spent (USD)")
    ax.set_xlim(0, max(hours[-1], 1e-9))
    ax.yaxis.set_major_formatter(_usd_tick)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_spend_by(data: ReportData, key: str, path: str | os.PathLike[str]) -> Path:
    """Horizontal bars of spend per `key` (phase, activity, cluster, trial or run), useful +
    wasted. Phase and activity: the ledger's split (`split_by`)."""
    groups = split_by(data, key) if key in ("phase", "activity") else spend_by(data.spend, key)
    labels = list(groups)[::-1]  # the first (largest, or the job's first activity) on top
    height = 1.2 + 0.35 * max(len(labels), 2)
    fig = Figure(figsize=(7.0, min(height, 12.0)))
    ax = fig.add_subplot()
    ax.set_title(f"Spend by {key}")
    if not labels:
        _empty(ax, "no spend recorded")
        return _save(fig, path)

    useful = [groups[k][0] for k in labels]
    wasted = [groups[k][1] for k in labels]
    ax.barh(labels, useful, color=_USEFUL, label="useful")
    ax.barh(labels, wasted, left=useful, color=_WASTED, label="wasted")
    for i, (u, w) in enumerate(zip(useful, wasted, strict=True)):
        ax.annotate(usd(u + w), (u + w, i), textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax.set_xlim(0, max(u + w for u, w in zip(useful, wasted, strict=True)) * 1.18 or 1.0)
    ax.set_xlabel("spent (USD)")
    ax.xaxis.set_major_formatter(_usd_tick)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def write_figures(data: ReportData, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every figure of `FIGURES` into `out_dir`; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "pareto": plot_pareto(data, out / FIGURES["pareto"]),
        "spend_over_time": plot_spend_over_time(data, out / FIGURES["spend_over_time"]),
        "spend_by_phase": plot_spend_by(data, "phase", out / FIGURES["spend_by_phase"]),
        "spend_by_activity": plot_spend_by(data, "activity", out / FIGURES["spend_by_activity"]),
        "spend_by_cluster": plot_spend_by(data, "cluster", out / FIGURES["spend_by_cluster"]),
        "spend_by_trial": plot_spend_by(data, "trial", out / FIGURES["spend_by_trial"]),
    }
