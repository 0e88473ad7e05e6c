"""What a sweep is: its types (`SweepSpec`, `ParamSpec`) and how a sweep file becomes one.

A sweep file (`sweeps/<name>.yaml`, format in sweeps/README.md) fills a `SweepSpec`:

    spec = load_sweep("mask_ratio", ["n_trials=3"])               # YAML < overrides, validated

Validation that needs only the spec happens in `__post_init__`; what needs the trial recipe
(every param's extreme values compose with it) in `compose.check_against_recipe`, which
`load_sweep` runs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from budget_lab.config import EvalConfig, RunConfig
from budget_lab.config.compose import FileKind, apply_overrides, compose_named, parse_overrides
from budget_lab.config_files import find_config, list_configs
from budget_lab.errors import ConfigError, check
from budget_lab.sweep.compose import DERIVED_TARGETS, base_config, check_against_recipe
from budget_lab.sweep.objectives import OBJECTIVES

__all__ = [
    "SWEEPS_DIR",
    "SAMPLERS",
    "PRUNERS",
    "PARAM_TYPES",
    "REPEAT_PARAM",
    "ParamSpec",
    "SweepSpec",
    "list_sweeps",
    "sweep_path",
    "load_sweep",
    "sweep_from_dict",
    "sweep_to_dict",
]

#: Sweeps shipped with the project (one YAML per sweep).
SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"

SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "dollar_rungs")
PARAM_TYPES = ("float", "int", "categorical", "bool")

#: The param a sweep with `repeats: k` gets: the repeat's index, 0 .. k - 1.
REPEAT_PARAM = "repeat"


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (True is not 1, 1 is 1.0)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _is_in(value: Any, values: list[Any]) -> bool:
    return any(_same(value, v) for v in values)


# ------------------------------------------------------------------------------------------------
# The spec.
# ------------------------------------------------------------------------------------------------


@dataclass
class ParamSpec:
    """One dimension of the search space: what Optuna samples and what it sets in a trial's run."""

    name: str = ""  # Optuna parameter name (the key in trial.params); unique within the sweep
    target: str | None = None  # a DERIVED_TARGETS knob or a RunConfig key; None = a selector
    type: str = "float"  # float, int, categorical or bool
    low: float | None = None  # float/int: smallest value (inclusive)
    high: float | None = None  # float/int: largest value (inclusive)
    step: float | None = None  # float/int: spacing of the values; None = continuous (int: 1)
    log: bool = False  # float/int: sample on a log scale (needs low > 0 and no step)
    choices: list[Any] | None = None  # categorical: the values (str, int, float, bool or null)
    grid: list[Any] | None = None  # grid sampler's values; None = all choices / low..high by step
    when: dict[str, Any] | None = None  # sampled only if earlier params take these values
    default: Any = None  # with `when`: the value set while it is false; None = the recipe's

    def __post_init__(self) -> None:
        p = f"params[{self.name or '?'}]"
        check(
            bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or "")),
            f"{p}.name",
            self.name,
            "expected an identifier such as mask_ratio",
        )
        check(self.type in PARAM_TYPES, f"{p}.type", self.type, f"expected {_or(PARAM_TYPES)}")
        if self.type in ("float", "int"):
            check(
                self.low is not None and self.high is not None,
                p,
                (self.low, self.high),
                f"a {self.type} param needs low and high",
            )
            assert self.low is not None and self.high is not None
            check(self.low <= self.high, f"{p}.high", self.high, f"expected >= low={self.low}")
            check(self.step is None or self.step > 0, f"{p}.step", self.step, "expected > 0")
            if self.type == "int":
                for f in ("low", "high", "step"):
                    v = getattr(self, f)
                    check(v is None or float(v).is_integer(), f"{p}.{f}", v, "expected an integer")
            if self.log:
                check(
                    self.low > 0 and self.step is None,
                    f"{p}.log",
                    self.log,
                    "a log scale needs low > 0 and no step",
                )
            check(
                self.choices is None,
                f"{p}.choices",
                self.choices,
                "choices are for categorical params; a float or int param takes low and high",
            )
        else:
            for f in ("low", "high", "step"):
                v = getattr(self, f)
                check(v is None, f"{p}.{f}", v, f"a {self.type} param takes no {f}")
            check(not self.log, f"{p}.log", self.log, f"a {self.type} param takes no log scale")
        if self.type == "categorical":
            check(bool(self.choices), f"{p}.choices", self.choices, "expected a non-empty list")
            assert self.choices is not None
            for c in self.choices:
                check(
                    c is None or isinstance(c, (str, int, float, bool)),
                    f"{p}.choices",
                    c,
                    "choices are str, int, float, bool or null",
                )
            check(
                all(not _is_in(c, self.choices[:k]) for k, c in enumerate(self.choices)),
                f"{p}.choices",
                self.choices,
                "choices must be distinct",
            )
        if self.type == "bool":
            check(self.choices is None, f"{p}.choices", self.choices, "a bool param is true/false")
        if self.grid is not None:
            check(bool(self.grid), f"{p}.grid", self.grid, "expected values (or leave grid out)")
            for v in self.grid:
                check(self.contains(v), f"{p}.grid", v, f"grid values must be {self.domain()}")
        if self.when is not None:
            check(bool(self.when), f"{p}.when", self.when, "expected {param: [values]}")
            self.when = {
                str(k): list(v) if isinstance(v, (list, tuple)) else [v]
                for k, v in self.when.items()
            }
        check(
            self.default is None or self.when is not None,
            f"{p}.default",
            self.default,
            "a default is the value set while `when` is false: add `when`, or remove default",
        )
        if self.default is not None:
            check(
                self.contains(self.default) or self.type in ("float", "int"),
                f"{p}.default",
                self.default,
                f"expected {self.domain()}",
            )
        if self.target is not None:
            top = self.target.split(".")[0]
            check(
                self.target in DERIVED_TARGETS
                or top in {f.name for f in dataclasses.fields(RunConfig)},
                f"{p}.target",
                self.target,
                f"expected a derived knob ({', '.join(DERIVED_TARGETS)}), a RunConfig key such "
                f"as model.mixer_depth or phases.0.lr, or null for a selector",
            )

    def contains(self, value: Any) -> bool:
        """Whether `value` is one of the values this param can take."""
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "categorical":
            return _is_in(value, self.choices or [])
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        assert self.low is not None and self.high is not None
        if not (self.low <= value <= self.high):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def domain(self) -> str:
        """The values this param can take, in words (for error messages)."""
        if self.type == "bool":
            return "true or false"
        if self.type == "categorical":
            return f"one of {self.choices}"
        by = f" by {self.step:g}" if self.step is not None else ""
        return f"a{'n' if self.type == 'int' else ''} {self.type} in [{self.low}, {self.high}]{by}"

    def grid_values(self) -> list[Any] | None:
        """The values the grid sampler visits; None when the param is continuous without a grid."""
        if self.grid is not None:
            return list(self.grid)
        if self.type == "bool":
            return [False, True]
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + k * self.step, 12) for k in range(n + 1)]

    def active(self, params: dict[str, Any]) -> bool:
        """Whether this param is sampled, given the values of the params before it."""
        return self.when is None or all(
            k in params and _is_in(params[k], vals) for k, vals in self.when.items()
        )


def _or(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


@dataclass
class SweepSpec:
    """A sweep: trial recipe, search space, objective, and how trials are judged and paid for."""

    name: str = ""  # sweep name; trial runs are <name>-<trial:03d>; default: the file's stem
    description: str = ""  # what the sweep asks, and how long its default run takes
    recipe: str = "nano"  # the trial recipe: a name in recipes/ or a YAML path
    base_overrides: list[str] = field(default_factory=list)  # key=value for every trial, first
    params: list[ParamSpec] = field(default_factory=list)  # the search space, sampled in order
    objective: str = "pareto"  # pareto, fid_at_budget or fid_per_dollar (see objectives.py)
    sampler: str = "tpe"  # tpe, nsga2, random or grid (the grid of every param's values)
    seed: int = 0  # seeds the sampler and the grid's order; trials keep the recipe's seed
    population: int | None = None  # nsga2 population; None = n_trials // 5 within [4, 50]
    n_trials: int | None = None  # trials to run; None = the grid's size (grid sampler only)
    slots: int = 1  # trials running at the same time
    budget_usd: float | None = None  # hard cap on the whole sweep's spend ($); None = no cap
    trial_budget_usd: float | None = None  # fid_at_budget: each trial's spend; else a trial cap
    budget_split: list[float] | None = None  # share of trial_budget_usd per phase; None = recipe's
    pruner: str = "none"  # none, or dollar_rungs: cut trials whose FID lags at a dollar rung
    rungs_usd: list[float] = field(default_factory=list)  # spends ($) at which FID is judged
    rung_fractions: list[float] = field(default_factory=list)  # rungs as fractions of a trial's $
    phase_rung: bool = False  # also judge at the end of masked pretraining, before finetuning
    prune_percentile: float = 50.0  # cut when FID > this percentile of the peers' (50 = median)
    prune_min_peers: int = 2  # peers with an FID at a rung before any trial is cut there
    prune_confidence: float = 0.95  # cut only when the lag is significant at this level (0.5: any)
    repeats: int = 1  # seeds per configuration (grid sampler); scores become means over them
    cost_tolerance: float = 0.1  # relative $ differences below this are noise (machine load)
    eval: dict[str, Any] = field(default_factory=dict)  # EvalConfig overrides for trial FIDs
    cluster: str = "local"  # where trials run unless the command line says otherwise

    def __post_init__(self) -> None:
        check(
            not self.name or bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)),
            "name",
            self.name,
            "expected letters, digits, '_', '.' or '-' (trial runs are named <name>-NNN)",
        )
        valid = _or(list(OBJECTIVES))
        check(self.objective in OBJECTIVES, "objective", self.objective, f"expected {valid}")
        check(self.sampler in SAMPLERS, "sampler", self.sampler, f"expected {_or(SAMPLERS)}")
        check(self.pruner in PRUNERS, "pruner", self.pruner, f"expected {_or(PRUNERS)}")
        bad = [o for o in self.base_overrides if "=" not in o]
        check(not bad, "base_overrides", bad, "expected key=value items (phases.0.steps=100)")
        # The search space.
        check(bool(self.params), "params", self.params, "a sweep needs at least one param")
        seen: dict[str, ParamSpec] = {}
        for p in self.params:
            check(p.name not in seen, "params", p.name, "param names must be unique")
            for k, vals in (p.when or {}).items():
                check(
                    k in seen,
                    f"params[{p.name}].when",
                    k,
                    f"`when` names a param declared before this one: {', '.join(seen) or '(none)'}",
                )
                for v in vals:
                    check(
                        seen[k].contains(v),
                        f"params[{p.name}].when.{k}",
                        v,
                        f"{k} takes {seen[k].domain()}",
                    )
            seen[p.name] = p
        for knob in ("route_start", "route_end"):
            check(
                sum(p.target == knob for p in self.params) <= 1,
                "params",
                knob,
                "at most one param may target each route knob",
            )
        start = next((p for p in self.params if p.target == "route_start"), None)
        end = next((p for p in self.params if p.target == "route_end"), None)
        if start is not None and end is not None:
            lo_end = min(end.grid_values() or [end.low])
            hi_start = max(start.grid_values() or [start.high])
            check(
                lo_end > hi_start,
                f"params[{end.name}]",
                lo_end,
                f"route_end's smallest value must exceed route_start's largest ({hi_start}), "
                f"so that every sample is a valid route",
            )
        # Repeats: one more grid param, the seed's offset.
        check(self.repeats >= 1, "repeats", self.repeats, "expected >= 1 seeds per configuration")
        if self.repeats > 1:
            check(
                self.sampler == "grid",
                "repeats",
                self.repeats,
                f"repeats need the grid sampler (each configuration trained with k seeds); "
                f"sampler={self.sampler} samples new configurations instead",
            )
            repeat = next((p for p in self.params if p.name == REPEAT_PARAM), None)
            if repeat is None:
                self.params.append(
                    ParamSpec(
                        name=REPEAT_PARAM,
                        target="seed_offset",
                        type="int",
                        low=0,
                        high=self.repeats - 1,
                    )
                )
            else:
                check(
                    repeat.target == "seed_offset" and repeat.high == self.repeats - 1,
                    "params",
                    REPEAT_PARAM,
                    f"the name {REPEAT_PARAM!r} is the repeats' own param; rename yours",
                )
        # Sampler and trial count.
        if self.sampler == "grid":
            for p in self.params:
                check(
                    p.when is None,
                    f"params[{p.name}].when",
                    p.when,
                    "the grid sampler needs a fixed search space; use tpe, nsga2 or random",
                )
                check(
                    p.grid_values() is not None,
                    f"params[{p.name}]",
                    p.domain(),
                    "the grid sampler needs discrete values: add `grid: [...]` or a `step`",
                )
            size = self.grid_size()
            if self.n_trials is None:
                self.n_trials = size
            check(
                1 <= self.n_trials <= size,
                "n_trials",
                self.n_trials,
                f"the grid has {size} points; expected 1..{size} (or leave n_trials out)",
            )
        else:
            check(
                self.n_trials is not None and self.n_trials >= 1,
                "n_trials",
                self.n_trials,
                f"expected >= 1 (only the grid sampler counts its trials; sampler={self.sampler})",
            )
        check(self.slots >= 1, "slots", self.slots, "expected >= 1")
        check(
            self.population is None or self.population >= 2,
            "population",
            self.population,
            "expected >= 2 or null",
        )
        check(
            self.population is None or self.sampler == "nsga2",
            "population",
            self.population,
            "only the nsga2 sampler has a population",
        )
        # Money.
        for name in ("budget_usd", "trial_budget_usd"):
            v = getattr(self, name)
            check(v is None or v > 0, name, v, "expected a positive amount in $, or null")
        check(
            self.objective != "fid_at_budget" or self.trial_budget_usd is not None,
            "trial_budget_usd",
            self.trial_budget_usd,
            "objective fid_at_budget trains every trial until it spent trial_budget_usd: set it",
        )
        if self.budget_split is not None:
            check(
                self.trial_budget_usd is not None,
                "budget_split",
                self.budget_split,
                "it splits trial_budget_usd between phases: set trial_budget_usd",
            )
            check(
                all(s > 0 for s in self.budget_split) and abs(sum(self.budget_split) - 1.0) < 1e-6,
                "budget_split",
                self.budget_split,
                "expected one positive share per phase, summing to 1",
            )
        # Pruning.
        rungs = self.rungs_usd or self.rung_fractions
        if self.pruner == "none":
            check(
                not rungs and not self.phase_rung,
                "pruner",
                self.pruner,
                "rungs and phase_rung judge trials for a pruner: set pruner: dollar_rungs, or "
                "remove them",
            )
        else:
            check(
                bool(rungs) or self.phase_rung,
                "pruner",
                self.pruner,
                "dollar_rungs needs rungs_usd, rung_fractions or phase_rung: true",
            )
        check(
            not (self.rungs_usd and self.rung_fractions),
            "rung_fractions",
            self.rung_fractions,
            "give rungs_usd or rung_fractions, not both",
        )
        for name, hi in (("rungs_usd", math.inf), ("rung_fractions", 1.0)):
            v = getattr(self, name)
            check(
                all(0 < x <= hi for x in v) and all(a < b for a, b in zip(v, v[1:], strict=False)),
                name,
                v,
                f"expected increasing values in (0, {hi:g}]",
            )
        check(
            0 < self.prune_percentile <= 100,
            "prune_percentile",
            self.prune_percentile,
            "expected (0, 100]",
        )
        check(self.prune_min_peers >= 1, "prune_min_peers", self.prune_min_peers, "expected >= 1")
        check(
            0.5 <= self.prune_confidence < 1,
            "prune_confidence",
            self.prune_confidence,
            "expected [0.5, 1): one-sided confidence that a trial lags before it is cut "
            "(0.5 cuts on any lag, 0.95 on a lag beyond the noise)",
        )
        check(
            0 <= self.cost_tolerance < 1,
            "cost_tolerance",
            self.cost_tolerance,
            "expected [0, 1): relative $ differences below it count as ties",
        )
        # Trial FID settings.
        names = [f.name for f in dataclasses.fields(EvalConfig)]
        unknown = sorted(set(self.eval) - set(names))
        check(not unknown, "eval", unknown, f"valid eval keys: {', '.join(names)}")
        check(bool(self.cluster), "cluster", self.cluster, "expected a cluster name (local)")

    @property
    def fid_samples(self) -> int:
        """Generated images per trial FID: eval.fid_samples of the trial config."""
        return base_config(self).eval.fid_samples

    @property
    def sampler_steps(self) -> int:
        """Heun steps per generated image of a trial FID: eval.sampler_steps of the trial config."""
        return base_config(self).eval.sampler_steps

    def grid_size(self) -> int:
        """Points in the grid of every param's values (the grid sampler's trial count)."""
        return math.prod(len(p.grid_values() or []) for p in self.params)


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def list_sweeps() -> list[str]:
    """The names of the sweeps: the user's config folder's `sweeps/`, then the project's."""
    return list_configs("sweeps")


def sweep_path(name_or_path: str | Path) -> Path:
    """A sweep name (user config folder, then sweeps/) or a path to a YAML file."""
    return find_config("sweeps", name_or_path)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown keys, at the top level and in each param, with the valid ones."""
    valid = _field_names(SweepSpec)
    for key in raw:
        check(key in valid, f"{where}: key", key, f"valid sweep keys: {', '.join(valid)}")
    params = raw.get("params") or []
    check(isinstance(params, list), f"{where}: params", params, "expected a list of params")
    valid = _field_names(ParamSpec)
    for k, item in enumerate(params):
        check(isinstance(item, dict), f"{where}: params[{k}]", item, "expected a mapping")
        for key in item:
            check(key in valid, f"{where}: params[{k}] key", key, f"valid keys: {', '.join(valid)}")


_SWEEP = FileKind(
    "sweeps",
    "sweep",
    "sweep keys (name:, recipe:, params:, objective:, ...; see sweeps/README.md)",
    "compare with sweeps/mask_ratio.yaml",
)
_OVERRIDE_HELP = "write key=value (e.g. n_trials=3, params.0.high=0.9), ~key to delete one"


def _sweep_key_exists(key: str) -> bool:
    """Whether `key` is a SweepSpec key (params.<i>.<ParamSpec key>, eval.<anything>); an
    unknown one is a ConfigError listing the valid keys."""
    parts = key.split(".")
    valid = _field_names(SweepSpec)
    check(parts[0] in valid, "override key", key, f"valid sweep keys: {', '.join(valid)}")
    if parts[0] == "params" and len(parts) > 2:
        valid = _field_names(ParamSpec)
        check(parts[2] in valid, "override key", key, f"valid keys: {', '.join(valid)}")
    return True


def _build(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], where: str) -> SweepSpec:
    _check_keys(raw, where)
    parsed = parse_overrides(overrides, _sweep_key_exists, _OVERRIDE_HELP, where=where)
    try:
        node = OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.create(raw))
    except OmegaConfBaseException as err:
        raise _invalid(where, err) from None
    apply_overrides(node, parsed, where, "the key then takes its default")  # names `where`
    try:
        spec = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise _invalid(where, err) from None
    except ConfigError as err:  # SweepSpec's own checks
        raise ConfigError(f"{where}: {err}") from None
    assert isinstance(spec, SweepSpec)
    return spec


def _invalid(where: str, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return ConfigError(f"{where}: invalid sweep{f' value at {key!r}' if key else ''}: {msg}")


def load_sweep(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Load a sweep (a name in the user's or the project's sweeps/, or a path), composed by
    Hydra (a sweep may extend another through its defaults list), apply overrides in Hydra's
    grammar (n_trials=3, params.0.high=0.9), validate it and compose its recipe with every
    param's extreme values. A sweep's name is its own `name:` or its file's name, never the
    name of a sweep it extends (each sweep has its own study)."""
    path = sweep_path(name_or_path)
    node = compose_named(path, _SWEEP)  # keys are checked against SweepSpec by _build
    try:
        raw = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    assert isinstance(raw, dict)
    spec = _build(raw, overrides, str(path))
    try:
        check_against_recipe(spec)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return spec


def sweep_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The resolved spec as plain data (the controller freezes it in the sweep's folder)."""
    return dataclasses.asdict(spec)


def sweep_from_dict(d: dict[str, Any]) -> SweepSpec:
    """A spec from `sweep_to_dict` (re-attaching to a sweep uses the frozen spec, not the YAML)."""
    spec = _build(dict(d), (), "sweep")
    check_against_recipe(spec)
    return spec
