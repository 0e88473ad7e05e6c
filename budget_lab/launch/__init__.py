"""Launching runs to clusters through submitit, and following them.

cluster.py   clusters/*.yaml: executor, partition, GPUs, capacity, prices (validated)
backend.py   Backend: what the launcher and status need from a scheduler; backend_for(executor)
local.py     the local backend: submitit's LocalExecutor, jobs as processes on this machine
slurm.py     the Slurm backend: sbatch through submitit, squeue/sacct, scancel, dependent jobs
job.py       TrainJob: the trainer as a submitit Checkpointable (preemption → checkpoint →
             requeue → exact resume), segments.jsonl, dollar rungs for sweep trials
submit.py    launch_run / launch_runs: a fresh submitit folder per launch, launch.json
status.py    run_status / cancel_run / log_paths: what runs where, in which phase and segment
activity.py  ActivityLog: what each segment's seconds went to (activity.jsonl)
notify.py    notify / Listener: a job wakes the controller that launched it (a Unix datagram)

The names below are imported from their modules when first used (`__getattr__`): importing
`budget_lab.launch.cluster` (`budget-lab clusters`, `--help`) loads neither submitit nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from budget_lab.lazy import lazy_exports

if TYPE_CHECKING:
    from budget_lab.launch.job import EvalPlan, TrainJob
    from budget_lab.launch.status import (
        FINAL_STATES,
        RunStatus,
        cancel_run,
        log_paths,
        run_status,
    )
    from budget_lab.launch.submit import Placement, launch_run, launch_runs
    from budget_lab.rundir import LaunchRecord, read_launch

#: Each public name → the module that defines it.
_EXPORTS = {
    "EvalPlan": "budget_lab.launch.job",
    "TrainJob": "budget_lab.launch.job",
    "LaunchRecord": "budget_lab.rundir",
    "Placement": "budget_lab.launch.submit",
    "launch_run": "budget_lab.launch.submit",
    "launch_runs": "budget_lab.launch.submit",
    "read_launch": "budget_lab.rundir",
    "RunStatus": "budget_lab.launch.status",
    "run_status": "budget_lab.launch.status",
    "cancel_run": "budget_lab.launch.status",
    "log_paths": "budget_lab.launch.status",
    "FINAL_STATES": "budget_lab.launch.status",
}

__all__ = [
    "EvalPlan",
    "TrainJob",
    "LaunchRecord",
    "Placement",
    "launch_run",
    "launch_runs",
    "read_launch",
    "RunStatus",
    "run_status",
    "cancel_run",
    "log_paths",
    "FINAL_STATES",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
