"""Submit a run to a cluster through submitit, and write down where it went (launch.json).

    record = launch_run(cfg, load_cluster("slurm-local"), Workspace.from_args(None), "nano-1")

Every launch gets a fresh submitit folder under `workspace/jobs/<launch-id>/`: job ids restart at
1 on a fresh cluster, and a folder keyed only on the job id would hand back an old job's result.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from budget_lab.config import RunConfig, run_config_to_dict
from budget_lab.errors import ConfigError, UserError
from budget_lab.io import atomic_write_text, yaml_dump
from budget_lab.launch.backend import BACKENDS, backend_for
from budget_lab.launch.job import EvalPlan, TrainJob
from budget_lab.launch.status import run_status
from budget_lab.rundir import LaunchRecord, RunDir, read_config, read_launch, write_launch
from budget_lab.workspace import Workspace

if TYPE_CHECKING:
    from budget_lab.launch.cluster import ClusterConfig

__all__ = [
    "LaunchRecord",
    "Placement",
    "check_run_name",
    "launch_run",
    "launch_runs",
    "make_executor",
    "read_launch",
    "new_launch_id",
]

RUN_NAME_MAX = 100  # characters; a run name is a folder name, a Slurm job name, a ledger key
_RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: str) -> str:
    """`name` if it can name a run: letters, digits, '.', '_', '-', starting with a letter or a
    digit, at most RUN_NAME_MAX characters. Else a UserError: a name such as `../x` would put the
    run folder outside workspace/runs, and a newline would reach the #SBATCH lines."""
    if (
        not isinstance(name, str)
        or len(name) > RUN_NAME_MAX
        or _RUN_NAME_RE.fullmatch(name) is None
    ):
        what = f"{len(name)} characters" if isinstance(name, str) else type(name).__name__
        raise UserError(
            f"run name {name!r} is invalid ({what}): use 1-{RUN_NAME_MAX} letters, digits, '.', "
            "'_' or '-', starting with a letter or a digit (it names the folder "
            "workspace/runs/NAME and the Slurm job); e.g. --name nano-r075"
        )
    return name


@dataclass
class Placement:
    """Where and how wide a run goes: nodes × GPUs per node (0 GPUs: a CPU-only machine)."""

    nodes: int = 1
    gpus_per_node: int | None = None  # None: all of a node's GPUs

    def resolve(self, cluster: ClusterConfig) -> tuple[int, int]:
        gpus = cluster.gpus_per_node if self.gpus_per_node is None else self.gpus_per_node
        cluster.check_request(self.nodes, gpus)
        return self.nodes, gpus


def new_launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def make_executor(
    cluster: ClusterConfig, folder: Path, nodes: int, gpus_per_node: int, name: str
) -> submitit.Executor:
    """A submitit executor for `cluster` (its backend's), with one task per GPU (one per node
    without GPUs)."""
    backend = backend_for(cluster.executor, cluster=cluster.name)
    return backend.make_executor(cluster, folder, nodes, gpus_per_node, name)


def _job_for(
    cfg_dict: dict[str, Any],
    run_dir: Path,
    cluster: ClusterConfig,
    nodes: int,
    gpus: int,
    eval_plan: EvalPlan | None,
    stop_after_phase: int | None = None,
) -> TrainJob:
    devices = nodes * max(gpus, 1)
    return TrainJob(
        str(run_dir),
        cfg_dict,
        usd_per_device_hour=cluster.price.usd_per_gpu_hour,
        devices=devices,
        eval_plan=eval_plan,
        max_requeues=cluster.max_requeues,
        stop_after_phase=stop_after_phase,
        nice=getattr(cluster, "nice", 0),
        cluster=cluster,
        price_cache_dir=_price_cache_dir(run_dir),
    )


def _price_cache_dir(run_dir: str | os.PathLike[str]) -> str | None:
    """The workspace's AWS spot price cache for a run folder workspace/runs/<run> (what the
    ledger's sync uses), so that the job's live spend reads the same history."""
    home = Workspace.of_run(run_dir)
    return str(home.prices_cache_dir) if home is not None else None


def _phase_jobs(
    cfg_dict: dict[str, Any],
    run_dir: Path,
    cluster: ClusterConfig,
    nodes: int,
    gpus: int,
    eval_plan: EvalPlan | None,
) -> list[TrainJob]:
    """One job per phase, each stopping after its own phase (the last runs to the end): to be
    submitted as a chain, each starting once the previous one ended well; a failed phase
    cancels the jobs after it."""
    n = len(cfg_dict["phases"])
    return [
        _job_for(cfg_dict, run_dir, cluster, nodes, gpus, eval_plan, i if i < n - 1 else None)
        for i in range(n)
    ]


def _prepare_run_folder(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Write config.yaml (or check it matches) before the job starts: a queued run is visible."""
    resolved = run_config_to_dict(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = read_config(run_dir)
    if saved is None:
        atomic_write_text(RunDir(run_dir).config, yaml_dump(resolved))
    elif saved != resolved:
        raise ConfigError(
            f"{run_dir} already holds a run with a different configuration; launch it under a "
            "new --name, or with the same recipe and overrides to resume it"
        )
    return resolved


def launch_runs(
    runs: list[tuple[str, Any]],
    cluster: ClusterConfig,
    workspace: Workspace,
    placement: Placement | None = None,
    *,
    sweep: str | None = None,
    trials: list[int | None] | None = None,
    eval_plans: list[Any] | None = None,
    phase_jobs: bool = False,
) -> list[LaunchRecord]:
    """Submit several runs `[(name, RunConfig), ...]` as one submitit job array (one launch).
    `phase_jobs` (one run, Slurm): each phase as its own job, dependent on the one before."""
    chains = cluster.executor in BACKENDS and BACKENDS[cluster.executor].chains_jobs
    if phase_jobs and (not chains or len(runs) != 1):
        raise ConfigError(
            "phases as dependent jobs need a Slurm cluster and a single run (cluster "
            f"{cluster.name!r} has executor {cluster.executor!r}); on this machine the phases "
            "run one after the other in one job: drop --phase-jobs"
        )
    for name, _ in runs:
        check_run_name(name)
    placement = placement or Placement()
    nodes, gpus = placement.resolve(cluster)
    launch_id = new_launch_id()
    folder = workspace.job_dir(launch_id)
    folder.mkdir(parents=True, exist_ok=False)
    trials = trials or [None] * len(runs)
    eval_plans = eval_plans or [None] * len(runs)
    jobs_in, run_dirs = [], []
    for (name, cfg), plan in zip(runs, eval_plans, strict=True):
        run_dir = workspace.run_dir(name)
        if RunDir(run_dir).launch.is_file():
            old = read_launch(run_dir)
            state = run_status(run_dir).state
            if state in ("running", "queued"):
                raise UserError(
                    f"run {name!r} is already {state} (launch {old.launch_id if old else '?'}, "
                    f"job {', '.join(old.job_ids) if old else '?'}); see `budget-lab status {name}`"
                    ", cancel it first, or pick another --name"
                )
        cfg_dict = _prepare_run_folder(cfg, run_dir)
        jobs_in.append(_job_for(cfg_dict, run_dir, cluster, nodes, gpus, plan))
        run_dirs.append(run_dir)
    # The launch record is written before the submission (without job ids) so that a process
    # killed in between leaves a record pointing at the submitit folder, where the ids of what
    # was submitted can be found again (`recover_job_ids`): a restart follows that job instead
    # of submitting a second one into the same run folder.
    records = []
    for (name, _), run_dir, trial in zip(runs, run_dirs, trials, strict=True):
        record = LaunchRecord(
            run=name,
            run_dir=str(run_dir.resolve()),
            cluster=cluster.name,
            executor=cluster.executor,
            launch_id=launch_id,
            submitit_folder=str(folder.resolve()),
            job_ids=[],
            nodes=nodes,
            gpus_per_node=gpus,
            tasks_per_node=max(gpus, 1),
            sweep=sweep,
            trial=trial,
            cluster_file=getattr(cluster, "source", None) or cluster.name,
        )
        write_launch(record)
        records.append(record)

    executor = make_executor(
        cluster, folder, nodes, gpus, name=runs[0][0] if len(runs) == 1 else f"array-{launch_id}"
    )
    try:
        if phase_jobs:
            job = jobs_in[0]
            phases = _phase_jobs(job.config, run_dirs[0], cluster, nodes, gpus, job.eval_plan)
            chain = backend_for(cluster.executor).submit_chain(executor, cluster, phases)
            jobs: list[Any] = [chain]
        elif len(jobs_in) == 1:
            jobs = [executor.submit(jobs_in[0])]
        else:
            jobs = executor.submit_array(jobs_in)
    except (submitit.core.utils.FailedJobError, OSError) as err:
        raise UserError(
            f"could not submit to cluster {cluster.name!r}: {err}. Check the cluster file "
            f"(`budget-lab clusters show {cluster.name}`) and that the scheduler is reachable"
        ) from err
    crash_point("after-submit")
    for record, job in zip(records, jobs, strict=True):
        record.job_ids = [str(j.job_id) for j in (job if isinstance(job, list) else [job])]
        write_launch(record)
    return records


def crash_point(name: str) -> None:
    """Fault injection for the crash-window tests: SIGKILL this process when the environment
    variable BUDGET_LAB_CRASH_AT names this point (never set outside tests)."""
    if os.environ.get("BUDGET_LAB_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def launch_run(
    cfg: RunConfig,
    cluster: ClusterConfig,
    workspace: Workspace,
    name: str,
    placement: Placement | None = None,
    *,
    sweep: str | None = None,
    trial: int | None = None,
    eval_plan: Any = None,
    phase_jobs: bool = False,
) -> LaunchRecord:
    """Submit one run; returns its launch record (also in `<run_dir>/launch.json`).
    `phase_jobs`: each phase its own job (Slurm dependencies), else all phases in one job."""
    return launch_runs(
        [(name, cfg)],
        cluster,
        workspace,
        placement,
        sweep=sweep,
        trials=[trial],
        eval_plans=[eval_plan],
        phase_jobs=phase_jobs,
    )[0]
