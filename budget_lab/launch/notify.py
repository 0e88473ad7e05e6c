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

The socket's folder (`budget-lab-notify-<pid>-*` in the temporary folder) is removed when the
listener closes, on an exception too. A controller killed outright (SIGKILL) cannot remove its
own: the next `Listener` of the same user removes every such folder whose socket no process
listens on any more.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ENV_VAR", "Listener", "notify", "remove_stale_folders"]

ENV_VAR = "BUDGET_LAB_NOTIFY_SOCKET"
_MAX_BYTES = 4096
_PREFIX = "budget-lab-notify-"
# A folder without its socket is being set up (microseconds) or was left half-made: removed once
# it is this old (seconds).
_UNFINISHED_S = 60.0


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
            remove_stale_folders()
            # A short private folder (mode 0700: only this user can send to it); a socket path is
            # limited to ~100 bytes, a workspace path is not.
            self._dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
            path = os.path.join(self._dir, "sock")
            sock = None
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(path)
                sock.setblocking(False)
            except BaseException as err:
                if sock is not None:
                    sock.close()
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
                if not isinstance(err, OSError):  # no socket: polling only; anything else raises
                    raise
            else:
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


def remove_stale_folders(tmp_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove this user's listener folders in `tmp_dir` (default: the temporary folder) whose
    socket nobody listens on (their controller was killed); returns them. Never raises."""
    root = Path(tmp_dir or tempfile.gettempdir())
    removed = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
            continue
        if _listened(Path(entry.path) / "sock", st.st_mtime):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            removed.append(Path(entry.path))
    if removed:
        print(
            f"budget-lab: removed {len(removed)} notify socket folder(s) of controllers that were "
            f"killed: {', '.join(p.name for p in removed)}",
            file=sys.stderr,
        )
    return removed


def _listened(sock_path: Path, folder_mtime: float) -> bool:
    """Whether a process still listens on the socket (a connect succeeds; a socket whose owner
    died refuses it). A folder without its socket counts as in use while young."""
    if not sock_path.exists():
        return time.time() - folder_mtime < _UNFINISHED_S
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(str(sock_path))
        except OSError as err:
            return err.errno not in (errno.ECONNREFUSED, errno.ENOTSOCK)
    return True
