"""`budget-lab clusters ...`: the clusters runs can launch on (clusters/*.yaml) and their prices."""

from __future__ import annotations

import argparse
import json
import sys

_EPILOG = """\
examples:
  budget-lab clusters list                          name, executor, GPUs, capacity, price
  budget-lab clusters show aws-p5                   the resolved YAML of one cluster
  budget-lab clusters show slurm-local --set slurm.partition=spot
  budget-lab clusters show ./my-cluster.yaml        a cluster file outside clusters/

Add a cluster: copy a file in clusters/ to clusters/<name>.yaml and edit it (clusters/README.md
describes every key), then check it with `budget-lab clusters show <name>`.
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "clusters": "list and inspect clusters (clusters/*.yaml)",
}


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "clusters",
        help=COMMANDS["clusters"],
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group_sub = group.add_subparsers(dest="clusters_command", metavar="SUBCOMMAND", required=True)

    list_ = group_sub.add_parser(
        "list",
        help="the clusters in clusters/: executor, GPUs per node, capacity, price",
        description="List the clusters shipped in the project's clusters/ folder.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    list_.add_argument("--json", action="store_true", help="print JSON instead of a table")
    list_.set_defaults(func=_list)

    show = group_sub.add_parser(
        "show",
        help="one cluster's resolved configuration, as YAML",
        description=(
            "Load a cluster (a name from clusters/ or a path to a YAML file), apply --set "
            "overrides, validate it, and print the result as YAML."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("cluster", metavar="NAME|PATH", help="a cluster name or a YAML file")
    show.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set slurm.partition=spot (repeatable)",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=_show)


def price_text(cluster) -> str:  # noqa: ANN001 (a ClusterConfig; imported lazily)
    """A cluster's price in a few words, e.g. "$1.50/GPU-h fixed" or "AWS spot (fallback ...)"."""
    p = cluster.price
    unit = "GPU-h" if cluster.gpus_per_node else "h"
    amount = f"${p.usd_per_gpu_hour:,.2f}/{unit}"
    if p.kind == "fixed":
        return f"{amount} fixed"
    if p.kind == "on_demand":
        return f"{amount} on-demand" + (f" ({p.catalog_date})" if p.catalog_date else "")
    return f"AWS spot (fallback {amount})"


def _list(args: argparse.Namespace) -> int:
    # cluster.py alone: the launch package loads its other modules (submitit) on first use.
    from budget_lab.errors import ConfigError
    from budget_lab.launch.cluster import CLUSTERS_DIR, cluster_to_dict, list_clusters, load_cluster

    clusters, errors = [], []
    for name in list_clusters():
        try:
            clusters.append(load_cluster(name))
        except ConfigError as err:  # one broken file must not hide the others
            errors.append(str(err))

    if args.json:
        print(json.dumps([cluster_to_dict(c) for c in clusters], indent=2))
    else:
        from rich.console import Console  # the table only
        from rich.table import Table

        table = Table(title=f"clusters ({CLUSTERS_DIR})", title_justify="left")
        for col in ("name", "executor", "GPUs / node", "capacity", "price"):
            table.add_column(col, no_wrap=True)
        table.add_column("description", overflow="fold")
        for c in clusters:
            gpus = "cpu only" if c.gpus_per_node == 0 else f"{c.gpus_per_node} x {c.gpu_type}"
            partition = f" ({c.slurm.partition})" if c.slurm else ""
            table.add_row(
                c.name, c.executor + partition, gpus, c.capacity, price_text(c), c.description
            )
        Console(width=max(Console().width, 132)).print(table)
    for message in errors:
        print(f"budget-lab: error: {message}", file=sys.stderr)
    return 2 if errors else 0


def _show(args: argparse.Namespace) -> int:
    import yaml

    from budget_lab.launch.cluster import cluster_to_dict, load_cluster

    data = cluster_to_dict(load_cluster(args.cluster, args.set))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0
