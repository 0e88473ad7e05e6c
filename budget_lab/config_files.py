"""Where config files are: a name in a folder of YAML files, or a path. One lookup for recipes,
clusters and sweeps.

    find_config("recipes", "nano")        # <user config folder>/recipes/nano.yaml, else recipes/
    find_config("clusters", "./my.yaml")  # a path: used as given

Each kind is a folder of `<name>.yaml` files, searched in order: the user's config folder first
(`$BUDGET_LAB_CONFIG_DIR`, else `<workspace>/configs`), then the project's top-level folder
(`recipes/`, `clusters/`, `sweeps/`). A name found in both is the user's.

This module reads no YAML and imports neither OmegaConf nor Hydra, so the command line can list
names for its help text without paying for them.
"""

from __future__ import annotations

import os
from pathlib import Path

from budget_lab.errors import ConfigError
from budget_lab.workspace import Workspace

__all__ = [
    "ENV_VAR",
    "KINDS",
    "PROJECT_DIR",
    "user_config_dir",
    "config_dirs",
    "list_configs",
    "find_config",
]

#: The environment variable naming the user's config folder (its recipes/, clusters/, sweeps/).
ENV_VAR = "BUDGET_LAB_CONFIG_DIR"
#: The project checkout, whose top-level recipes/, clusters/ and sweeps/ ship with budget-lab.
PROJECT_DIR = Path(__file__).resolve().parents[1]
#: The kinds of config file: each is a folder of that name.
KINDS = ("recipes", "clusters", "sweeps")


def user_config_dir() -> Path:
    """The user's config folder: $BUDGET_LAB_CONFIG_DIR, else the workspace's `configs/`."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().resolve()
    return Workspace.from_args().root / "configs"


def config_dirs(kind: str) -> list[Path]:
    """The folders searched for a `kind` ("recipes", "clusters", "sweeps"), first match wins:
    the user's (when it exists), then the project's."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; valid: {', '.join(KINDS)}")
    user = user_config_dir() / kind
    project = PROJECT_DIR / kind
    return [user, project] if user.is_dir() and user.resolve() != project else [project]


def list_configs(kind: str) -> list[str]:
    """The names of every `kind` file in the searched folders, sorted."""
    return sorted({p.stem for d in config_dirs(kind) for p in d.glob("*.yaml")})


def find_config(kind: str, name_or_path: str | os.PathLike[str], hint: str = "") -> Path:
    """A name (`nano`: the first `<folder>/nano.yaml`) or a path (`x.yaml`, `./dir/x`) -> the file.
    An unknown name is a ConfigError listing the valid names and the folders searched; `hint`
    (e.g. how to add one) is appended to it."""
    what = kind.removesuffix("s")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {str(path)!r} does not exist")
        return path
    dirs = config_dirs(kind)
    for folder in dirs:
        named = folder / f"{name_or_path}.yaml"
        if named.is_file():
            return named
    raise ConfigError(
        f"unknown {what} {str(name_or_path)!r}; valid {kind}: "
        f"{', '.join(list_configs(kind)) or '(none)'} (in {', '.join(map(str, dirs))}), or a path "
        f"to a YAML file{'. ' + hint if hint else ''}"
    )
