"""The local Slurm (scripts/slurm/start-slurm.sh) is a real cluster: submitit runs jobs on it,
sacct accounts every run with its GPUs, and a debug job really preempts a spot job, which is
requeued and runs again. Runs in ~20 s once the cluster is up (the first start installs it)."""

from __future__ import annotations

import operator
import os
import subprocess
from pathlib import Path

import pytest
import submitit

from budget_lab.launch.cluster import load_cluster
from tests.slurm_cluster import sacct_runs, wait_until

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.usefixtures("slurm_cluster"),  # starts the cluster, sets SLURM_CONF
    pytest.mark.timeout(600),
]


def _sbatch(*args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _settled(job_id: str, n_runs: int = 1) -> list[dict[str, str]] | None:
    """sacct's rows of a job once it shows `n_runs` runs, the last one ended.

    A row can read COMPLETED half a second before its Partition is filled in: wait for both.
    """
    runs = sacct_runs(job_id)
    if len(runs) < n_runs or not all(run["Partition"] for run in runs):
        return None
    return runs if runs[-1]["State"] not in ("PENDING", "RUNNING", "REQUEUED") else None


def test_the_cluster_matches_clusters_slurm_local_yaml():
    cluster = load_cluster("slurm-local")
    sinfo = subprocess.run(
        ["sinfo", "-h", "-o", "%P|%c|%G"], capture_output=True, text=True, check=True
    ).stdout.split()
    rows = {line.split("|")[0].rstrip("*"): line.split("|")[1:] for line in sinfo}
    assert set(rows) == {"debug", "spot"} and cluster.slurm.partition in rows
    assert rows["debug"] == [str(cluster.cpus_per_node), f"gpu:{cluster.gpus_per_node}"]


def test_submitit_jobs_run_and_sacct_accounts_their_gpus(tmp_path: Path):
    # A job asking for 2 of the 8 fake GPUs, and a CPU-only job, both on partition debug.
    gpu_executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    gpu_executor.update_parameters(
        slurm_partition="debug", timeout_min=30, cpus_per_task=1, mem_gb=1, gpus_per_node=2
    )
    gpu_job = gpu_executor.submit(os.getenv, "CUDA_VISIBLE_DEVICES")
    cpu_executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    cpu_executor.update_parameters(
        slurm_partition="debug", timeout_min=30, cpus_per_task=1, mem_gb=1
    )
    cpu_job = cpu_executor.submit(operator.mul, 6, 7)

    wait_until(lambda: gpu_job.done() and cpu_job.done(), 90, "the two submitit jobs to end")
    assert cpu_job.result() == 42
    visible = gpu_job.result()
    assert visible is not None and len(visible.split(",")) == 2  # Slurm bound 2 devices

    (gpu_run,) = wait_until(lambda: _settled(gpu_job.job_id), 30, "sacct to show the GPU job")
    (cpu_run,) = wait_until(lambda: _settled(cpu_job.job_id), 30, "sacct to show the CPU job")
    assert gpu_run["State"] == cpu_run["State"] == "COMPLETED"
    assert gpu_run["Partition"] == cpu_run["Partition"] == "debug"
    assert "gres/gpu=2" in gpu_run["AllocTRES"].split(",")
    assert "gres/gpu" not in cpu_run["AllocTRES"]
    assert int(gpu_run["ElapsedRaw"]) >= 0


# A spot job that behaves like a submitit job: on the signal Slurm sends at preemption
# (preempt_send_user_signal delivers --signal), it saves (here: prints a line) and requeues itself.
_SPOT_JOB = """\
#!/bin/bash
on_preemption() {
    echo "signal restart=${SLURM_RESTART_COUNT:-0}"
    kill "$child"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_preemption USR2
echo "start restart=${SLURM_RESTART_COUNT:-0}"
sleep 300 &
child=$!
wait
"""


def test_a_debug_job_preempts_a_spot_job_which_is_requeued(tmp_path: Path):
    script = tmp_path / "spot.sh"
    script.write_text(_SPOT_JOB)
    log = tmp_path / "spot.out"
    gpus = f"--gres=gpu:{load_cluster('slurm-local').gpus_per_node}"  # every GPU of the node
    common = ("-c", "1", "--mem=100M", "--time=10", gpus)
    spot = debug = None
    try:
        spot = _sbatch("-p", "spot", "--requeue", "--signal=B:USR2@60", *common,
                       "-o", str(log), "--open-mode=append", str(script))  # fmt: skip
        # Alone on the cluster this takes ~15 s; the long waits cover jobs of other test runs
        # that hold GPUs (a pending debug job also keeps the spot job from starting).
        wait_until(lambda: log.exists() and "start restart=0" in log.read_text(), 240, "spot start")
        debug = _sbatch("-p", "debug", *common, "-o", "/dev/null", "--wrap", "sleep 1")

        # Requeued runs become eligible cred_expire + 1 = 11 s after they end.
        wait_until(lambda: "start restart=1" in log.read_text(), 240, "the spot job to run again")
        assert "signal restart=0" in log.read_text()  # the preemption signal reached the job

        (debug_run,) = wait_until(lambda: _settled(debug), 30, "sacct to show the debug job")
        assert debug_run["State"] == "COMPLETED"
        subprocess.run(["scancel", spot], check=True)  # end the second run
        runs = wait_until(lambda: _settled(spot, 2), 30, "sacct to show both spot runs")
        first, second = runs[0], runs[-1]
        assert first["State"] == "REQUEUED" and first["Partition"] == "spot"
        assert first["End"] <= debug_run["Start"]  # the spot run made room for the debug job
        assert second["State"].startswith("CANCELLED") and second["Start"] >= first["End"]
        assert "gres/gpu=8" in first["AllocTRES"].split(",")
    finally:
        for job in (spot, debug):
            if job:
                subprocess.run(["scancel", job], capture_output=True)
