"""The run's own clock: what the job was doing, span by span (`activity.jsonl` in the run folder).

The job wrapper and the trainer (rank 0 only) note each change of activity; a span is written
when it ends, one row per span, never per step:

    {"attempt": 0, "activity": "train", "phase": "masked-pretrain", "start": 1795000010.2,
     "end": 1795000071.9}

Activities: `startup` (from the segment's start row to the first training step: imports, data,
model, resume), `train` (optimizer steps of a phase), `checkpoint` (a checkpoint write, carved out
of the phase's training time), `eval` (a rung FID inside a phase, or the final FID),
`sample_grid` (a phase's sample grid), `idle` (after a STOP request: the work is cut, the time is
still paid) and `other` (between the trainer's end and the segment's end row). The ledger
(`budget_lab.ledger.sync`) splits each segment's dollars over these spans; it never changes the
segment's total.

    log = ActivityLog(run_dir, attempt=0, start=t0)   # "startup" from t0
    log.switch("train", "masked-pretrain")
    with log.during("checkpoint"):
        store.save(...)
    log.close()
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from budget_lab.rundir import RunDir, append_row

__all__ = ["ACTIVITIES", "ACTIVITY_FILE", "ActivityLog"]

#: Every activity a span can name (the order of reports).
ACTIVITIES = ("startup", "train", "checkpoint", "eval", "sample_grid", "idle", "other")
#: The spans' file name in a run folder (`RunDir.activity`; kept for its importers).
ACTIVITY_FILE = RunDir(".").activity.name


class ActivityLog:
    """Timestamped activity spans of one segment (attempt) of a run, appended durably."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        attempt: int | None,
        *,
        start: float | None = None,
        phase: str | None = None,
        enabled: bool = True,
    ):
        self.path = RunDir(run_dir).activity
        self.attempt = attempt  # the segment (segments.jsonl attempt); None outside a job
        self.enabled = enabled  # False on ranks other than 0: nothing is written
        self.activity: str | None = "startup"  # the open span's activity (None once closed)
        self.phase = phase  # the open span's phase, when known
        self.since = time.time() if start is None else start  # when the open span began

    def set_phase(self, phase: str | None) -> None:
        """Label the open span with a phase (startup learns it once the checkpoint is read)."""
        self.phase = phase

    def switch(self, activity: str, phase: str | None = None, *, now: float | None = None) -> None:
        """End the open span now and begin `activity` (in `phase`, default: the current one)."""
        if activity not in ACTIVITIES:
            raise ValueError(f"unknown activity {activity!r}; valid: {', '.join(ACTIVITIES)}")
        now = time.time() if now is None else now
        if activity == self.activity and (phase is None or phase == self.phase):
            return
        self._write(now)
        self.activity = activity
        self.phase = self.phase if phase is None else phase
        self.since = now

    @contextlib.contextmanager
    def during(self, activity: str, phase: str | None = None) -> Iterator[None]:
        """`activity` for the duration of the block, then back to what was going on. Nothing
        changes while idle (a checkpoint after a STOP request is part of the idle time) or after
        the log is closed."""
        if self.activity in ("idle", None):
            yield
            return
        before = (self.activity, self.phase)
        self.switch(activity, phase)
        try:
            yield
        finally:
            if self.activity is not None:
                self.switch(*before)

    def close(self, *, now: float | None = None) -> None:
        """End the open span (the segment ends). Further switches reopen the log."""
        self._write(time.time() if now is None else now)
        self.activity = None

    def _write(self, now: float) -> None:
        if not self.enabled or self.activity is None or now <= self.since:
            return
        row = {
            "attempt": self.attempt,
            "activity": self.activity,
            "phase": self.phase,
            "start": self.since,
            "end": now,
        }
        append_row(self.path, row)
