"""Submit a run to a cluster through submitit, and write down where it went (launch.json).

    record = launch_run(cfg, load_cluster("slurm-local"), Workspace.from_args(None), "nano-1")

Every launch gets a fresh submitit folder under `workspace/jobs/<launch-id>/`: job ids restart at
1 on a fresh cluster, and a folder keyed only on the job id would hand back an old job's result.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from budget_lab.errors import ConfigError, UserError
from budget_lab.io import atomic_write_json
from budget_lab.rundir import LAUNCH_FILE, LaunchRecord, read_launch

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

    def resolve(self, cluster) -> tuple[int, int]:
        gpus = cluster.gpus_per_node if self.gpus_per_node is None else self.gpus_per_node
        cluster.check_request(self.nodes, gpus)
        return self.nodes, gpus


def new_launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def make_executor(cluster, folder: Path, nodes: int, gpus_per_node: int, name: str):
    """A submitit executor for `cluster`, with one task per GPU (one per node without GPUs)."""
    import submitit

    tasks = max(gpus_per_node, 1)
    if cluster.executor == "local":
        executor = _session_local_executor()(folder=folder)
        executor.update_parameters(
            timeout_min=cluster.time_limit_min,
            tasks_per_node=tasks,
            gpus_per_node=gpus_per_node,
            signal_delay_s=cluster.signal_delay_s,
        )
        return executor
    if cluster.executor != "slurm":
        raise ConfigError(
            f"cluster {cluster.name!r} has executor={cluster.executor!r}; valid: local, slurm"
        )
    slurm = cluster.slurm
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {
        "timeout_min": cluster.time_limit_min,
        "nodes": nodes,
        "tasks_per_node": tasks,
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


def _session_local_executor() -> type:
    """submitit's LocalExecutor, whose job controllers (and so their tasks) start in a session of
    their own. Otherwise they share the launching terminal's process group: Ctrl-C on a
    `budget-lab sweep` or `launch --wait` would kill the running jobs, and closing the terminal
    would hang them up. Only the launcher stops; its jobs run on, and are re-attached later."""
    import submitit
    from submitit.local import local

    class SessionLocalExecutor(submitit.LocalExecutor):
        def _submit_command(self, command: str):
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
                import shlex

                cmd = " && ".join([*setup, shlex.join(cmd)])
            process = subprocess.Popen(cmd, shell=bool(setup), env=env, start_new_session=True)
            return local.LocalJob(
                folder=self.folder,
                job_id=str(process.pid),
                process=process,
                tasks=list(range(ntasks)),
            )

    return SessionLocalExecutor


def _job_for(cfg_dict, run_dir, cluster, nodes, gpus, eval_plan, stop_after_phase=None):
    from budget_lab.launch.job import TrainJob

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
    path = Path(run_dir).resolve()
    return str(path.parent.parent / "cache" / "prices") if path.parent.name == "runs" else None


def _submit_phase_jobs(executor, cluster, cfg_dict, run_dir, nodes, gpus, eval_plan) -> list:
    """One job per phase, each starting once the previous one ended well (Slurm afterok); a
    failed phase cancels the jobs after it (kill-on-invalid-dep)."""
    n = len(cfg_dict["phases"])
    extra = dict(cluster.slurm.additional) if cluster.slurm else {}
    jobs: list = []
    for i in range(n):
        job = _job_for(cfg_dict, run_dir, cluster, nodes, gpus, eval_plan, i if i < n - 1 else None)
        if jobs:
            executor.update_parameters(
                slurm_additional_parameters={
                    **extra,
                    "dependency": f"afterok:{jobs[-1].job_id}",
                    "kill_on_invalid_dep": "yes",
                }
            )
        jobs.append(executor.submit(job))
    return jobs


def _prepare_run_folder(cfg, run_dir: Path) -> dict[str, Any]:
    """Write config.yaml (or check it matches) before the job starts: a queued run is visible."""
    from budget_lab.config import run_config_to_dict
    from budget_lab.io import yaml_dump, yaml_load

    resolved = run_config_to_dict(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.is_file():
        saved = yaml_load(path.read_text())
        if saved != resolved:
            raise ConfigError(
                f"{run_dir} already holds a run with a different configuration; launch it under a "
                "new --name, or with the same recipe and overrides to resume it"
            )
    else:
        from budget_lab.io import atomic_write_text

        atomic_write_text(path, yaml_dump(resolved))
    return resolved


def launch_runs(
    runs: list[tuple[str, Any]],
    cluster,
    workspace,
    placement: Placement | None = None,
    *,
    sweep: str | None = None,
    trials: list[int | None] | None = None,
    eval_plans: list[Any] | None = None,
    phase_jobs: bool = False,
) -> list[LaunchRecord]:
    """Submit several runs `[(name, RunConfig), ...]` as one submitit job array (one launch).
    `phase_jobs` (one run, Slurm): each phase as its own job, dependent on the one before."""
    if phase_jobs and (cluster.executor != "slurm" or len(runs) != 1):
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
    folder = Path(workspace.jobs_dir) / launch_id
    folder.mkdir(parents=True, exist_ok=False)
    trials = trials or [None] * len(runs)
    eval_plans = eval_plans or [None] * len(runs)
    jobs_in, run_dirs = [], []
    for (name, cfg), plan in zip(runs, eval_plans, strict=True):
        run_dir = Path(workspace.runs_dir) / name
        if (run_dir / LAUNCH_FILE).is_file():
            old = read_launch(run_dir)
            state = _quick_state(run_dir)
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
        atomic_write_json(run_dir / LAUNCH_FILE, asdict(record))
        records.append(record)

    executor = make_executor(
        cluster, folder, nodes, gpus, name=runs[0][0] if len(runs) == 1 else f"array-{launch_id}"
    )
    import submitit

    try:
        if phase_jobs:
            job = jobs_in[0]
            jobs = [
                _submit_phase_jobs(
                    executor, cluster, job.config, run_dirs[0], nodes, gpus, job.eval_plan
                )
            ]
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
    for record, run_dir, job in zip(records, run_dirs, jobs, strict=True):
        record.job_ids = [str(j.job_id) for j in (job if isinstance(job, list) else [job])]
        atomic_write_json(run_dir / LAUNCH_FILE, asdict(record))
    return records


def crash_point(name: str) -> None:
    """Fault injection for the crash-window tests: SIGKILL this process when the environment
    variable BUDGET_LAB_CRASH_AT names this point (never set outside tests)."""
    if os.environ.get("BUDGET_LAB_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def launch_run(
    cfg,
    cluster,
    workspace,
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


def _quick_state(run_dir: Path) -> str:
    from budget_lab.launch.status import run_status

    return run_status(run_dir).state
