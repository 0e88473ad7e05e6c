"""What a launched run is doing: from its run folder, its scheduler, and its submitit logs.

A run's state is read from three witnesses, in this order of trust:
  1. result.json, written by the trainer (completed / failed / cut; running / interrupted);
  2. the scheduler: Slurm through submitit (sacct), or the job's process for the local executor;
  3. submitit's own result pickle and logs (a job that died before the trainer started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_lab.launch.job import pid_alive, read_jsonl, segment_alive, segment_rows
from budget_lab.rundir import LaunchRecord, read_launch

__all__ = [
    "RunStatus",
    "run_status",
    "cancel_run",
    "log_paths",
    "tail",
    "list_runs",
    "FINAL_STATES",
    "segment_alive",
]

#: States after which a run does nothing more (until it is launched again).
FINAL_STATES = ("completed", "failed", "cut", "cancelled", "interrupted")
CANCELLED_FILE = "CANCELLED"

# Slurm job states (sacct / squeue) → ours.
_SLURM = {
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


def _current_job(record: LaunchRecord, ask: bool = True) -> tuple[str, str | None]:
    """The job that speaks for the run, and its Slurm state (None when not asked, or local).
    With phases as dependent jobs, that is the first job that has not completed (the running
    phase, or the one that failed); else the only one. Asked once per status: each answer is a
    squeue/sacct call."""
    if record.executor != "slurm" or not ask:
        return record.job_ids[0], None
    for job_id in record.job_ids:
        state = _slurm_state_of(job_id)
        if state != "COMPLETED":
            return job_id, state
    return record.job_ids[-1], "COMPLETED"


def log_paths(record: LaunchRecord, job_id: str | None = None) -> tuple[Path, Path]:
    """(stdout, stderr) of a job's first task (default: the run's current job), in the launch's
    submitit folder."""
    from submitit.core.utils import JobPaths

    job_id = job_id or _current_job(record)[0]
    paths = JobPaths(record.submitit_folder, job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _slurm_state_of(job_id: str) -> str | None:
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0].strip()
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        states = [s.split()[0] for s in out.stdout.split("\n") if s.strip()]
        return states[-1] if states else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _submitit_outcome(record: LaunchRecord, job_id: str, run_dir: Path) -> tuple[str, str] | None:
    """('success'|'error', detail) from submitit's result pickle, if the job wrote one.

    A pickle runs code when read: only one inside the workspace's own `jobs/` folder (the run
    folder's `../../jobs`) is read, never one a planted launch.json points elsewhere to."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(record.submitit_folder, job_id=job_id, task_id=0).result_pickle
    jobs_dir = (Path(run_dir).resolve().parent.parent / "jobs").resolve()
    if not path.resolve().is_relative_to(jobs_dir) or not path.is_file():
        return None
    try:
        outcome, value = pickle_load(path)
    except Exception:  # noqa: BLE001 - a torn pickle says nothing
        return None
    return outcome, str(value)[-2000:]


def run_status(run_dir: str | os.PathLike[str], scheduler: bool = True) -> RunStatus:
    """The state of a run folder. `scheduler=False` skips asking Slurm (fast, files only)."""
    run_dir = Path(run_dir)
    record = read_launch(run_dir)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    status = RunStatus(run=run_dir.name, run_dir=str(run_dir), state="unknown", result=result)
    job_id, sched = None, None
    if record is not None and not record.job_ids:
        record = None  # launched, but nothing reached the scheduler: no job to ask about
    if record is not None:
        status.cluster, status.executor = record.cluster, record.executor
        status.job_ids, status.sweep, status.trial = record.job_ids, record.sweep, record.trial
        job_id, sched = _current_job(record, ask=scheduler)
        out, err = log_paths(record, job_id)
        status.stdout, status.stderr = str(out), str(err)
    # A segment without an end row whose job is gone was killed hard: it ends at its last sign
    # of life (as in the ledger), never "running" forever.
    segments = segment_rows(run_dir, live=_segment_live(record, sched))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if metrics:
        status.phase, status.step = metrics[-1].get("phase"), metrics[-1].get("step")
    if result is not None:
        status.step = result.get("global_step", status.step)
    status.segments = segments

    written = (result or {}).get("status")
    if (
        written in ("completed", "cut")
        and record is not None
        and _job_still_busy(record, segments, sched)
    ):
        # The trainer is done but the job is not: a sweep trial measures its final FID.
        status.state, status.phase = "running", "final eval"
        return status
    if written in ("completed", "failed", "cut"):
        status.state = written
        if written == "failed":
            status.error = result.get("error") or (tail(Path(status.stderr)) if record else None)
        return status
    if (run_dir / CANCELLED_FILE).is_file():
        status.state = "cancelled"
        return status
    if record is None:  # trained in the foreground with `budget-lab train`
        status.state = {"running": "running", "interrupted": "interrupted"}.get(written, "unknown")
        if written == "running" and segments == []:
            status.state = "unknown"
        return status

    if record.executor == "slurm":
        status.scheduler_state = sched
        if sched is not None:
            state = _SLURM.get(sched, "unknown")
            if state == "completed" and written == "phase-completed":
                state = "queued"  # the next phase's job is about to start (afterok)
            elif state == "completed" and written != "completed":
                # The job ended well but the trainer did not finish: it was stopped (interrupted)
                # or submitit gave up requeueing.
                state = "interrupted" if written == "interrupted" else "failed"
            status.state = state
        else:
            status.state = "running" if written == "running" else "queued"
    else:
        last = segments[-1] if segments else None
        if last is not None and last["end"] is None:  # its process is alive (else it is closed)
            status.state = "running"
        elif last is not None and last["status"] == "preempted":
            # The local controller requeues in place; give it a moment before calling it over.
            status.state = "queued" if time.time() - (last["end"] or 0) < 60 else "interrupted"
        elif last is None:
            outcome = _submitit_outcome(record, job_id, run_dir)
            status.state = "failed" if outcome and outcome[0] == "error" else "queued"
            if outcome and outcome[0] == "error":
                status.error = outcome[1]
        else:
            status.state = "interrupted" if written == "interrupted" else "failed"
    if status.state == "failed" and status.error is None:
        outcome = _submitit_outcome(record, job_id, run_dir)
        status.error = (outcome[1] if outcome and outcome[0] == "error" else None) or tail(
            Path(status.stderr or "")
        )
    return status


def _segment_live(record: LaunchRecord | None, sched: str | None):
    """`segment_rows`'s test of whether a segment without an end row still runs. Slurm: only the
    last one, while the scheduler says the job runs (or was not asked); else its process here."""
    if record is not None and record.executor == "slurm":
        running = sched is None or _SLURM.get(sched) == "running"
        return lambda seg, last: last and running
    return lambda seg, last: segment_alive(seg)


def _job_still_busy(
    record: LaunchRecord, segments: list[dict[str, Any]], sched: str | None
) -> bool:
    """The last segment has not written its end row, and its job is still alive (`sched`: the
    current job's Slurm state)."""
    if not segments or segments[-1]["end"] is not None:
        return False
    if record.executor == "slurm":
        return _SLURM.get(sched or "", "") == "running"
    return pid_alive(int(segments[-1]["pid"]))


def cancel_run(run_dir: str | os.PathLike[str]) -> RunStatus:
    """Cancel a queued or running job now (no checkpoint beyond the last periodic one)."""
    from budget_lab.errors import UserError
    from budget_lab.io import atomic_write_json

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
    atomic_write_json(run_dir / CANCELLED_FILE, {"time": time.time()})
    if record.executor == "slurm":
        # Every job of the launch: with phases as dependent jobs, the ones still waiting too.
        subprocess.run(["scancel", *record.job_ids], capture_output=True, timeout=30)
    else:
        for seg in segment_rows(run_dir):
            if seg["end"] is None and pid_alive(int(seg["pid"])):
                _kill(int(seg["pid"]))
    return run_status(run_dir)


def _kill(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def list_runs(runs_dir: str | os.PathLike[str]) -> list[Path]:
    """Run folders (those with a config.yaml), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
