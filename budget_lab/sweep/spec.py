"""What a sweep is: a search space over a trial recipe, an objective, and how trials are judged.

A sweep file (`sweeps/<name>.yaml`, format in sweeps/README.md) fills a `SweepSpec`. The sweep
controller owns the Optuna ask/tell loop and calls the functions here:

    spec = load_sweep("mask_ratio", ["n_trials=3"])               # YAML < overrides, validated
    study = optuna.create_study(directions=study_directions(spec),
                                sampler=make_sampler(spec), pruner=make_pruner(spec))
    trial = study.ask()
    params = suggest(trial, spec)                                 # {"mask_ratio": 0.75}
    cfg = compose_run(spec.recipe, trial_overrides(spec, params) + [f"name={run}"])
    ...                                                           # train; at each dollar rung:
    report_fid(trial, fid, spent_usd, rung_usd=r)                 # or phase="masked-pretrain"
    if should_prune(trial): study.tell(trial, state=TrialState.PRUNED)
    ...                                                           # finished:
    study.tell(trial, objective_values(spec, fid, cost_usd, fid_baseline))

Money is in US dollars (floats) everywhere. Intermediate FIDs are not passed through Optuna's
`Trial.report`: Optuna refuses it (and `should_prune`) in multi-objective studies, and `pareto`
is one; its integer step is also too coarse a unit of money for CPU trials that cost a fraction
of a cent. `report_fid` keeps them in the trial's user attribute `fid_reports` instead, where
`DollarRungPruner` (an Optuna pruner) and the report read them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from budget_lab.config import (
    EvalConfig,
    RunConfig,
    compose_run,
    model_config,
    recipe_path,
    run_config_from_dict,
)
from budget_lab.errors import ConfigError
from budget_lab.sweep.objectives import OBJECTIVES, directions
from model.config import round_up

__all__ = [
    "SWEEPS_DIR",
    "SAMPLERS",
    "PRUNERS",
    "PARAM_TYPES",
    "DERIVED_TARGETS",
    "FID_REPORTS_ATTR",
    "REPEAT_PARAM",
    "ParamSpec",
    "SweepSpec",
    "list_sweeps",
    "sweep_path",
    "load_sweep",
    "sweep_from_dict",
    "sweep_to_dict",
    "base_config",
    "masked_phases",
    "phase_rung_phases",
    "suggest",
    "trial_overrides",
    "param_overrides",
    "base_overrides",
    "trial_config",
    "budget_steps",
    "grid_search_space",
    "make_sampler",
    "make_pruner",
    "study_directions",
    "resolve_rungs",
    "DollarRungPruner",
    "report_fid",
    "fid_reports",
    "should_prune",
]

#: Sweeps shipped with the project (one YAML per sweep).
SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"

SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "dollar_rungs")
PARAM_TYPES = ("float", "int", "categorical", "bool")

#: A phase is a finetune phase when its name contains this; every other phase is "masked".
FINETUNE_MARK = "finetune"

#: The trial user attribute holding its intermediate FIDs (see `report_fid`).
FID_REPORTS_ATTR = "fid_reports"

#: Knobs a param can target besides a plain RunConfig key, and what each one sets.
DERIVED_TARGETS: dict[str, str] = {
    "mask_ratio": (
        "phases.<i>.mask_ratio of every masked phase (each phase whose name does not contain "
        "'finetune'); finetune phases keep theirs. A float in [0, 1)"
    ),
    "experts": "model.num_experts: experts per MoE layer; 0 = a dense FFN everywhere",
    "width": (
        "model.dim, the backbone width (a multiple of model.head_dim); a patch-mixer keeps its "
        "width ratio: mixer_dim = round_up(mixer_dim * width / dim, head_dim)"
    ),
    "attn_ratio_first": (
        "model.attn_ratio = (value, the recipe's last-block ratio): the first block's attention "
        "width / dim under layer-wise scaling"
    ),
    "ffn_ratio_first": (
        "model.ffn_ratio = (value, the recipe's last-block ratio): the first block's FFN ratio "
        "under layer-wise scaling"
    ),
    "route_ratio": (
        "model.routes = one token route (TREAD) with this fraction of tokens, in [0, 1); 0 = no "
        "route. Unset route knobs come from the recipe's first route, else ratio 0.5, blocks "
        "[1, depth - 1)"
    ),
    "route_start": "model.routes: the first backbone block the routed tokens skip (0-based)",
    "route_end": "model.routes: the block before which routed tokens re-join (start < end)",
    "seed_offset": (
        "seed = the recipe's seed + value: the same configuration trained with another seed "
        "(`repeats: k` adds the param `repeat` with this target)"
    ),
}

#: The param a sweep with `repeats: k` gets: the repeat's index, 0 .. k - 1.
REPEAT_PARAM = "repeat"

_ROUTE_KNOBS = ("route_ratio", "route_start", "route_end")


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {valid}")


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
        _check(
            bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or "")),
            f"{p}.name",
            self.name,
            "expected an identifier such as mask_ratio",
        )
        _check(self.type in PARAM_TYPES, f"{p}.type", self.type, f"expected {_or(PARAM_TYPES)}")
        if self.type in ("float", "int"):
            _check(
                self.low is not None and self.high is not None,
                p,
                (self.low, self.high),
                f"a {self.type} param needs low and high",
            )
            assert self.low is not None and self.high is not None
            _check(self.low <= self.high, f"{p}.high", self.high, f"expected >= low={self.low}")
            _check(self.step is None or self.step > 0, f"{p}.step", self.step, "expected > 0")
            if self.type == "int":
                for f in ("low", "high", "step"):
                    v = getattr(self, f)
                    _check(v is None or float(v).is_integer(), f"{p}.{f}", v, "expected an integer")
            if self.log:
                _check(
                    self.low > 0 and self.step is None,
                    f"{p}.log",
                    self.log,
                    "a log scale needs low > 0 and no step",
                )
            _check(
                self.choices is None,
                f"{p}.choices",
                self.choices,
                "choices are for categorical params; a float or int param takes low and high",
            )
        else:
            for f in ("low", "high", "step"):
                v = getattr(self, f)
                _check(v is None, f"{p}.{f}", v, f"a {self.type} param takes no {f}")
            _check(not self.log, f"{p}.log", self.log, f"a {self.type} param takes no log scale")
        if self.type == "categorical":
            _check(bool(self.choices), f"{p}.choices", self.choices, "expected a non-empty list")
            assert self.choices is not None
            for c in self.choices:
                _check(
                    c is None or isinstance(c, (str, int, float, bool)),
                    f"{p}.choices",
                    c,
                    "choices are str, int, float, bool or null",
                )
            _check(
                all(not _is_in(c, self.choices[:k]) for k, c in enumerate(self.choices)),
                f"{p}.choices",
                self.choices,
                "choices must be distinct",
            )
        if self.type == "bool":
            _check(self.choices is None, f"{p}.choices", self.choices, "a bool param is true/false")
        if self.grid is not None:
            _check(bool(self.grid), f"{p}.grid", self.grid, "expected values (or leave grid out)")
            for v in self.grid:
                _check(self.contains(v), f"{p}.grid", v, f"grid values must be {self.domain()}")
        if self.when is not None:
            _check(bool(self.when), f"{p}.when", self.when, "expected {param: [values]}")
            self.when = {
                str(k): list(v) if isinstance(v, (list, tuple)) else [v]
                for k, v in self.when.items()
            }
        _check(
            self.default is None or self.when is not None,
            f"{p}.default",
            self.default,
            "a default is the value set while `when` is false: add `when`, or remove default",
        )
        if self.default is not None:
            _check(
                self.contains(self.default) or self.type in ("float", "int"),
                f"{p}.default",
                self.default,
                f"expected {self.domain()}",
            )
        if self.target is not None:
            top = self.target.split(".")[0]
            _check(
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
        _check(
            not self.name or bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)),
            "name",
            self.name,
            "expected letters, digits, '_', '.' or '-' (trial runs are named <name>-NNN)",
        )
        valid = _or(list(OBJECTIVES))
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"expected {valid}")
        _check(self.sampler in SAMPLERS, "sampler", self.sampler, f"expected {_or(SAMPLERS)}")
        _check(self.pruner in PRUNERS, "pruner", self.pruner, f"expected {_or(PRUNERS)}")
        bad = [o for o in self.base_overrides if "=" not in o]
        _check(not bad, "base_overrides", bad, "expected key=value items (phases.0.steps=100)")
        # The search space.
        _check(bool(self.params), "params", self.params, "a sweep needs at least one param")
        seen: dict[str, ParamSpec] = {}
        for p in self.params:
            _check(p.name not in seen, "params", p.name, "param names must be unique")
            for k, vals in (p.when or {}).items():
                _check(
                    k in seen,
                    f"params[{p.name}].when",
                    k,
                    f"`when` names a param declared before this one: {', '.join(seen) or '(none)'}",
                )
                for v in vals:
                    _check(
                        seen[k].contains(v),
                        f"params[{p.name}].when.{k}",
                        v,
                        f"{k} takes {seen[k].domain()}",
                    )
            seen[p.name] = p
        for knob in ("route_start", "route_end"):
            _check(
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
            _check(
                lo_end > hi_start,
                f"params[{end.name}]",
                lo_end,
                f"route_end's smallest value must exceed route_start's largest ({hi_start}), "
                f"so that every sample is a valid route",
            )
        # Repeats: one more grid param, the seed's offset.
        _check(self.repeats >= 1, "repeats", self.repeats, "expected >= 1 seeds per configuration")
        if self.repeats > 1:
            _check(
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
                _check(
                    repeat.target == "seed_offset" and repeat.high == self.repeats - 1,
                    "params",
                    REPEAT_PARAM,
                    f"the name {REPEAT_PARAM!r} is the repeats' own param; rename yours",
                )
        # Sampler and trial count.
        if self.sampler == "grid":
            for p in self.params:
                _check(
                    p.when is None,
                    f"params[{p.name}].when",
                    p.when,
                    "the grid sampler needs a fixed search space; use tpe, nsga2 or random",
                )
                _check(
                    p.grid_values() is not None,
                    f"params[{p.name}]",
                    p.domain(),
                    "the grid sampler needs discrete values: add `grid: [...]` or a `step`",
                )
            size = self.grid_size()
            if self.n_trials is None:
                self.n_trials = size
            _check(
                1 <= self.n_trials <= size,
                "n_trials",
                self.n_trials,
                f"the grid has {size} points; expected 1..{size} (or leave n_trials out)",
            )
        else:
            _check(
                self.n_trials is not None and self.n_trials >= 1,
                "n_trials",
                self.n_trials,
                f"expected >= 1 (only the grid sampler counts its trials; sampler={self.sampler})",
            )
        _check(self.slots >= 1, "slots", self.slots, "expected >= 1")
        _check(
            self.population is None or self.population >= 2,
            "population",
            self.population,
            "expected >= 2 or null",
        )
        _check(
            self.population is None or self.sampler == "nsga2",
            "population",
            self.population,
            "only the nsga2 sampler has a population",
        )
        # Money.
        for name in ("budget_usd", "trial_budget_usd"):
            v = getattr(self, name)
            _check(v is None or v > 0, name, v, "expected a positive amount in $, or null")
        _check(
            self.objective != "fid_at_budget" or self.trial_budget_usd is not None,
            "trial_budget_usd",
            self.trial_budget_usd,
            "objective fid_at_budget trains every trial until it spent trial_budget_usd: set it",
        )
        if self.budget_split is not None:
            _check(
                self.trial_budget_usd is not None,
                "budget_split",
                self.budget_split,
                "it splits trial_budget_usd between phases: set trial_budget_usd",
            )
            _check(
                all(s > 0 for s in self.budget_split) and abs(sum(self.budget_split) - 1.0) < 1e-6,
                "budget_split",
                self.budget_split,
                "expected one positive share per phase, summing to 1",
            )
        # Pruning.
        rungs = self.rungs_usd or self.rung_fractions
        if self.pruner == "none":
            _check(
                not rungs and not self.phase_rung,
                "pruner",
                self.pruner,
                "rungs and phase_rung judge trials for a pruner: set pruner: dollar_rungs, or "
                "remove them",
            )
        else:
            _check(
                bool(rungs) or self.phase_rung,
                "pruner",
                self.pruner,
                "dollar_rungs needs rungs_usd, rung_fractions or phase_rung: true",
            )
        _check(
            not (self.rungs_usd and self.rung_fractions),
            "rung_fractions",
            self.rung_fractions,
            "give rungs_usd or rung_fractions, not both",
        )
        for name, hi in (("rungs_usd", math.inf), ("rung_fractions", 1.0)):
            v = getattr(self, name)
            _check(
                all(0 < x <= hi for x in v) and all(a < b for a, b in zip(v, v[1:], strict=False)),
                name,
                v,
                f"expected increasing values in (0, {hi:g}]",
            )
        _check(
            0 < self.prune_percentile <= 100,
            "prune_percentile",
            self.prune_percentile,
            "expected (0, 100]",
        )
        _check(self.prune_min_peers >= 1, "prune_min_peers", self.prune_min_peers, "expected >= 1")
        _check(
            0.5 <= self.prune_confidence < 1,
            "prune_confidence",
            self.prune_confidence,
            "expected [0.5, 1): one-sided confidence that a trial lags before it is cut "
            "(0.5 cuts on any lag, 0.95 on a lag beyond the noise)",
        )
        _check(
            0 <= self.cost_tolerance < 1,
            "cost_tolerance",
            self.cost_tolerance,
            "expected [0, 1): relative $ differences below it count as ties",
        )
        # Trial FID settings.
        names = [f.name for f in dataclasses.fields(EvalConfig)]
        unknown = sorted(set(self.eval) - set(names))
        _check(not unknown, "eval", unknown, f"valid eval keys: {', '.join(names)}")
        _check(bool(self.cluster), "cluster", self.cluster, "expected a cluster name (local)")

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
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def sweep_path(name_or_path: str | Path) -> Path:
    """A sweep name (from sweeps/) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist")
        return path
    named = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(
            f"unknown sweep {str(name_or_path)!r}; valid sweeps: "
            f"{', '.join(list_sweeps()) or '(none)'} (in {SWEEPS_DIR}), or a path to a YAML file"
        )
    return named


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown keys, at the top level and in each param, with the valid ones."""
    valid = _field_names(SweepSpec)
    for key in raw:
        _check(key in valid, f"{where}: key", key, f"valid sweep keys: {', '.join(valid)}")
    params = raw.get("params") or []
    _check(isinstance(params, list), f"{where}: params", params, "expected a list of params")
    valid = _field_names(ParamSpec)
    for k, item in enumerate(params):
        _check(isinstance(item, dict), f"{where}: params[{k}]", item, "expected a mapping")
        for key in item:
            _check(
                key in valid, f"{where}: params[{k}] key", key, f"valid keys: {', '.join(valid)}"
            )


def _build(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], where: str) -> SweepSpec:
    _check_keys(raw, where)
    try:
        node = OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.create(raw))
        for item in overrides:
            _check("=" in item, "override", item, "expected key=value (e.g. n_trials=3)")
            key, value = (s.strip() for s in item.split("=", 1))
            parts = key.split(".")
            valid = _field_names(SweepSpec)
            _check(parts[0] in valid, "override key", key, f"valid sweep keys: {', '.join(valid)}")
            if parts[0] == "params" and len(parts) > 2:
                valid = _field_names(ParamSpec)
                _check(parts[2] in valid, "override key", key, f"valid keys: {', '.join(valid)}")
            OmegaConf.update(node, key, yaml.safe_load(value), merge=True)
        spec = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(
            f"{where}: invalid sweep{f' value at {key!r}' if key else ''}: {msg}"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    assert isinstance(spec, SweepSpec)
    return spec


def load_sweep(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Load a sweep (a name in sweeps/ or a path), apply `key=value` overrides, validate it and
    compose its recipe with every param's extreme values."""
    path = sweep_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    _check(isinstance(raw, dict), str(path), type(raw).__name__, "expected a mapping of sweep keys")
    spec = _build(raw, overrides, str(path))
    if not spec.name:
        spec = dataclasses.replace(spec, name=path.stem)
    try:
        _check_against_recipe(spec)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return spec


def sweep_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The resolved spec as plain data (the controller freezes it in the sweep's folder)."""
    return dataclasses.asdict(spec)


def sweep_from_dict(d: dict[str, Any]) -> SweepSpec:
    """A spec from `sweep_to_dict` (re-attaching to a sweep uses the frozen spec, not the YAML)."""
    spec = _build(dict(d), (), "sweep")
    _check_against_recipe(spec)
    return spec


def _check_against_recipe(spec: SweepSpec) -> None:
    """What needs the recipe: it composes with the base overrides, the phases fit the knobs, and
    every param's lowest and highest value (every choice) composes on its own."""
    recipe_path(spec.recipe)
    base = base_config(spec)
    targets = {p.target for p in spec.params}
    if "mask_ratio" in targets:
        _check(
            bool(masked_phases(base)),
            "params",
            "mask_ratio",
            f"the recipe {spec.recipe!r} has no masked phase (every phase name contains "
            f"{FINETUNE_MARK!r}) for the mask_ratio knob",
        )
    if spec.budget_split is not None:
        _check(
            len(spec.budget_split) == len(base.phases),
            "budget_split",
            spec.budget_split,
            f"expected one share per phase of the recipe: {[p.name for p in base.phases]}",
        )
    if spec.phase_rung:
        _check(
            bool(phase_rung_phases(base)),
            "phase_rung",
            True,
            "the recipe has no masked phase followed by a finetune phase to judge trials at",
        )
    for p in spec.params:
        if p.target is None:
            continue
        grid = p.grid_values()
        probes = [p.low, p.high] if grid is None else [grid[0], grid[-1]]
        if p.type == "categorical":
            probes = list(p.choices or [])
        elif p.type == "bool":
            probes = [False, True]
        if p.default is not None:
            probes.append(p.default)
        for value in probes:
            try:
                overrides = [*spec.base_overrides, *_eval_overrides(spec)]
                compose_run(spec.recipe, [*overrides, *_target_overrides({p.target: value}, base)])
            except ConfigError as err:
                raise ConfigError(
                    f"params[{p.name}]: {p.target}={value!r} does not compose with the recipe "
                    f"{spec.recipe!r}: {err}"
                ) from None


# ------------------------------------------------------------------------------------------------
# From sampled params to a trial's run configuration.
# ------------------------------------------------------------------------------------------------


def _eval_overrides(spec: SweepSpec) -> list[str]:
    return [f"eval.{k}={_yaml_value(v)}" for k, v in spec.eval.items()]


def base_config(spec: SweepSpec) -> RunConfig:
    """The trial recipe with the base overrides and eval settings: a trial before its params."""
    return compose_run(spec.recipe, base_overrides(spec))


def masked_phases(cfg: RunConfig) -> list[int]:
    """Indices of the masked phases: each phase whose name does not contain 'finetune'."""
    return [i for i, p in enumerate(cfg.phases) if FINETUNE_MARK not in p.name.lower()]


def phase_rung_phases(cfg: RunConfig) -> list[str]:
    """Names of the masked phases directly followed by a finetune phase: the phase rung judges a
    trial at their end, before its finetuning is paid for."""
    masked = set(masked_phases(cfg))
    return [
        cfg.phases[i].name
        for i in range(len(cfg.phases) - 1)
        if i in masked and i + 1 not in masked
    ]


def _yaml_value(v: Any) -> str:
    """`v` in YAML flow syntax, read back exactly by the yaml.safe_load of compose_run."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        x = float(v)
        if math.isnan(x):
            return ".nan"
        if math.isinf(x):
            return ".inf" if x > 0 else "-.inf"
        mantissa, e, exponent = repr(x).partition("e")  # YAML 1.1 floats need a dot: 1.0e-05
        return (mantissa if "." in mantissa else mantissa + ".0") + e + exponent
    if isinstance(v, str):
        return json.dumps(v)  # a double-quoted YAML scalar
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"value {v!r} of type {type(v).__name__} cannot be written as an override")


def _target_overrides(values: dict[str, Any], base: RunConfig) -> list[str]:
    """key=value overrides setting each target (a RunConfig key or a derived knob) to its value."""
    model = model_config(base)
    out = [f"{t}={_yaml_value(v)}" for t, v in values.items() if t not in DERIVED_TARGETS]
    knobs = {t: v for t, v in values.items() if t in DERIVED_TARGETS}
    if "mask_ratio" in knobs:
        ratio = _yaml_value(knobs["mask_ratio"])
        out += [f"phases.{i}.mask_ratio={ratio}" for i in masked_phases(base)]
    if "experts" in knobs:
        out.append(f"model.num_experts={_yaml_value(knobs['experts'])}")
    if "seed_offset" in knobs:
        out.append(f"seed={int(base.seed) + int(knobs['seed_offset'])}")
    if "width" in knobs:
        width = knobs["width"]
        out.append(f"model.dim={_yaml_value(width)}")
        if model.mixer_depth:
            mixer = round_up(model.mixer_dim * width / model.dim, model.head_dim)
            out.append(f"model.mixer_dim={mixer}")
    if "attn_ratio_first" in knobs:
        pair = [knobs["attn_ratio_first"], model.attn_ratio[1]]
        out.append(f"model.attn_ratio={_yaml_value(pair)}")
    if "ffn_ratio_first" in knobs:
        pair = [knobs["ffn_ratio_first"], model.ffn_ratio[1]]
        out.append(f"model.ffn_ratio={_yaml_value(pair)}")
    if any(k in knobs for k in _ROUTE_KNOBS):
        # One route; knobs the sweep leaves alone come from the recipe's first route, or TREAD's
        # defaults: half the tokens skip every block but the first and the last.
        first = model.routes[0] if model.routes else None
        start = knobs.get("route_start", first.start if first else min(1, model.depth - 1))
        end = knobs.get("route_end", first.end if first else max(start + 1, model.depth - 1))
        ratio = knobs.get("route_ratio", first.ratio if first else 0.5)
        route = {"start": int(start), "end": int(end), "ratio": float(ratio)}
        out.append(f"model.routes={_yaml_value([route] if ratio > 0 else [])}")
    return out


def param_overrides(
    spec: SweepSpec, params: dict[str, Any], base: RunConfig | dict[str, Any] | None = None
) -> list[str]:
    """The key=value overrides that set each param's target (inactive params set their default,
    if any), to apply after the base overrides and eval settings. `base` is `base_config(spec)`
    (or its dict) when the caller already has it."""
    if base is None:
        base = base_config(spec)
    elif isinstance(base, dict):
        base = run_config_from_dict(base)
    names = [p.name for p in spec.params]
    unknown = sorted(set(params) - set(names))
    _check(not unknown, "params", unknown, f"the sweep's params are {', '.join(names)}")
    values: dict[str, Any] = {}
    for p in spec.params:
        if p.active(params):
            _check(p.name in params, "params", sorted(params), f"missing a value for {p.name!r}")
            value = params[p.name]
        elif p.default is not None:
            value = p.default
        else:
            continue
        if p.target is not None:
            values[p.target] = value  # a later param with the same target wins
    return _target_overrides(values, base)


def base_overrides(spec: SweepSpec) -> list[str]:
    """What every trial of the sweep applies to its recipe first: base overrides, eval settings."""
    return [*spec.base_overrides, *_eval_overrides(spec)]


def trial_overrides(
    spec: SweepSpec,
    params: dict[str, Any],
    base: RunConfig | dict[str, Any] | None = None,
) -> list[str]:
    """The key=value overrides of one trial, for `compose_run(spec.recipe, overrides)`: the base
    overrides, the eval settings, then each param's target (`param_overrides`). Validated by
    composing; an invalid combination raises ConfigError."""
    overrides = [*base_overrides(spec), *param_overrides(spec, params, base)]
    compose_run(spec.recipe, overrides)
    return overrides


def trial_config(
    spec: SweepSpec, params: dict[str, Any], extra: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """The trial's composed RunConfig; `extra` overrides come last (name=..., data.path=...)."""
    return compose_run(spec.recipe, [*trial_overrides(spec, params), *extra])


def budget_steps(spec: SweepSpec, cfg: RunConfig, usd_per_step: list[float]) -> list[str]:
    """`phases.<i>.steps` overrides that make a trial spend trial_budget_usd B (fid_at_budget).

    usd_per_step[i] is the estimated $ of one optimizer step of phase i for this trial's config
    (the calibration's images/s and the cluster's price). With budget_split s:
    steps_i = floor(s_i B / usd_per_step_i); without, every phase of the recipe is scaled by one
    factor k = B / sum_j(steps_j usd_per_step_j), so the trial keeps the recipe's proportions.
    Warmup is scaled with its phase. The controller still stops the trial at B (the estimate
    can be off); this only makes the phases fit.
    """
    _check(spec.trial_budget_usd is not None, "trial_budget_usd", None, "budget_steps needs it")
    assert spec.trial_budget_usd is not None
    _check(
        len(usd_per_step) == len(cfg.phases) and all(u > 0 for u in usd_per_step),
        "usd_per_step",
        usd_per_step,
        f"expected a positive cost per step for each of the {len(cfg.phases)} phases",
    )
    budget = spec.trial_budget_usd
    if spec.budget_split is not None:
        steps = [int(s * budget / u) for s, u in zip(spec.budget_split, usd_per_step, strict=True)]
    else:
        k = budget / sum(p.steps * u for p, u in zip(cfg.phases, usd_per_step, strict=True))
        steps = [int(k * p.steps) for p in cfg.phases]
    out = []
    for i, (phase, n) in enumerate(zip(cfg.phases, steps, strict=True)):
        n = max(n, 1)
        out.append(f"phases.{i}.steps={n}")
        if phase.warmup_steps:
            warmup = min(n, round(phase.warmup_steps * n / phase.steps))
            out.append(f"phases.{i}.warmup_steps={warmup}")
    return out


# ------------------------------------------------------------------------------------------------
# Optuna: directions, sampler, suggestions.
# ------------------------------------------------------------------------------------------------


def study_directions(spec: SweepSpec) -> list[str]:
    """Directions for `optuna.create_study(directions=...)`: see budget_lab.sweep.objectives."""
    return directions(spec)


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the trial's params in the spec's order (a param whose `when` is false is skipped).
    The returned dict equals `trial.params`, which `trial_overrides` turns into a run config."""
    values: dict[str, Any] = {}
    for p in spec.params:
        if not p.active(values):
            continue
        if p.type == "float":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        elif p.type == "bool":
            values[p.name] = trial.suggest_categorical(p.name, [False, True])
        else:
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices or []))
    return values


def grid_search_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """{param: the values the grid sampler visits}."""
    space = {p.name: p.grid_values() for p in spec.params}
    missing = [k for k, v in space.items() if v is None]
    _check(not missing, "params", missing, "the grid sampler needs `grid` values or a `step`")
    return space  # type: ignore[return-value]


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its `study.stop()` at the last grid point, which raises in an
    ask/tell loop (Optuna allows `stop` only inside `optimize`); the controller counts trials."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with spec.seed.

    grid: every combination of the params' grid values, in an order shuffled by the seed.
    tpe: multivariate TPE (grouped, for conditional params), random for its first
    min(10, max(3, n_trials // 4)) trials, with constant liar when slots > 1.
    nsga2: NSGA-II with `population` (default n_trials // 5 within [4, 50]).
    random: independent uniform samples.
    """
    n = spec.n_trials or 1
    with warnings.catch_warnings():  # multivariate TPE and constant liar are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "grid":
            return _AskTellGridSampler(grid_search_space(spec), seed=spec.seed)
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed)
        if spec.sampler == "nsga2":
            population = spec.population or min(50, max(4, n // 5))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=spec.seed)
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            n_startup_trials=min(10, max(3, n // 4)),
            multivariate=True,
            group=True,
            constant_liar=spec.slots > 1,
        )


# ------------------------------------------------------------------------------------------------
# Pruning in dollars.
# ------------------------------------------------------------------------------------------------


def resolve_rungs(spec: SweepSpec, trial_cost_usd: float | None = None) -> list[float]:
    """The spends ($) at which a trial's FID is judged: rungs_usd, or rung_fractions of
    trial_budget_usd, or of `trial_cost_usd` (the controller's estimate of the base trial's cost,
    one number per sweep so that every trial is judged at the same dollars)."""
    if spec.rungs_usd:
        return list(spec.rungs_usd)
    if not spec.rung_fractions:
        return []
    reference = spec.trial_budget_usd or trial_cost_usd
    if reference is None or not reference > 0:
        raise ValueError(
            "rung_fractions are fractions of a trial's spend: pass trial_cost_usd (the estimated "
            "cost of the base trial) when the sweep has no trial_budget_usd"
        )
    return [f * reference for f in spec.rung_fractions]


def report_fid(
    trial: optuna.Trial,
    fid: float,
    spent_usd: float,
    *,
    rung_usd: float | None = None,
    phase: str | None = None,
    se: float | None = None,
) -> None:
    """Record an intermediate FID of a running trial, judged by `should_prune` next.

    Exactly one of: `rung_usd`, the rung (one of `resolve_rungs(spec)`) the trial just passed,
    with the FID of its first checkpoint at or after that spend; `phase`, the name of the masked
    phase that just ended (one of `phase_rung_phases(cfg)`). `spent_usd` is what the trial had
    spent when that checkpoint was written; `se` the FID's standard error (its interval's
    noise). A non-finite FID is stored as null and judged worst.
    """
    _check(
        (rung_usd is None) != (phase is None),
        "report_fid",
        (rung_usd, phase),
        "give rung_usd or phase, not both",
    )
    entry = {
        "rung_usd": None if rung_usd is None else float(rung_usd),
        "phase": phase,
        "spent_usd": float(spent_usd),
        "fid": float(fid) if math.isfinite(fid) else None,
        "fid_se": None if se is None or not math.isfinite(se) else float(se),
    }
    trial.set_user_attr(FID_REPORTS_ATTR, [*trial.user_attrs.get(FID_REPORTS_ATTR, []), entry])


def fid_reports(trial: optuna.Trial | optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """A trial's intermediate FIDs in the order reported: {rung_usd, phase, spent_usd, fid}."""
    return list(trial.user_attrs.get(FID_REPORTS_ATTR, []))


def should_prune(trial: optuna.Trial) -> bool:
    """Ask the study's pruner about the trial's latest report (works in multi-objective studies,
    where Optuna's own `Trial.should_prune` refuses)."""
    study = trial.study
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    return study.pruner.prune(study, frozen)


class DollarRungPruner(optuna.pruners.BasePruner):
    """Cut a trial whose FID lags its peers' at the same spend by more than the noise.

    The trial is judged on its latest `report_fid`:
      * at a dollar rung, its peers are the other trials' FIDs at the same rung: every trial
        spent the same money there, so a lower FID is simply better;
      * at the end of masked phase P (phase_rung), its peers are the other trials' FIDs at the
        end of P that cost at most as much: a trial that reached the phase's end more cheaply
        (a higher mask ratio) is never cut for lagging trials that paid more.
    With F its FID, se its standard error, P the `percentile`-th percentile (50: the median) of
    the peers' FIDs and se_P the median of their standard errors, it is cut when at least
    `min_peers` peers exist and

        F - P > z * sqrt(se^2 + se_P^2),   z = the one-sided normal quantile of `confidence`

    i.e. only when it lags by more than the noise of the two FIDs (confidence 0.5: z = 0, any
    lag; reports without an se count as exact). Peers come from every other trial, running,
    finished, pruned or failed. A missing (non-finite) FID counts as the worst.
    """

    def __init__(
        self,
        percentile: float = 50.0,
        min_peers: int = 2,
        phase_rung: bool = True,
        confidence: float = 0.95,
    ):
        self.percentile = percentile
        self.min_peers = min_peers
        self.phase_rung = phase_rung
        self.confidence = confidence
        self.z = statistics.NormalDist().inv_cdf(confidence)  # one-sided

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        reports = fid_reports(trial)
        if not reports:
            return False
        last = reports[-1]
        if last["phase"] is not None and not self.phase_rung:
            return False
        peers: list[float] = []
        peer_ses: list[float] = []
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number:
                continue
            for r in fid_reports(other):
                same_rung = (
                    last["rung_usd"] is not None
                    and r["rung_usd"] is not None
                    and math.isclose(r["rung_usd"], last["rung_usd"], rel_tol=1e-9)
                )
                same_phase = (
                    last["phase"] is not None
                    and r["phase"] == last["phase"]
                    and r["spent_usd"] <= last["spent_usd"]
                )
                if same_rung or same_phase:
                    peers.append(math.inf if r["fid"] is None else r["fid"])
                    peer_ses.append(r.get("fid_se") or 0.0)
                    break
        if len(peers) < self.min_peers:
            return False
        fid = math.inf if last["fid"] is None else last["fid"]
        reference = _percentile(peers, self.percentile)
        if math.isinf(fid) or math.isinf(reference):
            return fid > reference
        noise = math.hypot(last.get("fid_se") or 0.0, statistics.median(peer_ses))
        return fid - reference > max(self.z * noise, 0.0)


def _percentile(values: list[float], q: float) -> float:
    """numpy.percentile's linear interpolation, but exact with infinite values (numpy: nan)."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if v[lo] == v[hi]:
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """NopPruner for pruner none; DollarRungPruner with the spec's settings for dollar_rungs."""
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return DollarRungPruner(
        spec.prune_percentile, spec.prune_min_peers, spec.phase_rung, spec.prune_confidence
    )
