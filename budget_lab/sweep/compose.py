"""From a sweep's sampled params to a trial's run configuration.

A param targets a RunConfig key (`model.mixer_depth`, `phases.0.lr`) or a derived knob
(`DERIVED_TARGETS`: mask_ratio, width, routes, ...) that sets several keys. A trial's config is
its recipe, then the sweep's base overrides and eval settings (`base_overrides`), then each
param's target (`param_overrides`), composed and validated by `compose_run`:

    cfg = trial_config(spec, {"mask_ratio": 0.75}, [f"name={run}"])
    trials = TrialComposer(spec)                    # the same, the recipe composed once
    cfg = trials.compose({"mask_ratio": 0.75})

`budget_steps` sizes a fid_at_budget trial's phases to spend its budget; `check_against_recipe`
(run by `load_sweep`) proves that every param's extreme values compose with the recipe.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import TYPE_CHECKING, Any

from budget_lab.config import (
    RecipeBase,
    RunConfig,
    compose_run,
    model_config,
    recipe_path,
    run_config_from_dict,
)
from budget_lab.errors import ConfigError, check
from model.config import round_up

if TYPE_CHECKING:  # for annotations only: spec.py imports this module (load_sweep checks a
    # sweep against its recipe), so the types cannot be imported back at run time
    from budget_lab.sweep.spec import SweepSpec

__all__ = [
    "FINETUNE_MARK",
    "DERIVED_TARGETS",
    "TrialComposer",
    "base_config",
    "base_overrides",
    "masked_phases",
    "phase_rung_phases",
    "param_overrides",
    "trial_overrides",
    "trial_config",
    "budget_steps",
    "check_against_recipe",
]

#: A phase is a finetune phase when its name contains this; every other phase is "masked".
FINETUNE_MARK = "finetune"

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

_ROUTE_KNOBS = ("route_ratio", "route_start", "route_end")


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
    check(not unknown, "params", unknown, f"the sweep's params are {', '.join(names)}")
    values: dict[str, Any] = {}
    for p in spec.params:
        if p.active(params):
            check(p.name in params, "params", sorted(params), f"missing a value for {p.name!r}")
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
    check(spec.trial_budget_usd is not None, "trial_budget_usd", None, "budget_steps needs it")
    assert spec.trial_budget_usd is not None
    check(
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


class TrialComposer:
    """The trials of one sweep: its recipe with the base overrides and eval settings composed
    once, then each trial's param targets, the command line's `overrides` and `extra`.
    `compose(params, extra)` equals `trial_config(spec, params, [*overrides, *extra])`."""

    def __init__(self, spec: SweepSpec, overrides: list[str] | tuple[str, ...] = ()):
        self.spec = spec
        self.overrides = list(overrides)  # the command line's, after every trial's params
        self._recipe = RecipeBase(spec.recipe, base_overrides(spec))
        self.base = self._recipe.compose()  # a trial before its params (`base_config(spec)`)

    def compose(self, params: dict[str, Any], extra: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """The trial's RunConfig; composing validates it (an invalid one raises ConfigError)."""
        targets = param_overrides(self.spec, params, self.base)
        return self._recipe.compose([*targets, *self.overrides, *extra])

    def without_params(self) -> RunConfig:
        """The base config with the command line's overrides and no params (the trials' data)."""
        return self._recipe.compose(self.overrides)


# ------------------------------------------------------------------------------------------------
# Checking a sweep against its recipe.
# ------------------------------------------------------------------------------------------------


def check_against_recipe(spec: SweepSpec) -> None:
    """What needs the recipe: it composes with the base overrides, the phases fit the knobs, and
    every param's lowest and highest value (every choice) composes on its own."""
    recipe_path(spec.recipe)
    base = base_config(spec)
    targets = {p.target for p in spec.params}
    if "mask_ratio" in targets:
        check(
            bool(masked_phases(base)),
            "params",
            "mask_ratio",
            f"the recipe {spec.recipe!r} has no masked phase (every phase name contains "
            f"{FINETUNE_MARK!r}) for the mask_ratio knob",
        )
    if spec.budget_split is not None:
        check(
            len(spec.budget_split) == len(base.phases),
            "budget_split",
            spec.budget_split,
            f"expected one share per phase of the recipe: {[p.name for p in base.phases]}",
        )
    if spec.phase_rung:
        check(
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
