"""`budget-lab report`: what a sweep (or the whole workspace) cost and what it bought."""

from __future__ import annotations

import argparse
from pathlib import Path

from budget_lab.rundir import SweepDir

_EPILOG = """\
examples:
  budget-lab report                                   every run of the workspace, as tables
  budget-lab report --sweep mask_ratio                one sweep: trials, Pareto front, spend
  budget-lab report --sweep mask_ratio --out report/  + report/index.html with PNG figures
  budget-lab report --sweep mask_ratio --wandb --project budget-lab --entity my-team

The HTML page is self-contained: open report/index.html in a browser, offline (no CDN, no
network). --wandb logs a summary run and saves a "Cost report" on W&B; without an API key or a
network it says so and writes what it would have created to OUT/wandb_report_spec.json (OUT
defaults to <workspace>/sweeps/<sweep>/report, or <workspace>/report without --sweep).
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "report": "cost report: trials, FID vs $ Pareto front, spend (terminal, HTML, W&B)",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command to the main parser."""
    from budget_lab.workspace import add_workspace_argument

    p = sub.add_parser(
        "report",
        help=COMMANDS["report"],
        description=(
            "Summarise a sweep (or every run of the workspace) from its Optuna study and the "
            "dollar ledger: the trials with FID and cost, the FID-vs-$ Pareto front, spend over "
            "time and by phase / cluster, useful vs wasted. Prints tables; --out writes an HTML "
            "page with PNG figures; --wandb builds a W&B report."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sweep", default=None, metavar="S", help="report on this sweep only")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the HTML report (index.html + PNG figures) into DIR",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log the summary run and save a 'Cost report' on W&B (needs an API key and network)",
    )
    p.add_argument(
        "--project",
        default="budget-lab",
        metavar="P",
        help="W&B project of the report (default budget-lab)",
    )
    p.add_argument(
        "--entity",
        default=None,
        metavar="E",
        help="W&B user or team (default: the API key's default entity)",
    )
    add_workspace_argument(p)
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from budget_lab.report.load import load_report_data
    from budget_lab.report.terminal import print_report
    from budget_lab.workspace import Workspace

    workspace = Workspace.from_args(args.workspace)
    data = load_report_data(workspace, args.sweep)
    print_report(data, Console())

    if args.out:
        from budget_lab.report.html import write_html_report

        index = write_html_report(data, args.out)
        print(f"wrote {index} (open it in a browser; works offline)")

    if args.wandb:
        from budget_lab.report.wandb_report import push_wandb_report

        out = (
            Path(args.out)
            if args.out
            else (
                SweepDir(workspace.sweep_dir(args.sweep)).report
                if args.sweep
                else workspace.root / "report"
            )
        )
        url = push_wandb_report(data, args.entity, args.project, out)
        print(f"W&B report: {url}")
    return 0
