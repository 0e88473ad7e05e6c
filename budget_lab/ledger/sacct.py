"""Slurm accounting (`sacct`): every time a job ran, with its GPUs and elapsed seconds.

    sacct -X -D -P -n -o JobID,State,Start,End,ElapsedRaw,AllocTRES,Partition,NNodes -j 42,43

`-D` lists each run of a requeued job on its own row (REQUEUED or PREEMPTED, then COMPLETED), so
a requeued job has one record per segment; GPU-seconds = ElapsedRaw x the gres/gpu count of
AllocTRES. Times are asked for as epoch seconds (SLURM_TIME_FORMAT=%s). Rows can appear a few
seconds after a job ends (once ~25 s for an array task): `poll_sacct` asks again until they are
complete or a deadline passes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from budget_lab.errors import ConfigError, UserError

__all__ = [
    "SACCT_FIELDS",
    "SacctError",
    "SacctRecord",
    "parse_sacct",
    "sacct_records",
    "poll_sacct",
    "FINISHED_STATES",
]

#: The columns asked for, in order.
SACCT_FIELDS = ("JobID", "State", "Start", "End", "ElapsedRaw", "AllocTRES", "Partition", "NNodes")

#: States after which a record does not change any more.
FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REQUEUED",
        "TIMEOUT",
    }
)


class SacctError(UserError):
    """sacct failed (no accounting daemon, wrong cluster): the message has its stderr."""


@dataclass(frozen=True)
class SacctRecord:
    """One row of `sacct -X -D`: one time a job ran (or waits to)."""

    job_id: str  # "42", "42_3" for an array task
    state: str  # first word of State: COMPLETED, REQUEUED, PREEMPTED, RUNNING, PENDING, ...
    start: float | None  # epoch seconds; None while pending
    end: float | None  # epoch seconds; None while running or pending
    elapsed_s: int  # ElapsedRaw: seconds it ran (so far, while running)
    gpus: int  # gres/gpu in AllocTRES, over all nodes; 0 for a CPU-only job
    partition: str | None
    nodes: int

    @property
    def gpu_seconds(self) -> float:
        return float(self.elapsed_s * self.gpus)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES and self.end is not None


def _time(value: str) -> float | None:
    value = value.strip()
    if not value or value in ("Unknown", "None", "N/A"):
        return None
    if value.isdigit():
        return float(value)
    # A site with its own SLURM_TIME_FORMAT left as ISO: Slurm prints local time.
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


def _gpus(tres: str) -> int:
    """gres/gpu count from AllocTRES ("cpu=2,gres/gpu=2,gres/gpu:h100=2,node=1" -> 2)."""
    plain, typed = None, 0
    for item in tres.split(","):
        name, _, count = item.partition("=")
        if name == "gres/gpu":
            plain = int(count)
        elif name.startswith("gres/gpu:"):
            typed += int(count)
    return plain if plain is not None else typed


def parse_sacct(text: str) -> list[SacctRecord]:
    """Records from `sacct -P -n -o <SACCT_FIELDS>` output (one line per record)."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < len(SACCT_FIELDS):
            raise SacctError(
                f"unexpected sacct line {line!r}: expected {len(SACCT_FIELDS)} '|'-separated "
                f"fields ({','.join(SACCT_FIELDS)})"
            )
        job_id, state, start, end, elapsed, tres, partition, nodes = parts[: len(SACCT_FIELDS)]
        records.append(
            SacctRecord(
                job_id=job_id.strip(),
                state=(state.split() or ["UNKNOWN"])[0].rstrip("+"),
                start=_time(start),
                end=_time(end),
                elapsed_s=int(elapsed) if elapsed.strip().isdigit() else 0,
                gpus=_gpus(tres),
                partition=partition.strip() or None,
                nodes=int(nodes) if nodes.strip().isdigit() else 1,
            )
        )
    return records


def sacct_records(
    job_ids: Sequence[str], *, sacct: str = "sacct", timeout_s: float = 60.0
) -> list[SacctRecord]:
    """Ask sacct for every run of `job_ids` (records in sacct's order: by job, then by start)."""
    if not job_ids:
        return []
    cmd = [sacct, "-X", "-D", "-P", "-n", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(job_ids)]
    env = dict(os.environ, SLURM_TIME_FORMAT="%s")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except FileNotFoundError:
        raise ConfigError(
            f"{sacct!r} was not found: pricing Slurm jobs needs the Slurm client tools on PATH "
            "(run `budget-lab cost sync` on a machine of the cluster)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SacctError(f"`{' '.join(cmd)}` did not answer within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-2000:]
        raise SacctError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: {tail}. sacct needs "
            "Slurm accounting (slurmdbd); check `sacct -X` works on this machine"
        )
    return parse_sacct(proc.stdout)


def poll_sacct(
    job_ids: Sequence[str],
    done: Callable[[list[SacctRecord]], bool],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 1.0,
    query: Callable[[Sequence[str]], list[SacctRecord]] = sacct_records,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[SacctRecord]:
    """Query until `done(records)` or `timeout_s` passes; the last answer either way."""
    deadline = clock() + timeout_s
    while True:
        records = query(job_ids)
        if done(records) or clock() >= deadline:
            return records
        sleep(interval_s)
