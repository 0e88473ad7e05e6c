"""Issue 7's acceptance: an offline W&B run holds `train/cost_usd` monotonic across a real requeue.

A run is launched on the `local` cluster (a real submitit job process) with W&B enabled and
offline, preempted mid-phase with SIGUSR2 (what Slurm sends at a preemption, and submitit's local
controller at a timeout), requeued and finished. Its W&B files then hold two segments of one W&B
run, and the dollar axis read back from W&B's own transaction logs (`run-<id>.wandb`) never folds
back. Nothing secret from the environment may land in the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from budget_lab.config import compose_run
from budget_lab.launch import launch_run, run_status
from budget_lab.launch.cluster import load_cluster
from budget_lab.report.wandb_log import wandb_run_id
from budget_lab.workspace import Workspace

pytestmark = pytest.mark.slow

#: A value that must never be written into a run folder (the job inherits this environment).
FAKE_SECRET = "bl-test-secret-9f1c2e7a5b3d4c6e8a0b1d2f3e4c5a6b"

FINAL = ("completed", "failed", "cut", "cancelled", "interrupted")

# ------------------------------------------------------------------------------------------------
# A reader for W&B's transaction log (`run-<id>.wandb`): a LevelDB-log-like record stream.
# ------------------------------------------------------------------------------------------------

_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_RECORD = struct.Struct("<IHB")  # crc32, payload length, record type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every physical record; a torn tail (a crash mid-write) ends the stream.

    Records never straddle a 32 KiB block (counted from the start of the file, header included):
    a block's tail shorter than a record header is zero padding.
    """
    pos = _HEADER.size
    while pos + _RECORD.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD.size:
            pos += left_in_block
            continue
        crc, length, kind = _RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding before the next block
            pos += left_in_block
            continue
        start = pos + _RECORD.size
        payload = data[start : start + length]
        if len(payload) < length:
            return
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        yield kind, payload
        pos = start + length


def read_wandb_records(path: Path) -> list[Any]:
    """Every `wandb_internal_pb2.Record` in a `.wandb` file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    magic, version_magic, version = _HEADER.unpack_from(data, 0)
    assert magic == b":W&B" and version_magic == 0xBEE1, f"{path} is not a W&B transaction log"
    assert version == 0, f"unknown W&B log version {version}"
    records, parts = [], []
    for kind, payload in _chunks(data):
        if kind == _FULL:
            parts = [payload]
        elif kind == _FIRST:
            parts = [payload]
            continue
        elif kind == _MIDDLE:
            parts.append(payload)
            continue
        elif kind == _LAST:
            parts.append(payload)
        else:
            raise AssertionError(f"{path}: unknown record type {kind}")
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        records.append(record)
        parts = []
    return records


def history_values(path: Path, key: str) -> list[float]:
    """The values logged under `key` in a W&B transaction log, in logging order."""
    values = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            name = item.key or "/".join(item.nested_key)
            if name == key:
                values.append(json.loads(item.value_json))
    return values


# ------------------------------------------------------------------------------------------------
# The test.
# ------------------------------------------------------------------------------------------------


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_offline_wandb_cost_is_monotonic_across_a_real_requeue(
    train_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline W&B, no key anywhere: the job process inherits this environment at submit time.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))  # the run dir wins (dir=)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    (tmp_path / "home").mkdir()

    cfg = compose_run(
        "nano",
        [
            f"data.path={train_data_dir}",
            "phases.0.steps=40",
            "phases.0.warmup_steps=2",
            "phases.0.batch_size=8",
            "phases.1.steps=4",
            "phases.1.batch_size=8",
            "checkpoint.every=1000",  # the only mid-phase checkpoint is the preemption's
            "log_every=1",
            "eval.grid_size=0",
            "wandb.enabled=true",
            "wandb.mode=offline",
        ],
    )
    workspace = Workspace(tmp_path / "ws").ensure()
    record = launch_run(cfg, load_cluster("local"), workspace, "wandb-cost")
    run_dir = Path(record.run_dir)

    _wait(lambda: _metric_rows(run_dir) >= 4, 120, "the job to be mid-phase")
    pid = int(run_status(run_dir).segments[-1]["pid"])
    os.kill(pid, signal.SIGUSR2)  # a preemption: checkpoint, stop, requeue
    st = _wait(lambda: (s := run_status(run_dir)).state in FINAL and s, 180, "the run to end", 0.5)
    assert st.state == "completed", st.error
    assert [s["status"] for s in st.segments] == ["preempted", "completed"]

    # Two offline segments of one W&B run.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, [p.name for p in folders]
    run_id = wandb_run_id(run_dir)
    assert all(p.name.endswith("-" + run_id) for p in folders), [p.name for p in folders]
    logs = [folder / f"run-{run_id}.wandb" for folder in folders]  # names sort by start time

    per_segment = [history_values(path, "train/cost_usd") for path in logs]
    first, second = per_segment
    assert first and second, per_segment
    assert first == sorted(first) and second == sorted(second), per_segment  # non-decreasing
    assert second[0] >= first[-1], (first[-1], second[0])  # no fold-back at the requeue
    assert second[-1] > 0.0
    # The same figures as the run's own metrics (the job's clock over both segments).
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["cost_usd"] for m in metrics] == pytest.approx(first + second)
    steps = [history_values(path, "train/step") for path in logs]
    assert steps[0] and steps[1] and steps[1][0] <= steps[0][-1] + 1  # resumed, not restarted

    # Nothing secret from the job's environment is in the run folder (W&B files included).
    leaked = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and FAKE_SECRET.encode() in p.read_bytes()
    ]
    assert not leaked, f"the fake AWS secret was written to {leaked}"
