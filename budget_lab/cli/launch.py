"""`budget-lab launch|status|logs|cancel`: send runs to clusters and follow them."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from budget_lab.errors import UserError

_LAUNCH_EPILOG = """\
examples:
  budget-lab launch --cluster local --recipe nano                 this machine, in the background
  budget-lab launch --cluster slurm-local --recipe nano --wait    the test Slurm; follow to the end
  budget-lab launch --cluster aws-p5 --recipe microdit-xl --dry-run   plan + cost estimate only
  budget-lab launch --cluster aws-p5 --recipe microdit-xl --budget-usd 2000
  budget-lab launch --cluster slurm-local --set slurm.partition=spot --recipe nano phases.0.steps=50

The config is the recipe YAML < KEY=VALUE overrides; the cluster is clusters/NAME.yaml (or a path)
< --set overrides. The run folder is WORKSPACE/runs/NAME; the submitit folder (pickles, logs) is
WORKSPACE/jobs/LAUNCH-ID, fresh for every launch. On preemption or near its time limit the job
checkpoints, requeues and resumes exactly (at most max_requeues times, from the cluster file).
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "launch": "submit a training run to a cluster (local, Slurm) through submitit",
    "status": "what runs where: state, phase, step, segments, log paths",
    "logs": "print a launched run's job log (stdout, or --err)",
    "cancel": "cancel a queued or running job now",
}


def register(sub: argparse._SubParsersAction) -> None:
    from budget_lab.workspace import add_workspace_argument

    p = sub.add_parser(
        "launch",
        help=COMMANDS["launch"],
        description="Compose a run, print the plan and its cost estimate, and submit it.",
        epilog=_LAUNCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cluster", required=True, help="cluster name (budget-lab clusters list) or YAML path"
    )
    p.add_argument("--recipe", default="nano", help="recipe name from recipes/ or a YAML path")
    p.add_argument("--name", default=None, help="run name (default: the recipe's name)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (default: all of a node's)"
    )
    p.add_argument(
        "--set",
        dest="cluster_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a cluster field, e.g. --set slurm.partition=spot (repeatable)",
    )
    p.add_argument(
        "--budget-usd",
        type=float,
        default=None,
        help="the run's budget in $: refuse if what it already spent (a relaunch, from the "
        "ledger) plus the estimate exceeds it; 0 refuses any spend",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and estimate; submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument(
        "--phase-jobs",
        action="store_true",
        help="Slurm: one job per phase, each after the previous ended well (default: one job)",
    )
    add_workspace_argument(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides")
    p.set_defaults(func=_launch)

    s = sub.add_parser(
        "status",
        help=COMMANDS["status"],
        description="Without RUN: every run of the workspace. With RUN: its details.",
    )
    s.add_argument("run", nargs="?", help="run name (or run folder)")
    add_workspace_argument(s)
    s.set_defaults(func=_status)

    lg = sub.add_parser("logs", help=COMMANDS["logs"])
    lg.add_argument("run", help="run name (or run folder)")
    lg.add_argument("--err", action="store_true", help="stderr instead of stdout")
    lg.add_argument("-n", "--lines", type=int, default=50, help="last N lines (0 = all)")
    add_workspace_argument(lg)
    lg.set_defaults(func=_logs)

    c = sub.add_parser("cancel", help=COMMANDS["cancel"])
    c.add_argument("run", help="run name (or run folder)")
    add_workspace_argument(c)
    c.set_defaults(func=_cancel)


def _run_dir(workspace, run: str) -> Path:
    from budget_lab.launch.status import list_runs
    from budget_lab.rundir import RunDir

    path = Path(run)
    if RunDir.looks_like_run(path):
        return path
    candidate = workspace.run_dir(run)
    if RunDir.looks_like_run(candidate):
        return candidate

    known = [p.name for p in list_runs(workspace.runs_dir)]
    hint = (
        f"runs in {workspace.runs_dir}: {', '.join(known[:20])}"
        if known
        else (
            f"there are no runs in {workspace.runs_dir} yet (launch one with `budget-lab launch`)"
        )
    )
    raise UserError(f"no run {run!r}; {hint}")


def _check_budget_arg(budget_usd: float | None) -> None:
    if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd >= 0):
        raise UserError(
            f"--budget-usd={budget_usd:g} is invalid: a budget is a dollar amount >= 0 (0 "
            "refuses any spend); pass e.g. --budget-usd 50, or leave it out for no budget"
        )


def _run_spend(workspace, name: str):
    """The ledger, brought up to date with what run `name` already spent (a relaunch: its
    folder's segments are synced first), and that spend in $. The caller closes the ledger."""
    from budget_lab.launch.cluster import load_cluster
    from budget_lab.ledger import Ledger, sync_run
    from budget_lab.rundir import read_launch

    ledger = Ledger.for_workspace(workspace)
    run_dir = workspace.run_dir(name)
    record = read_launch(run_dir)
    if record is not None:
        try:
            cluster = load_cluster(record.cluster_file or record.cluster)
            sync_run(ledger, run_dir, cluster, sacct_wait_s=0.0)
        except UserError as err:  # the ledger's figure is what there is
            print(f"warning: could not sync run {name} into the ledger: {err}", file=sys.stderr)
    return ledger, ledger.spent(run=name)


def _launch(args: argparse.Namespace) -> int:
    from budget_lab.config import compose_run
    from budget_lab.launch.cluster import load_cluster
    from budget_lab.launch.status import FINAL_STATES, run_status
    from budget_lab.launch.submit import Placement, check_run_name, launch_run
    from budget_lab.workspace import Workspace

    # Mistakes in the arguments first: nothing is read, written or printed before.
    _check_budget_arg(args.budget_usd)
    if args.name is not None:
        check_run_name(args.name)
    workspace = Workspace.from_args(args.workspace)
    cluster = load_cluster(args.cluster, args.cluster_overrides)
    cfg = compose_run(args.recipe, list(args.overrides))
    cfg.data.path = str(Path(cfg.data.path).resolve())  # the job may start elsewhere
    name = check_run_name(args.name or cfg.name)
    nodes, gpus = Placement(args.nodes, args.gpus_per_node).resolve(cluster)

    steps = " → ".join(
        f"{p.name} ({p.steps} steps × {p.batch_size}, mask {p.mask_ratio:g})" for p in cfg.phases
    )
    print(f"run      {name}  →  {workspace.run_dir(name)}")
    print(f"recipe   {args.recipe}: {cfg.model['preset']}, {steps}")
    where = f"{nodes} node(s) × {gpus} {cluster.gpu_type}" if gpus else "1 node, CPU only"
    part = f", partition {cluster.slurm.partition}" if cluster.slurm else ""
    print(f"cluster  {cluster.name} ({cluster.executor}{part}): {where}, {cluster.capacity}")
    print(f"limits   {cluster.time_limit_min} min per job, up to {cluster.max_requeues} requeues")

    from budget_lab.ledger import check_budget, estimate_run, format_estimate

    estimate = estimate_run(cfg, cluster, workspace, nodes=nodes, gpus_per_node=gpus)
    print(format_estimate(estimate, cfg=cfg, cluster=cluster))
    if args.budget_usd is None:
        check_budget(workspace, estimate, budget_usd=None)  # the monthly budget, if any
    else:
        # A relaunch resumes the run: its budget counts what the run already spent.
        ledger, spent = _run_spend(workspace, name)
        try:
            left = max(args.budget_usd - spent, 0.0)
            print(
                f"budget   ${args.budget_usd:.4f} for run {name}: ${spent:.4f} already spent "
                f"(ledger), ${left:.4f} left, estimate ${estimate.usd:.4f}"
            )
            check_budget(workspace, estimate, budget_usd=args.budget_usd, run=name, ledger=ledger)
        finally:
            ledger.close()
    if args.dry_run:
        print("dry run: nothing submitted")
        return 0

    workspace.ensure()
    record = launch_run(
        cfg, cluster, workspace, name, Placement(nodes, gpus), phase_jobs=args.phase_jobs
    )
    from budget_lab.ledger import write_estimate

    write_estimate(record.run_dir, estimate)  # `cost report --run` compares it with the bill
    print(f"submitted job {', '.join(record.job_ids)} (launch {record.launch_id})")
    print(f"  follow: budget-lab status {name}   logs: budget-lab logs {name}")
    if not args.wait:
        return 0
    last = None
    while True:
        st = run_status(record.run_dir)
        line = f"{st.state}" + (f", {st.phase} step {st.step}" if st.step else "")
        if line != last:
            print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)
            last = line
        if st.state in FINAL_STATES:
            break
        time.sleep(2)
    _settle(workspace, name, cluster)
    if st.state == "failed":
        print(f"run {name} failed:\n{st.error or ''}\nlogs: {st.stderr}", file=sys.stderr)
        return 1
    return 0


def _settle(workspace, name: str, cluster) -> None:
    """After `launch --wait`: the ended run into the ledger (a settled run updates the
    calibration, as `cost sync` does) and its estimate vs what the ledger settled."""
    from budget_lab.ledger import Ledger, estimate_vs_settled, read_estimate
    from budget_lab.ledger.sync import sync_workspace
    from budget_lab.units import usd

    # Slurm's accounting rows of a job that just ended may lag: wait a little for them (a run
    # not settled now is learned from at the next `budget-lab cost sync`).
    wait_s = 10.0 if cluster.executor == "slurm" else 0.0
    with Ledger.for_workspace(workspace) as ledger:
        report = sync_workspace(
            ledger, workspace, runs=[name], clusters=lambda _name: cluster, sacct_wait_s=wait_s
        )
        settled = ledger.spent(run=name)
    if report.errors:
        error = next(iter(report.errors.values()))
        print(f"warning: could not sync run {name} into the ledger: {error}", file=sys.stderr)
        return
    line = estimate_vs_settled(read_estimate(workspace.run_dir(name)), settled)
    print(f"cost     {line or f'settled {usd(settled)} (ledger)'}")
    if report.learned:
        print(f"         calibration updated from run {name} (the next estimate uses it)")


# `budget-lab status` columns, in the order shown; the first two are never cut or dropped.
_STATUS_COLUMNS = ("run", "state", "cluster", "job", "phase", "step", "segments", "sweep/trial")
# Which columns go first when the terminal is too narrow for all of them.
_STATUS_DROP_ORDER = ("segments", "job", "cluster", "sweep/trial", "step", "phase")


def _runs_table(rows: list[dict[str, str]], width: int, title: str):
    """The runs as a rich Table that fits `width` columns: run names and states whole (folded
    onto a second line only when they alone are wider than the terminal), lesser columns
    dropped (named in the caption) rather than cut."""
    from rich.table import Table

    def need(col: str) -> int:  # characters, padding and left border
        return max([len(col), *(len(r[col]) for r in rows)]) + 3

    shown = list(_STATUS_COLUMNS)
    for col in _STATUS_DROP_ORDER:
        if sum(need(c) for c in shown) + 1 <= width:
            break
        shown.remove(col)
    dropped = [c for c in _STATUS_COLUMNS if c not in shown]
    caption = f"left out for width: {', '.join(dropped)}" if dropped else None
    table = Table(title=title, caption=caption)
    for col in shown:
        if col in ("run", "state"):
            table.add_column(col, overflow="fold", min_width=min(need(col) - 3, width // 3))
        else:
            table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(*(r[c] for c in shown))
    return table


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from budget_lab.launch.status import list_runs, run_status
    from budget_lab.workspace import Workspace

    workspace = Workspace.from_args(args.workspace)
    console = Console()
    if args.run is None:
        runs = list_runs(workspace.runs_dir)
        if not runs:
            print(f"no runs in {workspace.runs_dir} (launch one with `budget-lab launch`)")
            return 0
        rows = []
        for run_dir in runs:
            st = run_status(run_dir)
            cells = (
                st.run,
                st.state,
                st.cluster or "-",
                ",".join(st.job_ids) or "-",
                st.phase or "-",
                str(st.step if st.step is not None else "-"),
                str(len(st.segments)),
                f"{st.sweep}/{st.trial}" if st.sweep else "-",
            )
            rows.append(dict(zip(_STATUS_COLUMNS, cells, strict=True)))
        console.print(_runs_table(rows, console.width, f"runs in {workspace.runs_dir}"))
        return 0
    st = run_status(_run_dir(workspace, args.run))
    print(f"run        {st.run}  ({st.run_dir})")
    print(
        f"state      {st.state}"
        + (f"  [scheduler: {st.scheduler_state}]" if st.scheduler_state else "")
    )
    if st.cluster:
        print(f"cluster    {st.cluster} ({st.executor}), job {', '.join(st.job_ids)}")
    if st.step is not None:
        print(f"progress   phase {st.phase}, step {st.step}")
    for seg in st.segments:
        end = time.strftime("%H:%M:%S", time.localtime(seg["end"])) if seg["end"] else "…"
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seg["start"]))
        print(
            f"segment {seg['attempt']}  job {seg['job_id']} on {seg['host']}: {start} → {end}"
            f"  {seg['status']}"
        )
    if st.stdout:
        print(f"logs       {st.stdout}\n           {st.stderr}")
    if st.error:
        print(f"error\n{st.error}")
    return 1 if st.state == "failed" else 0


def _logs(args: argparse.Namespace) -> int:
    from budget_lab.launch.status import log_paths
    from budget_lab.rundir import read_launch
    from budget_lab.workspace import Workspace

    run_dir = _run_dir(Workspace.from_args(args.workspace), args.run)
    record = read_launch(run_dir)
    if record is None:
        raise UserError(f"{run_dir} was not launched with `budget-lab launch`: it has no job logs")
    out, err = log_paths(record)
    path = err if args.err else out
    if not path.is_file():
        print(f"no log yet at {path} (the job may still be queued)")
        return 0
    lines = path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.lines :] if args.lines else lines))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from budget_lab.launch.status import cancel_run
    from budget_lab.workspace import Workspace

    st = cancel_run(_run_dir(Workspace.from_args(args.workspace), args.run))
    print(f"{st.run}: {st.state}")
    return 0
