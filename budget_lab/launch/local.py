"""The local backend: submitit's LocalExecutor, jobs as processes on this machine.

There is no scheduler to ask: a job is followed through its run folder's segments and their
processes (a segment without an end row runs while its pid is alive here), and cancelled by
signalling that process. submitit's local controller requeues a preempted job in place.

    backend = LocalBackend()
    executor = backend.make_executor(cluster, folder, nodes=1, gpus_per_node=0, name="nano")
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
from submitit.core.utils import JobPaths
from submitit.local import local as submitit_local

from budget_lab.rundir import LaunchRecord, SegmentRow, segment_rows

if TYPE_CHECKING:
    from budget_lab.launch.cluster import ClusterConfig

__all__ = ["LocalBackend", "SessionLocalExecutor", "pid_alive", "segment_alive"]

#: How long a preempted segment may wait for the local controller to requeue it (seconds) before
#: the run counts as interrupted.
REQUEUE_GRACE_S = 60.0
#: How long a cancelled job has to stop after SIGTERM before it gets SIGKILL (seconds).
KILL_GRACE_S = 5.0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def segment_alive(seg: SegmentRow) -> bool:
    """Whether the process of a segment without an end row still runs: its pid is alive on this
    host (the ledger's test, budget_lab.ledger.sync; the local executor runs jobs here)."""
    if seg.get("host") != socket.gethostname():
        return False
    pid = seg.get("pid")
    return isinstance(pid, int) and pid_alive(pid)


class SessionLocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, whose job controllers (and so their tasks) start in a session of
    their own. Otherwise they share the launching terminal's process group: Ctrl-C on a
    `budget-lab sweep` or `launch --wait` would kill the running jobs, and closing the terminal
    would hang them up. Only the launcher stops; its jobs run on, and are re-attached later."""

    def _submit_command(self, command: str) -> submitit_local.LocalJob:
        # submitit.local.local.LocalExecutor._submit_command and start_controller, but the
        # controller process starts with start_new_session=True.
        params = self.parameters
        ntasks = params.get("tasks_per_node", 1)
        n_gpus = params.get("gpus_per_node", 0)
        visible = params.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        setup = params.get("setup", ())
        env = dict(os.environ)
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * params.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(params.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="1" if params.get("stderr_to_stdout", False) else "",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
            SUBMITIT_LOCAL_WITH_SHELL="1" if setup else "",
        )
        cmd: Any = [sys.executable, "-m", "submitit.local._local", str(self.folder)]
        if setup:
            cmd = " && ".join([*setup, shlex.join(cmd)])
        process = subprocess.Popen(cmd, shell=bool(setup), env=env, start_new_session=True)
        return submitit_local.LocalJob(
            folder=self.folder,
            job_id=str(process.pid),
            process=process,
            tasks=list(range(ntasks)),
        )


class LocalBackend:
    """Jobs as processes on this machine (`budget_lab.launch.backend.Backend`)."""

    name = "local"
    chains_jobs = False  # no dependencies between jobs: the phases run one after the other in one

    def make_executor(
        self, cluster: ClusterConfig, folder: Path, nodes: int, gpus_per_node: int, name: str
    ) -> submitit.Executor:
        """One node: one task per GPU (one task without GPUs), at the cluster's time limit."""
        executor = SessionLocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=cluster.time_limit_min,
            tasks_per_node=max(gpus_per_node, 1),
            gpus_per_node=gpus_per_node,
            signal_delay_s=cluster.signal_delay_s,
        )
        return executor

    def submit_chain(
        self, executor: submitit.Executor, cluster: ClusterConfig, jobs: list[Any]
    ) -> list[submitit.Job]:
        raise NotImplementedError("the local executor cannot make a job wait for another")

    def current_job(self, record: LaunchRecord) -> tuple[str, str | None]:
        """The launch's first job; no scheduler word (None)."""
        return record.job_ids[0], None

    def run_state(
        self, scheduler_state: str | None, segments: list[SegmentRow], written: str | None
    ) -> str | None:
        """From the last segment: running while its process lives (`segment_rows` closed it
        otherwise), queued for a moment after a preemption (the controller requeues in place),
        else over. None before any segment started: submitit's result tells queued from failed."""
        if not segments:
            return None
        last = segments[-1]
        if last["end"] is None:
            return "running"
        if last["status"] == "preempted":
            return "queued" if time.time() - (last["end"] or 0) < REQUEUE_GRACE_S else "interrupted"
        return "interrupted" if written == "interrupted" else "failed"

    def segment_alive(
        self, segment: SegmentRow, is_last: bool, scheduler_state: str | None
    ) -> bool:
        """Its process is alive on this host, whichever segment it is."""
        return segment_alive(segment)

    def still_running(self, segment: SegmentRow, scheduler_state: str | None) -> bool:
        """Its process is alive."""
        return pid_alive(int(segment["pid"]))

    def cancel(self, record: LaunchRecord, run_dir: Path) -> None:
        """SIGTERM the process of every segment without an end row, SIGKILL after a grace."""
        for seg in segment_rows(run_dir):
            if seg["end"] is None and pid_alive(int(seg["pid"])):
                _kill(int(seg["pid"]))

    def log_paths(self, record: LaunchRecord, job_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) of the job's first task, in the launch's submitit folder."""
        paths = JobPaths(record.submitit_folder, job_id=job_id, task_id=0)
        return paths.stdout, paths.stderr


def _kill(pid: int, grace_s: float = KILL_GRACE_S) -> None:
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
