"""Where a sweep's Optuna study lives.

A storage is named by one string, so that it can be printed, passed on the command line and kept
in sweep.json:

- a path to a journal file (`study.journal`, or anything written `journal:PATH`): Optuna's
  append-only journal storage. The default: one small file beside the sweep's other files, safe on
  NFS (it locks with a symlink, not with fcntl as SQLite does), and cheap to write: an ask, a
  param or an attribute is one appended line (about 1 ms of the controller's time where an SQLite
  commit takes 10 to 25 ms; see BENCHMARKS.md). Several controllers may share one journal file;
- a SQLAlchemy URL (`sqlite:///PATH`, `postgresql+psycopg://USER@HOST/DB`): Optuna's RDB storage,
  for a database several controllers on several machines share.

A workspace made by an older budget-lab keeps its `study.db`: the default finds it and resumes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna

from budget_lab.errors import ConfigError

__all__ = [
    "check_storage",
    "default_storage",
    "open_storage",
    "is_journal",
    "study_exists",
    "JOURNAL_NAME",
]

JOURNAL_NAME = "study.journal"
SQLITE_NAME = "study.db"  # the default of budget-lab <= 0.1: still found and resumed


def default_storage(workspace, sweep: str) -> str:
    """The sweep's storage in the workspace: its journal file (or an older SQLite study.db)."""
    folder = workspace.sweep_dir(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    legacy = folder / SQLITE_NAME
    if legacy.is_file() and not (folder / JOURNAL_NAME).is_file():
        return f"sqlite:///{legacy}"
    return str(folder / JOURNAL_NAME)


def is_journal(storage: str) -> bool:
    return "://" not in storage


def _journal_path(storage: str) -> Path:
    return Path(storage.removeprefix("journal:")).expanduser()


def study_exists(storage: str) -> bool:
    """Whether a file-based storage has been written (a database URL: assumed so)."""
    if is_journal(storage):
        return _journal_path(storage).is_file()
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///")).is_file()
    return True


def check_storage(storage: str) -> None:
    """ConfigError now, not after the data is prepared, when a journal file cannot be made."""
    if not is_journal(storage):
        return
    path = _journal_path(storage)
    if path.is_dir():
        raise ConfigError(
            f"storage {storage!r} is a folder; expected a journal file (e.g. "
            f"{path / JOURNAL_NAME}) or a database URL (sqlite:///PATH, postgresql+psycopg://...)"
        )
    if not path.parent.is_dir():
        raise ConfigError(
            f"storage {storage!r}: the folder {path.parent} does not exist; create it or give a "
            "database URL (sqlite:///PATH, postgresql+psycopg://...)"
        )


def open_storage(storage: str) -> optuna.storages.BaseStorage | str:
    """What optuna.create_study / load_study take for `storage`: a JournalStorage over the file,
    or the URL itself (Optuna builds its cached RDB storage from it)."""
    if not is_journal(storage):
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage(storage)
    path = _journal_path(storage)
    _drop_torn_line(path)
    return JournalStorage(JournalFileBackend(str(path)))


def _drop_torn_line(path: Path) -> None:
    """A controller killed in the middle of an append can leave a last line without its newline
    (never acknowledged, so nothing is lost by dropping it); Optuna would refuse the whole file
    once another line follows it. Cut the file back to its last complete line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    print(
        f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes) left by a killed "
        "controller",
        file=sys.stderr,
    )
