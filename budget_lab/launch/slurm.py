"""The Slurm backend: sbatch through submitit, squeue/sacct for a job's state, scancel.

A job is followed through the scheduler's word for it (`STATES` maps it to a run state), asked
once per status; the processes themselves run on the cluster's nodes, out of reach. Phases may run
as a chain of jobs, each starting once the previous one ended well (`--dependency=afterok`).

    backend = SlurmBackend()
    executor = backend.make_executor(cluster, folder, nodes=2, gpus_per_node=8, name="xl")
    backend.scheduler_state("1234")   # "RUNNING", "PENDING", ... (None: Slurm does not say)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
from submitit.core.utils import JobPaths

from budget_lab.rundir import LaunchRecord, SegmentRow

if TYPE_CHECKING:
    from budget_lab.launch.cluster import ClusterConfig

__all__ = ["STATES", "SlurmBackend"]

#: Slurm job states (squeue / sacct) → run states.
STATES = {
    "PENDING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "CONFIGURING": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "PREEMPTED": "queued",  # with PreemptMode=REQUEUE it comes back
    "COMPLETED": "completed",
    "FAILED": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "TIMEOUT": "failed",
    "CANCELLED": "cancelled",
}
_CLIENT_TIMEOUT_S = 30  # squeue, sacct, scancel: a controller that does not answer


class SlurmBackend:
    """Jobs on a Slurm cluster (`budget_lab.launch.backend.Backend`)."""

    name = "slurm"
    chains_jobs = True  # --dependency=afterok: phases as dependent jobs

    def make_executor(
        self, cluster: ClusterConfig, folder: Path, nodes: int, gpus_per_node: int, name: str
    ) -> submitit.Executor:
        """`nodes` × one task per GPU (one task per node without GPUs), with the cluster file's
        partition, account, QoS, constraint, memory, extra #SBATCH lines and setup."""
        slurm = cluster.slurm
        assert slurm is not None  # a Slurm cluster has a slurm section (ClusterConfig checks)
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params: dict[str, Any] = {
            "timeout_min": cluster.time_limit_min,
            "nodes": nodes,
            "tasks_per_node": max(gpus_per_node, 1),
            "name": name,
            "slurm_partition": slurm.partition,
            "slurm_signal_delay_s": cluster.signal_delay_s,
        }
        if gpus_per_node:
            params["slurm_gpus_per_node"] = gpus_per_node
        if slurm.cpus_per_task:
            params["cpus_per_task"] = slurm.cpus_per_task
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        for key, value in (
            ("slurm_account", slurm.account),
            ("slurm_qos", slurm.qos),
            ("slurm_constraint", slurm.constraint),
        ):
            if value:
                params[key] = value
        if slurm.additional:
            params["slurm_additional_parameters"] = dict(slurm.additional)
        if slurm.setup:
            params["slurm_setup"] = list(slurm.setup)
        executor.update_parameters(**params)
        return executor

    def submit_chain(
        self, executor: submitit.Executor, cluster: ClusterConfig, jobs: list[Any]
    ) -> list[submitit.Job]:
        """Submit `jobs` in order, each starting once the one before ended well (afterok); a
        failed one cancels those after it (kill-on-invalid-dep)."""
        extra = dict(cluster.slurm.additional) if cluster.slurm else {}
        submitted: list[submitit.Job] = []
        for job in jobs:
            if submitted:
                executor.update_parameters(
                    slurm_additional_parameters={
                        **extra,
                        "dependency": f"afterok:{submitted[-1].job_id}",
                        "kill_on_invalid_dep": "yes",
                    }
                )
            submitted.append(executor.submit(job))
        return submitted

    def current_job(self, record: LaunchRecord) -> tuple[str, str | None]:
        """With phases as dependent jobs, the first job that has not completed (the running
        phase, or the one that failed); else the only one. Each job asked is a squeue/sacct
        call."""
        for job_id in record.job_ids:
            state = self.scheduler_state(job_id)
            if state != "COMPLETED":
                return job_id, state
        return record.job_ids[-1], "COMPLETED"

    def scheduler_state(self, job_id: str) -> str | None:
        """Slurm's word for the job: squeue while it is known there, else sacct; None when
        neither answers."""
        try:
            out = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%T"],
                capture_output=True,
                text=True,
                timeout=_CLIENT_TIMEOUT_S,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0].strip()
            out = subprocess.run(
                ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                capture_output=True,
                text=True,
                timeout=_CLIENT_TIMEOUT_S,
            )
            states = [s.split()[0] for s in out.stdout.split("\n") if s.strip()]
            return states[-1] if states else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    def run_state(
        self, scheduler_state: str | None, segments: list[SegmentRow], written: str | None
    ) -> str | None:
        """Slurm's word, read with the trainer's (`written`): a job that ended well whose trainer
        did not finish was stopped or ran out of requeues. Without a word: running if the
        trainer says so, else queued."""
        if scheduler_state is None:
            return "running" if written == "running" else "queued"
        state = STATES.get(scheduler_state, "unknown")
        if state == "completed" and written == "phase-completed":
            return "queued"  # the next phase's job is about to start (afterok)
        if state == "completed" and written != "completed":
            return "interrupted" if written == "interrupted" else "failed"
        return state

    def segment_alive(
        self, segment: SegmentRow, is_last: bool, scheduler_state: str | None
    ) -> bool:
        """Only the last segment may run, while the job runs (or Slurm was not asked)."""
        running = scheduler_state is None or STATES.get(scheduler_state) == "running"
        return is_last and running

    def still_running(self, segment: SegmentRow, scheduler_state: str | None) -> bool:
        """Slurm says the job runs."""
        return STATES.get(scheduler_state or "", "") == "running"

    def cancel(self, record: LaunchRecord, run_dir: Path) -> None:
        """scancel every job of the launch: with phases as dependent jobs, those waiting too."""
        subprocess.run(["scancel", *record.job_ids], capture_output=True, timeout=_CLIENT_TIMEOUT_S)

    def log_paths(self, record: LaunchRecord, job_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) of the job's first task, in the launch's submitit folder."""
        paths = JobPaths(record.submitit_folder, job_id=job_id, task_id=0)
        return paths.stdout, paths.stderr
