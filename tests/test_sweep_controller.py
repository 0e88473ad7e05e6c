"""The sweep controller end to end: real jobs (local executor and a real Slurm), a real SQLite
study and ledger, real FID. Trials are tiny: a few steps of the nano model, FID of 8 images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from budget_lab.launch import Placement
from budget_lab.launch.cluster import load_cluster
from budget_lab.sweep import load_sweep, objective_values
from budget_lab.sweep.controller import SweepController
from budget_lab.sweep.storage import default_storage, open_storage
from budget_lab.workspace import Workspace

pytestmark = pytest.mark.slow


def write_sweep(folder: Path, data_dir: Path, **fields) -> Path:
    spec = {
        "name": "tiny",
        "recipe": "nano",
        "base_overrides": [
            f"data.path={data_dir}",
            "phases.0.steps=8",
            "phases.0.warmup_steps=2",
            "phases.0.batch_size=8",
            "phases.1.steps=4",
            "phases.1.batch_size=8",
            "checkpoint.every=4",
            "log_every=1",
        ],
        "params": [
            {
                "name": "mask_ratio",
                "target": "mask_ratio",
                "type": "float",
                "low": 0.0,
                "high": 0.75,
                "grid": [0.0, 0.75],
            },
        ],
        "objective": "pareto",
        "sampler": "grid",
        "slots": 1,
        "pruner": "none",
        "eval": {"fid_samples": 8, "sampler_steps": 2, "grid_size": 0, "batch_size": 8},
        "cluster": "local",
    }
    spec.update(fields)
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def load_study(ws, name="tiny"):
    return optuna.load_study(study_name=name, storage=open_storage(default_storage(ws, name)))


def test_local_sweep_runs_and_objectives_are_as_documented(train_data_dir, tmp_path):
    ws = Workspace(tmp_path / "ws")
    spec = load_sweep(write_sweep(tmp_path, train_data_dir))
    summary = SweepController(spec, ws, load_cluster("local"), progress=False).run()
    assert summary.stop_reason == "all 2 trials done"
    study = load_study(ws)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.params["mask_ratio"] for t in trials) == [0.0, 0.75]
    for t in trials:
        fid, cost = t.user_attrs["fid"], t.user_attrs["cost_usd"]
        assert t.values == objective_values(spec, fid, cost) == [fid, cost]  # pareto: (F, C)
        assert cost > 0 and fid > 0
        # Trial ↔ run ↔ ledger linked both ways.
        run_dir = Path(t.user_attrs["run_dir"])
        launch = yaml.safe_load((run_dir / "launch.json").read_text())
        assert launch["sweep"] == "tiny" and launch["trial"] == t.number
    assert summary.pareto and set(summary.pareto) <= {t.number for t in trials}
    assert summary.spent_usd == pytest.approx(sum(t.user_attrs["cost_usd"] for t in trials))


def test_budget_cap_stops_the_sweep_before_a_trial_that_does_not_fit(train_data_dir, tmp_path):
    ws = Workspace(tmp_path / "ws")
    spec = load_sweep(write_sweep(tmp_path, train_data_dir))
    cluster = load_cluster("local")
    # A budget that holds the first trial but leaves less than the second trial's estimate (a
    # trial's estimate prices its training steps, a third or so of what a tiny trial costs in
    # all; 5 % of a trial is left).
    first = SweepController(spec, ws, cluster, n_trials=1, progress=False).run()
    one_trial = first.spent_usd
    capped = SweepController(
        spec, ws, cluster, budget_usd=one_trial * 1.05, n_trials=2, progress=False
    ).run()
    assert capped.stop_reason.startswith("budget: the next trial's estimate"), capped.stop_reason
    trials = load_study(ws).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]  # the second never started
    assert "exceeds the remaining" in trials[1].user_attrs["not_started"]
    assert capped.spent_usd == pytest.approx(one_trial)


def test_killed_controller_resumes_without_duplicates(train_data_dir, tmp_path):
    ws_root = tmp_path / "ws"
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
                "grid": [0.0, 0.5, 0.75],
            }
        ],
    )
    cmd = [
        sys.executable,
        "-m",
        "budget_lab",
        "sweep",
        str(path),
        "--workspace",
        str(ws_root),
        "--no-report",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_run = ws_root / "runs" / "tiny-000" / "launch.json"
    deadline = time.time() + 180
    while not first_run.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert first_run.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() else "no launch"
    proc.send_signal(signal.SIGKILL)  # mid-sweep, with a job running
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-attached" in done.stdout or "done" in done.stdout
    study = load_study(Workspace(ws_root))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(t.params["mask_ratio"] for t in trials) == [0.0, 0.5, 0.75]
    runs = sorted(p.name for p in (ws_root / "runs").iterdir())
    assert runs == ["tiny-000", "tiny-001", "tiny-002"]
    launches = {
        yaml.safe_load((ws_root / "runs" / r / "launch.json").read_text())["launch_id"]
        for r in runs
    }
    assert len(launches) == 3  # every trial launched exactly once
    # The sweep's summary (summary.json and the offline W&B summary run) matches the study.
    from budget_lab.report.data import read_report_data

    summary = read_report_data(ws_root / "sweeps" / "tiny" / "summary.json")
    assert [(t.number, t.state, t.fid) for t in summary.trials] == [
        (t.number, t.state.name, t.user_attrs["fid"]) for t in trials
    ]
    (table,) = (ws_root / "sweeps" / "tiny" / "wandb").glob(
        "offline-run-*/files/media/table/trials_*.table.json"
    )
    logged = json.loads(table.read_text())
    col = {name: i for i, name in enumerate(logged["columns"])}
    assert [(r[col["trial"]], r[col["state"]]) for r in logged["data"]] == [
        (t.number, t.state.name) for t in trials
    ]
    for r in runs:  # and trained exactly once (one segment each)
        starts = [
            line
            for line in (ws_root / "runs" / r / "segments.jsonl").read_text().splitlines()
            if '"start"' in line
        ]
        assert len(starts) == 1


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_sweep_two_slots_one_failed_one_pruned(train_data_dir, tmp_path):
    ws = Workspace(tmp_path / "ws")
    missing = tmp_path / "no-such-data"
    path = write_sweep(
        tmp_path,
        train_data_dir,
        name="slots",
        base_overrides=[
            "phases.0.steps=500",
            "phases.0.warmup_steps=2",
            "phases.0.batch_size=8",
            "phases.1.steps=4",
            "phases.1.batch_size=8",
            "checkpoint.every=1000",
            "log_every=5",
        ],
        params=[
            {
                "name": "data",
                "target": "data.path",
                "type": "categorical",
                "choices": [str(train_data_dir), str(missing)],
            },
            # An EMA that barely moves keeps the samples at the untrained model's: a lagging trial.
            {
                "name": "ema",
                "target": "optim.ema_decay",
                "type": "categorical",
                "choices": [0.5, 0.9999],
            },
        ],
        sampler="random",
        objective="fid_per_dollar",
        pruner="dollar_rungs",
        rungs_usd=[0.006],  # ~22 s of one $1/h GPU, start-up included: before 500 steps end
        prune_percentile=50.0,
        prune_min_peers=1,
        # Any lag cuts: this test follows a cut through two Slurm slots. At N = 8 the two FIDs'
        # noise (~6 points each) would hide the lag at the default 0.95; the noise rule itself is
        # tested in test_sweep_decide.py.
        prune_confidence=0.5,
        slots=2,
        n_trials=3,
        cluster="slurm-local",
    )
    spec = load_sweep(path)
    cluster = load_cluster("slurm-local")
    from budget_lab.ledger import calibrate_benchmark

    calibrate_benchmark(ws.ensure(), "nano", mask_ratio=0.75, device_type="fake-gpu", batch=8)
    study = optuna.create_study(
        study_name="slots",
        storage=open_storage(default_storage(ws, "slots")),
        directions=["maximize"],
    )
    # Fix the order: a good trial and a broken one together, then the lagging one.
    study.enqueue_trial({"data": str(train_data_dir), "ema": 0.5})
    study.enqueue_trial({"data": str(missing), "ema": 0.5})
    study.enqueue_trial({"data": str(train_data_dir), "ema": 0.9999})
    # One (fake) GPU per trial, so that two trials fit on the node at once.
    controller = SweepController(
        spec, ws, cluster, progress=True, poll_s=0.5, placement=Placement(gpus_per_node=1)
    )
    summary = controller.run()
    states = {t.number: t.state.name for t in load_study(ws, "slots").get_trials()}
    assert states[1] == "FAIL", summary
    # The two good-data trials measured FID at the same dollar rung; the one judged second is
    # cut exactly when it lags the first (prune_min_peers=1, median, any lag: confidence 0.5).
    rung = {}
    for n in (0, 2):
        (row,) = [
            json.loads(line)
            for line in (ws.run_dir(f"slots-{n:03d}") / "rungs.jsonl").read_text().splitlines()
        ]
        rung[n] = row
    first, second = sorted((0, 2), key=lambda n: rung[n]["time"])
    lagging = rung[second]["fid"] > rung[first]["fid"]
    # The controller judges a rung when it reads it: the first, with no peer yet, is never cut.
    # Two rows read in the same pass (written close together) are judged in trial order
    # instead; then it still holds that only a trial that lags the other can be cut.
    if rung[second]["time"] - rung[first]["time"] > 3.0:
        assert states[first] == "COMPLETE", (rung, states)
        assert states[second] == ("PRUNED" if lagging else "COMPLETE"), (rung, states)
    pruned = [n for n in (0, 2) if states[n] == "PRUNED"]
    assert len(pruned) <= 1 and states[first] in ("COMPLETE", "PRUNED"), (rung, states)
    for n in pruned:
        other = 2 - n
        assert rung[n]["fid"] > rung[other]["fid"], (rung, states)
        cut = json.loads((ws.run_dir(f"slots-{n:03d}") / "result.json").read_text())
        assert cut["status"] == "cut" and cut["cut_reason"].startswith("pruned at $")
    failed = load_study(ws, "slots").trials[1]
    assert "no prepared data" in failed.user_attrs["error"]
    assert failed.user_attrs["cost_usd"] >= 0  # its cost is recorded
