"""Launching runs to clusters through submitit, and following them.

cluster.py   clusters/*.yaml: executor, partition, GPUs, capacity, prices (validated)
job.py       TrainJob: the trainer as a submitit Checkpointable (preemption → checkpoint →
             requeue → exact resume), segments.jsonl, dollar rungs for sweep trials
submit.py    launch_run / launch_runs: a fresh submitit folder per launch, launch.json
status.py    run_status / cancel_run / log_paths: what runs where, in which phase and segment
notify.py    notify / Listener: a job wakes the controller that launched it (a Unix datagram)
"""

from budget_lab.launch.job import EvalPlan, TrainJob
from budget_lab.launch.status import FINAL_STATES, RunStatus, cancel_run, log_paths, run_status
from budget_lab.launch.submit import Placement, launch_run, launch_runs
from budget_lab.rundir import LaunchRecord, read_launch

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
