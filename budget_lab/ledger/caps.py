"""Caps: refuse a launch that would overspend, and stop running work before it does.

Before a launch (`launch --budget-usd`, `sweep --budget-usd`, the workspace's monthly budget):

    check_budget(workspace, estimate, budget_usd=100, sweep="s")   # spend read from the ledger
    check_figures(estimate.usd, budget_usd=100, spent_usd=12.5)   # the same on given figures

Both raise `BudgetError` (a `UserError`: printed, exit 2) with the estimate, the spend so far and
what remains.

While work runs, a controller asks a `BudgetGuard` at every check (a pure object: no I/O, no
clock) which runs to stop and which thresholds were newly crossed:

    guard = BudgetGuard(100.0, check_interval_s=60, crossed=ledger.crossed_thresholds(scope))
    decision = guard.check(spent_usd=ledger.spent(sweep="s"), running=[RunningJob(...), ...])
    for run in decision.stop: request_stop_file(run_dir(run), "budget cap", kind=BUDGET_CAP)
    for t in decision.crossed: if ledger.record_threshold(scope, t, ...): tell the user

A job left running until the next check, then told to stop, spends up to
`check_interval_s + stop_latency_s` more (a STOP file is read at the next step, which then saves
a checkpoint). The guard stops jobs - the newest first, since less is sunk in them - as soon as
the spend so far plus that much of every running job's burn would reach the budget, so the cap
holds as long as each job stops within its declared `stop_latency_s` (at most one checkpoint
interval) and `spent_usd` is no staler than `spend_lag_s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from budget_lab.errors import UserError
from budget_lab.units import usd

__all__ = [
    "BudgetError",
    "check_budget",
    "check_figures",
    "month_start",
    "month_scope",
    "RunningJob",
    "GuardDecision",
    "BudgetGuard",
    "DEFAULT_THRESHOLDS",
]

#: Fractions of a budget reported once each as spend passes them.
DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)


class BudgetError(UserError):
    """A launch would take spend past a budget. Carries the figures the message states."""

    def __init__(
        self,
        message: str,
        *,
        estimate_usd: float,
        spent_usd: float,
        remaining_usd: float,
        budget_usd: float,
        scope: str,
    ):
        super().__init__(message)
        self.estimate_usd = estimate_usd  # what the refused launch was estimated to cost
        self.spent_usd = spent_usd  # already spent in the budget's scope
        self.remaining_usd = remaining_usd  # budget - spent (never below 0)
        self.budget_usd = budget_usd
        self.scope = scope  # "launch", "sweep:<name>", "run:<name>", "month:YYYY-MM"


def month_start(now: float) -> float:
    """Epoch seconds of the first instant of `now`'s calendar month (UTC)."""
    t = datetime.fromtimestamp(now, tz=timezone.utc)
    return datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp()


def month_scope(now: float) -> str:
    """The ledger scope of the monthly budget, e.g. "month:2026-11"."""
    return "month:" + datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m")


def _usd(x: float) -> str:
    return usd(x)


def check_figures(
    estimate_usd: float,
    *,
    budget_usd: float | None = None,
    spent_usd: float = 0.0,
    scope: str = "launch",
    monthly_budget_usd: float | None = None,
    month_spent_usd: float = 0.0,
    month: str = "this month",
) -> None:
    """Raise `BudgetError` if `estimate_usd` on top of the spend so far passes a budget (pure).

    `budget_usd` is the launch's or sweep's own cap (`--budget-usd`), with `spent_usd` already
    spent in that `scope`; `monthly_budget_usd` the workspace's, with `month_spent_usd` spent.
    """
    if budget_usd is not None:
        remaining = max(budget_usd - spent_usd, 0.0)
        if estimate_usd > remaining + 1e-9:
            raise BudgetError(
                f"refused: the estimated cost {_usd(estimate_usd)} exceeds what remains of the "
                f"budget: {_usd(budget_usd)} budget ({scope}), {_usd(spent_usd)} already spent, "
                f"{_usd(remaining)} remaining. Raise --budget-usd, make the run cheaper (fewer "
                "steps, a smaller batch, a higher mask ratio, a spot cluster; see `budget-lab "
                "launch --dry-run`), or look at the spend with `budget-lab cost report`",
                estimate_usd=estimate_usd,
                spent_usd=spent_usd,
                remaining_usd=remaining,
                budget_usd=budget_usd,
                scope=scope,
            )
    if monthly_budget_usd is not None:
        remaining = max(monthly_budget_usd - month_spent_usd, 0.0)
        if estimate_usd > remaining + 1e-9:
            raise BudgetError(
                f"refused: the estimated cost {_usd(estimate_usd)} exceeds what remains of the "
                f"workspace's monthly budget: {_usd(monthly_budget_usd)} for {month}, "
                f"{_usd(month_spent_usd)} already spent, {_usd(remaining)} remaining. Raise "
                "monthly_budget_usd in workspace.yaml, make the run cheaper, or wait for the next "
                "month",
                estimate_usd=estimate_usd,
                spent_usd=month_spent_usd,
                remaining_usd=remaining,
                budget_usd=monthly_budget_usd,
                scope=f"month:{month}",
            )


def check_budget(
    workspace: Any,
    estimate: Any,
    *,
    budget_usd: float | None = None,
    sweep: str | None = None,
    run: str | None = None,
    ledger: Any = None,
    now: float | None = None,
) -> None:
    """Refuse (`BudgetError`) a launch whose estimate (an `Estimate` or dollars) passes
    `budget_usd` or the workspace's monthly budget (workspace.yaml), spend so far read from the
    ledger: a sweep's budget counts the sweep's spend, a run's budget the run's (a resumed run),
    the monthly budget the calendar month's (UTC). `ledger` defaults to the workspace's (opened
    only when a spend has to be read)."""
    estimate_usd = float(getattr(estimate, "usd", estimate))
    monthly = workspace.monthly_budget_usd
    needs_ledger = monthly is not None or (budget_usd is not None and (sweep or run))
    if not needs_ledger:
        check_figures(estimate_usd, budget_usd=budget_usd)
        return
    now = time.time() if now is None else now
    opened = None
    if ledger is None:
        from budget_lab.ledger.store import Ledger  # SQLAlchemy: only when the ledger is read

        ledger = opened = Ledger.for_workspace(workspace)
    try:
        spent, scope = 0.0, "launch"
        if budget_usd is not None and sweep is not None:
            spent, scope = ledger.spent(sweep=sweep), f"sweep:{sweep}"
        elif budget_usd is not None and run is not None:
            spent, scope = ledger.spent(run=run), f"run:{run}"
        month_spent = ledger.spent(since=month_start(now)) if monthly is not None else 0.0
    finally:
        if opened is not None:
            opened.close()
    check_figures(
        estimate_usd,
        budget_usd=budget_usd,
        spent_usd=spent,
        scope=scope,
        monthly_budget_usd=monthly,
        month_spent_usd=month_spent,
        month=month_scope(now).removeprefix("month:"),
    )


@dataclass(frozen=True)
class RunningJob:
    """A job the guard may stop."""

    run: str  # run name (its folder gets the STOP file)
    usd_per_hour: float  # what it burns: GPUs x $/GPU-hour
    stop_latency_s: (
        float  # how long it may still run once told to stop (<= one checkpoint interval)
    )
    started_at: float = 0.0  # newer jobs are stopped first
    stopping: bool = False  # a STOP was already written; it is winding down


@dataclass
class GuardDecision:
    """What a `BudgetGuard.check` decided."""

    stop: list[str]  # runs to stop now (write their STOP file)
    crossed: list[float]  # thresholds crossed since the last check (fractions of the budget)
    spent_usd: float
    committed_usd: float  # spent + the most the running jobs can add if left until the next check
    budget_usd: float

    @property
    def remaining_usd(self) -> float:
        return max(self.budget_usd - self.spent_usd, 0.0)


@dataclass
class BudgetGuard:
    """Decides, from the spend so far and the running jobs, which runs to stop (see module doc)."""

    budget_usd: float  # the cap
    check_interval_s: float = 60.0  # seconds until the controller checks again
    spend_lag_s: float = 0.0  # how stale spent_usd may be (accounting rows appear late)
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS  # fractions reported once each
    crossed: set[float] = field(default_factory=set)  # already reported (e.g. from the ledger)

    def __post_init__(self) -> None:
        if not (self.budget_usd >= 0 and math.isfinite(self.budget_usd)):
            raise UserError(f"budget {self.budget_usd!r} is invalid: expected dollars >= 0")
        self.crossed = set(self.crossed)

    def _burn(self, job: RunningJob, horizon_s: float) -> float:
        return job.usd_per_hour / 3600 * horizon_s

    def committed(self, spent_usd: float, running: Iterable[RunningJob]) -> float:
        """Spend plus the most each running job adds if not stopped at this check."""
        total = spent_usd
        for job in running:
            horizon = self.spend_lag_s + job.stop_latency_s
            if not job.stopping:
                horizon += self.check_interval_s
            total += self._burn(job, horizon)
        return total

    def check(self, spent_usd: float, running: Sequence[RunningJob]) -> GuardDecision:
        """Runs to stop now, and the thresholds newly crossed by `spent_usd`."""
        committed = self.committed(spent_usd, running)
        stop: list[str] = []
        if committed >= self.budget_usd:
            # Stopping a job now saves its burn until the next check; stop the newest first until
            # what is left fits (or nothing is left to stop).
            for job in sorted(
                (j for j in running if not j.stopping), key=lambda j: j.started_at, reverse=True
            ):
                if committed < self.budget_usd:
                    break
                stop.append(job.run)
                committed -= self._burn(job, self.check_interval_s)
        if self.budget_usd > 0:
            fraction = spent_usd / self.budget_usd
        else:  # a zero budget: any spend crosses every threshold
            fraction = math.inf if spent_usd > 0 else 0.0
        newly = sorted(t for t in self.thresholds if fraction >= t and t not in self.crossed)
        self.crossed.update(newly)
        return GuardDecision(
            stop=stop,
            crossed=newly,
            spent_usd=spent_usd,
            committed_usd=committed,
            budget_usd=self.budget_usd,
        )

    def can_launch(
        self, estimate_usd: float, spent_usd: float, running: Sequence[RunningJob]
    ) -> bool:
        """Whether a new job estimated at `estimate_usd` fits beside the committed spend."""
        return self.committed(spent_usd, running) + estimate_usd <= self.budget_usd
