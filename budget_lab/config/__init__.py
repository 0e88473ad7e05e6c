"""Compose a run's configuration with Hydra: recipe YAML < CLI overrides, validated into typed
dataclasses.

    cfg = compose_run("nano", ["phases.0.steps=100", "model.num_experts=0"])

Recipes form Hydra's config group `recipes`: a name is looked up in the user's config folder
(`$BUDGET_LAB_CONFIG_DIR/recipes/`, else `<workspace>/configs/recipes/`) first, then the project's
`recipes/` folder; a path to a YAML file works too (`budget_lab.config_files`). A recipe may extend
others through a defaults list, later entries winning, the recipe's own keys last:

    defaults: [nano, _self_]
    name: nano-dense
    model: {num_experts: 0}

Overrides use Hydra's grammar: `key=value` sets a key (phases.0.lr=3e-4, model.attn_ratio=[0.5,1]),
`+key=value` adds a key the config does not have, `~key` deletes one the recipe sets (a model or
edm field goes back to the preset's value, a typed key to its default). Every key of the schema (`RunConfig`) and every model/edm field exists,
so `+` is for nothing of budget-lab's own. The result is validated into `RunConfig`; every run
writes it into its run folder (`config.yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from budget_lab.config.compose import FileKind, apply_overrides, compose_file, parse_overrides
from budget_lab.config.schema import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    OptimConfig,
    PhaseConfig,
    RunConfig,
    WandbConfig,
)
from budget_lab.config_files import PROJECT_DIR, config_dirs, find_config, list_configs
from budget_lab.errors import ConfigError
from model.config import EDMConfig, MicroDiTConfig, ModelConfigError, get_preset

__all__ = [
    "RunConfig",
    "PhaseConfig",
    "OptimConfig",
    "DataConfig",
    "EvalConfig",
    "CheckpointConfig",
    "WandbConfig",
    "DistributedConfig",
    "RECIPES_DIR",
    "list_recipes",
    "recipe_path",
    "compose_run",
    "RecipeBase",
    "run_config_from_dict",
    "run_config_to_dict",
    "model_config",
    "edm_config",
]

#: Recipes shipped with the project (one YAML per recipe).
RECIPES_DIR = PROJECT_DIR / "recipes"
_GROUP = "recipes"
_RECIPE = FileKind(
    _GROUP,
    "recipe",
    f"config keys (model:, phases:, data:, ...; see {RECIPES_DIR / 'nano.yaml'})",
    f"compare with {RECIPES_DIR / 'nano.yaml'}",
)
_OVERRIDE_HELP = (
    "write key=value (e.g. phases.0.steps=100), +key=value to add a key, ~key to delete one"
)


def list_recipes() -> list[str]:
    """Recipe names: the user's config folder and the project's recipes/."""
    return list_configs(_GROUP)


def recipe_path(recipe: str | Path) -> Path:
    """A recipe name (user config folder, then recipes/) or a path to a YAML file."""
    return find_config(_GROUP, recipe)


def compose_run(recipe: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose a recipe (and what its defaults list extends) with overrides in Hydra's grammar,
    and validate the result into a RunConfig."""
    return RecipeBase(recipe).compose(overrides)


class RecipeBase:
    """A recipe with a first set of overrides, to compose many runs from: a sweep's trials share
    the recipe, its base overrides and its eval settings, and differ in a few keys.
    `compose(overrides)` equals `compose_run(recipe, [*base_overrides, *overrides])`."""

    def __init__(self, recipe: str | Path, overrides: Sequence[str] = ()):
        self.path = recipe_path(recipe)
        self._node = _apply(copy.deepcopy(_recipe_node(self.path)), overrides, self.path)

    def compose(self, overrides: Sequence[str] = ()) -> RunConfig:
        return _to_run_config(_apply(copy.deepcopy(self._node), overrides, self.path))


# ------------------------------------------------------------------------------------------------
# Composition: Hydra composes the recipe over its search path and defaults list onto the schema;
# the overrides, in Hydra's grammar, are applied to a copy.
# ------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()  # Hydra's ConfigStore and GlobalHydra are process-wide
_RECIPE_NODES: dict[tuple[Any, ...], DictConfig] = {}


def _recipe_node(path: Path) -> DictConfig:
    """The recipe at `path` composed by Hydra onto the RunConfig schema, kept per version of the
    recipe files (a compose takes ~50 ms, a copy ~2 ms; a sweep composes one config per trial)."""
    dirs = config_dirs(_GROUP)
    files = [path, *(f for d in dirs for f in sorted(d.glob("*.yaml")))]
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    with _LOCK:
        node = _RECIPE_NODES.get(key)
        if node is None:
            node = compose_file(path, _RECIPE, _schema())
            if len(_RECIPE_NODES) >= 16:  # old versions of the files, or many recipes
                _RECIPE_NODES.clear()
            _RECIPE_NODES[key] = node
    return node


def _schema() -> DictConfig:
    """RunConfig as a Hydra schema: typed keys, except `model` and `edm`, open mappings of
    MicroDiTConfig / EDMConfig fields that a recipe sets only where it differs from the preset
    (`model.mixer_depth=2` sets one; model_config/edm_config validate them)."""
    node = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(node.model, False)
    OmegaConf.set_struct(node.edm, False)
    return node


def _apply(node: DictConfig, overrides: Sequence[str], path: Path) -> DictConfig:
    """Apply overrides in Hydra's grammar to a composed recipe, in place (`apply_overrides`); a
    phase index past the recipe's phases is named as such."""
    parsed = parse_overrides(overrides, _key_exists, _OVERRIDE_HELP)
    for o in parsed:
        m = re.match(r"phases\.(\d+)(\.|$)", o.key_or_group)
        if m and int(m.group(1)) >= len(node.phases):
            raise ConfigError(
                f"override {o.input_line!r}: the recipe has {len(node.phases)} phase(s), "
                f"numbered 0..{len(node.phases) - 1}"
            )
    return apply_overrides(
        node,
        parsed,
        path,
        "a model or edm field then takes the preset's value, a typed key its default",
        _omegaconf_message,
    )


def _key_exists(key: str) -> bool:
    """Whether `key` (e.g. "optim.lr", "phases.0.steps", "model.mixer_depth") is a key of the
    schema or a model/edm field. An unknown key of a typed section is a ConfigError listing the
    valid ones; keys inside model/edm that are not fields are left to model_config/edm_config."""
    node: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        if node is PhaseConfig and parent == "phases" and part.isdigit():
            continue  # phases.<i>: one phase
        if node in (MicroDiTConfig, EDMConfig):
            return i == len(parts) - 1 and part in {f.name for f in dataclasses.fields(node)}
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = f" under {parent}" if parent else ""
            raise ConfigError(f"unknown config key {key!r}; valid keys{where}: {', '.join(fields)}")
        node = {"phases": PhaseConfig, "model": MicroDiTConfig, "edm": EDMConfig}.get(part)
        if node is None:
            default = fields[part].default_factory  # a nested section (optim, data, ...)
            node = type(default()) if default is not dataclasses.MISSING else None
            if node is None or not dataclasses.is_dataclass(node):
                return i == len(parts) - 1
    return True


def _to_run_config(node: Any) -> RunConfig:
    try:
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    assert isinstance(cfg, RunConfig)
    # Validate the model and EDM sections now, not at the first step.
    model_config(cfg)
    edm_config(cfg)
    return cfg


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    if "Key '" in msg and "not in" in msg and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(parent)
        return (
            f"unknown config key {key!r}; valid keys{' under ' + parent if parent else ''}: {valid}"
        )
    return f"invalid config{f' at {key!r}' if key else ''}: {msg}"


def _valid_keys(parent: str) -> str:
    """The field names of the config section at `parent` (e.g. "optim", "phases[0]")."""
    node: Any = RunConfig
    for part in (p for p in re.split(r"[.\[\]]", parent) if p and not p.isdigit()):
        if part == "phases":
            node = PhaseConfig
            continue
        f = {f.name: f for f in dataclasses.fields(node)}.get(part)
        default = (
            f.default_factory() if f and f.default_factory is not dataclasses.MISSING else None
        )
        if not dataclasses.is_dataclass(default):
            return "(any)"
        node = type(default)
    return ", ".join(f.name for f in dataclasses.fields(node))


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    try:
        node = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(d))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    return _to_run_config(node)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain YAML/JSON data (dicts, lists, scalars): what config.yaml holds."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_config(cfg: RunConfig) -> MicroDiTConfig:
    fields = dict(cfg.model)
    preset = fields.pop("preset")
    try:
        return get_preset(str(preset), **fields)
    except ModelConfigError as err:
        raise ConfigError(str(err)) from None


def edm_config(cfg: RunConfig) -> EDMConfig:
    names = {f.name for f in dataclasses.fields(EDMConfig)}
    unknown = sorted(set(cfg.edm) - names)
    if unknown:
        raise ConfigError(f"unknown edm field(s) {unknown}; valid: {', '.join(sorted(names))}")
    try:
        return EDMConfig(**cfg.edm)
    except ModelConfigError as err:
        raise ConfigError(str(err)) from None
