"""One interface to the schedulers a run can go to, one module per scheduler.

    backend = backend_for(cluster.executor)      # the `executor` of a cluster file or launch.json
    executor = backend.make_executor(cluster, folder, nodes=1, gpus_per_node=0, name="nano")
    job_id, word = backend.current_job(record)   # the job that speaks for the run, and its state

local.py   submitit's LocalExecutor: jobs are processes on this machine, followed by their pid
slurm.py   sbatch through submitit, squeue/sacct for states, scancel; phases as dependent jobs

The launcher (submit.py) and status (status.py) speak to a backend only through `Backend`; the
backends implement it structurally and import neither this module nor each other. A new backend
is a module with a class like theirs, named in `BACKENDS` (and in the cluster files' `executor`
choices, budget_lab.launch.cluster.EXECUTORS).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from budget_lab.errors import ConfigError
from budget_lab.launch.local import LocalBackend
from budget_lab.launch.slurm import SlurmBackend
from budget_lab.rundir import LaunchRecord, SegmentRow

if TYPE_CHECKING:
    import submitit

    from budget_lab.launch.cluster import ClusterConfig

__all__ = ["Backend", "BACKENDS", "backend_for"]


@runtime_checkable
class Backend(Protocol):
    """What the launcher and status need from a scheduler. "Scheduler state" is the scheduler's
    own word for a job (Slurm's RUNNING); None where there is no scheduler to ask, or it did not
    answer. "Run state" is ours: queued, running, completed, failed, cancelled, interrupted."""

    #: The `executor` name of cluster files and launch records ("local", "slurm").
    name: str
    #: Whether jobs can wait for one another (`submit_chain`: phases as dependent jobs).
    chains_jobs: bool

    def make_executor(
        self, cluster: ClusterConfig, folder: Path, nodes: int, gpus_per_node: int, name: str
    ) -> submitit.Executor:
        """A submitit executor for `cluster` writing into `folder`: `nodes` × one task per GPU
        (one task per node without GPUs); `name` names the job where the scheduler shows it."""
        ...

    def submit_chain(
        self, executor: submitit.Executor, cluster: ClusterConfig, jobs: list[Any]
    ) -> list[submitit.Job]:
        """Submit `jobs` in order, each starting once the one before ended well (only where
        `chains_jobs`)."""
        ...

    def current_job(self, record: LaunchRecord) -> tuple[str, str | None]:
        """The job of the launch that speaks for the run, and its scheduler state."""
        ...

    def run_state(
        self, scheduler_state: str | None, segments: list[SegmentRow], written: str | None
    ) -> str | None:
        """The run's state when its result.json says nothing final (`written`: its status, or
        None), from the current job's scheduler state and the run's segments. None when the
        backend cannot tell (no segment started, no scheduler to ask): submitit's own result
        decides."""
        ...

    def segment_alive(
        self, segment: SegmentRow, is_last: bool, scheduler_state: str | None
    ) -> bool:
        """Whether a segment without an end row may still run (`segment_rows`' `live`); if not,
        it was killed hard."""
        ...

    def still_running(self, segment: SegmentRow, scheduler_state: str | None) -> bool:
        """Whether the run's last segment, without an end row, surely still runs (a trainer that
        wrote its result in a job that is not over: a sweep trial's final FID)."""
        ...

    def cancel(self, record: LaunchRecord, run_dir: Path) -> None:
        """Stop every job of the launch now, queued or running."""
        ...

    def log_paths(self, record: LaunchRecord, job_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) of the job's first task."""
        ...


#: Every backend, by its `executor` name.
BACKENDS: dict[str, Backend] = {b.name: b for b in (LocalBackend(), SlurmBackend())}


def backend_for(executor: str, *, cluster: str | None = None) -> Backend:
    """The backend of an executor name; a ConfigError naming the valid ones (and `cluster`, the
    cluster or launch record that named it) for any other."""
    backend = BACKENDS.get(executor)
    if backend is None:
        where = f"cluster {cluster!r} has " if cluster else ""
        raise ConfigError(f"{where}executor={executor!r}; valid: {', '.join(BACKENDS)}")
    return backend
