"""Hydra's compose API over budget-lab's three config groups: recipes, clusters and sweeps.

Each group is a folder of `<name>.yaml` files searched in order (`budget_lab.config_files`: the
user's config folder, then the project's `recipes/`, `clusters/`, `sweeps/`). A file may extend
others of its group through a defaults list, later entries winning, its own keys last:

    defaults: [aws-p5, _self_]      # clusters/aws-p5-spot.yaml
    price: {kind: spot}

`compose_file` composes one file (a name found in the group, or any path) with Hydra, optionally
onto a typed schema; `parse_overrides` and `apply_overrides` give the command line Hydra's
override grammar (`key=value`, `+key=value`, `~key`) with the key checked against the group's
typed dataclasses first, so that a typo lists the valid keys. Validation into the typed configs
stays with each group (`budget_lab.config`, `budget_lab.launch.cluster`, `budget_lab.sweep.spec`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

from budget_lab.config_files import PROJECT_DIR, config_dirs, find_config, list_configs
from budget_lab.errors import ConfigError
from budget_lab.io import read_text, yaml_problem

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# Hydra itself is imported where it is used: its import (~0.2 s) is paid only when a file extends
# another (a defaults list), a schema is composed or an override is given, so that listing the
# clusters with their prices starts in well under half a second.

__all__ = [
    "FileKind",
    "load_file",
    "compose_file",
    "parse_overrides",
    "apply_overrides",
    "omegaconf_message",
]

_LOCK = threading.Lock()  # Hydra's ConfigStore and GlobalHydra are process-wide
_PRIMARY = "_budget_lab_{kind}"  # [schema <] file: the config Hydra composes
_SCHEMA = "_budget_lab_{kind}_schema"
_FILE = "_budget_lab_{kind}_file"  # a file given as a path, stored in its group for the compose


class FileKind:
    """One config group: its folder name and how its files are described in error messages."""

    def __init__(self, group: str, what: str, keys: str, fix: str):
        self.group = group  # "recipes", "clusters", "sweeps"
        self.what = what  # "recipe", "cluster file", "sweep"
        self.keys = keys  # what a file holds: "config keys (model:, phases:, data:, ...)"
        self.fix = fix  # where to compare: "compare with recipes/nano.yaml"


def _yaml_loader() -> type:
    """OmegaConf's YAML rules (1e-4 is a float, a date stays text, a duplicate key is an error)
    on libyaml's parser when PyYAML has it: `OmegaConf.load` parses in pure Python, ~25 ms a
    file, and `clusters list` reads every cluster."""
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
            keys = set()
            for key_node, _ in node.value:
                if key_node.tag != yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
                    continue
                if key_node.value in keys:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value}",
                        key_node.start_mark,
                    )
                keys.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = get_yaml_loader().yaml_implicit_resolvers
    return Loader


_LOADER = _yaml_loader()


def load_file(path: Path, kind: FileKind) -> DictConfig:
    """The file as an OmegaConf node (what `OmegaConf.load` gives); a file that is not UTF-8
    text, not YAML or not a mapping is a ConfigError naming it."""
    text = read_text(path, kind.what)
    try:
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ConfigError(
            f"the {kind.what} {path} is not valid YAML: {yaml_problem(err)}. Fix it ({kind.fix})"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"the {kind.what} {path} must hold a mapping of {kind.keys}, not a "
            f"{type(data).__name__}"
        )
    return OmegaConf.create(data or {})


def compose_file(
    path: Path, kind: FileKind, schema: Any = None, loaded: DictConfig | None = None
) -> DictConfig:
    """Compose the file at `path` (and what its defaults list extends) with Hydra, onto `schema`
    (a structured node) when given. A name of the group's folders resolves beside it; any other
    file is composed as if it were in the group. `loaded`: the file's `load_file`, if read."""
    node = load_file(path, kind) if loaded is None else loaded  # clear errors for the user's file
    if schema is None and "defaults" not in node:
        return copy.deepcopy(node)  # extends nothing: the file is its own composition
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException, MissingConfigException

    dirs = config_dirs(kind.group)
    try:
        in_group = find_config(kind.group, path.stem).resolve() == path.resolve()
    except ConfigError:
        in_group = False
    roots = [d.parent.resolve() for d in dirs] or [PROJECT_DIR]
    with _LOCK:
        store = ConfigStore.instance()
        defaults: list[Any] = []
        if schema is not None:
            store.store(name=_SCHEMA.format(kind=kind.group), node=schema)
            defaults.append(_SCHEMA.format(kind=kind.group))
        choice = path.stem
        if not in_group:
            choice = _FILE.format(kind=kind.group)
            store.store(group=kind.group, name=choice, node=node)
        store.store(
            name=_PRIMARY.format(kind=kind.group),
            node={
                "defaults": [*defaults, {f"{kind.group}@_global_": choice}, "_self_"],
                # Searched after the main folder, the user's (when it exists) being the main one.
                "hydra": {"searchpath": [f"file://{r}" for r in roots[1:]]},
            },
        )
        try:
            with initialize_config_dir(config_dir=str(roots[0]), version_base=None):
                return compose(config_name=_PRIMARY.format(kind=kind.group))
        except MissingConfigException as err:  # a defaults list names a file that is not there
            text = str(err).split("\n")[0].strip()
            raise ConfigError(
                f"{path}: {text} A defaults list names {kind.group} of "
                f"{', '.join(map(str, dirs))}: {', '.join(list_configs(kind.group))}"
            ) from None
        except HydraException as err:
            text = " ".join(s.strip() for s in str(err).splitlines() if s.strip())
            raise ConfigError(f"{path}: {text}") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {omegaconf_message(err)}") from None


def compose_named(path: Path, kind: FileKind) -> DictConfig:
    """A cluster or a sweep file composed (`compose_file`, no schema), open to keys its file does
    not set (the group checks keys against its own dataclasses), and named by its own `name:`
    or its file's name, never by a file it extends (each cluster and sweep is its own)."""
    own = load_file(path, kind)
    node = compose_file(path, kind, loaded=own)
    OmegaConf.set_struct(node, False)
    node.name = own.get("name") or path.stem
    return node


def parse_overrides(
    overrides: Sequence[str],
    key_exists: Callable[[str], bool],
    usage: str,
    where: Path | str | None = None,
) -> list[Override]:
    """Hydra's override grammar, checked before anything is applied: not key=value, a sweep
    (`a=1,2`), or `+key` on a key that exists are ConfigErrors (naming `where`, the file, when
    given); `key_exists(key)` raises for a key that cannot exist (with the valid ones) and says
    whether it is a key of the schema."""
    if not overrides:
        return []
    if where is not None:
        try:
            return parse_overrides(overrides, key_exists, usage)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value: {usage}")
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(
            f"override {err.override!r} is not valid: {_parse_problem(err.message)}; {usage}. "
            "Quote a value with spaces or commas: name='a b'"
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
        if o.is_add() and key_exists(key):
            raise ConfigError(
                f"override {o.input_line!r}: {key} is already a config key (+ adds a key the "
                f"config does not have); write {o.input_line[1:]}"
            )
        if not o.is_add() and not o.is_force_add() and not o.is_delete():
            key_exists(key)  # an unknown key of a typed section lists the valid ones
    return parsed


def apply_overrides(
    node: DictConfig,
    parsed: Sequence[Override],
    where: Path | str,
    deleted_means: str,
    explain: Callable[[OmegaConfBaseException], str] | None = None,
) -> DictConfig:
    """Apply parsed overrides to a composed node, in place, with Hydra's meanings: `key=value`
    sets (a section the file leaves null starts empty), `+key=value` / `++key=value` add, `~key`
    deletes a key the file sets (`deleted_means` says what the key then is)."""
    explain = explain or omegaconf_message
    for o in parsed:
        key, line = o.key_or_group, o.input_line
        try:
            if o.is_delete():
                if OmegaConf.select(node, key, default=None) is None:
                    raise ConfigError(
                        f"override {line!r}: {where} does not set {key} (~ deletes a key the "
                        f"file sets; {deleted_means})"
                    )
                parent, _, leaf = key.rpartition(".")
                with open_dict(node):
                    del (OmegaConf.select(node, parent) if parent else node)[leaf]
                continue
            section = key.rpartition(".")[0]
            if section and OmegaConf.select(node, section, default=None) is None:
                with open_dict(node):  # e.g. `slurm:` left null in a cluster file
                    OmegaConf.update(node, section, {}, merge=False, force_add=True)
            add = o.is_add() or o.is_force_add()
            OmegaConf.update(node, key, o.value(), merge=True, force_add=add)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {explain(err)} (override {line!r})") from None
    return node


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """An OmegaConf error in one line, with the key it is about."""
    key = getattr(err, "full_key", None)
    return f"invalid config{f' at {key!r}' if key else ''}: {str(err).splitlines()[0]}"


def _parse_problem(message: str) -> str:
    """Hydra's parse error without its first line (the override again) and its docs link."""
    lines = [s.strip() for s in message.splitlines()[1:] if s.strip()]
    return " ".join(s for s in lines if not s.startswith("See https")) or message.strip()
