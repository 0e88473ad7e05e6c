"""Checkpoints that are never half-written, and a loader that falls back when the latest is bad.

Layout of `<run>/checkpoints/`: `step-000000123.pt` files (global optimizer step) and `latest`, a
one-line text file naming the newest complete checkpoint. A checkpoint is written to a temporary
file, flushed and fsynced, then renamed into place; only then is `latest` replaced (also by
rename). A crash at any moment leaves either the old or the new checkpoint as latest, never a torn
one. Loading tries `latest`, then older checkpoints, newest first, warning about each bad one.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from budget_lab.io import atomic_write, atomic_write_text

__all__ = ["CheckpointStore"]

_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointStore:
    """Save / load / prune the checkpoints of one run."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"step-{step:09d}.pt"

    def list(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)

    def latest_path(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.is_file():
                return path
        found = self.list()
        return found[0] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint for global step `step`, point `latest` at it, prune old ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write_text(self.dir / "latest", f"{path.name}\n")
        for old in self.list()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None when there is none. A corrupt one is skipped
        with a warning naming it (and left on disk for inspection, renamed *.corrupt)."""
        candidates = self.list()
        latest = self.latest_path()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        for path in candidates:
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
                if not isinstance(state, dict) or "model" not in state:
                    raise ValueError("not a budget-lab checkpoint (no 'model' entry)")
                return state, path
            except Exception as err:  # any unreadable file: fall back to the previous one
                bad = path.with_name(path.name + ".corrupt")
                os.replace(path, bad)
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                    f"moved it to {bad.name} and falling back to the previous checkpoint",
                    stacklevel=2,
                )
        return None
