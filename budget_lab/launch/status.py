"""What a launched run is doing: from its run folder, its scheduler, and its submitit logs.

A run's state is read from three witnesses, in this order of trust:
  1. result.json, written by the trainer (completed / failed / cut; running / interrupted);
  2. the scheduler, through the run's backend (budget_lab.launch.backend): Slurm's squeue/sacct,
     or the job's process for the local executor;
  3. submitit's own result pickle and logs (a job that died before the trainer started).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths, pickle_load

from budget_lab.errors import ConfigError, UserError
from budget_lab.io import atomic_write_json, read_jsonl
from budget_lab.launch.backend import BACKENDS, Backend, backend_for
from budget_lab.rundir import LaunchRecord, RunDir, read_launch, read_result, segment_rows
from budget_lab.workspace import Workspace

__all__ = [
    "RunStatus",
    "run_status",
    "cancel_run",
    "log_paths",
    "tail",
    "list_runs",
    "FINAL_STATES",
]

#: States after which a run does nothing more (until it is launched again).
FINAL_STATES = ("completed", "failed", "cut", "cancelled", "interrupted")


@dataclass
class RunStatus:
    run: str
    run_dir: str
    state: str  # queued / running / completed / failed / cut / cancelled / interrupted / unknown
    cluster: str | None = None
    executor: str | None = None
    job_ids: list[str] = field(default_factory=list)
    scheduler_state: str | None = None  # the scheduler's own word (e.g. Slurm's RUNNING)
    phase: str | None = None
    step: int | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # failed: the trainer's error, else the tail of the job's stderr
    stdout: str | None = None
    stderr: str | None = None
    sweep: str | None = None
    trial: int | None = None
    result: dict[str, Any] | None = None


def _backend(record: LaunchRecord | None, run_dir: Path) -> Backend:
    """The backend the run went to; without a launch record (`budget-lab train` in the
    foreground), the local one: the run's process ran here."""
    if record is None:
        return BACKENDS["local"]
    try:
        return backend_for(record.executor)
    except ConfigError as err:
        raise ConfigError(
            f"{RunDir(run_dir).launch}: {err}. The launcher writes it; relaunch the run, or fix "
            "or remove the file"
        ) from None


def _current_job(
    record: LaunchRecord, backend: Backend, ask: bool = True
) -> tuple[str, str | None]:
    """The job that speaks for the run, and its scheduler state (None when not asked, or there
    is no scheduler). Asked once per status: on Slurm each answer is a squeue/sacct call."""
    if not ask:
        return record.job_ids[0], None
    return backend.current_job(record)


def log_paths(record: LaunchRecord, job_id: str | None = None) -> tuple[Path, Path]:
    """(stdout, stderr) of a job's first task (default: the run's current job), in the launch's
    submitit folder."""
    backend = _backend(record, Path(record.run_dir))
    job_id = job_id or _current_job(record, backend)[0]
    return backend.log_paths(record, job_id)


def tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _submitit_outcome(record: LaunchRecord, job_id: str, run_dir: Path) -> tuple[str, str] | None:
    """('success'|'error', detail) from submitit's result pickle, if the job wrote one.

    A pickle runs code when read: only one inside the workspace's own `jobs/` folder (the run
    folder's workspace) is read, never one a planted launch.json points elsewhere to."""
    path = JobPaths(record.submitit_folder, job_id=job_id, task_id=0).result_pickle
    home = Workspace.of_run(run_dir)
    if home is None or not path.resolve().is_relative_to(home.jobs_dir.resolve()):
        return None
    if not path.is_file():
        return None
    try:
        outcome, value = pickle_load(path)
    except Exception:  # noqa: BLE001 - a torn pickle says nothing
        return None
    return outcome, str(value)[-2000:]


def run_status(run_dir: str | os.PathLike[str], scheduler: bool = True) -> RunStatus:
    """The state of a run folder. `scheduler=False` skips asking Slurm (fast, files only)."""
    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    record = read_launch(run_dir)
    written_result = read_result(run_dir)
    result = dict(written_result) if written_result is not None else None
    status = RunStatus(run=run_dir.name, run_dir=str(run_dir), state="unknown", result=result)
    job_id, sched = None, None
    if record is not None and not record.job_ids:
        record = None  # launched, but nothing reached the scheduler: no job to ask about
    backend = _backend(record, run_dir)
    if record is not None:
        status.cluster, status.executor = record.cluster, record.executor
        status.job_ids, status.sweep, status.trial = record.job_ids, record.sweep, record.trial
        job_id, sched = _current_job(record, backend, ask=scheduler)
        out, err = backend.log_paths(record, job_id)
        status.stdout, status.stderr = str(out), str(err)
    # A segment without an end row whose job is gone was killed hard: it ends at its last sign
    # of life (as in the ledger), never "running" forever.
    segments = segment_rows(run_dir, live=lambda seg, last: backend.segment_alive(seg, last, sched))
    metrics = read_jsonl(files.metrics)
    if metrics:
        status.phase, status.step = metrics[-1].get("phase"), metrics[-1].get("step")
    if result is not None:
        status.step = result.get("global_step", status.step)
    status.segments = segments

    written = (result or {}).get("status")
    if (
        written in ("completed", "cut")
        and record is not None
        and segments
        and segments[-1]["end"] is None
        and backend.still_running(segments[-1], sched)
    ):
        # The trainer is done but the job is not: a sweep trial measures its final FID.
        status.state, status.phase = "running", "final eval"
        return status
    if written in ("completed", "failed", "cut"):
        status.state = written
        if written == "failed":
            status.error = result.get("error") or (tail(Path(status.stderr)) if record else None)
        return status
    if files.cancelled.is_file():
        status.state = "cancelled"
        return status
    if record is None:  # trained in the foreground with `budget-lab train`
        status.state = {"running": "running", "interrupted": "interrupted"}.get(written, "unknown")
        if written == "running" and segments == []:
            status.state = "unknown"
        return status

    assert job_id is not None  # a launch record with jobs
    status.scheduler_state = sched
    state = backend.run_state(sched, segments, written)
    if state is None:  # nothing started, and no scheduler says why: did the job die first?
        outcome = _submitit_outcome(record, job_id, run_dir)
        state = "failed" if outcome and outcome[0] == "error" else "queued"
        if outcome and outcome[0] == "error":
            status.error = outcome[1]
    status.state = state
    if status.state == "failed" and status.error is None:
        outcome = _submitit_outcome(record, job_id, run_dir)
        status.error = (outcome[1] if outcome and outcome[0] == "error" else None) or tail(
            Path(status.stderr or "")
        )
    return status


def cancel_run(run_dir: str | os.PathLike[str]) -> RunStatus:
    """Cancel a queued or running job now (no checkpoint beyond the last periodic one)."""
    run_dir = Path(run_dir)
    record = read_launch(run_dir)
    if record is None:
        raise UserError(
            f"{run_dir} was not launched with `budget-lab launch` (no launch.json); stop a "
            "foreground `budget-lab train` with Ctrl-C"
        )
    before = run_status(run_dir)
    if before.state in FINAL_STATES:
        return before
    atomic_write_json(RunDir(run_dir).cancelled, {"time": time.time()})
    _backend(record, run_dir).cancel(record, run_dir)
    return run_status(run_dir)


def list_runs(runs_dir: str | os.PathLike[str]) -> list[Path]:
    """Run folders (those with a config.yaml), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if RunDir.looks_like_run(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
