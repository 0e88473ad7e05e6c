"""Launching to a real Slurm (scripts/slurm/start-slurm.sh): completion, real preemption with
requeue and exact resume, job arrays, failures and cancellation."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from budget_lab.launch import Placement, cancel_run, launch_run, launch_runs, run_status
from budget_lab.launch.cluster import load_cluster
from budget_lab.train import CheckpointStore
from budget_lab.workspace import Workspace
from tests.helpers import tiny_run_config
from tests.slurm_cluster import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
ONE_GPU = Placement(gpus_per_node=1)  # one (fake) GPU: one task, priced; training runs on the CPU


tiny_cfg = tiny_run_config


def wait_final(run_dir, timeout=300):
    final = ("completed", "failed", "cut", "cancelled", "interrupted")
    return wait_until(
        lambda: (st := run_status(run_dir)).state in final and st, timeout, f"{run_dir} to end"
    )


@pytest.fixture()
def workspace(tmp_path):
    return Workspace(tmp_path / "ws").ensure()


def test_slurm_launch_completes(train_data_dir, workspace):
    record = launch_run(
        tiny_cfg(train_data_dir), load_cluster("slurm-local"), workspace, "s1", ONE_GPU
    )
    st = wait_final(record.run_dir)
    assert st.state == "completed", st.error
    assert st.cluster == "slurm-local" and st.job_ids == record.job_ids
    assert (Path(st.run_dir) / "result.json").is_file()
    assert st.segments[0]["job_id"] == record.job_ids[0]


def test_real_preemption_requeues_and_resumes_bit_identical(train_data_dir, workspace):
    cfg = tiny_cfg(train_data_dir, "phases.0.steps=300", "checkpoint.every=1000")
    spot = load_cluster("slurm-local", ["slurm.partition=spot"])
    # The reference runs uninterrupted on the same node, in the same kind of job (same threads);
    # it holds no GPU so that the high-priority job below needs exactly the spot job's.
    ref = launch_run(
        cfg, load_cluster("slurm-local"), workspace, "reference", Placement(gpus_per_node=0)
    )
    record = launch_run(cfg, spot, workspace, "preempted", ONE_GPU)
    run_dir = Path(record.run_dir)
    wait_until(
        lambda: (
            (run_dir / "metrics.jsonl").is_file()
            and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5
        ),
        240,
        "the spot job to be mid-phase",
        interval_s=0.1,
    )
    # A high-priority job that needs every GPU of the node preempts the spot job for real.
    hog = subprocess.run(
        ["sbatch", "-p", "debug", "--gres=gpu:8", "-c", "1", "--wrap", "sleep 3", "--parsable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    st = wait_final(run_dir, timeout=400)
    assert st.state == "completed", st.error
    statuses = lambda: [s["status"] for s in run_status(run_dir).segments]  # noqa: E731
    wait_until(lambda: statuses()[-1] != "running", 30, "the job's end row")  # written last
    assert statuses() == ["preempted", "completed"]
    wait_final(ref.run_dir)
    ref_w = CheckpointStore(Path(ref.run_dir) / "checkpoints").load_latest()[0]["model"]
    got_w = CheckpointStore(run_dir / "checkpoints").load_latest()[0]["model"]
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert hog


def test_job_array_failure_and_cancel(train_data_dir, workspace, tmp_path):
    cluster = load_cluster("slurm-local")
    runs = [(f"arr-{i}", tiny_cfg(train_data_dir, f"seed={i}")) for i in range(2)]
    runs.append(("broken", tiny_cfg(train_data_dir, f"data.path={tmp_path / 'nowhere'}")))
    records = launch_runs(runs, cluster, workspace, Placement(gpus_per_node=0))
    assert len({r.launch_id for r in records}) == 1
    states = [wait_final(r.run_dir) for r in records]
    assert [s.state for s in states] == ["completed", "completed", "failed"]
    assert "no prepared data" in states[2].error

    long = launch_run(
        tiny_cfg(train_data_dir, "phases.0.steps=100000"), cluster, workspace, "long", ONE_GPU
    )
    wait_until(lambda: run_status(long.run_dir).state == "running", 120, "the long job to run")
    t0 = time.time()
    st = cancel_run(long.run_dir)
    assert st.state == "cancelled" and time.time() - t0 < 30
    squeue = lambda: subprocess.run(  # noqa: E731
        ["squeue", "-h", "-j", long.job_ids[0]], capture_output=True, text=True
    ).stdout.strip()
    wait_until(lambda: not squeue(), 60, "the cancelled job to leave the queue")


def test_phases_as_dependent_jobs(train_data_dir, workspace):
    record = launch_run(
        tiny_cfg(train_data_dir),
        load_cluster("slurm-local"),
        workspace,
        "phased",
        Placement(gpus_per_node=0),
        phase_jobs=True,
    )
    assert len(record.job_ids) == 2  # masked pretraining, then the finetune after it
    st = wait_final(record.run_dir)
    assert st.state == "completed", st.error
    wait_until(
        lambda: (
            [s["status"] for s in run_status(record.run_dir).segments]
            == ["phase-completed", "completed"]
        ),
        30,
        "both jobs' end rows",
    )
    segs = run_status(record.run_dir).segments
    assert [s["job_id"] for s in segs] == record.job_ids
    assert segs[1]["start"] >= segs[0]["end"]  # the finetune job waited for the first one
    result = json.loads((Path(record.run_dir) / "result.json").read_text())
    assert result["global_step"] == 10


def test_phase_jobs_need_slurm(train_data_dir, workspace):
    from budget_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="need a Slurm cluster"):
        launch_run(tiny_cfg(train_data_dir), load_cluster("local"), workspace, "x", phase_jobs=True)
