"""What a report shows, as plain data: trials of a sweep and priced spend rows from the ledger.

`ReportData` is the contract between the loader (which reads the Optuna study and the ledger) and
the renderers (figures, HTML page, terminal tables, W&B report). A sweep also writes it as
``sweeps/<sweep>/summary.json`` (`report_data_to_json`, read back with `report_data_from_json`).

Money comes in two kinds: *useful* spend produced work that was kept (a checkpoint, a finished
run) and *wasted* spend did not (GPU time after the last checkpoint of a preempted segment, a
failed run). ``cost_usd`` always includes ``wasted_usd``: useful = cost - wasted.

Every score is a measurement: a trial's FID comes with its 95 % interval ``[fid_lo, fid_hi]``
at ``fid_n`` generated images, KID with its spread, alignment with its interval (all None for a
trial of an older study, which is then treated as exact at its FID).

Where the money went: ``parts`` is the ledger's split of every segment over what the job did in it
(`budget_lab.ledger.sync`: start-up, training per phase, checkpoint writes, evaluation, sample
grids, idle, other); the parts sum to the segments' total. `split_by` and `cost_matrix` read it
(dollars per phase, per activity, phase x activity). A trial's ``estimate_usd`` is what was
expected before it was launched, ``estimate_error`` = settled / estimate - 1.

The helpers below aggregate spend (by phase, cluster, trial, over time), find the noise-aware
Pareto front of FID vs $ (`budget_lab.sweep.decide.robust_front`: a trial leaves the front only
for a difference beyond the noise) and format dollars (`usd`) and scores (`fid_text`, ...);
every renderer uses them, so the page, the terminal and W&B agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_lab.errors import DataError
from budget_lab.eval.measurement import Measurement
from budget_lab.sweep.decide import (
    config_from_rows,
    decide,
    group_repeats,
    pair_trials,
    robust_front,
)
from budget_lab.sweep.spec import REPEAT_PARAM
from budget_lab.units import usd

__all__ = [
    "TRIAL_STATES",
    "SUMMARY_FORMAT",
    "COST_TOLERANCE",
    "TrialRow",
    "SpendRow",
    "CostPart",
    "ReportData",
    "report_data_to_dict",
    "report_data_from_dict",
    "report_data_to_json",
    "report_data_from_json",
    "read_report_data",
    "pareto_numbers",
    "mark_pareto",
    "sweep_verdict",
    "best_trials",
    "usd",
    "fid_text",
    "kid_text",
    "alignment_text",
    "spend_by",
    "split_parts",
    "split_by",
    "cost_matrix",
    "estimate_text",
    "cumulative_spend",
]

TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # Optuna's names for a trial's state
SUMMARY_FORMAT = "budget-lab-report/1"  # the "format" key of summary.json; bumped on a change
COST_TOLERANCE = 0.1  # relative $ differences below this are noise, unless the sweep says otherwise
# What a sweep writes into summary.json beside the report data (its decisions, read elsewhere).
_SWEEP_KEYS = (
    "tiers",
    "front",
    "configs",
    "tied",
    "tied_with_best",
    "indistinguishable",
    "separates",
)

ParamValue = float | int | str | bool


@dataclass
class TrialRow:
    """One trial of a sweep (one training run), with what it reached and what it cost."""

    number: int  # Optuna trial number
    state: str  # COMPLETE, PRUNED (cut by a pruner or the budget), FAIL or RUNNING
    params: dict[str, ParamValue]  # the sampled hyperparameters
    fid: float | None  # FID of the final model; None when the run was not evaluated
    cost_usd: float  # everything the run cost, wasted spend included
    gpu_hours: float  # GPU-hours billed to the run
    wasted_usd: float  # the part of cost_usd that produced no kept work
    run: str | None = None  # run name, `<sweep>-<trial:03d>`
    run_dir: str | None = None  # absolute run folder
    grid_path: str | None = None  # PNG sample grid of the run, if any
    objective_values: list[float] | None = None  # what was told to Optuna (None until told)
    pareto: bool = False  # on the noise-aware FID-vs-$ front of the COMPLETE trials
    fid_lo: float | None = None  # 95 % interval of the FID at fid_n images; None: no interval
    fid_hi: float | None = None
    fid_n: int | None = None  # generated images the FID was computed from
    kid: float | None = None  # KID (unbiased at any N), mean over subsets
    kid_std: float | None = None  # its standard deviation over subsets
    alignment: float | None = None  # text alignment in [0, 1] (built-in data), else None
    alignment_lo: float | None = None  # its 95 % interval
    alignment_hi: float | None = None
    estimate_usd: float | None = None  # what the controller estimated before launching it
    estimate_error: float | None = None  # cost_usd / estimate_usd - 1 (None: no estimate)

    def __post_init__(self) -> None:
        if self.state not in TRIAL_STATES:
            raise DataError(
                f"trial {self.number}: unknown state {self.state!r}; "
                f"expected one of {', '.join(TRIAL_STATES)}"
            )

    @property
    def useful_usd(self) -> float:
        """Spend that produced kept work."""
        return self.cost_usd - self.wasted_usd

    @property
    def fid_interval(self) -> tuple[float, float] | None:
        """(lo, hi) of the FID: its 95 % interval, zero-width at the FID for a trial without
        one (an older study); None without an FID."""
        if self.fid is None:
            return None
        if self.fid_lo is None or self.fid_hi is None:
            return (self.fid, self.fid)
        return (self.fid_lo, self.fid_hi)


@dataclass
class SpendRow:
    """One priced ledger segment: a stretch of time a job held GPUs (or a CPU) and what it cost."""

    run: str | None  # run name; None for spend not tied to a run
    trial: int | None  # trial number when the run belongs to the sweep
    phase: str | None  # training phase (e.g. "pretrain", "finetune"); None when unknown
    cluster: str  # cluster name, as in clusters/*.yaml
    start: float  # epoch seconds
    end: float  # epoch seconds (>= start)
    cost_usd: float  # price of the segment, wasted spend included
    wasted_usd: float  # the part of cost_usd whose work was lost
    gpu_seconds: float  # GPU-seconds billed (GPUs x wall seconds)

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise DataError(
                f"spend row of run {self.run!r}: end {self.end} is before start {self.start}"
            )


@dataclass
class CostPart:
    """The part of the spend of one run spent on one activity in one phase (the ledger's split
    of its segments, `budget_lab.ledger.store.SegmentPart`, summed over the run's segments)."""

    run: str | None  # run name; None for spend not tied to a run
    trial: int | None  # trial number when the run belongs to the sweep
    phase: str | None  # training phase; None when unknown
    activity: str  # startup | train | checkpoint | eval | sample_grid | idle | other
    cost_usd: float  # its dollars, wasted spend included
    wasted_usd: float  # the part of cost_usd whose work was lost
    gpu_seconds: float  # GPU-seconds in this part


@dataclass
class ReportData:
    """Everything one report shows: a sweep (or a whole workspace) and its spend."""

    title: str  # page heading, e.g. "Sweep mask_ratio"
    sweep: str | None  # sweep name; None for a report over all runs
    objective: str | None  # what the sweep minimised, e.g. "fid+cost"
    objective_formula: str | None  # human-readable, e.g. "FID + 2.0 x $"
    trials: list[TrialRow] = field(default_factory=list)
    spend: list[SpendRow] = field(default_factory=list)
    stop_reason: str | None = None  # why the sweep stopped (budget, n_trials, ...); None if running
    budget_usd: float | None = None  # the sweep's (or month's) cap, when there is one
    generated_at: float = 0.0  # epoch seconds when the data was read
    verdict: str | None = None  # what the sweep found beyond the noise, in words (decide.py)
    cost_tolerance: float = COST_TOLERANCE  # the front's "$ within this count as equal"
    # The spend split by run, phase and activity; sums to total_usd. Empty in a summary written
    # before the split existed (`split_by` then falls back to the segments' phases).
    parts: list[CostPart] = field(default_factory=list)

    @property
    def total_usd(self) -> float:
        """Everything spent, from the ledger rows."""
        return sum(row.cost_usd for row in self.spend)

    @property
    def wasted_usd(self) -> float:
        return sum(row.wasted_usd for row in self.spend)

    @property
    def useful_usd(self) -> float:
        return self.total_usd - self.wasted_usd

    @property
    def gpu_hours(self) -> float:
        return sum(row.gpu_seconds for row in self.spend) / 3600.0

    def count(self, state: str) -> int:
        """Number of trials in `state` (one of TRIAL_STATES)."""
        return sum(1 for t in self.trials if t.state == state)


# --------------------------------------------------------------------------------------------
# JSON (summary.json)
# --------------------------------------------------------------------------------------------


def report_data_to_dict(data: ReportData) -> dict[str, Any]:
    """A JSON-ready dict with a "format" key; `report_data_from_dict` reads it back."""
    return {"format": SUMMARY_FORMAT, **dataclasses.asdict(data)}


def _build(cls: type, raw: Any, where: str) -> Any:
    """`cls(**raw)`, turning a wrong shape or a missing/unknown key into a DataError."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; expected keys {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as err:  # a required key is missing
        raise DataError(f"{where}: {err}") from None


def report_data_from_dict(raw: Any) -> ReportData:
    """Inverse of `report_data_to_dict`; raises DataError on a wrong format or shape."""
    if not isinstance(raw, dict) or raw.get("format") != SUMMARY_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(
            f"not a budget-lab report summary (format {found!r}, expected {SUMMARY_FORMAT!r}); "
            "re-create it with `budget-lab report` or the sweep that wrote it"
        )
    body = {k: v for k, v in raw.items() if k != "format" and k not in _SWEEP_KEYS}
    trials = [_build(TrialRow, t, f"trials[{i}]") for i, t in enumerate(body.pop("trials", []))]
    spend = [_build(SpendRow, s, f"spend[{i}]") for i, s in enumerate(body.pop("spend", []))]
    parts = [_build(CostPart, p, f"parts[{i}]") for i, p in enumerate(body.pop("parts", []))]
    return _build(
        ReportData, {**body, "trials": trials, "spend": spend, "parts": parts}, "report summary"
    )


def report_data_to_json(data: ReportData) -> str:
    """The summary.json text (indented, ends with a newline)."""
    return json.dumps(report_data_to_dict(data), indent=2) + "\n"


def report_data_from_json(text: str) -> ReportData:
    """Parse summary.json text written by `report_data_to_json`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"report summary is not valid JSON: {err}") from None
    return report_data_from_dict(raw)


def read_report_data(path: str | os.PathLike[str]) -> ReportData:
    """Read a summary.json file; errors name the path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read report summary {path}: {err.strerror}") from None
    try:
        return report_data_from_json(text)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------
# Pareto front and best trials
# --------------------------------------------------------------------------------------------


def _scored(trials: Iterable[TrialRow]) -> list[TrialRow]:
    """COMPLETE trials with a finite FID: the only ones that can be on the front."""
    return [
        t for t in trials if t.state == "COMPLETE" and t.fid is not None and math.isfinite(t.fid)
    ]


def pareto_numbers(trials: Iterable[TrialRow], cost_tolerance: float = COST_TOLERANCE) -> set[int]:
    """Numbers of the COMPLETE trials on the noise-aware FID-vs-$ front
    (`budget_lab.sweep.decide.robust_front`): a trial leaves the front only when another is
    clearly better, i.e. its FID interval lies below this one's or it is cheaper by more than
    `cost_tolerance` (relative), and clearly worse in neither. A trial without an interval
    counts as exact at its FID (zero-width interval)."""

    scored = _scored(trials)
    fids = []
    for t in scored:
        fid, (lo, hi) = float(t.fid), t.fid_interval  # type: ignore[arg-type, misc]
        se = (hi - lo) / 3.92  # the 95 % interval is value ± 1.96 se
        fids.append(Measurement(fid, lo, hi, se, t.fid_n or 0, "interval"))
    front, _ = robust_front(fids, [t.cost_usd for t in scored], cost_tolerance)
    return {scored[i].number for i in front}


def mark_pareto(
    trials: Sequence[TrialRow], cost_tolerance: float = COST_TOLERANCE
) -> list[TrialRow]:
    """Copies of `trials` with `pareto` set from `pareto_numbers` (for loaders)."""
    front = pareto_numbers(trials, cost_tolerance)
    return [dataclasses.replace(t, pareto=t.number in front) for t in trials]


def sweep_verdict(
    trials: Iterable[TrialRow],
    objective: str | None,
    cost_tolerance: float = COST_TOLERANCE,
    fid_baseline: float | None = None,
) -> str | None:
    """What the sweep found beyond the noise, in words: `budget_lab.sweep.decide.decide` over
    the COMPLETE trials (repeats of one configuration merged, as the sweep does). `objective`
    is the sweep's (pareto when unknown); fid_per_dollar ranks by FID points per $ from
    `fid_baseline` (the untrained model's FID): None without it."""

    objective = objective or "pareto"
    if objective == "fid_per_dollar" and fid_baseline is None:
        return None
    rows = []
    for t in _scored(trials):
        lo, hi = t.fid_interval  # type: ignore[misc]
        rows.append(
            {
                "number": t.number,
                "params": t.params,
                "fid": t.fid,
                "fid_ci95": [lo, hi],
                "fid_n": t.fid_n,
                "cost_usd": t.cost_usd,
                "run_dir": t.run_dir,
                "alignment": t.alignment,
                "alignment_ci95": None
                if t.alignment_lo is None or t.alignment_hi is None
                else [t.alignment_lo, t.alignment_hi],
            }
        )
    configs = []
    for key, params, group in group_repeats(rows, REPEAT_PARAM):
        config = config_from_rows(key, params, group, objective, fid_baseline)
        if config is not None:
            configs.append(config)
    pair_trials(configs, rows, objective)  # as the sweep does: paired where the runs allow
    return decide(configs, objective, cost_tolerance).verdict


def best_trials(trials: Iterable[TrialRow], n: int) -> list[TrialRow]:
    """The `n` COMPLETE trials with the lowest FID (ties: the cheaper first)."""
    return sorted(_scored(trials), key=lambda t: (t.fid, t.cost_usd, t.number))[:n]


# --------------------------------------------------------------------------------------------
# Text: dollars and scores
# --------------------------------------------------------------------------------------------


def fid_text(t: TrialRow) -> str:
    """``212.4 [205.1, 219.7]`` with its 95 % interval, ``212.40`` without one, "—" without
    an FID."""
    if t.fid is None:
        return "—"
    if t.fid_lo is None or t.fid_hi is None:
        return f"{t.fid:.2f}"
    return f"{t.fid:.1f} [{t.fid_lo:.1f}, {t.fid_hi:.1f}]"


def kid_text(t: TrialRow) -> str:
    """``0.0123 ± 0.0021`` (KID ± its std over subsets), "—" without a KID."""
    if t.kid is None:
        return "—"
    if t.kid_std is None:
        return f"{t.kid:.4f}"
    return f"{t.kid:.4f} ± {t.kid_std:.4f}"


def estimate_text(t: TrialRow) -> tuple[str, str]:
    """(estimate, error) of a trial as text: ``$0.0042``, ``+12%`` (settled / estimate - 1);
    "—" where there is none."""
    if t.estimate_usd is None:
        return "—", "—"
    error = "—" if t.estimate_error is None else f"{t.estimate_error:+.0%}"
    return usd(t.estimate_usd), error


def alignment_text(t: TrialRow) -> str:
    """``0.612 [0.551, 0.673]`` with its interval, "—" without an alignment score."""
    if t.alignment is None:
        return "—"
    if t.alignment_lo is None or t.alignment_hi is None:
        return f"{t.alignment:.3f}"
    return f"{t.alignment:.3f} [{t.alignment_lo:.3f}, {t.alignment_hi:.3f}]"


# --------------------------------------------------------------------------------------------
# Spend aggregates
# --------------------------------------------------------------------------------------------

_SPEND_KEYS: dict[str, Callable[[SpendRow], str]] = {
    "phase": lambda r: r.phase or "(no phase)",
    "cluster": lambda r: r.cluster,
    "trial": lambda r: f"trial {r.trial}" if r.trial is not None else "(no trial)",
    "run": lambda r: r.run or "(no run)",
}


def spend_by(spend: Iterable[SpendRow], key: str) -> dict[str, tuple[float, float]]:
    """``{label: (useful_usd, wasted_usd)}`` grouped by `key` (phase, cluster, trial or run),
    largest total first."""
    if key not in _SPEND_KEYS:
        raise ValueError(f"unknown spend key {key!r}; expected one of {', '.join(_SPEND_KEYS)}")
    label_of = _SPEND_KEYS[key]
    totals: dict[str, list[float]] = {}
    for row in spend:
        acc = totals.setdefault(label_of(row), [0.0, 0.0])
        acc[0] += row.cost_usd - row.wasted_usd
        acc[1] += row.wasted_usd
    ordered = sorted(totals.items(), key=lambda kv: (-(kv[1][0] + kv[1][1]), kv[0]))
    return {label: (useful, wasted) for label, (useful, wasted) in ordered}


#: The order activities are shown in (budget_lab.launch.activity.ACTIVITIES); others follow.
_ACTIVITY_ORDER = ("startup", "train", "checkpoint", "eval", "sample_grid", "idle", "other")


def split_parts(data: ReportData) -> list[CostPart]:
    """The report's spend split (`ReportData.parts`); for a summary without it, one part per
    segment: its phase, activity
    "other" (as `cost report --by activity` counts a segment the ledger has not split)."""
    if data.parts or not data.spend:
        return list(data.parts)
    return [
        CostPart(r.run, r.trial, r.phase, "other", r.cost_usd, r.wasted_usd, r.gpu_seconds)
        for r in data.spend
    ]


def _phase_label(phase: str | None) -> str:
    return phase or "(no phase)"


def split_by(data: ReportData, key: str) -> dict[str, tuple[float, float]]:
    """``{label: (useful_usd, wasted_usd)}`` of the whole spend by "phase" or "activity", from the
    ledger's split (each segment's dollars over what the job did in it): phases largest first,
    activities in the order of a job (startup, train, checkpoint, eval, ...). Sums to
    `total_usd`."""
    if key not in ("phase", "activity"):
        raise ValueError(f"unknown split key {key!r}; expected phase or activity")
    totals: dict[str, list[float]] = {}
    for part in split_parts(data):
        label = _phase_label(part.phase) if key == "phase" else part.activity
        acc = totals.setdefault(label, [0.0, 0.0])
        acc[0] += part.cost_usd - part.wasted_usd
        acc[1] += part.wasted_usd
    if key == "phase":
        order = sorted(totals, key=lambda k: (-(totals[k][0] + totals[k][1]), k))
    else:
        rank = {a: i for i, a in enumerate(_ACTIVITY_ORDER)}
        order = sorted(totals, key=lambda k: (rank.get(k, len(rank)), k))
    return {label: (totals[label][0], totals[label][1]) for label in order}


def cost_matrix(data: ReportData) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(phases, activities, {(phase, activity): usd}): the spend as a phase x activity table,
    in `split_by`'s orders; its cells sum to `total_usd`."""
    cells: dict[tuple[str, str], float] = {}
    for part in split_parts(data):
        key = (_phase_label(part.phase), part.activity)
        cells[key] = cells.get(key, 0.0) + part.cost_usd
    return list(split_by(data, "phase")), list(split_by(data, "activity")), cells


def cumulative_spend(spend: Sequence[SpendRow]) -> tuple[list[float], list[float], list[float]]:
    """Cumulative (times, total_usd, wasted_usd) at every segment start and end.

    A segment's cost accrues linearly from its start to its end (a zero-length segment all at
    once), so the curve is exact at each breakpoint and linear between them.
    """
    times = sorted({t for row in spend for t in (row.start, row.end)})

    def accrued(row: SpendRow, t: float, amount: float) -> float:
        if t >= row.end:
            return amount
        if t <= row.start:
            return 0.0
        return amount * (t - row.start) / (row.end - row.start)

    total = [sum(accrued(r, t, r.cost_usd) for r in spend) for t in times]
    wasted = [sum(accrued(r, t, r.wasted_usd) for r in spend) for t in times]
    return times, total, wasted
