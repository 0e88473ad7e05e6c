"""Clusters: where a run executes and what an hour of it costs, one YAML file per cluster.

    cluster = load_cluster("slurm-local", ["slurm.partition=spot"])
    cluster.check_request(nodes=1, gpus_per_node=2)

A cluster is named after its file in the user's or the project's `clusters/` folder (Hydra's
config group `clusters`: a file may extend another through a defaults list), or given as a path
to a YAML file. Precedence is YAML < overrides in Hydra's grammar (`budget_lab.config.compose`);
unknown keys are rejected with the list of valid ones. `clusters/README.md` documents every key
and how to add your own cluster.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from budget_lab.config.compose import FileKind, apply_overrides, compose_named, parse_overrides
from budget_lab.config_files import find_config, list_configs
from budget_lab.errors import ConfigError

__all__ = [
    "PriceConfig",
    "SlurmConfig",
    "ClusterConfig",
    "CLUSTERS_DIR",
    "EXECUTORS",
    "CAPACITIES",
    "PRICE_KINDS",
    "SPOT_PRODUCTS",
    "list_clusters",
    "cluster_path",
    "load_cluster",
    "cluster_from_dict",
    "cluster_to_dict",
]

#: Clusters shipped with the project (one YAML per cluster).
CLUSTERS_DIR = Path(__file__).resolve().parents[2] / "clusters"

EXECUTORS = ("local", "slurm")  # submitit's LocalExecutor (this machine) or SlurmExecutor
CAPACITIES = ("on-demand", "spot", "owned")  # how the nodes are held (spot can be reclaimed)
PRICE_KINDS = ("fixed", "on_demand", "spot")
#: `ProductDescriptions` that AWS's DescribeSpotPriceHistory knows.
SPOT_PRODUCTS = (
    "Linux/UNIX",
    "Linux/UNIX (Amazon VPC)",
    "Red Hat Enterprise Linux",
    "Red Hat Enterprise Linux (Amazon VPC)",
    "SUSE Linux",
    "SUSE Linux (Amazon VPC)",
    "Windows",
    "Windows (Amazon VPC)",
)
#: sbatch options that have their own `slurm.*` key, so `slurm.additional` must not set them.
_FIRST_CLASS_SBATCH = {
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "constraint": "slurm.constraint",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem": "slurm.mem_gb",
    "time": "time_limit_min",
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")  # line breaks, tabs and other control characters


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {valid}")


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    _check(value in choices, name, value, f"expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class PriceConfig:
    """What one GPU-hour costs on a cluster (one machine-hour on a cluster without GPUs).

    `fixed` is an internal chargeback rate, or what this machine costs per hour; `on_demand` is a
    cloud catalog price, dated; `spot` is looked up in AWS's spot price history for the cluster's
    `instance_type` in its `region`, falling back to `usd_per_gpu_hour` (reported as an estimate)
    when AWS cannot be asked.
    """

    kind: str  # "fixed" | "on_demand" | "spot" (see above)
    usd_per_gpu_hour: float  # fixed/on_demand: the price; spot: the fallback estimate. >= 0
    catalog_date: str | None = None  # YYYY-MM-DD the catalog price was read (prices change)
    on_demand_usd_per_gpu_hour: float | None = None  # spot: the on-demand price, for comparison
    gpus_per_instance: int | None = None  # spot: instance price / this = $/GPU-hour; None = node's
    availability_zone: str | None = None  # spot: price one AZ; None = mean over the region's AZs
    product_description: str = "Linux/UNIX"  # spot: the AWS product whose price history is read

    def __post_init__(self) -> None:
        _one_of("price.kind", self.kind, PRICE_KINDS)
        _check(
            self.usd_per_gpu_hour >= 0,
            "price.usd_per_gpu_hour",
            self.usd_per_gpu_hour,
            "expected a price >= 0 (0 = free)",
        )
        _check(
            self.catalog_date is None or _is_date(self.catalog_date),
            "price.catalog_date",
            self.catalog_date,
            "expected a date YYYY-MM-DD (when you read the price) or null",
        )
        od = self.on_demand_usd_per_gpu_hour
        _check(od is None or od >= 0, "price.on_demand_usd_per_gpu_hour", od, "expected >= 0")
        n = self.gpus_per_instance
        _check(n is None or n >= 1, "price.gpus_per_instance", n, "expected >= 1 or null")
        if self.kind != "spot":
            _check(
                self.availability_zone is None,
                "price.availability_zone",
                self.availability_zone,
                f"only a spot price has an availability zone (price.kind is {self.kind!r}); "
                "remove it",
            )
        _one_of("price.product_description", self.product_description, SPOT_PRODUCTS)


@dataclass(frozen=True)
class SlurmConfig:
    """How jobs are submitted to a Slurm cluster (submitit's SlurmExecutor parameters)."""

    partition: str  # sbatch --partition
    account: str | None = None  # sbatch --account (the bank the hours are charged to)
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint, e.g. a node feature "h100"
    cpus_per_task: int | None = None  # sbatch --cpus-per-task; None = the cluster's default
    mem_gb: int | None = None  # sbatch --mem per node in GB; None = the cluster's default
    additional: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. gres
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. module load cuda

    def __post_init__(self) -> None:
        _check(
            isinstance(self.partition, str) and bool(self.partition.strip()),
            "slurm.partition",
            self.partition,
            "expected a partition name (`sinfo -s` lists them)",
        )
        for name in ("cpus_per_task", "mem_gb"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"slurm.{name}", v, "expected >= 1 or null")
        # Each of these becomes an `#SBATCH --key=value` line: a line break would end it there
        # and start a line of its own (another option, or a command).
        one_line = {f"slurm.{k}": getattr(self, k) for k in ("partition", "account", "qos")}
        one_line["slurm.constraint"] = self.constraint
        for key, value in self.additional.items():
            one_line[f"slurm.additional.{key}"] = f"{key}={value}"
        for name, value in one_line.items():
            _check(
                value is None or not _CONTROL_RE.search(str(value)),
                name,
                value,
                "expected one line without control characters (it becomes an #SBATCH option)",
            )
        for key in self.additional:
            own = _FIRST_CLASS_SBATCH.get(key.replace("-", "_"))
            _check(
                own is None,
                f"slurm.additional.{key}",
                self.additional[key],
                f"set it with {own} instead",
            )


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """One cluster: how jobs get there, what a node has, and what an hour of it costs."""

    name: str  # the cluster's name in launch.json and the ledger (default: the file's name)
    executor: str  # "local" (this machine, submitit LocalExecutor) or "slurm"
    description: str = ""  # one line shown by `budget-lab clusters list`
    gpu_type: str  # e.g. "H100", "A100-80GB"; "cpu" for a node without GPUs
    gpus_per_node: int  # GPUs on one node; 0 only with gpu_type "cpu"
    cpus_per_node: int | None = None  # CPU cores on one node; None = unknown / not needed
    max_nodes: int = 1  # the most nodes one run may ask for
    capacity: str  # "on-demand", "spot" (may be reclaimed: runs are requeued) or "owned"
    region: str | None = None  # cloud region, e.g. "us-east-1" (spot prices are per region)
    instance_type: str | None = None  # cloud instance type, e.g. "p5.48xlarge"
    time_limit_min: int = 4320  # wall-clock limit of one job (Slurm --time); requeues reset it
    signal_delay_s: int = 120  # SIGUSR2 this long before the limit: time to save a checkpoint
    max_requeues: int = 10  # preemptions / timeouts a run survives before it is marked failed
    # Local executor: the jobs' CPU niceness (0..19). Above 0, a training job yields the cores to
    # the sweep controller and to interactive work on this machine when both want them, and
    # takes them back the moment they are idle; on Slurm, priorities are the scheduler's.
    nice: int = 0
    slurm: SlurmConfig | None = None  # required when executor is "slurm", else null
    price: PriceConfig  # what a GPU-hour (machine-hour without GPUs) costs

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and _NAME_RE.fullmatch(self.name) is not None,
            "name",
            self.name,
            "expected letters, digits, '.', '_' or '-' (it names folders and ledger rows)",
        )
        _one_of("executor", self.executor, EXECUTORS)
        _check(bool(self.gpu_type.strip()), "gpu_type", self.gpu_type, 'expected e.g. "H100"')
        _check(self.gpus_per_node >= 0, "gpus_per_node", self.gpus_per_node, "expected >= 0")
        _check(
            (self.gpus_per_node == 0) == (self.gpu_type == "cpu"),
            "gpus_per_node",
            self.gpus_per_node,
            f"gpu_type is {self.gpu_type!r}: a node without GPUs has gpu_type 'cpu' and "
            "gpus_per_node 0, a GPU node has gpus_per_node >= 1",
        )
        c = self.cpus_per_node
        _check(c is None or c >= 1, "cpus_per_node", c, "expected >= 1 or null")
        _check(self.max_nodes >= 1, "max_nodes", self.max_nodes, "expected >= 1")
        _check(
            self.executor != "local" or self.max_nodes == 1,
            "max_nodes",
            self.max_nodes,
            "the local executor runs on this machine only: expected 1",
        )
        _one_of("capacity", self.capacity, CAPACITIES)
        _check(self.time_limit_min >= 1, "time_limit_min", self.time_limit_min, "expected >= 1")
        _check(
            0 <= self.signal_delay_s < self.time_limit_min * 60,
            "signal_delay_s",
            self.signal_delay_s,
            f"expected 0 .. time_limit_min * 60 = {self.time_limit_min * 60} s",
        )
        _check(self.max_requeues >= 0, "max_requeues", self.max_requeues, "expected >= 0")
        _check(0 <= self.nice <= 19, "nice", self.nice, "expected 0 .. 19 (0: not lowered)")
        _check(
            self.executor == "local" or self.nice == 0,
            "nice",
            self.nice,
            "only the local executor lowers its jobs' CPU priority; on Slurm use the partition's "
            "QoS or `slurm: {additional: {nice: N}}`: expected 0",
        )
        if self.executor == "slurm":
            _check(
                self.slurm is not None,
                "slurm",
                None,
                "executor 'slurm' needs a slurm section with at least a partition, e.g. "
                "`slurm: {partition: debug}`",
            )
        elif self.slurm is not None:
            raise ConfigError(
                f"a slurm section is only valid with executor 'slurm' (executor is "
                f"{self.executor!r}): remove the section or set executor: slurm"
            )
        if self.price.kind == "spot":
            self._check_spot_price()

    def _check_spot_price(self) -> None:
        _check(
            self.capacity == "spot",
            "price.kind",
            "spot",
            f"a spot price needs capacity 'spot' (capacity is {self.capacity!r}); use kind "
            "'on_demand' or 'fixed' for capacity that is not reclaimed",
        )
        for key in ("region", "instance_type"):
            _check(
                getattr(self, key) is not None,
                key,
                None,
                "price.kind 'spot' reads AWS's spot price history for an instance type in a "
                'region: set both (e.g. region: us-east-1, instance_type: "p5.48xlarge")',
            )
        az = self.price.availability_zone
        _check(
            az is None or az.startswith(str(self.region)),
            "price.availability_zone",
            az,
            f"expected a zone of region {self.region!r}, e.g. {self.region}a, or null",
        )
        if self.price.gpus_per_instance is None:
            _check(
                self.gpus_per_node >= 1,
                "price.gpus_per_instance",
                None,
                "a spot price is per instance; set how many GPUs one instance has",
            )
            # Default: one node is one instance.
            price = dataclasses.replace(self.price, gpus_per_instance=self.gpus_per_node)
            object.__setattr__(self, "price", price)

    def check_request(self, nodes: int, gpus_per_node: int) -> None:
        """Raise ConfigError unless a job of `nodes` x `gpus_per_node` fits this cluster."""
        _check(
            1 <= nodes <= self.max_nodes,
            "nodes",
            nodes,
            f"expected 1 .. {self.max_nodes}, the max_nodes of cluster {self.name!r}; to use "
            "more nodes per run, raise max_nodes in its YAML",
        )
        if self.gpus_per_node == 0:
            _check(
                gpus_per_node == 0,
                "gpus_per_node",
                gpus_per_node,
                f"cluster {self.name!r} has no GPUs (gpu_type cpu); ask for 0 GPUs or pick a GPU "
                "cluster (`budget-lab clusters list`)",
            )
        _check(
            0 <= gpus_per_node <= self.gpus_per_node,
            "gpus_per_node",
            gpus_per_node,
            f"more GPUs than a node has: a node of cluster {self.name!r} has "
            f"{self.gpus_per_node} x {self.gpu_type}; ask for 0 .. {self.gpus_per_node} GPUs "
            "per node",
        )


def _is_date(text: Any) -> bool:
    if not isinstance(text, str) or not _DATE_RE.fullmatch(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# Loading: YAML (+ overrides) -> plain dict -> dataclasses, with unknown keys and wrong types
# reported by their dotted path.
# ------------------------------------------------------------------------------------------


def list_clusters() -> list[str]:
    """The names of the clusters: the user's config folder's `clusters/`, then the project's."""
    return list_configs("clusters")


def cluster_path(name_or_path: str | Path) -> Path:
    """A cluster name (user config folder, then clusters/) or a path to a YAML file -> the file."""
    return find_config(
        "clusters",
        name_or_path,
        hint="To add one, copy a file there and edit it (see clusters/README.md)",
    )


_CLUSTER = FileKind(
    "clusters",
    "cluster file",
    "cluster keys (name:, executor:, price:, ...; see clusters/README.md)",
    "compare with a file in clusters/, described in clusters/README.md",
)
_OVERRIDE_HELP = "write key=value (e.g. slurm.partition=spot), ~key to delete one the file sets"


def load_cluster(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ClusterConfig:
    """Load a cluster by name or path, composed by Hydra (a cluster file may extend another
    through its defaults list), and apply overrides in Hydra's grammar (slurm.partition=spot,
    slurm.setup=[module load cuda], ~max_nodes).

    The cluster's name is its own `name:`, else the file name without `.yaml`.
    """
    path = cluster_path(name_or_path)
    node = compose_named(path, _CLUSTER)  # keys are checked against ClusterConfig below
    parsed = parse_overrides(overrides, _cluster_key_exists, _OVERRIDE_HELP, where=path)
    apply_overrides(node, parsed, path, "the key then takes its default")  # names the file
    try:
        data = OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError as err:
        raise ConfigError(
            f"{path}: {str(err).splitlines()[0]}. Values are OmegaConf strings: ${{oc.env:VAR}} "
            "reads an environment variable; for a literal ${...} (e.g. a shell variable in "
            "slurm.setup) write \\${...} or $VAR"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    try:
        return cluster_from_dict(data)  # type: ignore[arg-type]
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _cluster_key_exists(key: str) -> bool:
    """Whether `key` (e.g. "slurm.partition") is a key of ClusterConfig; an unknown key is a
    ConfigError listing the valid ones. Keys inside a mapping field (slurm.additional.x) exist."""
    cls: Any = ClusterConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            parent = ".".join(parts[:i])
            raise ConfigError(
                f"unknown key {key!r}{' under ' + parent if parent else ''}; valid keys: "
                f"{', '.join(fields)}"
            )
        hint = get_type_hints(cls)[part]
        inner = [a for a in get_args(hint) if a is not type(None)] or [hint]
        cls = inner[0] if dataclasses.is_dataclass(inner[0]) else None
        if cls is None:
            return True  # a scalar, list or mapping field: anything under it is its value
    return True


def cluster_from_dict(data: Mapping[str, Any]) -> ClusterConfig:
    """A cluster from a plain dict (a loaded YAML, or `cluster_to_dict` output), validated."""
    return _build(ClusterConfig, data, "")


def cluster_to_dict(cluster: ClusterConfig) -> dict[str, Any]:
    """Plain data (YAML/JSON-ready) that `cluster_from_dict` turns back into the same cluster."""
    return dataclasses.asdict(cluster)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and value types first."""
    where = prefix.rstrip(".") or "the cluster"
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where} must be a mapping of keys, not {data!r}; valid keys: "
            + ", ".join(f.name for f in dataclasses.fields(cls))
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r} in {where}; valid keys: {', '.join(fields)}"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where} is missing required key(s) {', '.join(prefix + m for m in missing)}; "
            "clusters/README.md describes each key"
        )
    hints = get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field type (str, int, float, X | None, dict[str, str], list[str],
    a nested dataclass); ints pass as floats, scalar dict values become strings."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} is invalid: expected a mapping of option: value")
        for k, v in value.items():
            _check(
                isinstance(v, (str, int, float)) and not isinstance(v, bool),
                f"{key}.{k}",
                v,
                "expected a value for `--option=value` (a string or a number; sbatch flags "
                "without a value cannot be set here)",
            )
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list of strings")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}={value!r} is invalid: expected {_TYPE_WORDS[hint]}")
    return value


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number"}
