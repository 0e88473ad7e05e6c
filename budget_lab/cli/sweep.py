"""`budget-lab sweep NAME|PATH`: an Optuna sweep judged on FID and dollars."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from budget_lab.rundir import SweepDir, is_prepared_data

_EPILOG = """\
examples:
  budget-lab sweep mask_ratio                         the main job: local, built-in data
  budget-lab sweep mask_ratio --trials 3 --budget-usd 0.05
  budget-lab sweep mask_ratio --dry-run               the plan and its $, nothing launched
  budget-lab sweep experts --cluster slurm-local      trials as Slurm jobs
  budget-lab sweep sweeps/my-sweep.yaml phases.0.batch_size=32
  budget-lab sweep joint --storage postgresql+psycopg://me@db/optuna   a database study

Run the same command again after a crash (or Ctrl-C): the study resumes, running jobs are
re-attached, finished ones are told, nothing runs twice. Results: WORKSPACE/sweeps/NAME/
(study.journal, summary.json, report/index.html); the spend is in the workspace ledger
(`budget-lab cost report --sweep NAME`). Sweep files: sweeps/*.yaml (see sweeps/README.md).
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "sweep": "run (or resume) a sweep over mask ratio, experts, width... against FID per dollar",
}


def register(sub: argparse._SubParsersAction) -> None:
    from budget_lab.workspace import add_workspace_argument

    p = sub.add_parser(
        "sweep",
        help=COMMANDS["sweep"],
        description="Optuna ask/tell over launched training jobs; FID and $ per trial.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "sweep", help="sweep name from sweeps/ (mask_ratio, experts, ...) or a YAML path"
    )
    p.add_argument("--cluster", default=None, help="cluster name or YAML (default: the sweep's)")
    p.add_argument(
        "--budget-usd", type=float, default=None, help="total $ cap (default: the sweep's)"
    )
    p.add_argument(
        "--trials", type=int, default=None, help="number of trials (default: the sweep's)"
    )
    p.add_argument("--slots", type=int, default=None, help="parallel jobs (default: the sweep's)")
    p.add_argument(
        "--storage",
        default=None,
        help="the Optuna study: a journal file path or a database URL (sqlite:///PATH, "
        "postgresql+psycopg://USER@HOST/DB); default: WORKSPACE/sweeps/NAME/study.journal",
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (trials, phases, cluster, slots) with $ and wall time per trial and "
        "in total against the budget; launch nothing, create no study",
    )
    p.add_argument(
        "--wandb-project",
        default="budget-lab",
        help="W&B project of the sweep's summary run (offline without an API key)",
    )
    p.add_argument("--no-wandb", action="store_true", help="no W&B summary run")
    add_workspace_argument(p)
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides for every trial"
    )
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from budget_lab.config import compose_run
    from budget_lab.errors import ConfigError, DataError
    from budget_lab.launch.cluster import load_cluster
    from budget_lab.sweep import load_sweep
    from budget_lab.sweep.controller import SweepController
    from budget_lab.workspace import Workspace

    t0 = time.time()
    spec = load_sweep(args.sweep)
    if args.slots is not None:
        if args.slots < 1:
            raise ConfigError(f"--slots={args.slots} is invalid: expected >= 1")
        spec = replace(spec, slots=args.slots)
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials={args.trials} is invalid: expected >= 1")
    if args.budget_usd is not None and not (0 <= args.budget_usd < float("inf")):
        raise ConfigError(
            f"--budget-usd={args.budget_usd:g} is invalid: a budget is a dollar amount >= 0 (0 "
            "refuses any spend); pass e.g. --budget-usd 50, or leave it out for the sweep's"
        )
    budget = args.budget_usd if args.budget_usd is not None else spec.budget_usd
    cluster = load_cluster(args.cluster or spec.cluster)
    overrides = list(args.overrides)
    if args.dry_run:
        return _dry_run(args, spec, cluster, overrides)
    workspace = Workspace.from_args(args.workspace).ensure()
    if args.storage is not None:
        from budget_lab.sweep.storage import check_storage

        check_storage(args.storage)

    # The data: the built-in synthetic set is made on first use; a user's data must exist.
    probe = compose_run(spec.recipe, list(spec.base_overrides) + overrides)
    data = Path(probe.data.path)
    if not is_prepared_data(data):
        if not any(o.startswith("data.path=") for o in overrides) and not data.is_absolute():
            # Imported here: data preparation imports torch, which a sweep whose data is ready
            # (or that runs on a cluster) never needs.
            from budget_lab.data.builtin import ensure_builtin_data

            data = ensure_builtin_data(workspace.root / "data" / "synth-latents")
            overrides.append(f"data.path={data}")
        else:
            raise DataError(
                f"no prepared data at data.path={str(data)!r} (no manifest.json); prepare it with "
                "`budget-lab data prepare`, or leave data.path unset for the built-in data"
            )

    print(
        f"sweep {spec.name}: objective {spec.objective}, {args.trials or spec.n_trials} trials, "
        f"{spec.slots} slot(s) on {cluster.name}, budget "
        + (f"${budget:.4f}" if budget is not None else "none")
    )
    controller = SweepController(
        spec,
        workspace,
        cluster,
        budget_usd=args.budget_usd,
        n_trials=args.trials,
        storage=args.storage,
        overrides=overrides,
    )
    summary = controller.run()
    write_sweep_outputs(
        controller,
        summary,
        report=not args.no_report,
        wandb_project=None if args.no_wandb else args.wandb_project,
    )
    _print_summary(summary, time.time() - t0)
    if not summary.trials and summary.stop_reason.startswith("budget"):
        print(
            f"error: no trial ran: {summary.stop_reason}; raise --budget-usd or make the "
            "trials cheaper (fewer steps, a smaller eval.fid_samples)",
            file=sys.stderr,
        )
        return 1
    return 0


def _dry_run(args: argparse.Namespace, spec, cluster, overrides: list[str]) -> int:
    """`sweep --dry-run`: the plan and its dollars; no study, no run folder, no data made."""
    from budget_lab.sweep.controller import SweepController
    from budget_lab.units import usd as _usd
    from budget_lab.workspace import Workspace

    workspace = Workspace.from_args(args.workspace)
    # Named, never opened: the study's folder and file are not created.
    storage = args.storage or str(SweepDir(workspace.sweep_dir(spec.name)).journal)
    controller = SweepController(
        spec,
        workspace,
        cluster,
        budget_usd=args.budget_usd,
        n_trials=args.trials,
        storage=storage,
        overrides=overrides,
        progress=False,
    )
    try:
        plan = controller.plan()
    finally:
        controller.ledger.close()
    print(
        f"sweep {plan['sweep']} (dry run: nothing launched, no study created): objective "
        f"{plan['objective']}, sampler {plan['sampler']}, {plan['trials']} trial(s), "
        f"{plan['slots']} slot(s) on {plan['cluster']} ({plan['gpus_per_trial']} device(s) each)"
    )
    print("phases of a trial: " + ", ".join(plan["phases"]))
    if spec.objective == "fid_at_budget" and spec.trial_budget_usd:
        shares = " / ".join(f"{share:.0%}" for share in spec.budget_split or ())
        print(
            f"  each trial trains until it has spent {_usd(spec.trial_budget_usd)}"
            + (f" ({shares} over the phases)" if shares else "")
            + ": the step counts are sized at launch; its final FID follows"
        )
    print(f"price: {plan['price_source']}")
    for t in plan["trial_plans"]:
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "the base config"
        split = ", ".join(f"{k} {_usd(v)}" for k, v in t["by_activity_usd"].items() if v > 0)
        print(
            f"  {params}: {_usd(t['usd'])}, {t['wall_hours'] * 60:.1f} min "
            f"({split}) [{', '.join(t['sources'])}]"
        )
    if plan["sampler"] != "grid":
        print(f"  x {plan['trials']} trials ({plan['sampler']} picks the params as it goes)")
    total, budget = plan["total_usd"], plan["budget_usd"]
    print(
        f"total: {_usd(total)}, about {plan['wall_hours'] * 60:.1f} min wall clock on "
        f"{plan['slots']} slot(s); budget " + ("none" if budget is None else f"{_usd(budget)}")
    )
    if budget is not None and total > budget:
        fits = sum(1 for _ in _fitting(plan, budget))
        print(
            f"the plan exceeds the budget by {_usd(total - budget)}: about {fits} of "
            f"{plan['trials']} trial(s) would run before the cap stops the sweep; raise "
            "--budget-usd or pass --trials"
        )
    return 0


def _fitting(plan: dict, budget: float):
    """The trials of a plan that fit in `budget`, in order."""
    spent = 0.0
    per = plan["trial_plans"]
    each = per if plan["sampler"] == "grid" else per * plan["trials"]
    for t in each:
        spent += t["usd"]
        if spent > budget:
            return
        yield t


def safe_storage(storage: str) -> str:
    """A storage URL as it may be printed or saved: its password masked."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:
        return storage


def write_sweep_outputs(
    controller, summary, report: bool = True, wandb_project: str | None = None
) -> None:
    """sweep.json (state), summary.json (the report data), the HTML report, and the W&B
    summary run (trials table, Pareto front as a table and a plot; offline without a key)."""
    from budget_lab.io import atomic_write_json
    from budget_lab.report.data import report_data_to_json
    from budget_lab.report.load import load_report_data
    from budget_lab.sweep import objective_formula

    workspace, spec = controller.workspace, controller.spec
    folder = SweepDir(workspace.sweep_dir(spec.name))
    atomic_write_json(
        folder.state,
        {
            "sweep": spec.name,
            "objective": spec.objective,
            "objective_formula": objective_formula(spec),
            "stop_reason": summary.stop_reason,
            "budget_usd": summary.budget_usd,
            "spent_usd": summary.spent_usd,
            "pareto": summary.pareto,
            "best": summary.best,
            **_decision(summary),
            "storage": safe_storage(summary.study_storage),
            "cluster": controller.cluster.name,
            "updated_at": time.time(),
        },
    )
    data = load_report_data(workspace, spec.name, storage=summary.study_storage)
    path = folder.summary
    merged = {**json.loads(report_data_to_json(data)), **_decision(summary)}
    atomic_write_json(path, merged)
    summary.summary_path = str(path)
    if report:
        from budget_lab.report.html import write_html_report

        summary.report_path = str(write_html_report(data, folder.report))
    if wandb_project and os.environ.get("WANDB_MODE", "").lower() != "disabled":
        from budget_lab.report.wandb_report import log_sweep_summary, open_summary_run

        try:  # W&B is a view of the results: it never fails the sweep
            run = open_summary_run(data, wandb_project, dir=folder.path)
            try:
                log_sweep_summary(data, run)
            finally:
                run.finish()
        except Exception as err:  # noqa: BLE001 - any W&B failure is a warning
            print(f"warning: the W&B summary run was not logged: {err}", file=sys.stderr)


def _decision(summary) -> dict:
    """What the sweep decided, as plain data (sweep.json, summary.json)."""
    return {
        "verdict": summary.verdict,
        "configs": summary.configs,
        "tied_with_best": summary.tied,
        "tiers": summary.tiers,
        "front": summary.front,
        "indistinguishable": summary.indistinguishable,
        "separates": len(summary.tiers) >= 2,
    }


def _interval(t: dict, name: str, digits: int) -> str:
    if t.get(name) is None:
        return "-"
    ci = t.get(f"{name}_ci95")
    if not ci:
        return f"{t[name]:.{digits}f}"
    return f"{t[name]:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _estimate_cell(t: dict) -> str:
    """The trial's estimate and its error against the settled $ ("-" without an estimate)."""
    from budget_lab.units import usd as _usd

    if not t.get("estimate_usd"):
        return "-"
    error = t.get("estimate_error")
    return _usd(t["estimate_usd"]) + (f" ({error:+.0%})" if error is not None else "")


def _print_summary(summary, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from budget_lab.units import usd as _usd

    console = Console()
    if not console.is_terminal:  # a log or a pipe: no terminal width to fold into
        console = Console(width=200)
    n = next((t["fid_n"] for t in summary.trials if t.get("fid_n")), None)
    # What a user came for is never cut: params and scores fold, dollars never wrap; a terminal
    # too narrow for every column gets the secondary scores (KID, alignment) in a table of their
    # own instead of everything folded into slivers.
    split = console.width < 150
    table = Table(title=f"sweep {summary.sweep} ({summary.objective})")
    for col in ("trial", "state", "params", f"FID [95% CI], N={n}"):
        table.add_column(col, overflow="fold")
    if not split:
        table.add_column("KID ± std", overflow="fold")
        table.add_column("align [95% CI]", overflow="fold")
    table.add_column("$", no_wrap=True, min_width=9)
    table.add_column("est. $ (error)", no_wrap=True)
    table.add_column("front", no_wrap=True)
    scores = Table(title="other scores")
    for col in ("trial", "KID ± std", "align [95% CI]"):
        scores.add_column(col, overflow="fold")
    for t in summary.trials:
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()
        )
        kid = f"{t['kid']:.4f} ± {t['kid_std']:.4f}" if t.get("kid") is not None else "-"
        secondary = [kid, _interval(t, "alignment", 2)]
        table.add_row(
            str(t["number"]),
            t["state"],
            params,
            _interval(t, "fid", 1),
            *([] if split else secondary),
            _usd(t["cost_usd"]),
            _estimate_cell(t),
            "★" if t["number"] in summary.pareto else "",
        )
        scores.add_row(str(t["number"]), *secondary)
    console.print(table)
    if split:
        console.print(scores)
    print(f"stopped: {summary.stop_reason}")
    print(
        f"spent:   {_usd(summary.spent_usd)}"
        + (f" of {_usd(summary.budget_usd)}" if summary.budget_usd is not None else "")
    )
    if summary.configs and any(len(c["trials"]) > 1 for c in summary.configs):
        print("configurations (mean over repeats):")
        for c in summary.configs:
            f = c["fid"]
            print(
                f"  {c['key']}: FID {f['value']:.1f} [{f['lo']:.1f}, {f['hi']:.1f}] "
                f"({f['method']}), {_usd(c['cost_usd'])} per trial, trials {c['trials']}"
            )
    if summary.verdict:
        print("verdict:")
        for line in summary.verdict.splitlines():
            print(f"  {line}")
    if summary.objective == "pareto":
        print(f"front (FID vs $, noise-aware): trials {summary.pareto}")
    else:
        print(f"front (the best and its ties): trials {summary.pareto}")
    print(f"study:   {safe_storage(summary.study_storage)}")
    if summary.report_path:
        print(f"report:  {summary.report_path}")
    print(f"took {seconds / 60:.1f} min")
