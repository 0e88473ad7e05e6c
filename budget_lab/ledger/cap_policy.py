"""The budget cap as a sweep controller enforces it, on a clock the caller passes in.

`BudgetGuard` (caps.py) decides from figures which runs to stop. `CapPolicy` adds what a
controller decides around it: when the guard is due, what each job's stated stop latency is,
when a job told to stop is overdue and must be killed, and what a new trial may cost. It does no
I/O and reads no clock: the sweep controller calls it with `time.monotonic()` and does the
writing (STOP files) and the killing; `budget_lab.ledger.cap_sim` calls the same object with a
simulated clock, and tests/test_cap_sim.py checks the promise below over randomized sweeps.

    policy = CapPolicy(budget_usd, poll_s=0.25, guard_s=1.0, crossed=...)
    if estimate_usd > policy.headroom(spent_usd, outstanding_usd): refuse the launch
    if policy.due(now):
        check = policy.check(now, spent_usd, [CapJob(...), ...])
        for run, deadline in check.deadlines.items(): write run's STOP file, keep the deadline
    for run in policy.overdue(now, deadlines): kill run (scancel / SIGTERM, SIGKILL)

**The promise.** A job told to stop ends within its stated stop latency

    stop_latency_s = step_s + kill_grace_s + poll_s + kill_term_s

(`step_s` the job's measured seconds per training step): the trainer reads the STOP file at the
next step boundary and ends after a checkpoint; a job still running `step_s + kill_grace_s` after
the request (inside a rung or final FID, a slow checkpoint write, a hung step) is killed at the
next poll, and a kill takes up to `kill_term_s` (a submitit job ignores SIGTERM and dies at the
SIGKILL that follows: 5 s later for a local job, Slurm's KillWait for a Slurm job; the
controller kills in threads, so one kill never delays another). The guard stops jobs while the
spend plus every running job's burn over that latency (and the guard's period) still fits the
cap, so the sweep's final spend obeys

    final_usd <= cap_usd + sum over the jobs j running when the spend reaches the cap of
                 usd_per_s_j * (checkpoint_interval_s_j + stop_latency_s_j)

where `checkpoint_interval_s_j` is the time between two of job j's checkpoints (checkpoint.every
steps and one save) and `stop_latency_s_j` is its stated stop latency at that moment. The margin
covers what the guard cannot see coming: an estimate that is low (start-up, FIDs), a spend figure
up to one guard period old at a launch, a controller busy with a launch when a check is due.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from budget_lab.errors import UserError
from budget_lab.ledger.caps import BudgetGuard, GuardDecision, RunningJob

__all__ = [
    "KILL_GRACE_S",
    "KILL_TERM_S",
    "SLURM_KILL_WAIT_S",
    "UNMEASURED_STEP_S",
    "CapJob",
    "CapCheck",
    "CapPolicy",
    "launch_headroom",
]

#: Seconds a job asked to stop for the budget cap may run beyond one training step before the
#: controller kills it: the stated stop latency is one step + this + one poll.
KILL_GRACE_S = 10.0

#: Seconds from SIGTERM to SIGKILL when the controller kills a local job: the local backend's
#: `budget_lab.launch.local.KILL_GRACE_S` (not imported: this policy stays free of submitit).
KILL_TERM_S = 5.0

#: The same for a Slurm job: scancel's SIGTERM, then SIGKILL after the cluster's KillWait (30 s
#: is Slurm's default; the local test cluster sets 5 s).
SLURM_KILL_WAIT_S = 30.0

#: The step time a job is assumed to have before its first metrics row measures one.
UNMEASURED_STEP_S = 5.0

_Key = TypeVar("_Key")  # how the caller names its jobs (run name, trial number)


def launch_headroom(budget_usd: float, spent_usd: float, outstanding_usd: Iterable[float]) -> float:
    """What a new trial's estimate may be: the budget less the spend so far and less what the
    running trials are still expected to spend (each one's estimate less what it has spent, never
    below 0). Negative when the running trials are already expected to pass the budget."""
    return budget_usd - spent_usd - sum(max(o, 0.0) for o in outstanding_usd)


@dataclass(frozen=True)
class CapJob:
    """A running trial as the cap policy sees it."""

    run: str  # run name (its folder gets the STOP file)
    usd_per_hour: float  # what it burns: devices x $/device-hour
    step_s: float  # measured seconds per training step (UNMEASURED_STEP_S before a measurement)
    started_at: float = 0.0  # when it was launched; newer jobs are stopped first
    stopping: bool = False  # a STOP was already written; it is winding down


@dataclass
class CapCheck:
    """What one `CapPolicy.check` decided."""

    decision: GuardDecision  # the guard's figures, runs to stop and thresholds crossed
    deadlines: dict[str, float]  # run told to stop now -> the time after which it is killed


class CapPolicy:
    """The budget cap's decisions for a controller that polls every `poll_s` and checks the
    budget every `guard_s` (see the module doc for the promise they keep)."""

    def __init__(
        self,
        budget_usd: float,
        *,
        poll_s: float,
        guard_s: float,
        spend_lag_s: float = 0.0,
        kill_grace_s: float = KILL_GRACE_S,
        kill_term_s: float = KILL_TERM_S,
        crossed: Iterable[float] = (),
    ):
        for name, value in (("poll_s", poll_s), ("guard_s", guard_s), ("spend_lag_s", spend_lag_s)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"cap policy {name}={value!r} is invalid: expected seconds >= 0")
        self.poll_s = poll_s  # the controller's loop period
        self.guard_s = guard_s  # seconds between budget checks (a spend sync each)
        self.kill_grace_s = kill_grace_s  # beyond one step before a job told to stop is killed
        self.kill_term_s = kill_term_s  # a kill's own duration (SIGTERM ignored, then SIGKILL)
        # A check happens at the first poll after its time: up to guard_s + poll_s apart.
        self.guard = BudgetGuard(
            budget_usd,
            check_interval_s=guard_s + poll_s,
            spend_lag_s=spend_lag_s,
            crossed=set(crossed),
        )
        self.next_check = -math.inf  # the first pass checks

    @property
    def budget_usd(self) -> float:
        return self.guard.budget_usd

    def stop_latency_s(self, step_s: float) -> float:
        """The longest a job stepping every `step_s` runs once told to stop (stated, promised)."""
        return step_s + self.kill_grace_s + self.poll_s + self.kill_term_s

    def kill_deadline(self, now: float, step_s: float) -> float:
        """When a job told to stop at `now` is overdue: one step plus the kill grace later."""
        return now + step_s + self.kill_grace_s

    def headroom(self, spent_usd: float, outstanding_usd: Iterable[float]) -> float:
        """What a new trial's estimate may be (`launch_headroom` on this policy's budget)."""
        return launch_headroom(self.budget_usd, spent_usd, outstanding_usd)

    def due(self, now: float) -> bool:
        """Whether the budget check is due at `now`."""
        return now >= self.next_check

    def running_job(self, job: CapJob) -> RunningJob:
        """The job as the guard weighs it: its burn and stated stop latency."""
        return RunningJob(
            run=job.run,
            usd_per_hour=job.usd_per_hour,
            stop_latency_s=self.stop_latency_s(job.step_s),
            started_at=job.started_at,
            stopping=job.stopping,
        )

    def check(self, now: float, spent_usd: float, jobs: Sequence[CapJob]) -> CapCheck:
        """The budget check at `now` (the next one is due `guard_s` later): the guard's decision
        and, for each run newly told to stop, its kill deadline."""
        self.next_check = now + self.guard_s
        decision = self.guard.check(spent_usd, [self.running_job(j) for j in jobs])
        step_of = {j.run: j.step_s for j in jobs}
        deadlines = {run: self.kill_deadline(now, step_of[run]) for run in decision.stop}
        return CapCheck(decision=decision, deadlines=deadlines)

    def overdue(self, now: float, deadlines: Mapping[_Key, float]) -> list[_Key]:
        """The runs told to stop whose deadline has passed (the caller kills those still running
        and leaves out the ones it has killed already)."""
        return [run for run, deadline in deadlines.items() if now >= deadline]
