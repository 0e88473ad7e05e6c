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

A journal append holds the journal's lock (`study.journal.lock`, a symbolic link) for
milliseconds. A controller killed while holding it (SIGKILL, a lost node) leaves it behind, and
Optuna would make every later writer wait 30 s before taking it over. The lock used here first
removes a lock older than `STALE_LOCK_S`, with a message, so a restarted controller goes on at once.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from budget_lab.errors import ConfigError
from budget_lab.rundir import SweepDir

__all__ = [
    "check_storage",
    "default_storage",
    "open_storage",
    "is_journal",
    "study_exists",
    "STALE_LOCK_S",
    "remove_stale_lock",
]

#: A journal lock older than this (seconds) was left by a killed process: an append holds it for
#: milliseconds. Also Optuna's own grace period when a lock it waits on stops changing.
STALE_LOCK_S = 10


def default_storage(workspace, sweep: str) -> str:
    """The sweep's storage in the workspace: its journal file (or an older SQLite study.db)."""
    folder = SweepDir(workspace.sweep_dir(sweep))
    folder.path.mkdir(parents=True, exist_ok=True)
    legacy = folder.legacy_db
    if legacy.is_file() and not folder.journal.is_file():
        return f"sqlite:///{legacy}"
    return str(folder.journal)


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
            f"{SweepDir(path).journal}) or a database URL (sqlite:///PATH, postgresql+psycopg://...)"
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
    check_storage(storage)
    path = _journal_path(storage)
    _drop_torn_line(path)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=_JournalLock(str(path))))


class _JournalLock(JournalFileSymlinkLock):
    """Optuna's symlink lock (compatible with any other writer of the journal) that takes over a
    lock left by a killed process at once instead of after a 30 s wait."""

    def __init__(self, filepath: str) -> None:
        super().__init__(filepath, grace_period=STALE_LOCK_S)
        self._lock_path = Path(filepath + ".lock")  # Optuna's name for it (LOCK_FILE_SUFFIX)

    def acquire(self) -> bool:
        remove_stale_lock(self._lock_path)
        return super().acquire()


def remove_stale_lock(lock: Path, stale_s: float = STALE_LOCK_S) -> bool:
    """Remove the journal lock `lock` if it is older than `stale_s` (its holder was killed: a
    journal append holds it for milliseconds). True when it was removed; a message says so."""
    try:
        seen = os.lstat(lock)  # the link itself: its time is when it was taken
    except FileNotFoundError:
        return False
    age = time.time() - seen.st_mtime
    if age < stale_s:
        return False
    # Rename, then check that what was renamed is the lock looked at: a waiter that took over the
    # stale lock in between keeps its own (put back; the window is microseconds).
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # released (or taken over) meanwhile
        return False
    moved = os.lstat(aside)
    if (moved.st_ino, moved.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
        try:
            os.link(aside, lock, follow_symlinks=False)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    print(
        f"warning: {lock}: removed a stale lock ({age:.0f} s old) left by a controller that was "
        "killed while writing the journal; a journal append holds it for milliseconds",
        file=sys.stderr,
    )
    return True


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
