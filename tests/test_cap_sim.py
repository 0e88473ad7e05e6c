"""The budget cap is a promise (issue 15, item 1), checked over randomized simulated sweeps.

`budget_lab.ledger.cap_sim` runs the sweep controller's loop on a fake clock over jobs that behave
like TrainJobs (start-up, steps, checkpoints, rung and final FIDs that never look at STOP), with
every cap decision taken by the real `CapPolicy` the controller calls. The promise
(cap_policy.py): final spend <= cap + the burn of one checkpoint interval plus the stated stop
latency of every job running when the spend reaches the cap. Weakened policies must break it, so
that these tests fail when the enforcement does.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from budget_lab.ledger import cap_policy
from budget_lab.ledger.cap_policy import CapPolicy
from budget_lab.ledger.cap_sim import SweepOutcome, SweepSpec, TrialSpec, random_sweep, simulate

SEED = 20261202
SWEEPS = [random_sweep(rng) for rng in [random.Random(SEED)] for _ in range(100)]


class _NeverKills(CapPolicy):
    """Asks jobs to stop but never kills one: a job inside an FID runs it to the end."""

    def overdue(self, now, deadlines):
        return []


class _StatesOneStep(CapPolicy):
    """Claims a job stops at its next step: the guard reserves no time for FIDs or kills."""

    def stop_latency_s(self, step_s: float) -> float:
        return step_s


def _describe(i: int, o: SweepOutcome) -> str:
    return (
        f"sweep {i}: spent ${o.final_usd:.4f} of a ${o.cap_usd:.4f} cap, over by "
        f"${o.over_usd:.4f} > the promised margin ${o.margin_usd:.4f} ({o.cut} cut, {o.killed} "
        f"killed)"
    )


def test_100_randomized_capped_sweeps_keep_the_promise():
    outcomes = [simulate(sweep) for sweep in SWEEPS]
    for i, (sweep, o) in enumerate(zip(SWEEPS, outcomes, strict=True)):
        assert o.kept, _describe(i, o)
        # Every job told to stop ended within the latency stated for it (give or take the
        # controller's own spend sync, a few ms per running trial).
        for s in o.stopped:
            assert s.took_s <= s.stated_s + sweep.sync_s * sweep.slots, (i, s)
    # The sweeps exercise every path: caps from tiny to generous.
    assert sum(o.refused > 0 for o in outcomes) >= 20  # a trial refused for its estimate
    assert sum(o.cut > 0 for o in outcomes) >= 30  # the guard cut running trials
    assert sum(o.killed for o in outcomes) >= 20  # ... some of them inside an FID, killed
    uncut = [o for s, o in zip(SWEEPS, outcomes, strict=True) if o.launched == len(s.trials)]
    assert sum(o.cut == 0 for o in uncut) >= 5  # ... and caps that every trial fitted under
    # The cap is not kept by wasting it: cut sweeps spend most of their cap.
    cut = [o.final_usd / o.cap_usd for o in outcomes if o.cut]
    assert sum(cut) / len(cut) > 0.7


@pytest.mark.parametrize("weakened", [_NeverKills, _StatesOneStep], ids=lambda c: c.__name__)
def test_a_weakened_policy_breaks_the_promise_and_is_caught(weakened):
    broken = [i for i, sweep in enumerate(SWEEPS) if not simulate(sweep, weakened).kept]
    assert len(broken) >= 3, f"only sweeps {broken} caught {weakened.__name__}"


def _one_trial(fid_s: float, rung_fractions: tuple[float, ...] = ()) -> TrialSpec:
    """$1 a second; 2 s start-up, 100 steps of 0.1 s, a checkpoint every 50, then an FID."""
    return TrialSpec(
        usd_per_hour=3600.0,
        steps=100,
        step_s=0.1,
        first_step_s=0.1,
        every=50,
        save_s=0.1,
        log_every=10,
        startup_s=2.0,
        spawn_s=0.0,
        rung_fractions=rung_fractions,
        fid_s=fid_s,
        final_eval=True,
        estimate_usd=10.0,
        seed=1,
        jitter=(1.0, 1.0),
    )


def _alone(trial: TrialSpec, cap_usd: float) -> SweepSpec:
    return SweepSpec(
        cap_usd=cap_usd,
        slots=1,
        poll_s=0.25,
        guard_s=1.0,
        spend_lag_s=0.0,
        launch_s=0.0,
        sync_s=0.0,
        trials=(trial,),
    )


def test_a_job_inside_its_final_fid_is_killed_at_its_deadline():
    # Natural: 2 s start-up + 10.2 s of steps and saves + a 100 s FID = $112. The guard cuts it
    # inside the FID, which never looks at STOP; the kill ends it within the stated latency.
    sweep = _alone(_one_trial(fid_s=100.0), cap_usd=60.0)
    o = simulate(sweep)
    (stop,) = o.stopped
    assert stop.killed and stop.took_s <= stop.stated_s
    assert stop.stated_s == pytest.approx(0.1 + 10.0 + 0.25 + 5.0)  # step + grace + poll + kill
    assert o.final_usd <= o.cap_usd  # the guard reserved that latency: the cap itself held
    # Without the kill the FID runs to its end: $112, far past the cap and the margin.
    o = simulate(sweep, _NeverKills)
    assert o.final_usd == pytest.approx(112.2) and not o.kept


def test_a_job_between_steps_stops_at_its_next_step_without_a_kill():
    # No FID long enough to matter: told to stop during its steps, it ends a step and a save later.
    sweep = _alone(_one_trial(fid_s=0.5), cap_usd=25.0)
    o = simulate(sweep)
    (stop,) = o.stopped
    assert not stop.killed and stop.took_s <= 0.1 + 0.1 + 1e-9  # the step in progress + a save
    assert o.final_usd <= o.cap_usd


def test_the_policy_states_the_kill_wait_the_local_backend_uses():
    """The policy's latency counts the local kill's SIGTERM -> SIGKILL wait: the same seconds."""
    from budget_lab.launch.local import KILL_GRACE_S

    assert cap_policy.KILL_TERM_S == KILL_GRACE_S


def test_an_uncapped_sweep_runs_every_trial_to_its_end():
    sweep = _alone(_one_trial(fid_s=3.0, rung_fractions=(0.5,)), cap_usd=1e6)
    o = simulate(sweep)
    # Start-up 2 + steps 10 + 2 saves 0.2 + a rung FID 3 + the final FID 3.
    assert o.stopped == [] and o.refused == 0 and o.final_usd == pytest.approx(18.2)
    assert o.reached_at is None and o.kept


# -- the kill path against a real job ----------------------------------------------------------


@pytest.mark.slow
def test_an_overdue_job_is_killed_for_real_without_holding_up_the_controller(
    train_data_dir, tmp_path
):
    """The controller's `_kill_overruns` with the real policy on a real local job that ignores
    the stop request (it trains on: no STOP file, as inside an FID): killed, marked, and the loop
    is not held for the kill's SIGTERM -> SIGKILL wait; a job before its deadline is left alone."""
    import time

    from budget_lab.launch import launch_run, run_status
    from budget_lab.launch.cluster import load_cluster
    from budget_lab.launch.local import pid_alive as _pid_alive
    from budget_lab.rundir import segment_rows
    from budget_lab.sweep import load_sweep
    from budget_lab.sweep.controller import SweepController
    from budget_lab.workspace import Workspace
    from tests.helpers import tiny_run_config
    from tests.test_sweep_controller import write_sweep

    ws = Workspace(tmp_path / "ws").ensure()
    cluster = load_cluster("local")
    cfg = tiny_run_config(train_data_dir, "phases.0.steps=100000")
    record = launch_run(cfg, cluster, ws, "overdue")
    deadline = time.time() + 240
    while run_status(record.run_dir).state != "running" and time.time() < deadline:
        time.sleep(0.2)
    assert run_status(record.run_dir).state == "running"

    ctl = SweepController(
        load_sweep(write_sweep(tmp_path, train_data_dir)),
        ws,
        cluster,
        budget_usd=1.0,
        progress=False,
    )
    cap = CapPolicy(1.0, poll_s=ctl.poll_s, guard_s=ctl.guard_s)
    now = time.monotonic()
    ctl.active = {
        0: {"run_dir": record.run_dir, "stop_deadline": now - 0.1},  # overdue
        1: {"run_dir": str(tmp_path / "not-yet"), "stop_deadline": now + 3600},
    }
    t0 = time.monotonic()
    ctl._kill_overruns(cap)
    assert time.monotonic() - t0 < 1.0  # the kill runs beside the loop
    assert ctl.active[0].get("cap_killed") and not ctl.active[1].get("cap_killed")
    # The job's process is gone (SIGTERM is ignored: SIGKILL after kill_term_s) and the run
    # reads cancelled.
    pid = int(segment_rows(Path(record.run_dir))[-1]["pid"])
    while _pid_alive(pid) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert not _pid_alive(pid) and run_status(record.run_dir).state == "cancelled"
    assert took <= cap.kill_term_s + 2.0, f"the kill took {took:.1f} s"
