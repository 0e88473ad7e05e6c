"""The sweep controller's failure handling, against real processes (issue 15, items 4-7):

- a controller SIGKILLed in either crash window of a launch (submitted but the job ids not yet in
  launch.json; launch.json complete but the ids not yet on the trial) resumes without training
  anything twice;
- a combination of param values that does not compose fails its own trial only;
- a Slurm trial cancelled while pending is told, and the sweep ends (real local Slurm);
- one controller per sweep: a second one is refused, naming the first's pid; once the first is
  SIGKILLed, the kernel has released its lock and a new one runs.

Trials are tiny: a few steps of the nano model, FID of 8 images with 2 sampler steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from budget_lab.ledger import Ledger
from budget_lab.workspace import Workspace
from tests.slurm_cluster import wait_until
from tests.test_sweep_controller import load_study, write_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def sweep_cmd(path: Path, ws_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "budget_lab",
        "sweep",
        str(path),
        "--workspace",
        str(ws_root),
        "--no-report",
        "--no-wandb",
        *extra,
    ]


def sweep_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    env.pop("BUDGET_LAB_CRASH_AT", None)  # set only where a test asks for a crash
    return {**env, **extra}


def start_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "start"]


def check_trained_once(ws_root: Path, trials) -> None:
    """Every trial COMPLETE, its run trained by one job of one launch (one start row, its
    segments one after the other), and the ledger's sweep total the sum of the trials' costs."""
    from budget_lab.launch import read_launch
    from budget_lab.rundir import segment_rows

    assert [t.state.name for t in trials] == ["COMPLETE"] * len(trials)
    launch_ids = []
    for t in trials:
        run_dir = ws_root / "runs" / f"tiny-{t.number:03d}"
        assert t.user_attrs["run_dir"] == str(run_dir.resolve())
        record = read_launch(run_dir)  # job ids recovered from the submitit folder if need be
        assert record.trial == t.number and record.sweep == "tiny"
        assert record.job_ids and t.user_attrs["job_ids"] == record.job_ids
        starts = start_rows(run_dir)
        assert len(starts) == 1, starts  # trained exactly once
        assert [s["job_id"] for s in starts] == record.job_ids
        segs = segment_rows(run_dir)
        for before, after in zip(segs, segs[1:], strict=False):
            assert before["end"] is not None and before["end"] <= after["start"], segs
        launch_ids.append(record.launch_id)
        assert t.user_attrs["cost_usd"] > 0
    # One launch per run, and no other launch: a second submission would leave its own folder.
    assert len(set(launch_ids)) == len(trials)
    assert sorted(p.name for p in (ws_root / "jobs").iterdir()) == sorted(launch_ids)
    assert sorted(p.name for p in (ws_root / "runs").iterdir()) == [
        f"tiny-{t.number:03d}" for t in trials
    ]
    spent = Ledger.for_workspace(Workspace(ws_root)).spent(sweep="tiny")
    assert spent == pytest.approx(sum(t.user_attrs["cost_usd"] for t in trials), rel=1e-9)


# -- item 4: the crash windows of a launch ----------------------------------------------------------


@pytest.mark.parametrize("window", ["after-submit", "after-launch-record"])
def test_controller_killed_in_a_launch_window_resumes_without_duplicates(
    window, train_data_dir, tmp_path
):
    ws_root = tmp_path / "ws"
    cmd = sweep_cmd(write_sweep(tmp_path, train_data_dir), ws_root)
    crashed = subprocess.run(
        cmd, env=sweep_env(BUDGET_LAB_CRASH_AT=window), capture_output=True, text=True, timeout=600
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]

    # The controller died inside the window: the first trial's job was submitted (it runs on in
    # a session of its own), and the trial is RUNNING with its run folder but no job ids.
    run_dir = ws_root / "runs" / "tiny-000"
    record = json.loads((run_dir / "launch.json").read_text())
    submitted = sorted(Path(record["submitit_folder"]).glob("*_submitted.pkl"))
    assert len(submitted) == 1
    job_id = submitted[0].name.removesuffix("_submitted.pkl")
    if window == "after-submit":
        assert record["job_ids"] == []  # the provisional record, written before the submission
    else:
        assert record["job_ids"] == [job_id]
    (trial,) = load_study(Workspace(ws_root)).get_trials()
    assert trial.state.name == "RUNNING"
    assert trial.user_attrs["run"] == "tiny-000"
    assert trial.user_attrs["run_dir"] == str(run_dir.resolve())
    assert "job_ids" not in trial.user_attrs

    done = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "trial 0: re-attached to tiny-000" in done.stdout, done.stdout[-3000:]
    trials = load_study(Workspace(ws_root)).get_trials()
    assert len(trials) == 2
    assert sorted(t.params["mask_ratio"] for t in trials) == [0.0, 0.75]
    check_trained_once(ws_root, trials)
    assert load_study(Workspace(ws_root)).trials[0].user_attrs["job_ids"] == [job_id]


# -- item 5: a combination of valid values that does not compose --------------------------------


def test_an_invalid_param_combination_fails_its_trial_and_the_sweep_goes_on(
    train_data_dir, tmp_path
):
    ws_root = tmp_path / "ws"
    # Each value composes alone with the nano recipe (dim 128, head_dim 32), so the sweep file
    # loads; together, dim 96 with head_dim 64 does not (head_dim must divide dim).
    path = write_sweep(
        tmp_path,
        train_data_dir,
        params=[
            {"name": "dim", "target": "model.dim", "type": "categorical", "choices": [96, 128]},
            {
                "name": "head_dim",
                "target": "model.head_dim",
                "type": "categorical",
                "choices": [64],
            },
        ],
    )
    cmd = sweep_cmd(path, ws_root)
    done = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "all 2 trials done" in done.stdout, done.stdout[-3000:]

    def check() -> None:
        trials = {t.params["dim"]: t for t in load_study(Workspace(ws_root)).get_trials()}
        assert sorted(trials) == [96, 128]
        bad, good = trials[96], trials[128]
        assert bad.state.name == "FAIL"
        assert bad.user_attrs["error"].startswith("invalid configuration: "), bad.user_attrs
        assert "head_dim=64" in bad.user_attrs["error"] and "dim=96" in bad.user_attrs["error"]
        assert "run_dir" not in bad.user_attrs  # nothing was launched for it
        assert good.state.name == "COMPLETE" and good.user_attrs["fid"] > 0
        assert sorted(p.name for p in (ws_root / "runs").iterdir()) == [f"tiny-{good.number:03d}"]
        spent = Ledger.for_workspace(Workspace(ws_root)).spent(sweep="tiny")
        assert spent == pytest.approx(good.user_attrs["cost_usd"]) and spent > 0

    check()
    summary = json.loads((ws_root / "sweeps" / "tiny" / "summary.json").read_text())
    assert sorted(t["state"] for t in summary["trials"]) == ["COMPLETE", "FAIL"]
    # The same command again: nothing left to do, no crash, nothing launched again.
    again = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    check()


def test_a_sweep_wide_config_error_stops_the_sweep_and_fails_no_trial(tmp_path):
    """Only a combination of params that does not compose is the trial's own failure. A missing
    calibration on a Slurm cluster is the same for every trial: the sweep must stop with it (as
    before the fix of item 5) rather than tell every trial FAIL, which uses up n_trials so that
    the same command, run again once calibrated, has nothing left to run. Nothing is submitted:
    the estimate fails before the launch."""
    from budget_lab.errors import ConfigError
    from budget_lab.launch.cluster import load_cluster
    from budget_lab.sweep import load_sweep
    from budget_lab.sweep.controller import SweepController

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    spec = load_sweep(write_sweep(tmp_path, data, cluster="slurm-local"))
    ws = Workspace(tmp_path / "ws")
    controller = SweepController(spec, ws, load_cluster("slurm-local"), progress=False)
    with pytest.raises(ConfigError, match="no throughput calibration"):
        controller.run()
    assert [t.state.name for t in load_study(ws).get_trials()] in ([], ["RUNNING"])


# -- item 6: a Slurm trial cancelled while it pends ---------------------------------------------


def squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_trial_cancelled_while_pending_is_told_and_the_sweep_ends(train_data_dir, tmp_path):
    from budget_lab.ledger import calibrate_benchmark

    ws_root = tmp_path / "ws"
    # The trial's cost estimate needs a fake-gpu throughput calibration (none is measured on a
    # Slurm cluster).
    calibrate_benchmark(
        Workspace(ws_root).ensure(), "nano", mask_ratio=0.75, device_type="fake-gpu", batch=8
    )
    # slurm-local, with the jobs held in the queue (a begin time an hour away): the trial pends
    # whatever else runs on the node, and leaves the node free for other tests meanwhile.
    cluster = yaml.safe_load((REPO / "clusters" / "slurm-local.yaml").read_text())
    cluster["slurm"]["additional"] = {"begin": "now+1hour"}
    cluster_file = tmp_path / "slurm-pending.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    path = write_sweep(
        tmp_path,
        train_data_dir,
        params=[
            {
                "name": "mask_ratio",
                "target": "mask_ratio",
                "type": "float",
                "low": 0.0,
                "high": 0.75,
                "grid": [0.75],
            }
        ],
        cluster="slurm-local",
    )
    cmd = sweep_cmd(path, ws_root, "--cluster", str(cluster_file))
    log = tmp_path / "controller.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=sweep_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        launch = ws_root / "runs" / "tiny-000" / "launch.json"

        def job_ids():
            if proc.poll() is not None:
                pytest.fail(f"the controller ended early:\n{log.read_text()[-3000:]}")
            return launch.is_file() and json.loads(launch.read_text())["job_ids"]

        (job_id,) = wait_until(job_ids, 300, "the trial's submission")
        wait_until(lambda: squeue_state(job_id) == "PENDING", 60, f"job {job_id} to pend")
        time.sleep(1.5)  # a few controller polls see it queued
        assert squeue_state(job_id) == "PENDING"
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if proc.poll() is None:
            pytest.fail(
                f"the controller still waits 120 s after job {job_id} was cancelled while "
                f"pending:\n{log.read_text()[-3000:]}",
                pytrace=False,
            )
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "all 1 trials done" in text, text[-3000:]
    (trial,) = load_study(Workspace(ws_root)).get_trials()
    assert trial.state.name == "FAIL", trial
    assert trial.user_attrs["status"] == "cancelled"
    assert trial.user_attrs["cost_usd"] == 0.0
    assert trial.user_attrs["job_ids"] == [job_id]
    assert not (ws_root / "runs" / "tiny-000" / "segments.jsonl").is_file()  # it never ran
    assert Ledger.for_workspace(Workspace(ws_root)).spent(sweep="tiny") == 0.0


# -- item 7: one controller per sweep ---------------------------------------------------------------


def test_a_second_controller_is_refused_and_a_killed_ones_lock_is_released(
    train_data_dir, tmp_path
):
    ws_root = tmp_path / "ws"
    cmd = sweep_cmd(write_sweep(tmp_path, train_data_dir), ws_root, "--trials", "1")
    lock = ws_root / "sweeps" / "tiny" / "controller.lock"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(cmd, env=sweep_env(), stdout=out, stderr=subprocess.STDOUT)
    try:

        def holds():
            if first.poll() is not None:
                pytest.fail(f"the first controller ended early:\n{log.read_text()[-3000:]}")
            return lock.is_file() and lock.read_text().startswith(f"pid {first.pid} on ")

        wait_until(holds, 240, "the first controller to hold the sweep", interval_s=0.1)
        # Stopped, it still holds the lock (it cannot end meanwhile, whatever the machine's load).
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, env=sweep_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode != 0, second.stdout[-2000:]
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        assert "already being run by another controller" in second.stderr, second.stderr
        assert f"pid {first.pid} on " in second.stderr, second.stderr
        assert first.poll() is None  # the refusal touched nothing of the first's
    finally:
        first.kill()  # SIGKILL: no cleanup of its own, the kernel releases its lock
        first.wait()
    assert first.returncode == -signal.SIGKILL
    third = subprocess.Popen(
        cmd, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = third.communicate(timeout=600)
    finally:
        if third.poll() is None:
            third.kill()
            third.wait()
    assert third.returncode == 0, out[-2000:] + err[-3000:]
    assert lock.read_text().startswith(f"pid {third.pid} on ")
    (trial,) = load_study(Workspace(ws_root)).get_trials()
    assert trial.state.name == "COMPLETE"
    assert len(start_rows(ws_root / "runs" / "tiny-000")) == 1


def test_a_sweep_that_ran_no_trial_for_its_budget_fails_and_hides_storage_passwords(
    train_data_dir, tmp_path
):
    """Item 13: a zero budget runs nothing and says so with a non-zero exit (it used to exit 0);
    a storage URL's password is never printed nor saved in sweep.json."""
    from budget_lab.cli.sweep import safe_storage

    ws_root = tmp_path / "ws"
    path = write_sweep(tmp_path, train_data_dir)
    done = subprocess.run(
        sweep_cmd(path, ws_root, "--budget-usd", "0"),
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no trial ran" in done.stderr and "Traceback" not in done.stderr
    assert safe_storage("postgresql+psycopg://me:s3cret@db/optuna") == (
        "postgresql+psycopg://me:***@db/optuna"
    )
    assert safe_storage("/tmp/study.journal") == "/tmp/study.journal"
    saved = json.loads((ws_root / "sweeps" / "tiny" / "sweep.json").read_text())
    assert saved["storage"].endswith("study.journal")
