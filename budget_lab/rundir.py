"""The run folder's shared records, read and written by every part that follows a run.

The launch record: `launch.json`, where a run went (cluster, executor, submitit folder, job ids),
written by the launcher before it submits (`budget_lab.launch.submit`) and read by status,
the ledger and the sweep (`read_launch`).

The stop request: a `STOP` file that a controller drops into a run folder (a budget
cap, a pruned sweep trial, a trial that reached its own budget) to stop the run at its next step,
with a checkpoint. Its JSON says what kind of stop it is and why, in words:

    {"kind": "pruned", "reason": "pruned at $0.0123 (FID 48.2)", "time": 1718000000.0}

The run then ends with status "cut", and its result.json carries the same `cut_kind` and
`cut_reason`. Readers match on the kind (`cut_kind(result)`), never on the words. Files written
before the kind existed still read: their kind is inferred from the words in one place,
`_kind_from_words`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from budget_lab.io import atomic_write_json

__all__ = [
    "LAUNCH_FILE",
    "LaunchRecord",
    "read_launch",
    "recover_job_ids",
    "STOP_FILE",
    "CutKind",
    "PLANNED_CUTS",
    "StopRequest",
    "request_stop_file",
    "read_stop",
    "cut_kind",
]

#: Where a run went, in its run folder (see the module's docstring).
LAUNCH_FILE = "launch.json"


@dataclass
class LaunchRecord:
    """What `launch.json` in the run folder says about where the run went."""

    run: str
    run_dir: str
    cluster: str
    executor: str
    launch_id: str
    submitit_folder: str
    job_ids: list[str]
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    sweep: str | None = None
    trial: int | None = None
    created_at: float = field(default_factory=time.time)
    cluster_file: str | None = None  # the cluster YAML it was launched with (a path or a name)


def read_launch(run_dir: str | os.PathLike[str]) -> LaunchRecord | None:
    """The run folder's launch record; None when the run was not launched (`budget-lab train`)."""
    path = Path(run_dir) / LAUNCH_FILE
    if not path.is_file():
        return None
    record = LaunchRecord(**json.loads(path.read_text()))
    if not record.job_ids:  # written before a submission that did not return: what went out?
        record.job_ids = recover_job_ids(record)
    return record


def recover_job_ids(record: LaunchRecord) -> list[str]:
    """The ids of the jobs a launch submitted, from its submitit folder (`<id>_submitted.pkl`,
    written once the scheduler gave the id): for a launch record written before its submission
    returned. Empty when nothing was submitted."""
    folder = Path(record.submitit_folder)
    if not folder.is_dir():
        return []
    ids = {p.name.removesuffix("_submitted.pkl") for p in folder.glob("*_submitted.pkl")}
    return sorted(ids, key=lambda i: (len(i), i))


#: The stop request's file in a run folder (see the module's docstring).
STOP_FILE = "STOP"


class CutKind(StrEnum):
    """Why a run was stopped before its end (status "cut")."""

    TRIAL_BUDGET = "trial_budget"  # a sweep trial spent its own budget (fid_at_budget): planned
    PRUNED = "pruned"  # the sweep's pruner cut a lagging trial: planned
    BUDGET_CAP = "budget_cap"  # a budget cap (a sweep's or a cost cap) stopped it
    OTHER = "other"  # anything else: a STOP written by hand, or unreadable


#: Cuts that are part of the plan, not waste: the spend bought the answer (FID at the trial
#: budget; "this configuration lags"). A cap's cut, or any other, wastes what the run spent.
PLANNED_CUTS = frozenset({CutKind.TRIAL_BUDGET, CutKind.PRUNED})


@dataclass(frozen=True)
class StopRequest:
    """A run's STOP file: what kind of stop, why in words, and when it was asked."""

    kind: CutKind
    reason: str  # for people: "budget cap reached", "pruned at $0.0123 (FID 48.2)"
    time: float | None = None  # when it was written (unix seconds); None if unreadable

    def result_fields(self) -> dict[str, str]:
        """What a cut run's result.json records of it."""
        return {"cut_reason": self.reason, "cut_kind": str(self.kind)}


def request_stop_file(run_dir: str | os.PathLike[str], reason: str, *, kind: CutKind) -> Path:
    """Ask a running (or queued) run to checkpoint and stop with status "cut", from any process
    on any machine that shares the run folder."""
    path = Path(run_dir) / STOP_FILE
    atomic_write_json(path, {"kind": str(kind), "reason": reason, "time": time.time()})
    return path


def read_stop(run_dir: str | os.PathLike[str]) -> StopRequest | None:
    """The run's stop request; None when it has none. An unreadable one still stops the run."""
    path = Path(run_dir) / STOP_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        reason = str(raw.get("reason", "stop requested"))
        stamp = raw.get("time")
        return StopRequest(
            _kind(raw.get("kind"), reason), reason, float(stamp) if stamp is not None else None
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return StopRequest(CutKind.OTHER, "stop requested")


def cut_kind(result: Mapping[str, Any]) -> CutKind:
    """Why a cut run was cut, from its result.json (`cut_kind`; a result written before the kind
    existed: from its `cut_reason`)."""
    return _kind(result.get("cut_kind"), str(result.get("cut_reason") or ""))


def _kind(kind: Any, reason: str) -> CutKind:
    if kind is None:
        return _kind_from_words(reason)
    try:
        return CutKind(kind)
    except ValueError:
        return CutKind.OTHER


def _kind_from_words(reason: str) -> CutKind:
    """The kind of a STOP file or result written before the kind existed: the words its writers
    started their reasons with (the only place that reads them)."""
    for prefix, kind in (
        ("trial budget", CutKind.TRIAL_BUDGET),
        ("pruned", CutKind.PRUNED),
        ("budget cap", CutKind.BUDGET_CAP),
    ):
        if reason.startswith(prefix):
            return kind
    return CutKind.OTHER
