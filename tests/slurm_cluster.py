"""A real single-node Slurm for the tests: scripts/slurm/start-slurm.sh, started once per process.

    # tests/conftest.py registers this module as a plugin, so the fixture is everywhere:
    @pytest.mark.slurm
    def test_something(slurm_cluster): ...  # slurm_cluster = {"SLURM_CONF": ...}

The cluster (see clusters/slurm-local.yaml) has one node with 8 CPUs and 8 fake GPUs, and
partitions `debug` (default, never preempted) and `spot` (requeued when a debug job needs its
resources). Tests are skipped, with the reason, when this is not root, when the Slurm packages
cannot be installed, or when BUDGET_LAB_SKIP_SLURM=1.

A test session leaves the machine as it found it: the daemons (munged, MariaDB, slurmdbd,
slurmctld, slurmd) that were not running before a test session started them are stopped when the
last test session using the cluster ends (sessions register under $SLURM_ROOT/test-sessions, so
one session does not pull the cluster from under another). A cluster found running is left
running. BUDGET_LAB_KEEP_SLURM=1 keeps what the session started (a later run then finds it up in
under a second); `scripts/slurm/stop-slurm.sh` stops it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
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
_registered = False  # this session ran start-slurm.sh: release_slurm() runs at its end

# The daemons start-slurm.sh runs, in the order they are stopped, with their pid files under
# $SLURM_ROOT (munged's copy there is written only when start-slurm.sh started it).
_DAEMONS = {
    "slurmd": "run/slurmd.pid",
    "slurmctld": "run/slurmctld.pid",
    "slurmdbd": "run/slurmdbd.pid",
    "mariadbd": "db/mysqld.pid",
    "munged": "run/munged.pid",
}
_STARTED_FILE = "tests-started.json"  # {daemon: pid} that test sessions started
_SESSIONS_DIR = "test-sessions"  # one file per live test session using the cluster (its pid)


def _slurm_root() -> Path:
    return Path(os.environ.get("SLURM_ROOT", "/tmp/budget-lab-slurm"))


def _pid_running(pid: int, name: str | None = None) -> bool:
    """`pid` is a live (not zombie) process, called `name` when given."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state != "Z" and (name is None or comm == name)


def _running_daemons(root: Path) -> dict[str, int]:
    """{daemon: pid} of the daemons whose pid file under `root` names a live process of theirs."""
    found = {}
    for name, rel in _DAEMONS.items():
        try:
            pid = int((root / rel).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _pid_running(pid, name):
            found[name] = pid
    return found


class _Lock:
    """An exclusive flock on $SLURM_ROOT/.test-sessions.lock (sessions update the registry)."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(root / ".test-sessions.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> _Lock:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _read_started(root: Path) -> dict[str, int]:
    try:
        data = json.loads((root / _STARTED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _stop_daemon(name: str, pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM, up to `grace_s` of grace, then SIGKILL (as stop-slurm.sh)."""
    if not _pid_running(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _pid_running(pid, name):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_started(root: Path, started: dict[str, int]) -> None:
    """Stop the daemons of `started` that still run with the recorded pid; the jobs first while
    the controller can still cancel them, so that no slurmstepd outlives its slurmd."""
    conf = root / "etc" / "slurm.conf"
    if (
        "slurmctld" in started
        and _pid_running(started["slurmctld"], "slurmctld")
        and conf.is_file()
    ):
        env = {**os.environ, "SLURM_CONF": str(conf)}
        try:
            subprocess.run(["scancel", "--user", "root"], env=env, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = subprocess.run(
                    ["squeue", "-h", "-o", "%A"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for name in _DAEMONS:  # in stop order
        if name in started:
            _stop_daemon(name, started[name])


def _register_session(root: Path, before: dict[str, int]) -> None:
    """This session uses the cluster; what runs now and ran not `before`, it started."""
    sessions = root / _SESSIONS_DIR
    sessions.mkdir(parents=True, exist_ok=True)
    (sessions / str(os.getpid())).write_text("")
    if os.environ.get("BUDGET_LAB_KEEP_SLURM") == "1":
        return
    started = _read_started(root)
    started.update({k: v for k, v in _running_daemons(root).items() if k not in before})
    (root / _STARTED_FILE).write_text(json.dumps(started))


def release_slurm() -> None:
    """The end of this session's use of the cluster: the last session using it stops what test
    sessions started (a session that died without this counts as ended)."""
    global _registered
    if not _registered:
        return
    _registered = False
    root = _slurm_root()
    with _Lock(root):
        sessions = root / _SESSIONS_DIR
        (sessions / str(os.getpid())).unlink(missing_ok=True)
        for entry in sessions.iterdir() if sessions.is_dir() else []:
            if not (entry.name.isdigit() and _pid_running(int(entry.name))):
                entry.unlink(missing_ok=True)
        if any(sessions.iterdir()):
            return  # another session still uses it: the last one stops it
        started = _read_started(root)
        if started and os.environ.get("BUDGET_LAB_KEEP_SLURM") != "1":
            _stop_started(root, started)
            (root / _STARTED_FILE).unlink(missing_ok=True)
            print(f"\nlocal Slurm: stopped what the tests started ({', '.join(started)})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    release_slurm()


def ensure_slurm() -> dict[str, str]:
    """Start the cluster if needed and return the environment its clients need (SLURM_CONF).

    The variables are also set in this process's `os.environ`, so sbatch/sacct called by
    submitit find the cluster. Skips the calling test when the cluster cannot run here.
    """
    global _env, _skip_reason, _registered
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
    root = _slurm_root()
    with _Lock(root):  # a session that is ending does not stop the cluster while it starts
        before = _running_daemons(root)
        try:
            proc = subprocess.run(
                ["bash", str(START_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            _register_session(root, before)  # whatever it did start is stopped at the end
            _registered = True
            pytest.fail(f"{START_SCRIPT} did not finish in {_START_TIMEOUT_S} s", pytrace=False)
        _register_session(root, before)
        _registered = True
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
