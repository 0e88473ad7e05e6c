"""The workspace: one folder that holds everything a controller writes, and its settings.

    workspace/
      workspace.yaml     optional settings (below)
      ledger.sqlite      the dollar ledger (SQLite, WAL) unless ledger_url points elsewhere
      runs/<run>/        one folder per training run
      jobs/<launch-id>/  the submitit folder of one launch
      sweeps/<sweep>/    study.journal, sweep.json, summary.json, report/
      cache/prices/      AWS spot price history, per region and instance type
      calibration.json   measured images/s per (preset, resolution, mask ratio, device type)

`workspace.yaml` (every key optional, unknown keys rejected)::

    monthly_budget_usd: 500        # refuse launches that would take this month's spend past it
    ledger_url: postgresql+psycopg://budget@db.internal/budget_lab   # a shared ledger

`ledger_url` may name environment variables (`${LEDGER_PASSWORD}`) so that no password has to be
written into the file. Which workspace: `--workspace DIR` > `$BUDGET_LAB_WORKSPACE` > `./workspace`
(`Workspace.from_args`, `add_workspace_argument`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from budget_lab.errors import ConfigError

__all__ = ["ENV_VAR", "Workspace", "WorkspaceConfig", "add_workspace_argument"]

#: The environment variable that names the workspace when `--workspace` is not given.
ENV_VAR = "BUDGET_LAB_WORKSPACE"
_DEFAULT_DIR = "workspace"


@dataclass(frozen=True)
class WorkspaceConfig:
    """The settings in `workspace.yaml`."""

    monthly_budget_usd: float | None = None  # cap on the calendar month's spend (UTC); None = none
    ledger_url: str | None = None  # SQLAlchemy URL of the ledger; None = <root>/ledger.sqlite

    def __post_init__(self) -> None:
        budget = self.monthly_budget_usd
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0
        ):
            raise ConfigError(
                f"workspace.yaml: monthly_budget_usd={budget!r} is invalid: expected a number of "
                "dollars >= 0, or leave the key out for no monthly cap"
            )
        if self.ledger_url is not None and (
            not isinstance(self.ledger_url, str) or "://" not in self.ledger_url
        ):
            raise ConfigError(
                f"workspace.yaml: ledger_url={self.ledger_url!r} is not a database URL: expected "
                "e.g. sqlite:////abs/path/ledger.sqlite or postgresql+psycopg://user@host/db, or "
                "leave the key out for the workspace's own SQLite file"
            )


class Workspace:
    """The paths of one workspace folder (nothing is created until `ensure()`)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def from_args(cls, path: str | os.PathLike[str] | None = None) -> Workspace:
        """`path` (a --workspace flag) if given, else $BUDGET_LAB_WORKSPACE, else ./workspace."""
        chosen = path if path else os.environ.get(ENV_VAR) or _DEFAULT_DIR
        root = Path(chosen).expanduser()
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"workspace {str(root)!r} is a file, not a folder: pass --workspace DIR (or set "
                f"${ENV_VAR}) to a folder; it is created if missing"
            )
        return cls(root)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike[str]) -> Workspace | None:
        """The workspace holding `run_dir` when it is `<workspace>/runs/<run>`; None for a run
        folder elsewhere (`budget-lab train --run-dir /scratch/x`)."""
        path = Path(run_dir).expanduser().resolve()
        return cls(path.parent.parent) if path.parent.name == "runs" else None

    # -- the layout ----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "workspace.yaml"

    @property
    def ledger_path(self) -> Path:
        """The default SQLite ledger (used unless `ledger_url` points elsewhere)."""
        return self.root / "ledger.sqlite"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def sweeps_dir(self) -> Path:
        return self.root / "sweeps"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def prices_cache_dir(self) -> Path:
        return self.cache_dir / "prices"

    @property
    def calibration_path(self) -> Path:
        return self.root / "calibration.json"

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run

    def job_dir(self, launch_id: str) -> Path:
        return self.jobs_dir / launch_id

    def sweep_dir(self, sweep: str) -> Path:
        return self.sweeps_dir / sweep

    def run_dirs(self) -> list[Path]:
        """Every run folder, sorted by name."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(p for p in self.runs_dir.iterdir() if p.is_dir())

    def ensure(self) -> Workspace:
        """Create the workspace's folders (idempotent). Returns self."""
        for path in (self.runs_dir, self.jobs_dir, self.sweeps_dir, self.prices_cache_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self

    # -- settings ------------------------------------------------------------------------------

    @cached_property
    def config(self) -> WorkspaceConfig:
        """workspace.yaml, validated (defaults when the file does not exist)."""
        path = self.config_path
        if not path.is_file():
            return WorkspaceConfig()
        try:
            data: Any = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if data is None:
            return WorkspaceConfig()
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path} must be a mapping of settings (monthly_budget_usd, ledger_url), "
                f"not {type(data).__name__}"
            )
        valid = [f.name for f in fields(WorkspaceConfig)]
        unknown = sorted(str(k) for k in data if k not in valid)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
            )
        return WorkspaceConfig(**data)

    @property
    def monthly_budget_usd(self) -> float | None:
        return self.config.monthly_budget_usd

    @property
    def ledger_url(self) -> str:
        """The ledger's SQLAlchemy URL: workspace.yaml's ledger_url (with ${VARS} expanded), else
        the workspace's own SQLite file."""
        url = self.config.ledger_url
        if url is None:
            return f"sqlite:///{self.ledger_path}"
        expanded = os.path.expandvars(url)
        if "${" in expanded:
            raise ConfigError(
                f"{self.config_path}: ledger_url names an environment variable that is not set "
                f"({url.split('${', 1)[1].split('}', 1)[0]}); export it, or write the URL in full"
            )
        return expanded


def add_workspace_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--workspace DIR` to a (sub)command; read it back with `Workspace.from_args(args.workspace)`."""
    parser.add_argument(
        "--workspace",
        default=None,
        metavar="DIR",
        help=f"the workspace folder (default: ${ENV_VAR}, else ./{_DEFAULT_DIR})",
    )
