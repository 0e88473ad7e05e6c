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
import io
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

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
from budget_lab.io import read_text, yaml_load, yaml_problem
from model.config import MicroDiTConfig, ModelConfigError, get_preset
from model.edm import EDMConfig

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
_SCHEMA = "_budget_lab_run_schema"  # RunConfig, stored in Hydra's ConfigStore
_PRIMARY = "_budget_lab_run"  # schema < recipe: the config Hydra composes
_FILE_RECIPE = "_budget_lab_recipe_file"  # a recipe given as a path, stored under recipes/
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
            node = _hydra_compose(path, dirs)
            if len(_RECIPE_NODES) >= 16:  # old versions of the files, or many recipes
                _RECIPE_NODES.clear()
            _RECIPE_NODES[key] = node
    return node


def _hydra_compose(path: Path, dirs: list[Path]) -> DictConfig:
    recipe_node = _load_recipe(path)  # clear errors for the file the user named
    # A file of the searched folders is composed by name (its defaults list resolves beside it);
    # any other file is stored under recipes/ for the composition.
    try:
        in_group = find_config(_GROUP, path.stem).resolve() == path.resolve()
    except ConfigError:
        in_group = False
    store = ConfigStore.instance()
    store.store(name=_SCHEMA, node=_schema())
    if in_group:
        choice = path.stem
    else:
        store.store(group=_GROUP, name=_FILE_RECIPE, node=recipe_node)
        choice = _FILE_RECIPE
    roots = [d.parent.resolve() for d in dirs] or [PROJECT_DIR]
    store.store(
        name=_PRIMARY,
        node={
            "defaults": [_SCHEMA, {f"{_GROUP}@_global_": choice}, "_self_"],
            # Searched after the main folder, the user's (when it exists) being the main one.
            "hydra": {"searchpath": [f"file://{r}" for r in roots[1:]]},
        },
    )
    try:
        with initialize_config_dir(config_dir=str(roots[0]), version_base=None):
            return compose(config_name=_PRIMARY)
    except MissingConfigException as err:
        # A defaults list names a recipe that is not there.
        text = str(err).split("\n")[0].strip()
        raise ConfigError(
            f"{path}: {text} A defaults list names recipes of {', '.join(map(str, dirs))}: "
            f"{', '.join(list_recipes())}"
        ) from None
    except HydraException as err:
        text = " ".join(s.strip() for s in str(err).splitlines() if s.strip())
        raise ConfigError(f"{path}: {text}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_omegaconf_message(err)}") from None


def _schema() -> DictConfig:
    """RunConfig as a Hydra schema: typed keys, except `model` and `edm`, open mappings of
    MicroDiTConfig / EDMConfig fields that a recipe sets only where it differs from the preset
    (`model.mixer_depth=2` sets one; model_config/edm_config validate them)."""
    node = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(node.model, False)
    OmegaConf.set_struct(node.edm, False)
    return node


def _load_recipe(path: Path) -> DictConfig:
    """The recipe file as an OmegaConf node; a file that is not UTF-8 text, not YAML or not a
    mapping is a ConfigError naming it."""
    text = read_text(path, "recipe")
    try:
        data = yaml_load(text)  # to say what is wrong before OmegaConf reads it
        loaded = OmegaConf.load(io.StringIO(text))  # OmegaConf's YAML: 1e-4 is a float
    except yaml.YAMLError as err:
        raise ConfigError(
            f"the recipe {path} is not valid YAML: {yaml_problem(err)}. Fix it (compare with "
            f"{RECIPES_DIR / 'nano.yaml'})"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"the recipe {path} must hold a mapping of config keys (model:, phases:, data:, ...; "
            f"see {RECIPES_DIR / 'nano.yaml'}), not a {type(data).__name__}"
        )
    assert isinstance(loaded, DictConfig)
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's override grammar, checked against the schema before composing: an unknown key
    lists the valid ones; `+key` on a key that exists says to drop the `+`."""
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value: {_OVERRIDE_HELP}")
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(
            f"override {err.override!r} is not valid: {_parse_problem(err.message)}; "
            f"{_OVERRIDE_HELP}. Quote a "
            "value with spaces or commas: name='a b'"
        ) from None
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override():
            raise ConfigError(
                f"override {o.input_line!r} sweeps over several values; a run takes one: write "
                f"a list as {key}=[a,b], a string with commas quoted as {key}='a,b'"
            )
        if o.package is not None:
            raise ConfigError(f"override {o.input_line!r}: @package is not supported here")
        known = _key_exists(key)  # raises for an unknown key of the schema
        if o.is_add() and known:
            raise ConfigError(
                f"override {o.input_line!r}: {key} is already a config key (+ adds a key the "
                f"config does not have); write {o.input_line[1:]}"
            )
    return parsed


def _apply(node: DictConfig, overrides: Sequence[str], path: Path) -> DictConfig:
    """Apply overrides (Hydra's grammar, parsed by Hydra) to a composed node, in place, with
    Hydra's meanings: `key=value` sets, `+key=value` / `++key=value` add, `~key` deletes."""
    for o in _parse_overrides(overrides):
        key, line = o.key_or_group, o.input_line
        m = re.match(r"phases\.(\d+)(\.|$)", key)
        if m and int(m.group(1)) >= len(node.phases):
            raise ConfigError(
                f"override {line!r}: the recipe has {len(node.phases)} phase(s), "
                f"numbered 0..{len(node.phases) - 1}"
            )
        try:
            if o.is_delete():
                if OmegaConf.select(node, key, default=None) is None:
                    raise ConfigError(
                        f"override {line!r}: {path} does not set {key} (~ deletes a key the "
                        "recipe sets; a model or edm field then takes the preset's value)"
                    )
                parent, _, leaf = key.rpartition(".")
                with open_dict(node):
                    del (OmegaConf.select(node, parent) if parent else node)[leaf]
            else:
                add = o.is_add() or o.is_force_add()
                OmegaConf.update(node, key, o.value(), merge=True, force_add=add)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_omegaconf_message(err)} (override {line!r})") from None
    return node


def _parse_problem(message: str) -> str:
    """Hydra's parse error without its first line (the override again) and its docs link."""
    lines = [s.strip() for s in message.splitlines()[1:] if s.strip()]
    return " ".join(s for s in lines if not s.startswith("See https")) or message.strip()


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
