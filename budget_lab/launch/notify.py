"""Job → controller wake-ups: one Unix datagram per row the controller acts on.

The sweep controller follows its trials by polling their run folders every `poll_s`. Between
two polls it waits on a `Listener` instead of sleeping: a datagram socket in a private temporary
folder whose path it exports as BUDGET_LAB_NOTIFY_SOCKET before it launches anything, so that
the jobs it starts on this host inherit it (submitit's local executor copies the environment;
sbatch exports it by default). A job calls `notify(run_dir)` right after it appends a row the
controller reacts to (a rung FID, the end of a segment), and the controller's wait returns at
once: a freed slot is refilled within milliseconds, a trial to prune is cut before its next step.

Best effort in both directions, like systemd's sd_notify: no variable, a job on another host, a
controller that has exited, a full socket buffer: the datagram is dropped and the next poll finds
the row in the files, which stay the only source of truth.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import time

__all__ = ["ENV_VAR", "Listener", "notify"]

ENV_VAR = "BUDGET_LAB_NOTIFY_SOCKET"
_MAX_BYTES = 4096


def notify(message: str) -> bool:
    """Send `message` to the controller named by BUDGET_LAB_NOTIFY_SOCKET; never blocks or
    raises. True when a controller's socket took it."""
    path = os.environ.get(ENV_VAR)
    if not path or not hasattr(socket, "AF_UNIX"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode()[:_MAX_BYTES], path)
    except OSError:  # no such socket here, nobody listening, buffer full
        return False
    return True


class Listener:
    """A controller's end: `wait(timeout_s)` returns the messages that arrived, early on the
    first one. Where Unix sockets are missing it degrades to a plain sleep (polling only).

    Use as a context manager: it exports its path in os.environ while open and restores the
    previous value (and removes its folder) on exit."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._sock: socket.socket | None = None
        self._dir: str | None = None
        self._saved: str | None = None

    def __enter__(self) -> Listener:
        self._saved = os.environ.get(ENV_VAR)
        if hasattr(socket, "AF_UNIX"):
            # A short private folder (mode 0700: only this user can send to it); a socket path is
            # limited to ~100 bytes, a workspace path is not.
            self._dir = tempfile.mkdtemp(prefix="budget-lab-notify-")
            path = os.path.join(self._dir, "sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            else:
                sock.setblocking(False)
                self._sock, self.path = sock, path
                os.environ[ENV_VAR] = path
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self.path is not None and os.environ.get(ENV_VAR) == self.path:
            if self._saved is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = self._saved
        self.path = None

    def wait(self, timeout_s: float) -> list[str]:
        """Block up to `timeout_s`; return every message received (empty after a timeout)."""
        if self._sock is None:
            time.sleep(max(timeout_s, 0.0))
            return []
        ready, _, _ = select.select([self._sock], [], [], max(timeout_s, 0.0))
        messages: list[str] = []
        while ready:
            try:
                data = self._sock.recv(_MAX_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            messages.append(data.decode(errors="replace"))
        return messages
