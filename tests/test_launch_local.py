"""Launching through submitit's local executor: real job processes, real signals, real resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from budget_lab.errors import ConfigError
from budget_lab.io import read_jsonl
from budget_lab.launch import Placement, cancel_run, launch_run, launch_runs, run_status
from budget_lab.launch.backend import BACKENDS, Backend, backend_for
from budget_lab.launch.cluster import EXECUTORS, load_cluster
from budget_lab.launch.notify import Listener
from budget_lab.train import CheckpointStore, Trainer
from budget_lab.workspace import Workspace
from tests.helpers import tiny_run_config

tiny_cfg = tiny_run_config


def wait_for(
    run_dir, states=("completed", "failed", "cut", "cancelled", "interrupted"), timeout=240
):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = run_status(run_dir)
        if st.state in states:
            return st
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} still {run_status(run_dir).state} after {timeout} s")


def final_weights(run_dir):
    ckpt, _ = CheckpointStore(Path(run_dir) / "checkpoints").load_latest()
    return ckpt["model"]


@pytest.fixture()
def workspace(tmp_path):
    return Workspace(tmp_path / "ws").ensure()


def test_local_launch_completes_and_status_says_where(train_data_dir, workspace):
    cluster = load_cluster("local")
    with Listener() as wake:  # what the sweep controller waits on between its polls
        record = launch_run(tiny_cfg(train_data_dir), cluster, workspace, "nano-local")
        st = wait_for(record.run_dir)
        woken_by = wake.wait(60)  # at once: the datagram follows the end row by microseconds
    assert st.state == "completed", st.error
    # The job sent its run folder once its end row was written.
    assert [Path(m).resolve() for m in woken_by] == [Path(record.run_dir).resolve()]
    assert Path(st.run_dir) == workspace.run_dir("nano-local").resolve()
    assert (Path(st.run_dir) / "result.json").is_file()
    assert len(st.segments) == 1 and st.segments[0]["status"] == "completed"
    assert Path(st.stdout).parent == Path(record.submitit_folder)
    # The job ran at the cluster's CPU niceness (local.yaml: 10), above this process's.
    [start] = [r for r in read_jsonl(Path(st.run_dir) / "segments.jsonl") if r["event"] == "start"]
    assert cluster.nice == 10 and start["nice"] == max(os.nice(0), cluster.nice)
    # Every launch gets its own submitit folder; nice 0 leaves the priority alone.
    cluster0 = load_cluster("local", ["nice=0"])
    record2 = launch_run(tiny_cfg(train_data_dir), cluster0, workspace, "nano-local-2")
    assert record2.submitit_folder != record.submitit_folder
    st2 = wait_for(record2.run_dir)
    [start2] = [
        r for r in read_jsonl(Path(st2.run_dir) / "segments.jsonl") if r["event"] == "start"
    ]
    assert start2["nice"] == os.nice(0)


def test_local_preemption_requeues_and_resumes_bit_identical(train_data_dir, workspace, tmp_path):
    cfg = tiny_cfg(train_data_dir, "phases.0.steps=30", "checkpoint.every=50")
    reference = tmp_path / "reference"
    Trainer(cfg, reference, progress=False).run()

    record = launch_run(cfg, load_cluster("local"), workspace, "preempted")
    run_dir = Path(record.run_dir)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is mid-phase
        rows = (
            (run_dir / "metrics.jsonl").read_text().splitlines()
            if (run_dir / "metrics.jsonl").is_file()
            else []
        )
        if len(rows) >= 4:
            break
        time.sleep(0.05)
    # What submitit's local controller sends at a timeout, and Slurm at a preemption: USR2.
    os.kill(run_status(run_dir).segments[-1]["pid"], signal.SIGUSR2)
    st = wait_for(run_dir)
    assert st.state == "completed", st.error
    assert [s["status"] for s in st.segments] == ["preempted", "completed"]
    starts = [r for r in read_jsonl(run_dir / "segments.jsonl") if r["event"] == "start"]
    assert [r["nice"] for r in starts] == [max(os.nice(0), 10)] * 2  # the requeued job kept it
    ckpts = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert ckpts[0]["phase"] == "masked-pretrain" and ckpts[0]["step"] < 30  # saved mid-phase
    ref, got = final_weights(reference), final_weights(run_dir)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_failed_job_reports_its_error(train_data_dir, workspace, tmp_path):
    cfg = tiny_cfg(train_data_dir, f"data.path={tmp_path / 'nowhere'}")
    record = launch_run(cfg, load_cluster("local"), workspace, "broken")
    st = wait_for(record.run_dir)
    assert st.state == "failed"
    assert "no prepared data" in st.error


def test_cancel_returns_promptly(train_data_dir, workspace):
    cfg = tiny_cfg(train_data_dir, "phases.0.steps=100000")
    record = launch_run(cfg, load_cluster("local"), workspace, "long")
    wait_for(record.run_dir, states=("running",))
    t0 = time.time()
    st = cancel_run(record.run_dir)
    assert time.time() - t0 < 15
    assert st.state == "cancelled"
    assert run_status(record.run_dir).state == "cancelled"


def test_job_array_of_small_runs(train_data_dir, workspace):
    runs = [(f"arr-{i}", tiny_cfg(train_data_dir, f"seed={i}")) for i in range(3)]
    records = launch_runs(runs, load_cluster("local"), workspace, Placement())
    assert len({r.launch_id for r in records}) == 1
    assert len({r.job_ids[0] for r in records}) == 3
    for r in records:
        assert wait_for(r.run_dir).state == "completed"


def test_every_executor_has_a_backend_and_no_other():
    """The cluster files' executors and the backends are the same set; each backend implements
    the whole interface; another name is refused with the valid ones."""
    assert set(BACKENDS) == set(EXECUTORS)
    assert all(isinstance(b, Backend) and b.name == name for name, b in BACKENDS.items())
    with pytest.raises(
        ConfigError, match=r"cluster 'k8s' has executor='pods'; valid: local, slurm"
    ):
        backend_for("pods", cluster="k8s")


def test_a_launch_record_naming_no_backend_is_a_clear_error(workspace):
    run_dir = workspace.run_dir("odd")
    run_dir.mkdir(parents=True)
    record = {"run": "odd", "cluster": "k8s", "executor": "pods", "job_ids": ["1"]}
    (run_dir / "launch.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"launch.json: executor='pods'; valid: local, slurm"):
        run_status(run_dir)
