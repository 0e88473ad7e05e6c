"""Checkpoints that are never half-written, and a loader that falls back when the latest is bad.

Layout of `<run>/checkpoints/`: `step-000000123.pt` files (global optimizer step) and `latest`, a
one-line text file naming the newest complete checkpoint. A checkpoint is written to a temporary
file, flushed and fsynced, then renamed into place; only then is `latest` replaced (also by
rename). A crash at any moment leaves either the old or the new checkpoint as latest, never a torn
one; the temporary file a killed writer leaves behind is removed at the next save.

Loading never runs code and never loses a checkpoint:
- files are read with `torch.load(weights_only=True)`: tensors and plain containers only (all a
  budget-lab checkpoint holds). A file that asks for anything else (a planted pickle) is refused
  with `CheckpointError`, and left where it is for inspection.
- an I/O error (OSError: EIO, a flaky network file system) is retried a few times with a short
  backoff, then raised as `CheckpointError` naming the file; nothing is moved, nothing falls back.
- a file that is not a readable checkpoint (torn, truncated, garbled) is skipped with a warning and
  the previous checkpoint is used; the bad one is renamed `*.corrupt` only once an older checkpoint
  has loaded. When none loads, every file stays in place and `CheckpointError` says so: a run never
  restarts from step 0 because its checkpoints could not be read.

What a checkpoint holds (`checkpoint_payload` writes it; `restore_payload` and then, once the
phase's optimizer exists, `restore_phase_states` read it back): a dict of tensors and plain
containers, version 1.

    version        1 (`CHECKPOINT_VERSION`)
    model          the network's state dict (whole, also under FSDP)
    ema            the EMA copy's state dict, or None when the run keeps no EMA
    phase_states   the phase in progress: its "optimizer", "scheduler" and "loader" state dicts
    rng            "gen": the noise generator, "torch": the CPU generator, "cuda": or None
    segment        the segment (one run of the job) that wrote it
    phase_name     the phase in progress, by name (for people and tools)
    world_size     how many processes wrote it (a resume at another size says what changes)
    phase, phase_step, global_step, images_seen, train_seconds: the `TrainState`
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from budget_lab.data.loader import ShardLoader
from budget_lab.errors import TrainingError
from budget_lab.io import atomic_write, atomic_write_text

__all__ = [
    "CheckpointStore",
    "CheckpointError",
    "TrainState",
    "ResumePoint",
    "checkpoint_payload",
    "restore_payload",
    "restore_phase_states",
    "rng_states",
    "CHECKPOINT_VERSION",
]

#: The layout version of what a checkpoint holds (see the module's docstring).
CHECKPOINT_VERSION = 1

_NAME = re.compile(r"^step-(\d{9})\.pt$")
# Temporary files of `budget_lab.io.atomic_write` for this store's files: `.<name>.<random>.tmp`.
_TEMP = re.compile(r"^\.(step-\d{9}\.pt|latest)\..+\.tmp$")


class CheckpointError(TrainingError):
    """A checkpoint cannot be used (refused as unsafe, unreadable after retries, or none loads);
    the message names the file(s). Nothing was moved or deleted."""


class _NotACheckpoint(ValueError):
    """The file unpickles but is not a budget-lab checkpoint."""


def _is_format_error(err: BaseException) -> bool:
    """True when `err` says the file's bytes are not a checkpoint (torn, truncated, garbled), as
    opposed to an I/O error, a refused object or an environment problem (e.g. a CUDA tensor on a
    CPU-only machine), which must never get a good file quarantined."""
    if isinstance(err, (EOFError, _NotACheckpoint, pickle.UnpicklingError)):
        return True
    if isinstance(err, RuntimeError):  # torch's zip reader: "PytorchStreamReader failed ..."
        message = str(err)
        return "PytorchStreamReader" in message or "corrupt" in message
    return False


def _is_unsafe(err: BaseException) -> bool:
    """The weights-only unpickler refused an object (a global, a class to build): not a file
    budget-lab wrote, perhaps a planted one."""
    message = str(err)
    return isinstance(err, pickle.UnpicklingError) and (
        "GLOBAL" in message or "allowlisted" in message
    )


class CheckpointStore:
    """Save / load / prune the checkpoints of one run."""

    #: Seconds to wait before each retry of a read that failed with an OSError.
    io_retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0)

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

    def remove_temp_files(self) -> list[Path]:
        """Delete the temporary files a killed writer left (a checkpoint's size each); complete
        checkpoints and `latest` are never touched. Only the run's single writer may call it (a
        writer's own temporary file in flight would go too). Returns what was removed."""
        if not self.dir.is_dir():
            return []
        removed = []
        for path in self.dir.iterdir():
            if _TEMP.match(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        return removed

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint for global step `step`, point `latest` at it, prune old ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files()  # before writing: a killed save's leftover may fill the disk
        path = self.path_for(step)
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write_text(self.dir / "latest", f"{path.name}\n")
        for old in self.list()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def _read(self, path: Path, map_location: str | torch.device) -> dict[str, Any]:
        """One checkpoint, weights only, with I/O errors retried (CheckpointError after the last);
        format errors propagate as they are."""
        for attempt in range(len(self.io_retry_delays) + 1):
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
                break
            except FileNotFoundError:
                raise
            except OSError as err:
                if attempt == len(self.io_retry_delays):
                    raise CheckpointError(
                        f"cannot read checkpoint {path}: {err} (errno "
                        f"{errno.errorcode.get(err.errno, err.errno)}), still failing after "
                        f"{attempt + 1} attempts. It was left in place and the run was not "
                        "restarted; check the disk or file system, then run the same command "
                        "again to resume"
                    ) from err
                time.sleep(self.io_retry_delays[attempt])
            except pickle.UnpicklingError as err:
                if not _is_unsafe(err):
                    raise
                wants = re.search(r"GLOBAL (\S+)", str(err))
                what = f"it asks for {wants.group(1)}" if wants else str(err).strip()[-200:]
                raise CheckpointError(
                    f"refused to load checkpoint {path}: it holds Python objects other than "
                    f"tensors and plain containers ({what}), and unpickling them could run code. "
                    "budget-lab never writes such a file: if you did not put it there, treat the "
                    "folder as tampered with. It was left in place; move it away (or delete it) to "
                    "resume from the previous checkpoint"
                ) from None
        if not isinstance(state, dict) or "model" not in state:
            raise _NotACheckpoint("not a budget-lab checkpoint (no 'model' entry)")
        return state

    def load_latest(
        self, map_location: str | torch.device = "cpu", quarantine: bool = True
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None when there is none at all.

        A torn or garbled one is skipped with a warning naming it; once an older one has loaded,
        the bad ones are renamed *.corrupt (kept for inspection; `quarantine=False`, for readers
        such as eval, leaves them as they are). Raises `CheckpointError`, moving nothing, when a
        file is unsafe, unreadable after retries, or when no checkpoint loads."""
        candidates = self.list()
        latest = self.latest_path()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        bad: list[tuple[Path, BaseException]] = []
        for path in candidates:
            try:
                state = self._read(path, map_location)
            except FileNotFoundError:  # pruned by the run's writer since we listed it
                continue
            except Exception as err:
                if not _is_format_error(err):
                    raise
                bad.append((path, err))
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                    "falling back to the previous checkpoint",
                    stacklevel=2,
                )
                continue
            for bad_path, _ in bad:  # an older checkpoint loaded: the newer bad ones are not needed
                if quarantine:
                    moved = bad_path.with_name(bad_path.name + ".corrupt")
                    os.replace(bad_path, moved)
                    warnings.warn(f"moved unreadable {bad_path} to {moved.name}", stacklevel=2)
            return state, path
        if bad:
            listed = "; ".join(f"{p.name}: {type(e).__name__}: {str(e)[:120]}" for p, e in bad)
            raise CheckpointError(
                f"no checkpoint in {self.dir} loads ({listed}). Every file was left in place and "
                "the run was not restarted from step 0: restore a checkpoint from a backup, or to "
                "start over, move this folder's checkpoints away"
            )
        return None


# -- what a checkpoint holds --------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run stands: the counters a checkpoint carries, result.json reports and the step
    callback sees (`as_dict`, in this order)."""

    phase: int = 0  # index of the phase in progress in cfg.phases
    phase_step: int = 0  # optimizer steps done in that phase
    global_step: int = 0  # optimizer steps done in all phases (it names the checkpoint)
    images_seen: int = 0  # training images consumed: global batch x steps
    train_seconds: float = 0.0  # seconds in training steps (not checkpoints, grids, start-up)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> TrainState:
        """The counters of a checkpoint (`checkpoint_payload`)."""
        return cls(**{f.name: payload[f.name] for f in fields(cls)})


class _Stateful(Protocol):
    """What a checkpoint saves and restores of a component (a scheduler, a loader)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def rng_states(gen: torch.Generator, cuda: bool) -> dict[str, Any]:
    """Every source of randomness of a training step: the noise generator, torch's CPU generator
    and (`cuda`) the current CUDA device's."""
    return {
        "gen": gen.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def checkpoint_payload(
    state: TrainState,
    *,
    model: dict[str, Any],
    ema: dict[str, Any] | None,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    loader: dict[str, Any],
    rng: dict[str, Any],
    segment: int,
    phase_name: str,
    world_size: int,
) -> dict[str, Any]:
    """What a checkpoint holds (see the module's docstring), from its parts' state dicts (`model`,
    `ema` and `optimizer` whole: gathered first under FSDP) and `rng_states`."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": model,
        "ema": ema,
        "phase_states": {"optimizer": optimizer, "scheduler": scheduler, "loader": loader},
        "rng": rng,
        "segment": segment,
        "phase_name": phase_name,
        "world_size": world_size,
        **state.as_dict(),
    }


@dataclass
class ResumePoint:
    """Where a resumed run picks up (`restore_payload`)."""

    state: TrainState  # the counters at the checkpoint
    segment: int  # the resuming segment's number: one after the checkpoint's writer
    world_size: int  # the world size that wrote the checkpoint (1 when it predates the field)
    phase_states: dict[str, Any] | None  # the phase in progress (`restore_phase_states`)


def restore_payload(
    payload: Mapping[str, Any],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    gen: torch.Generator,
    cuda: bool,
) -> ResumePoint:
    """Load a checkpoint's weights into `model` and `ema`, and its random states into `gen`,
    torch's CPU generator and (`cuda`) the current CUDA device's. The phase in progress comes back
    once its optimizer exists (`restore_phase_states`)."""
    model.load_state_dict(payload["model"])
    if ema is not None and payload.get("ema") is not None:
        ema.load_state_dict(payload["ema"])
    gen.set_state(payload["rng"]["gen"])
    torch.set_rng_state(payload["rng"]["torch"])
    if cuda and payload["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(payload["rng"]["cuda"])
    return ResumePoint(
        state=TrainState.from_payload(payload),
        segment=payload.get("segment", 0) + 1,
        world_size=payload.get("world_size", 1),
        phase_states=payload.get("phase_states"),
    )


def restore_phase_states(
    saved: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: _Stateful,
    loader: ShardLoader,
    shard_optimizer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Put the phase in progress back (`saved`: a checkpoint's "phase_states"): the optimizer's
    moments (cut into this rank's shards by `shard_optimizer` under FSDP), the schedule's step and
    the position of `loader`. The position is exact unless the lanes had to change with the world
    size; then the loader warns that it resumes at the same fraction of the epoch."""
    optimizer_state = saved["optimizer"]
    if shard_optimizer is not None:
        optimizer_state = shard_optimizer(optimizer_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])
    exact = saved["loader"].get("lanes") == loader.lanes
    loader.load_state_dict(saved["loader"], strict=exact)
