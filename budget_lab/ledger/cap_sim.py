"""Capped sweeps simulated on a fake clock, driving the real budget-cap policy.

A discrete-event model of `SweepController._loop` (follow → refill → budget check → kill
overruns → wait one poll or until a job notifies) over jobs that behave like `TrainJob`s, with
every decision taken by `CapPolicy` (cap_policy.py) — the object the controller itself calls —
and every launch admitted by its `headroom`. Only the clock and the jobs are simulated:

    job:  spawn (not charged) → start-up (charged: imports, data, model) → steps, a checkpoint
          every `every` steps → ... → final FID → end
          after a step: STOP file? → save → rung FID if a dollar rung is due and no STOP exists
          (an FID never looks at STOP until it ends) → STOP seen? end
    kill: SIGTERM is ignored by submitit's job, so the job dies at SIGKILL `kill_term_s` later
          (or earlier if it ends by itself); the controller's loop goes on meanwhile

Each sweep's outcome is judged against the promise of cap_policy.py:

    final_usd <= cap_usd + sum over the jobs j running when the spend reaches the cap of
                 usd_per_s_j * (checkpoint_interval_s_j + stop_latency_s_j)

    outcome = simulate(random_sweep(random.Random(1)))
    outcome.kept            # the promise held
    outcome.over_fraction   # (final - cap) / allowed margin, when the spend reached the cap

`bench/cap_sim.py` prints the figure over N sweeps; tests/test_cap_sim.py runs 100 of them and
checks that a weakened policy (no kills, an understated latency) is caught.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from budget_lab.ledger.cap_policy import KILL_TERM_S, UNMEASURED_STEP_S, CapJob, CapPolicy

__all__ = [
    "TrialSpec",
    "SweepSpec",
    "SweepOutcome",
    "Stopped",
    "random_sweep",
    "simulate",
]

_EPS = 1e-9


@dataclass(frozen=True)
class TrialSpec:
    """What one simulated trial does if nobody stops it."""

    usd_per_hour: float  # its burn: devices x $/device-hour
    steps: int  # training steps
    step_s: float  # typical seconds per step (each checkpoint interval x `jitter` of it)
    first_step_s: float  # the first step (warm-up, compilation) takes this long
    every: int  # checkpoint.every: steps between checkpoints
    save_s: float  # seconds to write one checkpoint
    log_every: int  # steps between metrics rows, which measure the step time
    startup_s: float  # charged seconds before the first step (imports, data, model)
    spawn_s: float  # seconds from submission to the job's start row (not charged)
    rung_fractions: tuple[float, ...]  # dollar rungs (FIDs) at these fractions of the estimate
    fid_s: float  # seconds of one FID, rung or final (its sample count x seconds per sample)
    final_eval: bool  # an FID after the last step (not after a cut)
    estimate_usd: float  # the controller's estimate (off both ways; no start-up, no FID)
    seed: int  # draws the step-time jitter of its checkpoint intervals
    jitter: tuple[float, float] = (0.7, 1.5)  # range of a checkpoint interval's step time factor

    @property
    def checkpoint_interval_s(self) -> float:
        """Seconds from one checkpoint to the next at the typical step time."""
        return self.every * self.step_s + self.save_s


@dataclass(frozen=True)
class SweepSpec:
    """A sweep and the controller that runs it."""

    cap_usd: float  # --budget-usd
    slots: int  # trials at once
    poll_s: float  # controller loop period
    guard_s: float  # budget check period
    spend_lag_s: float  # the spend figure shows the spend as of this long ago (stated to policy)
    launch_s: float  # the controller is busy this long per launch (estimate, submission)
    sync_s: float  # ... and this long per running trial at each spend sync
    trials: tuple[TrialSpec, ...]  # in the order they are asked
    kill_term_s: float = KILL_TERM_S  # a kill's SIGTERM -> SIGKILL wait (stated to the policy)


@dataclass(frozen=True)
class _Act:
    """One stretch of a job's natural timeline."""

    kind: str  # "startup", "steps", "save", "rung", "final"
    start: float
    end: float
    step_s: float = 0.0  # steps: seconds per step
    n: int = 0  # steps: how many
    step0: int = 0  # steps: global step before the first of them
    train0: float = 0.0  # steps: train_seconds before the first of them
    last: bool = False  # save / rung: after the job's last step


class _Job:
    """A simulated `TrainJob`: its natural timeline, and its end once stopped or killed."""

    def __init__(self, spec: TrialSpec, run: str, launched_at: float, start: float):
        self.spec = spec
        self.run = run
        self.launched_at = launched_at  # controller's launch time (newest is cut first)
        self.start = start  # its first charged second
        self.rate_s = spec.usd_per_hour / 3600  # $ per second
        self.acts = self._timeline()
        self._starts = [a.start for a in self.acts]
        self._steps = [a for a in self.acts if a.kind == "steps"]
        self._step_starts = [a.start for a in self._steps]
        self._rows = [a.end for a in self.acts if a.kind == "rung"]  # rungs.jsonl rows notify
        self.end = self.acts[-1].end  # changes when it is stopped or killed
        self.stopped_at: float | None = None
        self.killed_at: float | None = None

    def _timeline(self) -> list[_Act]:
        spec, rng = self.spec, random.Random(self.spec.seed)
        t = self.start + spec.startup_s
        acts = [_Act("startup", self.start, t)]
        rungs = sorted(f * spec.estimate_usd for f in spec.rung_fractions)
        step, train = 0, 0.0
        while step < spec.steps:
            # One checkpoint interval (the first step alone: it is the slow one).
            if step == 0:
                n, s = 1, spec.first_step_s
            else:
                n = min((step // spec.every + 1) * spec.every, spec.steps) - step
                s = spec.step_s * rng.uniform(*spec.jitter)
            while n > 0:
                saves = (step + n) % spec.every == 0 or step + n == spec.steps
                # The first of these steps after which a dollar rung is due (the job's own spend
                # at its callback, after the save at an interval's end).
                k, fid = n, False
                if rungs:
                    due_at = self.start + rungs[0] / self.rate_s
                    kk = max(1, math.ceil((due_at - t) / s - _EPS))
                    if kk < n:
                        k, fid = kk, True
                    elif t + n * s + (spec.save_s if saves else 0.0) >= due_at:
                        fid = True
                acts.append(_Act("steps", t, t + k * s, s, k, step, train))
                t, step, train, n = t + k * s, step + k, train + k * s, n - k
                if n == 0 and saves:
                    acts.append(_Act("save", t, t + spec.save_s, last=step == spec.steps))
                    t += spec.save_s
                if fid:
                    spent = self.rate_s * (t - self.start)
                    rungs = [r for r in rungs if r > spent]  # one FID for every rung passed
                    acts.append(_Act("rung", t, t + spec.fid_s, last=step == spec.steps))
                    t += spec.fid_s
        if spec.final_eval:
            acts.append(_Act("final", t, t + spec.fid_s))
        return acts

    # -- what the controller sees ---------------------------------------------------------------

    def spent(self, t: float) -> float:
        """Dollars charged up to time `t`."""
        return self.rate_s * max(min(t, self.end) - self.start, 0.0)

    def cost(self) -> float:
        return self.spent(math.inf)

    def measured_step_s(self, t: float) -> float:
        """What `_step_seconds` reads at `t`: train_seconds / step of the last metrics row."""
        every, t = self.spec.log_every, min(t, self.end)
        i = bisect.bisect_right(self._step_starts, t) - 1
        if i < 0:
            return UNMEASURED_STEP_S
        a = self._steps[i]
        done = a.step0 + min(a.n, int((t - a.start) / a.step_s + _EPS))
        logged = done - done % every
        while i > 0 and self._steps[i].step0 >= logged:
            i -= 1
        if logged == 0:
            return UNMEASURED_STEP_S
        a = self._steps[i]
        return (a.train0 + (logged - a.step0) * a.step_s) / logged

    def notifies_after(self, t: float) -> float:
        """The first notification (a rung row, the job's end) after `t`, or inf."""
        i = bisect.bisect_right(self._rows, t)
        if i < len(self._rows) and self._rows[i] < self.end:
            return self._rows[i]
        return self.end if self.end > t else math.inf

    # -- what the controller does to it ---------------------------------------------------------

    def stop(self, t: float) -> None:
        """A STOP file appears at `t`: the job ends after its current activity, the step that
        sees the file, and a checkpoint (an FID, a last save or a final FID runs to its end)."""
        self.stopped_at = t
        if t >= self.end:
            return
        i = max(bisect.bisect_right(self._starts, t) - 1, 0)  # before its start: as in start-up
        a, rest = self.acts[i], self.acts[i + 1 :]
        following = next((b for b in rest if b.kind == "steps"), None)
        save = self.spec.save_s
        if a.kind == "final" or (a.kind in ("save", "rung") and a.last):
            return  # after the last step: the job completes, final FID included
        if a.kind == "steps":
            k = min(int((t - a.start) / a.step_s) + 1, a.n)  # the step in progress ends
            end = a.start + k * a.step_s + save
        elif following is not None:  # start-up, a save or a rung: then one more step
            end = a.end + following.step_s + save
        else:
            end = a.end
        self.end = min(self.end, end)

    def kill(self, t: float, term_s: float) -> None:
        self.killed_at = t
        self.end = min(self.end, t + term_s)


@dataclass(frozen=True)
class Stopped:
    """A job the guard told to stop."""

    run: str
    stated_s: float  # the stop latency the policy stated for it then
    took_s: float  # from its STOP file to its end
    killed: bool  # it was killed past its deadline


@dataclass
class SweepOutcome:
    """One simulated sweep, judged against the promise."""

    cap_usd: float
    final_usd: float  # what every job of the sweep was charged, in the end
    margin_usd: float  # allowed beyond the cap (0 when the spend never reached it)
    reached_at: float | None  # when the spend reached the cap (None: it never did)
    burn_at_cap: float = 0.0  # $/s of the jobs running when the spend reached the cap
    launched: int = 0  # trials started
    refused: int = 0  # trials the launch admission refused (the sweep ends there)
    stopped: list[Stopped] = field(default_factory=list)  # every job told to stop

    @property
    def cut(self) -> int:
        """Jobs the guard told to stop."""
        return len(self.stopped)

    @property
    def killed(self) -> int:
        """Jobs killed past their deadline."""
        return sum(s.killed for s in self.stopped)

    @property
    def over_usd(self) -> float:
        return self.final_usd - self.cap_usd

    @property
    def over_fraction(self) -> float | None:
        """(final - cap) / margin: <= 1 keeps the promise; None when the cap was never reached."""
        if self.reached_at is None:
            return None
        return self.over_usd / self.margin_usd if self.margin_usd > 0 else math.inf

    @property
    def kept(self) -> bool:
        return self.final_usd <= self.cap_usd + self.margin_usd + 1e-9 * max(self.cap_usd, 1.0)


PolicyFactory = Callable[..., CapPolicy]


def simulate(sweep: SweepSpec, policy: PolicyFactory = CapPolicy) -> SweepOutcome:
    """Run one sweep on a fake clock with the cap policy `policy` (a `CapPolicy` or a subclass,
    built as the controller builds it) and judge it against the promise."""
    cap = policy(
        sweep.cap_usd,
        poll_s=sweep.poll_s,
        guard_s=sweep.guard_s,
        spend_lag_s=sweep.spend_lag_s,
        kill_term_s=sweep.kill_term_s,
    )
    now = 0.0
    pending = list(sweep.trials)
    jobs: list[_Job] = []
    active: dict[str, _Job] = {}
    seen: dict[str, float] = {}  # each trial's spend at the last sync ("seen_usd")
    cache: tuple[float, float] | None = None  # (time, $) of the last sync, as `_spent` keeps it
    deadlines: dict[str, float] = {}  # told to stop, not killed: kill after this time
    stated: dict[str, float] = {}  # the stop latency stated when the job was told to stop
    stop_reason: str | None = None
    out = SweepOutcome(sweep.cap_usd, 0.0, 0.0, None)

    def sync(at: float) -> float:
        """`SweepController._spent`: every job's spend as of `at` less the accounting lag."""
        nonlocal cache
        for run, job in active.items():
            seen[run] = job.spent(at - sweep.spend_lag_s)
        total = sum(j.spent(at - sweep.spend_lag_s) for j in jobs)
        cache = (at, total)
        return total

    while True:
        # Follow: tell the ended trials (their final cost joins the cached spend figure).
        for run, job in list(active.items()):
            if job.end <= now:
                if cache is not None:
                    cache = (cache[0], cache[1] + job.cost() - seen.get(run, 0.0))
                del active[run]
                deadlines.pop(run, None)
        # Refill: each launch admitted by the policy's headroom on the estimate.
        while stop_reason is None and len(active) < sweep.slots and pending:
            spec = pending[0]
            if cache is not None and now - cache[0] < sweep.guard_s:
                spent = cache[1]
            else:
                spent = sync(now)
            outstanding = (j.spec.estimate_usd - seen.get(r, 0.0) for r, j in active.items())
            if spec.estimate_usd > cap.headroom(spent, outstanding):
                stop_reason, out.refused = "budget", out.refused + 1
                break
            pending.pop(0)
            launched_at, now = now, now + sweep.launch_s
            job = _Job(spec, f"trial-{len(jobs):03d}", launched_at, now + spec.spawn_s)
            jobs.append(job)
            active[job.run] = job
            seen[job.run] = 0.0
            out.launched += 1
        # The budget check: stop jobs (STOP files), each with a kill deadline.
        if active and cap.due(now):
            at = now
            spent = sync(at)
            now += sweep.sync_s * len(active)
            views = [
                CapJob(
                    run=run,
                    usd_per_hour=job.spec.usd_per_hour,
                    step_s=job.measured_step_s(at),
                    started_at=job.launched_at,
                    stopping=job.stopped_at is not None,
                )
                for run, job in active.items()
            ]
            check = cap.check(at, spent, views)
            for view in views:
                if view.run in check.deadlines and active[view.run].stopped_at is None:
                    active[view.run].stop(now)
                    deadlines[view.run] = check.deadlines[view.run]
                    stated[view.run] = cap.stop_latency_s(view.step_s)
            if check.decision.stop and stop_reason is None:
                stop_reason = "budget cap"
        # Kill the overruns (each kill in a thread of its own: the loop goes on).
        for run in cap.overdue(now, deadlines):
            job = active[run]
            del deadlines[run]
            if job.end > now:
                job.kill(now, sweep.kill_term_s)
        if not active and (stop_reason is not None or not pending):
            break
        # Wait one poll, or less if a job notifies: jump to the next pass that can act.
        wake = min(j.notifies_after(now) for j in active.values())
        due = min([cap.next_check, *deadlines.values()])
        polls = max(1, math.ceil((due - now) / sweep.poll_s - _EPS)) if due < math.inf else None
        at_poll = now + polls * sweep.poll_s if polls is not None else math.inf
        now = min(wake, at_poll)

    out.final_usd = sum(j.cost() for j in jobs)
    for job in jobs:
        if job.stopped_at is not None:
            took = job.end - job.stopped_at
            out.stopped.append(Stopped(job.run, stated[job.run], took, job.killed_at is not None))
    reached = _reached_at(jobs, sweep.cap_usd)
    if reached is not None:
        running = [j for j in jobs if j.launched_at <= reached < j.end]
        out.reached_at = reached
        out.burn_at_cap = sum(j.rate_s for j in running)
        out.margin_usd = sum(
            j.rate_s
            * (j.spec.checkpoint_interval_s + cap.stop_latency_s(j.measured_step_s(reached)))
            for j in running
        )
    return out


def _reached_at(jobs: list[_Job], cap_usd: float) -> float | None:
    """The first time the jobs' total spend reaches `cap_usd` (None if it never does); the
    total is piecewise linear between the jobs' starts and ends."""
    if sum(j.cost() for j in jobs) <= cap_usd:
        return None
    times = sorted({t for j in jobs for t in (j.start, j.end)})
    before = 0.0
    for a, b in zip(times, times[1:], strict=False):
        after = sum(j.spent(b) for j in jobs)
        if after >= cap_usd:
            rate = sum(j.rate_s for j in jobs if j.start <= a < j.end)
            return a + (cap_usd - before) / rate if rate > 0 else a
        before = after
    return times[-1]


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_sweep(rng: random.Random) -> SweepSpec:
    """A sweep drawn from wide ranges: nano on a CPU to XL on 8 GPUs, FIDs of 160 to 10,000
    samples, checkpoints every step to every 200, caps from 1 % of the sweep's cost to 150 %."""
    usd_per_hour = rng.choice([1, 2, 4, 8]) * rng.uniform(0.3, 12.0)
    base_step_s = _log_uniform(rng, 0.02, 3.0)
    seconds_per_sample = _log_uniform(rng, 0.002, 0.05)
    trials = []
    for _ in range(rng.randint(2, 12)):
        step_s = base_step_s * rng.uniform(0.5, 2.0)  # mask ratio, routing, width
        steps = rng.randint(20, 400)
        fid_samples = rng.choice([160, 500, 1000, 2000, 5000, 10000])
        trials.append(
            TrialSpec(
                usd_per_hour=usd_per_hour,
                steps=steps,
                step_s=step_s,
                first_step_s=step_s * rng.uniform(1.0, 20.0),
                every=rng.choice([1, 5, 20, 50, 100, 200]),
                save_s=_log_uniform(rng, 0.01, 5.0),
                log_every=rng.choice([1, 10, 25, 50]),
                startup_s=rng.uniform(2.0, 40.0),
                spawn_s=rng.uniform(0.1, 3.0),
                rung_fractions=tuple(sorted(rng.sample([0.25, 0.5, 0.75], rng.randint(0, 3)))),
                fid_s=fid_samples * seconds_per_sample,
                final_eval=rng.random() < 0.8,
                estimate_usd=usd_per_hour / 3600 * steps * step_s * rng.uniform(0.6, 1.4),
                seed=rng.getrandbits(32),
            )
        )
    natural = sum(
        _Job(t, "probe", 0.0, 0.0).cost() for t in trials
    )  # what the sweep costs uncapped
    poll_s = rng.choice([0.05, 0.25, 0.5, 1.0, 2.0])
    return SweepSpec(
        cap_usd=natural * _log_uniform(rng, 0.01, 1.5),
        slots=rng.randint(1, 4),
        poll_s=poll_s,
        guard_s=rng.choice([max(poll_s, 1.0), 5.0, 15.0]),
        spend_lag_s=rng.choice([0.0, 0.0, 1.0, 5.0, 20.0]),
        launch_s=_log_uniform(rng, 0.05, 3.0),
        sync_s=rng.uniform(0.002, 0.05),
        trials=tuple(trials),
    )
