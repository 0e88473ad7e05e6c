"""`budget-lab cost ...`: the dollar ledger - sync it, report from it, calibrate estimates."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from datetime import datetime, timezone

from budget_lab.rundir import read_eval
from budget_lab.workspace import Workspace, add_workspace_argument

_REPORT_EPILOG = """\
examples:
  budget-lab cost report                                 # every run, useful and wasted $
  budget-lab cost report --sweep mask_ratio --by trial   # one sweep, per trial
  budget-lab cost report --by day --since 2026-11-01 --format csv > november.csv
  budget-lab cost report --run nano-001 --by phase --format json
Run `budget-lab cost sync` first to bring the ledger up to date.
"""

_SYNC_EPILOG = """\
examples:
  budget-lab cost sync                          # every launched run folder of the workspace
  budget-lab cost sync --run mask_ratio-007     # one run
  budget-lab cost sync --rebuild                # a damaged ledger.sqlite: build it anew
Slurm runs are read from sacct (run it where the Slurm client tools work); local runs from their
segments.jsonl. Spot clusters read the AWS spot price history with your usual AWS credentials.

"""

_REBUILD_NOTE = (
    "--rebuild: every dollar in the ledger is derived from the run folders (and sacct), so a "
    "damaged SQLite ledger is recreated from them: the old file is moved aside as "
    "ledger.sqlite.corrupt-<UTC time> (.old-<UTC time> if it could still be read), never "
    "deleted. Stop running sweep controllers first (they keep writing to the file they opened). "
    "Not rebuilt: {not_rebuilt}. A lost ledger needs no flag: a plain sync creates it again."
)

_CALIBRATE_EPILOG = """\
examples:
  budget-lab cost calibrate --list
  budget-lab cost calibrate --preset nano --mask-ratio 0.75            # time a short benchmark here
  budget-lab cost calibrate --preset MicroDiT-XL/2 --mask-ratio 0.75 --batch 64 --device H100
  budget-lab cost calibrate --from-run nano-001                        # a finished run's images/s
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "cost": "the dollar ledger: sync, report, calibrate estimates",
}


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "cost",
        help=COMMANDS["cost"],
        description=(
            "What every run cost: one ledger row per segment (each time a job ran), priced from "
            "the cluster's price model, useful and wasted dollars apart."
        ),
    )
    group_sub = group.add_subparsers(dest="cost_command", metavar="SUBCOMMAND", required=True)

    from budget_lab.ledger.rebuild import NOT_REBUILT
    from budget_lab.ledger.report import FORMATS
    from budget_lab.ledger.store import REPORT_GROUPS

    report = group_sub.add_parser(
        "report",
        help="spend grouped by run, phase, cluster, day or trial",
        description=(
            "Useful and wasted dollars, GPU-hours and price sources from the ledger, grouped in "
            "the database. Estimated dollars (a spot catalog fallback) are flagged."
        ),
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_workspace_argument(report)
    report.add_argument("--sweep", default=None, help="only this sweep's trials")
    report.add_argument("--run", default=None, help="only this run")
    report.add_argument("--cluster", default=None, help="only this cluster")
    report.add_argument(
        "--by", choices=list(REPORT_GROUPS), default="run", help="group rows by (default: run)"
    )
    report.add_argument("--format", choices=FORMATS, default="table", help="default: table")
    report.add_argument(
        "--since",
        default=None,
        metavar="YYYY-MM-DD",
        help="only spend after this UTC date (segments across it count in part)",
    )
    report.set_defaults(func=_report)

    sync = group_sub.add_parser(
        "sync",
        help="price every launched run folder of the workspace into the ledger",
        description=(
            "Read each launched run folder (launch.json; sacct for Slurm, segments.jsonl for "
            "local runs), price its segments and upsert them: running it again updates, never "
            "duplicates."
        ),
        epilog=_SYNC_EPILOG + textwrap.fill(_REBUILD_NOTE.format(not_rebuilt=NOT_REBUILT), 96),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_workspace_argument(sync)
    sync.add_argument("--run", action="append", default=None, help="only this run (repeatable)")
    sync.add_argument(
        "--rebuild",
        action="store_true",
        help="recreate the SQLite ledger from every run folder, moving the old file aside",
    )
    sync.add_argument(
        "--sacct-wait",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for sacct rows of just-finished jobs (default 30)",
    )
    sync.set_defaults(func=_sync)

    cal = group_sub.add_parser(
        "calibrate",
        help="measure training throughput for cost estimates",
        description=(
            "Record images/s per device for a preset, resolution and mask ratio in the "
            "workspace's calibration.json: from a short benchmark on this machine, or from a "
            "finished run's metrics. Estimates (launch --dry-run) use the newest entry."
        ),
        epilog=_CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_workspace_argument(cal)
    how = cal.add_mutually_exclusive_group(required=True)
    how.add_argument("--preset", default=None, help="benchmark this model preset here")
    how.add_argument(
        "--from-run", default=None, metavar="RUN", help="a finished run's name or folder"
    )
    how.add_argument("--list", action="store_true", help="print the calibration entries")
    cal.add_argument("--mask-ratio", type=float, default=0.0, help="benchmark: default 0")
    cal.add_argument("--res", type=int, default=None, help="benchmark: pixels (default: preset's)")
    cal.add_argument("--batch", type=int, default=8, help="benchmark: images per step (default 8)")
    cal.add_argument("--steps", type=int, default=5, help="benchmark: timed steps (default 5)")
    cal.add_argument(
        "--device",
        default=None,
        help="device type as clusters/*.yaml name it (default: this machine's; --from-run: the "
        "run's cluster gpu_type)",
    )
    cal.set_defaults(func=_calibrate)


def _log_warnings() -> None:
    logger = logging.getLogger("budget_lab.ledger")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("budget-lab: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _since(value: str | None) -> float | None:
    from budget_lab.errors import ConfigError

    if value is None:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--since {value!r} is not a date: expected YYYY-MM-DD") from None
    return day.replace(tzinfo=timezone.utc).timestamp()


def _report(args: argparse.Namespace) -> int:
    from budget_lab.ledger.report import format_report
    from budget_lab.ledger.store import Ledger

    workspace = Workspace.from_args(args.workspace)
    with Ledger.for_workspace(workspace) as ledger:
        rows = ledger.report(
            args.by, sweep=args.sweep, run=args.run, cluster=args.cluster, since=_since(args.since)
        )
        where = ledger.display_url
    if not rows and args.format == "table":
        print(
            f"no segments in the ledger at {where} for this selection: `budget-lab cost sync` "
            "brings it up to date with the workspace's runs",
            file=sys.stderr,
        )
        return 0
    title = f"cost by {args.by}" + (f", sweep {args.sweep}" if args.sweep else "")
    title += f", run {args.run}" if args.run else ""
    scores = _scores(workspace, args.by, rows)
    text = format_report(rows, by=args.by, fmt=args.format, title=title, scores=scores)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if args.run and args.format == "table":
        line = _estimate_line(workspace, args.run, sum(r.cost_usd for r in rows))
        if line:
            print(line)
    return 0


def _scores(workspace: Workspace, by: str, rows) -> dict[str, dict] | None:
    """By run or by sweep trial: what the money bought, each run's final FID with its interval
    and N (its eval.json); None for the other groupings (a phase or a day has no score)."""
    if by not in ("run", "trial"):
        return None
    scores = {}
    for row in rows:
        name = row.group
        if by == "trial":  # "sweep#trial": the sweep names its runs <sweep>-<trial:03d>
            sweep, _, trial = row.group.partition("#")
            if not trial.isdigit():
                continue
            name = f"{sweep}-{int(trial):03d}"
        result = read_eval(workspace.run_dir(name))
        if result is None or result.get("fid") is None:
            continue
        lo, hi = (result.get("fid_ci95") or [None, None])[:2]
        scores[row.group] = {
            "fid": result["fid"],
            "fid_lo": lo,
            "fid_hi": hi,
            "fid_n": result.get("num_samples"),
        }
    return scores


def _estimate_line(workspace: Workspace, run: str, settled: float) -> str | None:
    """The line `estimate $X vs settled $Y: error +Z%` from the run folder's estimate.json."""
    from budget_lab.ledger.estimate import estimate_vs_settled, read_estimate

    return estimate_vs_settled(read_estimate(workspace.run_dir(run)), settled)


def _sync(args: argparse.Namespace) -> int:
    from budget_lab.ledger.store import Ledger
    from budget_lab.ledger.sync import sync_workspace

    _log_warnings()
    workspace = Workspace.from_args(args.workspace)
    if args.rebuild:
        return _rebuild(args, workspace)
    with Ledger.for_workspace(workspace) as ledger:
        report = sync_workspace(ledger, workspace, runs=args.run, sacct_wait_s=args.sacct_wait)
        spent, wasted = ledger.spent(), ledger.wasted()
    print(
        f"synced {report.runs} run(s): {report.inserted} new, {report.updated} updated, "
        f"{report.unchanged} unchanged segment(s); the ledger holds ${spent:,.2f} "
        f"(${wasted:,.2f} wasted)"
    )
    if report.learned:
        print(
            f"calibration updated from {len(report.learned)} settled run(s): "
            f"{', '.join(report.learned)}"
        )
    if report.skipped:
        print(f"not launched (no launch.json), skipped: {', '.join(report.skipped)}")
    for run, error in report.errors.items():
        print(f"budget-lab: error: {run}: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def _rebuild(args: argparse.Namespace, workspace: Workspace) -> int:
    from budget_lab.errors import ConfigError
    from budget_lab.ledger.rebuild import NOT_REBUILT, rebuild_ledger

    if args.run:
        raise ConfigError(
            "--rebuild syncs every run folder of the workspace; leave out --run (or, to sync "
            "only some runs into the ledger as it is, leave out --rebuild)"
        )
    r = rebuild_ledger(workspace, sacct_wait_s=args.sacct_wait)
    print(
        f"rebuilt the ledger {r.path} from {r.sync.runs} run folder(s): {r.segments} segment(s), "
        f"${r.spent_usd:,.2f} (${r.wasted_usd:,.2f} wasted)"
    )
    if r.moved_to:
        what = "damaged" if r.old_state == "corrupt" else "previous"
        why = f" ({r.old_problem})" if r.old_problem else ""
        kept = ", ".join(str(p) for p in r.moved_to)
        print(f"the {what} ledger{why} is kept, moved aside: {kept}")
    if r.old_state == "readable":
        print(
            f"the previous ledger held ${r.old_spent_usd:,.2f} (${r.old_wasted_usd:,.2f} wasted); "
            f"carried over from it: {r.carried_segments} segment(s) of runs not rebuilt, "
            f"{r.carried_thresholds} budget threshold record(s)"
        )
    else:
        print(f"not rebuilt: {NOT_REBUILT}")
    if r.sync.skipped:
        print(f"not launched (no launch.json), skipped: {', '.join(r.sync.skipped)}")
    for run, error in r.sync.errors.items():
        print(f"budget-lab: error: {run}: {error}", file=sys.stderr)
    return 1 if r.sync.errors else 0


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from budget_lab.errors import ConfigError
    from budget_lab.ledger.calibration import (
        Calibration,
        calibrate_benchmark,
        calibrate_from_run,
        device_of,
    )
    from budget_lab.rundir import read_launch

    workspace = Workspace.from_args(args.workspace)
    if args.list:
        for e in Calibration.load(workspace).all_entries():
            print(
                f"{e.preset:<16} {e.resolution:>5}px r={e.mask_ratio:<5g} {e.device:<10} "
                f"{e.images_per_s:>12,.2f} img/s/device  [{e.source}]"
            )
        return 0
    if args.from_run:
        run_dir = Path(args.from_run)
        if not run_dir.is_dir():
            run_dir = workspace.run_dir(args.from_run)
        if not run_dir.is_dir():
            raise ConfigError(
                f"no run folder {args.from_run!r} (looked in {workspace.runs_dir}); pass a run "
                "name of the workspace or a path"
            )
        device, devices = args.device, 1
        launch = read_launch(run_dir)
        if launch is not None:
            devices = launch.devices
            if device is None:
                from budget_lab.launch.cluster import load_cluster

                device = device_of(load_cluster(launch.cluster))
        entries = calibrate_from_run(
            workspace, run_dir, device_type=device or "cpu", devices=devices
        )
    else:
        from model.config import PRESETS

        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
        if not 0.0 <= args.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio {args.mask_ratio} is invalid: expected [0, 1)")
        entries = [
            calibrate_benchmark(
                workspace,
                args.preset,
                mask_ratio=args.mask_ratio,
                resolution=args.res,
                device_type=args.device,
                batch=args.batch,
                steps=args.steps,
            )
        ]
    for e in entries:
        print(
            f"recorded {e.preset} {e.resolution}px r={e.mask_ratio:g} on {e.device}: "
            f"{e.images_per_s:,.2f} images/s per device ({e.source}) in {workspace.calibration_path}"
        )
    return 0
