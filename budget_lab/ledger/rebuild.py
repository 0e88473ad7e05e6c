"""Rebuild a lost or damaged SQLite ledger from what it was computed from.

    report = rebuild_ledger(workspace)     # `budget-lab cost sync --rebuild`

Every dollar in the ledger is derived: local segments from each run folder's segments.jsonl,
Slurm segments from `sacct`, prices from the cluster files (and the cached AWS spot history), the
run, phase, sweep and trial from launch.json, metrics.jsonl and checkpoints.jsonl, waste from
result.json and checkpoints.jsonl. A rebuild syncs every launched run folder into a new file
beside the ledger, moves the old file (with its -wal and -shm) aside as
`ledger.sqlite.corrupt-<UTC time>` (or `.old-<UTC time>` when it could still be read), never
deleting it, and puts the new one in its place. A failed rebuild leaves the old file where it was.

What the run folders cannot give back (from a readable old ledger it is carried over):

- the budget thresholds already reported (50, 80, 100 % of a sweep's or a month's budget): after
  rebuilding a damaged ledger a running sweep may report one of them once more;
- segments of runs whose folder (or launch.json) is gone, or whose Slurm jobs have aged out of
  `sacct` or cannot be read from this host (such runs are listed as errors);
- a spot price no longer in the cache or AWS's 90-day history: priced at the catalog, marked as
  an estimate.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_lab.errors import ConfigError
from budget_lab.ledger.prices import ClusterLike, PriceBook
from budget_lab.ledger.sacct import SacctRecord, sacct_records
from budget_lab.ledger.store import Ledger, LedgerCorruptError, Segment, _parse_url
from budget_lab.ledger.sync import SyncReport, sync_workspace

__all__ = ["rebuild_ledger", "RebuildReport", "NOT_REBUILT"]

#: What a rebuild cannot recompute from the run folders (the help of `cost sync` prints it).
NOT_REBUILT = (
    "budget thresholds already reported (a running sweep may report one again), segments of "
    "runs whose folder is gone or whose Slurm jobs left sacct, and spot prices older than the "
    "price cache and AWS's 90-day history (charged at the catalog, marked estimated); from an "
    "old ledger that can still be read they are carried over"
)

_SIDECARS = ("", "-wal", "-shm")  # SQLite's file and the two files WAL mode keeps beside it


@dataclass
class RebuildReport:
    """What `rebuild_ledger` did."""

    path: Path  # the ledger file, rebuilt
    old_state: str  # the file it replaced: "missing", "corrupt" or "readable"
    old_problem: str | None = None  # what was wrong with it (SQLite's words)
    moved_to: list[Path] = field(default_factory=list)  # the old file and its -wal/-shm, kept
    sync: SyncReport = field(default_factory=SyncReport)  # the sync of every run folder
    old_spent_usd: float | None = None  # what a readable old ledger held
    old_wasted_usd: float | None = None
    carried_segments: int = 0  # from a readable old ledger: segments of runs not rebuilt
    carried_thresholds: int = 0  # from a readable old ledger: threshold crossings
    segments: int = 0  # in the new ledger
    spent_usd: float = 0.0
    wasted_usd: float = 0.0


def _ledger_file(workspace: Any) -> Path:
    url = _parse_url(workspace.ledger_url)
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        shown = url.render_as_string(hide_password=True)
        raise ConfigError(
            f"--rebuild recreates an SQLite ledger file, and this workspace's ledger is {shown}. "
            "For a database server: point ledger_url (workspace.yaml) at an empty database and "
            "run `budget-lab cost sync`, which fills it from the run folders, or restore the "
            "database from its backups"
        )
    return Path(database).resolve()


def _read_old(path: Path) -> tuple[str, str | None, list[Segment], list[dict[str, Any]]]:
    """(state, problem, segments, threshold records) of the ledger file at `path`; the state is
    "missing", "corrupt" or "readable"."""
    if not path.exists():
        return "missing", None, [], []
    try:
        with Ledger(f"sqlite:///{path}") as old:
            problem = old.check()
            if problem is None:
                return "readable", None, old.segments(), old.threshold_records()
    except LedgerCorruptError as err:
        problem = err.detail
    return "corrupt", problem, [], []


def _aside(path: Path, label: str, stamp: str) -> list[Path]:
    """Rename the ledger file and its -wal/-shm to <name>.<label>-<stamp>[-wal|-shm]."""
    base = f"{path.name}.{label}-{stamp}"
    n = 1
    while any(path.with_name(base + s).exists() for s in _SIDECARS):  # two rebuilds in a second
        n += 1
        base = f"{path.name}.{label}-{stamp}.{n}"
    moved = []
    for suffix in _SIDECARS:
        src = Path(f"{path}{suffix}")
        if src.exists():
            dst = path.with_name(base + suffix)
            os.rename(src, dst)
            moved.append(dst)
    return moved


def _remove(path: Path) -> None:
    for suffix in _SIDECARS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rebuild_ledger(
    workspace: Any,
    *,
    clusters: Callable[[str], ClusterLike] | None = None,
    prices: PriceBook | None = None,
    sacct_wait_s: float = 30.0,
    sacct_query: Callable[[Sequence[str]], list[SacctRecord]] = sacct_records,
    now: float | None = None,
) -> RebuildReport:
    """Recreate the workspace's SQLite ledger from its run folders (see the module docstring).

    The arguments are those of `sync_workspace`. Sync errors of single runs are in
    `report.sync.errors`; the new ledger replaces the old one all the same (a readable old
    ledger's segments of those runs are carried over)."""
    path = _ledger_file(workspace)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    state, problem, old_segments, old_thresholds = _read_old(path)
    report = RebuildReport(path=path, old_state=state, old_problem=problem)
    if state == "readable":
        report.old_spent_usd = sum(s.cost_usd for s in old_segments)
        report.old_wasted_usd = sum(s.wasted_usd for s in old_segments)

    # Build the new ledger beside the old one: nothing is moved until it is complete.
    fresh_path = path.with_name(f"{path.name}.rebuild-{stamp}")
    _remove(fresh_path)  # left by a rebuild that crashed
    try:
        with Ledger(f"sqlite:///{fresh_path}") as fresh:
            report.sync = sync_workspace(
                fresh,
                workspace,
                clusters=clusters,
                prices=prices,
                sacct_wait_s=sacct_wait_s,
                sacct_query=sacct_query,
            )
            rebuilt_runs = {s.run for s in fresh.segments()}
            carried = [s for s in old_segments if s.run not in rebuilt_runs]
            fresh.insert_many(carried)
            report.carried_segments = len(carried)
            for t in old_thresholds:
                fresh.record_threshold(
                    t["scope"], t["threshold"], t["spent_usd"], t["budget_usd"], t["crossed_at"]
                )
            report.carried_thresholds = len(old_thresholds)
            report.segments = len(fresh.segments())
            report.spent_usd, report.wasted_usd = fresh.spent(), fresh.wasted()
        # Closed: SQLite has folded its WAL into the file (any -wal/-shm left moves with it).
    except BaseException:
        _remove(fresh_path)
        raise

    # Swap: the old file (and its WAL) aside, never deleted; the new one in its place.
    if state != "missing" or any(Path(f"{path}{s}").exists() for s in _SIDECARS):
        report.moved_to = _aside(path, "corrupt" if state == "corrupt" else "old", stamp)
    for suffix in _SIDECARS:
        src = Path(f"{fresh_path}{suffix}")
        if src.exists():
            os.replace(src, f"{path}{suffix}")
    _fsync_dir(path.parent)
    return report
