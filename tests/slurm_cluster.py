"""A real single-node Slurm for the tests: scripts/slurm/start-slurm.sh, started once per process.

    # tests/conftest.py registers this module as a plugin, so the fixture is everywhere:
    @pytest.mark.slurm
    def test_something(slurm_cluster): ...  # slurm_cluster = {"SLURM_CONF": ...}

The cluster (see clusters/slurm-local.yaml) has one node with 8 CPUs and 8 fake GPUs, and
partitions `debug` (default, never preempted) and `spot` (requeued when a debug job needs its
resources). It keeps running after the tests: a later run finds it up in under a second.
`scripts/slurm/stop-slurm.sh` stops it. Tests are skipped, with the reason, when this is not root,
when the Slurm packages cannot be installed, or when BUDGET_LAB_SKIP_SLURM=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ensure_slurm", "slurm_cluster", "sacct_runs", "wait_until", "START_SCRIPT"]

START_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "start-slurm.sh"
_START_TIMEOUT_S = 900  # the first start installs packages with apt

_env: dict[str, str] | None = None  # set once the cluster is up (this process)
_skip_reason: str | None = None  # set once we know it cannot come up here


def ensure_slurm() -> dict[str, str]:
    """Start the cluster if needed and return the environment its clients need (SLURM_CONF).

    The variables are also set in this process's `os.environ`, so sbatch/sacct called by
    submitit find the cluster. Skips the calling test when the cluster cannot run here.
    """
    global _env, _skip_reason
    if _env is not None:
        return dict(_env)
    if os.environ.get("BUDGET_LAB_SKIP_SLURM") == "1":
        _skip_reason = "BUDGET_LAB_SKIP_SLURM=1"
    elif os.geteuid() != 0:
        _skip_reason = (
            f"the local Slurm runs as root ({START_SCRIPT.name}); this is uid {os.geteuid()}"
        )
    if _skip_reason:
        pytest.skip(f"no local Slurm: {_skip_reason}")

    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{START_SCRIPT} did not finish in {_START_TIMEOUT_S} s", pytrace=False)
    log_tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    if proc.returncode in (3, 4):  # packages cannot be installed / not root
        last = log_tail.splitlines()[-1] if log_tail else f"exit {proc.returncode}"
        _skip_reason = re.sub(r"^\[start-slurm [\d:]+\] (ERROR: )?", "", last)
        pytest.skip(f"no local Slurm: {_skip_reason}")
    if proc.returncode != 0:
        pytest.fail(f"{START_SCRIPT} failed (exit {proc.returncode}):\n{log_tail}", pytrace=False)
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("SLURM_"))
    if "SLURM_CONF" not in env:
        pytest.fail(f"{START_SCRIPT} printed no SLURM_CONF=... line:\n{proc.stdout}", pytrace=False)
    os.environ.update(env)
    _env = env
    print(f"local Slurm up in {time.monotonic() - t0:.1f} s ({env['SLURM_CONF']})")
    return dict(env)


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """The local Slurm cluster, started once per test session; its client environment."""
    return ensure_slurm()


def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5
) -> Any:
    """Poll `condition()` until it returns something truthy (returned); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


def sacct_runs(job_id: str | int) -> list[dict[str, str]]:
    """Every run of a job as sacct records it (requeued runs included), oldest first.

    Keys: JobID, State, Partition, Start, End, ElapsedRaw, AllocTRES. Rows appear 1-2 s after a
    run ends: poll with `wait_until`.
    """
    fields = ["JobID", "State", "Partition", "Start", "End", "ElapsedRaw", "AllocTRES"]
    out = subprocess.run(
        ["sacct", "-X", "-D", "-P", "-n", "-j", str(job_id), "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]
