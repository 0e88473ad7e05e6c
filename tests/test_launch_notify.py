"""Job → controller wake-ups (budget_lab/launch/notify.py): real sockets, real processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from budget_lab.launch.notify import ENV_VAR, Listener, notify


def test_a_process_started_inside_the_listener_wakes_it(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)  # as when no controller started this process
    with Listener() as wake:
        assert wake.path is not None and os.environ[ENV_VAR] == wake.path
        assert wake.wait(0) == []  # nothing yet: returns at once, empty
        assert stat.S_IMODE(os.stat(Path(wake.path).parent).st_mode) == 0o700  # this user only
        # A child inherits the variable, as a local job does through submitit.
        code = "from budget_lab.launch.notify import notify; assert notify('runs/x-001')"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        # The datagram is queued: the wait returns it (its 60 s timeout is never reached).
        assert wake.wait(60) == ["runs/x-001"]
        assert notify("a") and notify("b")
        assert wake.wait(60) == ["a", "b"]  # all that arrived, in order
        folder = Path(wake.path).parent
    # Closed: the variable and the socket's folder are gone, and a job's notify is a no-op.
    assert ENV_VAR not in os.environ
    assert not folder.exists()
    assert notify("late") is False


def test_notify_never_fails_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-such-socket"))  # a controller on another host
    assert notify("x") is False
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # not a socket at all
    assert notify("x") is False
    monkeypatch.delenv(ENV_VAR)
    assert notify("x") is False


def test_nested_listeners_restore_the_outer_one(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with Listener() as outer:
        with Listener() as inner:
            assert os.environ[ENV_VAR] == inner.path != outer.path
            assert notify("inner")
        assert os.environ[ENV_VAR] == outer.path
        assert notify("outer")
        assert outer.wait(60) == ["outer"]
    assert ENV_VAR not in os.environ
