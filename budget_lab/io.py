"""Atomic file writes: a reader (or a crash) never sees a half-written file under its final name.

Each write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target (`os.replace` is atomic on POSIX file systems); the folder is fsynced so the rename
itself survives a power cut.

Reading a user's file (`read_text`, `yaml_problem`): a file that is not UTF-8 text or not YAML is
a `ConfigError` naming the file and what is wrong with it, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from budget_lab.errors import ConfigError

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "read_text",
    "yaml_load",
    "yaml_dump",
    "yaml_problem",
]


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], mode: int = 0o644
) -> Path:
    """Call `write(f)` on a temporary binary file, then rename it to `path`. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# YAML through libyaml when PyYAML has it (5-8x faster than the pure-Python parser and emitter:
# a run's config.yaml is read and written on every launch of a sweep); same safe schema.
def _yaml_classes() -> tuple[type, type]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return loader, dumper


def yaml_load(text: str) -> Any:
    """yaml.safe_load(text), with libyaml when available."""
    import yaml

    return yaml.load(text, Loader=_yaml_classes()[0])  # noqa: S506 - a safe loader


def yaml_dump(data: Any) -> str:
    """yaml.safe_dump(data, sort_keys=False), with libyaml when available."""
    import yaml

    return yaml.dump(data, Dumper=_yaml_classes()[1], sort_keys=False)


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of the file `path`, a `what` (e.g. "recipe", "cluster file"). A file that
    cannot be read or is not text is a ConfigError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"the {what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}; is it a binary file?): a {what} is a YAML text file. Check that the "
            "path names the right file, or save it as UTF-8"
        ) from None


def yaml_problem(err: Exception) -> str:
    """A YAML error in one line: what is wrong and where ("expected ',' or ']' (line 2,
    column 1)")."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = str(err).splitlines()
    text = lines[0] if lines else type(err).__name__
    position = getattr(err, "position", None)  # a reader error: a character YAML does not allow
    return text if position is None else f"{text} (character {position + 1})"


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The object rows of a JSON-lines file (none if it does not exist); a torn line (a crash
    mid-write) or a row that is not an object is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
