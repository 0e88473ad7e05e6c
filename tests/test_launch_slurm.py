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
from budget_lab.ledger.store import Ledger
from budget_lab.ledger.sync import sync_run
from budget_lab.train import CheckpointStore
from budget_lab.workspace import Workspace
from tests.helpers import tiny_run_config
from tests.slurm_cluster import sacct_runs, wait_until

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


def test_two_task_job_preempted_requeued_resumes_bit_identical(
    train_data_dir, workspace, monkeypatch
):
    """One 2-task job (2 fake GPUs, a gloo rank per task) on the spot partition, preempted for
    real mid-phase by a high-priority job: submitit checkpoints on rank 0, both ranks stop at the
    same step, the job is requeued and ends bit-identical to an uninterrupted 2-task job. Rank 0
    alone writes the run folder, and the ledger charges 2 GPUs once per run of the job."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both jobs: 1 thread per rank (1 CPU per task)
    cfg = tiny_cfg(train_data_dir, "phases.0.steps=16", "phases.1.steps=2", "checkpoint.every=1000")
    two = Placement(gpus_per_node=2)  # one task per GPU: world size 2
    spot = load_cluster("slurm-local", ["slurm.partition=spot"])
    # The reference: the same kind of job, uninterrupted, on debug (never preempted).
    ref = launch_run(cfg, load_cluster("slurm-local"), workspace, "reference", two)
    record = launch_run(cfg, spot, workspace, "preempted", two)
    run_dir = Path(record.run_dir)
    metrics = run_dir / "metrics.jsonl"
    wait_until(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
        240,
        "the spot job to be mid-phase",
        interval_s=0.1,
    )
    # 8 GPUs, the reference holds 2 and the spot job 2: a debug job that needs 6 preempts it.
    subprocess.run(
        [
            "sbatch",
            "-p",
            "debug",
            "--gres=gpu:6",
            "-c",
            "1",
            "--wrap",
            "sleep 1",
            "-o",
            "/dev/null",
        ],
        check=True,
        capture_output=True,
    )
    st = wait_final(run_dir, timeout=400)
    assert st.state == "completed", st.error
    statuses = lambda: [s["status"] for s in run_status(run_dir).segments]  # noqa: E731
    wait_until(lambda: statuses()[-1] != "running", 30, "the job's end row")  # written last
    assert statuses() == ["preempted", "completed"]
    wait_final(ref.run_dir)

    # Bit-identical to the uninterrupted 2-task job: weights and EMA.
    ref_ckpt = CheckpointStore(Path(ref.run_dir) / "checkpoints").load_latest()[0]
    got_ckpt = CheckpointStore(run_dir / "checkpoints").load_latest()[0]
    for part in ("model", "ema"):
        assert all(torch.equal(ref_ckpt[part][k], got_ckpt[part][k]) for k in ref_ckpt[part])
    assert got_ckpt["world_size"] == 2

    # Both ranks stopped at the preemption checkpoint's step (each task's own log says).
    saved = [
        json.loads(r)["step"] for r in (run_dir / "checkpoints.jsonl").read_text().splitlines()
    ]
    assert len(saved) == 3 and saved[1:] == [16, 18]  # the preemption's, then each phase end's
    logs = [
        (Path(record.submitit_folder) / f"{record.job_ids[0]}_{task}_log.out").read_text()
        for task in (0, 1)
    ]
    for task, log in enumerate(logs):
        ends = [line for line in log.splitlines() if line.startswith(f"rank {task}: ")]
        assert ends == [
            f"rank {task}: interrupted at step {saved[0]}",
            f"rank {task}: completed at step 18",
        ]

    # Rank 0 alone wrote the run folder: one start and one end row per run of the job, one
    # metrics row per logged step, one activity timeline per run.
    rows = [json.loads(r) for r in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [(r["event"], r["attempt"]) for r in rows] == [
        ("start", 0), ("end", 0), ("start", 1), ("end", 1)
    ]  # fmt: skip
    assert [r["devices"] for r in rows if r["event"] == "start"] == [2, 2]
    steps = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert steps == list(range(1, 19))  # the preempted run logged up to its checkpoint
    spans = [json.loads(r) for r in (run_dir / "activity.jsonl").read_text().splitlines()]
    for attempt in (0, 1):
        mine = [s for s in spans if s["attempt"] == attempt]
        assert mine and all(a["end"] == b["start"] for a, b in zip(mine, mine[1:], strict=False))

    # The ledger: the job's 2 GPUs once per run of the job (sacct's figures), not once per rank.
    with Ledger.for_workspace(workspace) as ledger:
        segments = sync_run(ledger, run_dir, spot, price_cache_dir=workspace.prices_cache_dir)
        truth = sacct_runs(record.job_ids[0])
        assert len(segments) == len(truth) == 2, (segments, truth)
        for seg, row in zip(segments, truth, strict=True):
            assert seg.gpus == 2 and "gres/gpu=2" in row["AllocTRES"]
            assert seg.gpu_seconds == pytest.approx(int(row["ElapsedRaw"]) * 2, rel=0.02)
        assert ledger.spent(run="preempted") == pytest.approx(sum(s.cost_usd for s in segments))


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
