"""Stream prepared shards (`budget_lab.data.prepare`) as training batches, with exact resume.

`ShardLoader` reads the webdataset shards of one split at one resolution and yields batches,
epoch after epoch, forever::

    {"latents": float32 (B, C, H, W), "captions": float32 (B, L, D),
     "caption_mask": bool (B, L), "text": list[str], "keys": list[str]}

(``keys`` are the samples' keys, ``f"{input index:08d}"``, unique within the split.)

How an epoch is laid out
------------------------
Everything below is a pure function of the manifest, ``seed``, the epoch number, ``lanes`` and
``global_batch``, and *not* of ``world_size``, ``num_workers`` or ``batch_size``: the same global
batches come out on one process or on eight, with or without gradient accumulation, so a run can
move to another world size and resume exactly. Every rank and worker computes the plan on its own.

1. The split's shards are put in a random order drawn from ``(seed, epoch)`` (manifest order when
   ``shuffle=False``), and their samples are concatenated into one epoch stream of N samples.
2. The stream is cut into ``S = lanes`` contiguous, equal *lanes* of
   ``q = floor(N / G) * G / S`` samples, ``G = global_batch`` (samples per optimizer step over all
   ranks). The last ``N - S * q`` samples (fewer than ``G``) are left out of that epoch; which ones
   changes from epoch to epoch since the shard order does.
3. Each lane is shuffled with a ``shuffle_buffer``-sample buffer (webdataset's shuffle, seeded from
   ``(seed, epoch, lane)``; the buffer holds raw samples). Global sample position ``g`` of an epoch
   is sample ``g // S`` of lane ``g % S``, so a global batch of G positions takes ``G / S``
   consecutive samples from every lane.
4. There are ``R = world_size * max(num_workers, 1)`` readers (rank ``r``, worker ``w`` is reader
   ``r * W + w``), and reader ``i`` owns the lanes ``[i * S / R, (i + 1) * S / R)``: it reads only
   the shards those lanes overlap (a lane starting inside a shard reads that shard's earlier
   samples as raw bytes and drops them undecoded). A rank's batch takes ``c = batch_size *
   world_size / S`` samples from each of its lanes, lane by lane; each worker collates the part of
   its lanes and the main process concatenates the workers' parts in order. So ``lanes`` must be a
   multiple of ``world_size * max(num_workers, 1)`` and divide ``batch_size * world_size``
   (`ConfigError` says so otherwise); the default, ``world_size * max(num_workers, 1)``, always
   fits, but pin ``lanes`` (e.g. 64) to move a run between world sizes.
5. A rank yields ``batches_per_epoch = q / c`` batches per epoch (all ranks the same number);
   together the ranks' batches ``j`` hold global positions ``[j * c * S, (j + 1) * c * S)``, and
   within an epoch every kept sample is seen exactly once, by one rank and one worker. Each batch
   carries ``"index"``: the samples' global positions in their epoch (int64 (B,)), so a trainer
   can draw per-sample noise that does not depend on how the batch was split.

Exact resume
------------
`ShardLoader.state_dict` is ``{"epoch", "batch", "lane_position", ...}``: the epoch and how far
every lane has been read in it (the same on every rank), plus the settings that fix the order.
A new loader given that state with `load_state_dict` yields, bit for bit, the samples an
uninterrupted loader would have yielded next; every lane drops the samples already read after the
shuffle, before decoding them. Exact resume needs the same data, seed, shuffle settings, lanes and
global batch (checked), and a position that falls on a whole batch of the new loader; world
size, workers and batch size may change. ``strict=False`` accepts other settings and resumes at
the same fraction of the same epoch instead.

Errors
------
A missing, truncated or unreadable shard, a sample that is not a readable .npy or whose shape
does not match the manifest, and (with ``verify=True`` or `validate_shards`) a sha256 mismatch
raise `DataError` naming the shard and what to do: re-run ``budget-lab data prepare`` with the same
arguments (it redoes shards that fail verification), or delete the shard and re-run it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from budget_lab.errors import ConfigError, DataError
from budget_lab.rundir import DATA_MANIFEST

__all__ = [
    "MANIFEST_KIND",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Batch",
    "ImageEncoderInfo",
    "Manifest",
    "ResolutionInfo",
    "ShardInfo",
    "ShardLoader",
    "SplitInfo",
    "TextEncoderInfo",
    "ValidationReport",
    "load_manifest",
    "sha256_file",
    "validate_shards",
]

#: The manifest's file name inside a prepared data folder.
MANIFEST_NAME = DATA_MANIFEST
#: The manifest's ``kind``.
MANIFEST_KIND = "budget-lab-shards"
#: The manifest format version this code reads and writes.
MANIFEST_VERSION = 1

#: A batch: "latents", "captions", "caption_mask" (tensors), "text" and "keys" (lists of str).
Batch = dict[str, Any]

_STATE_FORMAT = "budget-lab-shard-loader"
_STATE_VERSION = 2  # 2: lanes (world-size-free order)
# State fields that must match for an exact resume.
_LAYOUT_FIELDS = (
    "seed",
    "shuffle",
    "shuffle_buffer",
    "lanes",
    "global_batch",
    "split",
    "resolution",
)
_EXPECT_FIELDS = (
    "latent_shape",
    "latent_channels",
    "image_encoder",
    "text_encoder",
    "caption_dim",
    "max_tokens",
)
_ERROR_KEY = "__budget_lab_data_error__"
_FIX = (
    "re-run `budget-lab data prepare` with the same arguments (it redoes shards that fail "
    "verification), or delete the shard file and re-run it"
)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name, absolute path, sample count and sha256."""

    name: str
    path: Path
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """A split at one resolution: its sample count and shards (in index order)."""

    name: str
    count: int
    shards: tuple[ShardInfo, ...]
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolutionInfo:
    """One prepared resolution: latent shape ``(C, H, W)``, splits and skipped inputs."""

    resolution: int
    latent_shape: tuple[int, int, int]
    splits: dict[str, SplitInfo]
    skipped: dict[str, int]


@dataclass(frozen=True)
class ImageEncoderInfo:
    """How the latents were made (see `budget_lab.data.encoders`)."""

    name: str
    channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float
    latent_sampling: str


@dataclass(frozen=True)
class TextEncoderInfo:
    """How the caption embeddings were made: encoder name, width D and length L."""

    name: str
    width: int
    max_tokens: int


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` (format in `budget_lab.data.prepare`)."""

    root: Path
    version: int
    complete: bool
    created_at: str
    updated_at: str
    settings: dict[str, Any]
    image_encoder: ImageEncoderInfo
    text_encoder: TextEncoderInfo
    resolutions: dict[int, ResolutionInfo]

    def resolution(self, resolution: int | None = None) -> ResolutionInfo:
        """The info of `resolution`; None picks the only one. `ConfigError` if absent/ambiguous."""
        available = ", ".join(str(r) for r in sorted(self.resolutions))
        if resolution is None:
            if len(self.resolutions) != 1:
                raise ConfigError(
                    f"{self.root} holds several resolutions ({available}): pass resolution= "
                    "(--res) to pick one"
                )
            return next(iter(self.resolutions.values()))
        if resolution not in self.resolutions:
            raise ConfigError(
                f"resolution={resolution} is not prepared in {self.root}: it holds {available}. "
                f"Pick one of those, or run `budget-lab data prepare ... --res {resolution}` "
                "into a new --out"
            )
        return self.resolutions[resolution]

    def split(self, resolution: int | None, split: str) -> SplitInfo:
        """The info of `split` at `resolution`; `ConfigError` naming the valid splits if absent."""
        info = self.resolution(resolution)
        if split not in info.splits:
            available = ", ".join(info.splits) or "none"
            raise ConfigError(
                f"split={split!r} is not in {self.root} at {info.resolution} px: it has {available}"
            )
        return info.splits[split]


def _manifest_error(path: Path, problem: str) -> DataError:
    return DataError(
        f"{path}: {problem}. It is not a manifest this budget-lab can read: re-run "
        "`budget-lab data prepare` into a new --out"
    )


def load_manifest(data_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check ``data_dir/manifest.json``.

    Raises `DataError` naming the folder or file when it is missing, not JSON, not a
    budget-lab shard manifest, of another version, or lacks a field.
    """
    root = Path(data_dir).expanduser()
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DataError(
            f"data folder {str(root)!r} does not exist: pass the --out of `budget-lab data "
            "prepare` (e.g. data/synth-latents)"
        )
    if not path.is_file():
        raise DataError(
            f"{root} has no {MANIFEST_NAME}: it is not the output of `budget-lab data prepare` "
            "(pass that --out), or prepare has not been run into it yet"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _manifest_error(path, f"not readable JSON ({err})") from err
    if not isinstance(raw, dict) or raw.get("kind") != MANIFEST_KIND:
        kind = raw.get("kind") if isinstance(raw, dict) else None
        raise _manifest_error(path, f"kind is {kind!r}, expected {MANIFEST_KIND!r}")
    if raw.get("version") != MANIFEST_VERSION:
        raise _manifest_error(
            path, f"version {raw.get('version')!r}, this budget-lab reads {MANIFEST_VERSION}"
        )
    try:
        ie, te = raw["image_encoder"], raw["text_encoder"]
        resolutions = {}
        for res_key, info in raw["resolutions"].items():
            res = int(res_key)
            splits = {
                name: SplitInfo(
                    name=name,
                    count=int(split["count"]),
                    shards=tuple(
                        ShardInfo(
                            name=s["name"],
                            path=(root / str(res) / s["name"]).resolve(),
                            count=int(s["count"]),
                            sha256=str(s["sha256"]),
                        )
                        for s in split["shards"]
                    ),
                    skipped=dict(split.get("skipped", {})),
                )
                for name, split in info["splits"].items()
            }
            c, h, w = (int(d) for d in info["latent_shape"])
            resolutions[res] = ResolutionInfo(res, (c, h, w), splits, dict(info["skipped"]))
        return Manifest(
            root=root.resolve(),
            version=int(raw["version"]),
            complete=bool(raw["complete"]),
            created_at=str(raw["created_at"]),
            updated_at=str(raw.get("updated_at", raw["created_at"])),
            settings=dict(raw["settings"]),
            image_encoder=ImageEncoderInfo(
                name=str(ie["name"]),
                channels=int(ie["channels"]),
                downsample=int(ie["downsample"]),
                scaling_factor=float(ie["scaling_factor"]),
                shift_factor=float(ie.get("shift_factor", 0.0)),
                latent_sampling=str(ie.get("latent_sampling", "mean")),
            ),
            text_encoder=TextEncoderInfo(
                name=str(te["name"]), width=int(te["width"]), max_tokens=int(te["max_tokens"])
            ),
            resolutions=resolutions,
        )
    except KeyError as err:
        raise _manifest_error(path, f"field {err.args[0]!r} is missing") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise _manifest_error(path, f"a field has the wrong type ({err})") from err


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What `validate_shards` checked and what it found wrong (empty `problems`: all good)."""

    data_dir: Path
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def validate_shards(
    data_dir: str | os.PathLike[str],
    resolution: int | None = None,
    split: str | None = None,
    raise_on_error: bool = True,
) -> ValidationReport:
    """Check that every shard in the manifest exists and has its recorded sha256.

    Limited to one `resolution` and/or `split` when given. Returns the report; with
    `raise_on_error` (the default) raises `DataError` listing the bad shards and what to do.
    """
    manifest = load_manifest(data_dir)
    report = ValidationReport(manifest.root)
    if not manifest.complete:
        report.problems.append(
            f"{manifest.root / MANIFEST_NAME} says prepare did not finish: re-run it with the "
            "same arguments to complete it"
        )
    resolutions = (
        [manifest.resolution(resolution)]
        if resolution is not None
        else list(manifest.resolutions.values())
    )
    for info in resolutions:
        splits = [manifest.split(info.resolution, split)] if split else list(info.splits.values())
        for split_info in splits:
            for shard in split_info.shards:
                report.shards += 1
                report.samples += shard.count
                if not shard.path.is_file():
                    report.problems.append(f"{shard.path}: missing")
                    continue
                report.bytes += shard.path.stat().st_size
                digest = sha256_file(shard.path)
                if digest != shard.sha256:
                    report.problems.append(
                        f"{shard.path}: sha256 {digest[:12]}... does not match the manifest's "
                        f"{shard.sha256[:12]}... (corrupt or modified)"
                    )
    if report.problems and raise_on_error:
        listed = "\n  ".join(report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        raise DataError(
            f"{len(report.problems)} problem(s) in {manifest.root}:\n  {listed}{more}\n"
            f"To fix: {_FIX}"
        )
    return report


# ------------------------------------------------------------------------------------------
# The per-worker stream
# ------------------------------------------------------------------------------------------


def _mix(*parts: object) -> int:
    """A 64-bit seed from `parts`, stable across processes and platforms."""
    text = "/".join(str(p) for p in ("budget-lab-loader", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _slot_plan(
    counts: Sequence[int], order: Sequence[int], start: int, stop: int
) -> list[tuple[int, int, int]]:
    """The (shard, first, end) sample ranges that cover [start, stop) of the epoch stream."""
    plan = []
    offset = 0
    for shard in order:
        lo, hi = offset, offset + counts[shard]
        offset = hi
        if hi <= start or counts[shard] == 0:
            continue
        if lo >= stop:
            break
        plan.append((shard, max(start, lo) - lo, min(stop, hi) - lo))
    return plan


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to produce its batches (plain data: picklable)."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    latent_shape: tuple[int, int, int]
    caption_shape: tuple[int, int]
    seed: int
    shuffle: bool
    shuffle_buffer: int
    lanes: int  # S
    lane_length: int  # q: samples of each lane per epoch
    per_lane: int  # c: samples each lane gives to one batch of a rank
    first_lane: int  # of reader (rank, worker 0)
    lanes_per_reader: int


def _read_range(path: str, expected: int, first: int, end: int) -> Iterator[dict[str, Any]]:
    """Raw samples ``[first, end)`` of a shard (bytes, undecoded); `DataError` when it is broken."""
    from webdataset.tariterators import tarfile_samples

    seen = 0
    try:
        for sample in tarfile_samples([{"url": path}]):
            if seen >= first:
                yield sample
            seen += 1
            if seen >= end:
                return
    except FileNotFoundError as err:
        raise DataError(f"shard {path} is missing: {_FIX}") from err
    except Exception as err:  # tarfile and webdataset raise many types for a broken archive
        text = str(err).strip().splitlines()
        raise DataError(
            f"shard {path} is corrupt ({text[0] if text else type(err).__name__}): {_FIX}"
        ) from err
    raise DataError(
        f"shard {path} holds {seen} samples but the manifest says {expected} (truncated?): {_FIX}"
    )


def _decode(sample: dict[str, Any], spec: _StreamSpec) -> dict[str, Any]:
    """Raw sample -> numpy arrays + caption, checked against the manifest's shapes."""
    from webdataset.autodecode import npy_loads

    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    out: dict[str, Any] = {"key": key}
    expected = {
        "latent.npy": spec.latent_shape,
        "emb.npy": spec.caption_shape,
        "mask.npy": spec.caption_shape[:1],
    }
    for name, shape in expected.items():
        if name not in sample:
            raise DataError(f"shard {url}: sample {key} has no {name}: {_FIX}")
        try:
            array = npy_loads(sample[name])
        except Exception as err:  # numpy raises ValueError, EOFError, ... for a broken .npy
            raise DataError(
                f"shard {url}: sample {key}'s {name} is unreadable ({err}): {_FIX}"
            ) from err
        if tuple(array.shape) != tuple(shape):
            raise DataError(
                f"shard {url}: sample {key}'s {name} has shape {tuple(array.shape)}, the manifest "
                f"says {tuple(shape)}: {_FIX}"
            )
        out[name] = array
    out["text"] = sample["txt"].decode("utf-8") if isinstance(sample.get("txt"), bytes) else ""
    return out


def _collate(samples: list[dict[str, Any]]) -> Batch:
    return {
        "latents": torch.from_numpy(np.stack([s["latent.npy"] for s in samples])).float(),
        "captions": torch.from_numpy(np.stack([s["emb.npy"] for s in samples])).float(),
        "caption_mask": torch.from_numpy(np.stack([s["mask.npy"] for s in samples])).bool(),
        "text": [s["text"] for s in samples],
        "keys": [s["key"] for s in samples],
    }


class _LaneStream(IterableDataset):
    """Infinite batch parts of one worker: `per_lane` samples of each of its lanes per batch."""

    def __init__(self, spec: _StreamSpec, start_epoch: int, start_position: int) -> None:
        super().__init__()
        self.spec = spec
        self.start_epoch = start_epoch
        self.start_position = start_position  # samples already read from every lane this epoch

    def _lane(self, epoch: int, order: list[int], lane: int, skip: int) -> Iterator[dict]:
        import webdataset as wds

        spec = self.spec
        q = spec.lane_length
        plan = _slot_plan(spec.counts, order, lane * q, (lane + 1) * q)
        raw: Iterator[dict[str, Any]] = (
            sample
            for shard, first, end in plan
            for sample in _read_range(spec.paths[shard], spec.counts[shard], first, end)
        )
        if spec.shuffle:
            rng = random.Random(_mix(spec.seed, epoch, "samples", lane))
            raw = wds.filters.shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)(raw)
        return islice(raw, skip, None)  # skipped before decoding

    def _epoch(self, epoch: int, worker: int, skip: int) -> Iterator[Batch]:
        spec = self.spec
        order = list(range(len(spec.paths)))
        if spec.shuffle:
            random.Random(_mix(spec.seed, epoch, "shards")).shuffle(order)
        first = spec.first_lane + worker * spec.lanes_per_reader
        lanes = range(first, first + spec.lanes_per_reader)
        streams = [self._lane(epoch, order, lane, skip) for lane in lanes]
        c = spec.per_lane
        for position in range(skip, spec.lane_length, c):
            samples, index = [], []
            for lane, stream in zip(lanes, streams, strict=True):
                samples.extend(_decode(sample, spec) for sample in islice(stream, c))
                index.extend((position + o) * spec.lanes + lane for o in range(c))
            if len(samples) < c * len(streams):  # a lane ran short: its shard lied about count
                raise DataError(f"a lane of epoch {epoch} ended early: {_FIX}")
            batch = _collate(samples)
            batch["index"] = torch.tensor(index, dtype=torch.int64)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, skip = self.start_epoch, self.start_position
        try:
            while True:
                yield from self._epoch(epoch, worker, skip)
                epoch, skip = epoch + 1, 0
        except DataError as err:
            if info is None:
                raise
            # Raised inside a worker, torch would re-raise it with the worker's traceback pasted
            # into the message; pass the message on instead and let the main process raise it.
            yield {_ERROR_KEY: str(err)}


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return {
        k: torch.cat([p[k] for p in parts])
        if isinstance(parts[0][k], torch.Tensor)
        else [x for p in parts for x in p[k]]
        for k in parts[0]
    }


# ------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}={value!r} is not valid: expected an integer >= {lo}")
    return value


class ShardLoader:
    """Infinite, deterministic, resumable batches from one split of a prepared data folder.

    Args:
        data_dir: the ``--out`` folder of ``budget-lab data prepare``.
        split: "train" or "val" (whatever the manifest has).
        resolution: which prepared resolution; None picks the only one (required if several).
        batch_size: samples per batch on this rank.
        seed: seeds the per-epoch shard order and sample shuffle.
        shuffle: shuffle shards and samples (False: manifest order, same every epoch).
        shuffle_buffer: samples held by each worker's shuffle buffer.
        num_workers: DataLoader worker processes (0: read in the main process).
        rank, world_size: this process's place in distributed training.
        lanes: how many lanes an epoch is cut into (see above); None: world_size x
            max(num_workers, 1). Pin it to keep the order when world size or workers change.
        global_batch: samples per optimizer step over all ranks (batch_size x world_size x
            gradient accumulation); None: batch_size x world_size. Fixes the epoch length.
        expect: what the model needs, checked against the manifest (`DataError` on mismatch):
            any of ``latent_shape`` (C, H, W), ``latent_channels``, ``image_encoder``,
            ``text_encoder`` (names), ``caption_dim`` (D), ``max_tokens`` (L).
        verify: check every shard's sha256 now (reads the whole split once).
        pin_memory: pin batches (for fast copies to a GPU).

    Raises `DataError` when the data is missing, incomplete, smaller than one global batch,
    or does not match `expect`; `ConfigError` for
    invalid arguments. Iterate with ``iter(loader)`` (one iterator at a time); each new iterator
    starts at the current position (`state_dict`). For one finite pass (evaluation), take
    ``itertools.islice(loader, loader.batches_per_epoch)``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        split: str = "train",
        resolution: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lanes: int | None = None,
        global_batch: int | None = None,
        expect: Mapping[str, Any] | None = None,
        verify: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed={seed!r} is not valid: expected an integer")
        if rank >= world_size:
            raise ConfigError(
                f"rank={rank} is not valid for world_size={world_size}: expected 0..{world_size - 1}"
            )
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.pin_memory = pin_memory
        self.manifest = load_manifest(data_dir)
        if not self.manifest.complete:
            raise DataError(
                f"{self.manifest.root / MANIFEST_NAME} says prepare did not finish: re-run it "
                "with the same arguments to complete it"
            )
        self.info = self.manifest.resolution(resolution)
        self.resolution = self.info.resolution
        self.split = split
        self.split_info = self.manifest.split(self.resolution, split)
        if expect:
            self._check_expect(expect)
        missing = [str(s.path) for s in self.split_info.shards if not s.path.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} shard(s) of {self._where()} are missing ({missing[0]}"
                f"{', ...' if len(missing) > 1 else ''}): {_FIX}"
            )
        if verify:
            validate_shards(self.manifest.root, self.resolution, split)
        total = sum(s.count for s in self.split_info.shards)
        workers = max(self.num_workers, 1)
        readers = self.world_size * workers
        self.lanes = readers if lanes is None else _check_int("lanes", lanes, 1)
        rank_batch = self.batch_size * self.world_size
        self.global_batch = (
            rank_batch if global_batch is None else _check_int("global_batch", global_batch, 1)
        )
        if self.lanes % readers or rank_batch % self.lanes:
            raise ConfigError(
                f"lanes={self.lanes} does not fit: it must be a multiple of world_size x "
                f"max(num_workers, 1) = {self.world_size} x {workers} = {readers} and divide "
                f"batch_size x world_size = {self.batch_size} x {self.world_size} = {rank_batch}. "
                "Pick lanes (data.lanes) that does, or change num_workers or the batch size"
            )
        if self.global_batch % rank_batch:
            raise ConfigError(
                f"global_batch={self.global_batch} is not a multiple of batch_size x world_size "
                f"= {rank_batch}: a step must be a whole number of batches"
            )
        lane_length = total // self.global_batch * self.global_batch // self.lanes
        if lane_length == 0:
            raise DataError(
                f"{self._where()} has {total} samples, fewer than the global batch "
                f"{self.global_batch} (batch_size {self.batch_size} x world_size "
                f"{self.world_size} x accumulation {self.global_batch // rank_batch}): every "
                "epoch needs a full global batch. Lower the batch size, or prepare more data"
            )
        te = self.manifest.text_encoder
        per_reader = self.lanes // readers
        self._spec = _StreamSpec(
            paths=tuple(str(s.path) for s in self.split_info.shards),
            counts=tuple(s.count for s in self.split_info.shards),
            latent_shape=self.info.latent_shape,
            caption_shape=(te.max_tokens, te.width),
            seed=seed,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            lanes=self.lanes,
            lane_length=lane_length,
            per_lane=rank_batch // self.lanes,
            first_lane=self.rank * workers * per_reader,
            lanes_per_reader=per_reader,
        )
        #: Samples this rank sees per epoch (all in full batches).
        self.samples_per_epoch = lane_length * self.lanes // self.world_size
        #: Batches this rank yields per epoch.
        self.batches_per_epoch = lane_length // self._spec.per_lane
        self._epoch = 0
        self._batch = 0
        fingerprint = hashlib.sha256()
        for shard in self.split_info.shards:
            fingerprint.update(f"{shard.name}:{shard.count}:{shard.sha256};".encode())
        self._fingerprint = fingerprint.hexdigest()[:16]

    def _where(self) -> str:
        return f"{self.manifest.root / str(self.resolution)} (split {self.split!r})"

    def _check_expect(self, expect: Mapping[str, Any]) -> None:
        unknown = sorted(set(expect) - set(_EXPECT_FIELDS))
        if unknown:
            raise ConfigError(
                f"expect has unknown field(s) {', '.join(unknown)}: valid are "
                f"{', '.join(_EXPECT_FIELDS)}"
            )
        found = {
            "latent_shape": tuple(self.info.latent_shape),
            "latent_channels": self.info.latent_shape[0],
            "image_encoder": self.manifest.image_encoder.name,
            "text_encoder": self.manifest.text_encoder.name,
            "caption_dim": self.manifest.text_encoder.width,
            "max_tokens": self.manifest.text_encoder.max_tokens,
        }
        for name, wanted in expect.items():
            if wanted is None:
                continue
            value = tuple(wanted) if name == "latent_shape" else wanted
            if value != found[name]:
                raise DataError(
                    f"{self._where()}: {name} is {found[name]!r} in the data but the model "
                    f"expects {value!r}. Prepare data that matches the model (--res, --vae, "
                    "--text-encoder, --max-tokens of `budget-lab data prepare`), or configure the "
                    "model for this data"
                )

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample's latent."""
        return self._spec.latent_shape

    @property
    def caption_shape(self) -> tuple[int, int]:
        """``(L, D)`` of one sample's caption embeddings."""
        return self._spec.caption_shape

    def __iter__(self) -> Iterator[Batch]:
        c = self._spec.per_lane
        dataset = _LaneStream(self._spec, self._epoch, self._batch * c)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        iterator = iter(loader)
        parts_per_batch = max(self.num_workers, 1)
        try:
            while True:
                parts = []
                for part in islice(iterator, parts_per_batch):
                    if _ERROR_KEY in part:
                        raise DataError(part[_ERROR_KEY])
                    parts.append(part)
                batch = _concat(parts)
                self._batch += 1
                if self._batch == self.batches_per_epoch:
                    self._epoch, self._batch = self._epoch + 1, 0
                yield batch
        finally:
            del iterator  # shuts the workers down

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches yielded in it, samples read from each lane) and the
        settings that fix the order."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "lane_position": self._batch * self._spec.per_lane,
            "batches_per_epoch": self.batches_per_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "lanes": self.lanes,
            "global_batch": self.global_batch,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "split": self.split,
            "resolution": self.resolution,
            "data": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Continue from `state` (from `state_dict`); takes effect at the next ``iter()``.

        With `strict` (the default), the data and every setting that fixes the order must match
        (`ConfigError` / `DataError` otherwise) and the resume is exact. With ``strict=False``
        they may differ: the loader resumes in the same epoch at the same fraction of it (a
        warning says so), which may repeat or skip some samples of that epoch.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ConfigError(
                "this is not a ShardLoader state (no format "
                f"{_STATE_FORMAT!r}): pass what ShardLoader.state_dict() returned"
            )
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
            old_per_epoch = int(state["batches_per_epoch"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"ShardLoader state is incomplete or malformed ({err!r})") from err
        mine = self.state_dict()
        different = [f for f in _LAYOUT_FIELDS if state.get(f) != mine[f]]
        if strict:
            if different:
                listed = ", ".join(f"{f}={state.get(f)!r} (now {mine[f]!r})" for f in different)
                raise ConfigError(
                    f"cannot resume the data order exactly: the state was saved with {listed}. "
                    "Use the same settings, or load_state_dict(state, strict=False) to resume "
                    "approximately"
                )
            if state.get("data") != self._fingerprint:
                raise DataError(
                    f"the shards of {self._where()} are not the ones the state was saved with: "
                    "resume with the same data folder, or load_state_dict(state, strict=False)"
                )
            c = self._spec.per_lane
            position = int(state.get("lane_position", batch * c))
            if position % c or not 0 <= position // c < self.batches_per_epoch or epoch < 0:
                raise ConfigError(
                    f"ShardLoader state position epoch={epoch}, lane position {position} does not "
                    f"fall on a batch of this loader (an epoch has {self.batches_per_epoch} "
                    f"batches of {c} samples per lane): resume with batch_size x world_size "
                    "dividing the global batch, or load_state_dict(state, strict=False)"
                )
            self._epoch, self._batch = epoch, position // c
            return
        fraction = batch / old_per_epoch if old_per_epoch > 0 else 0.0
        self._epoch = max(epoch, 0)
        self._batch = min(math.floor(fraction * self.batches_per_epoch), self.batches_per_epoch - 1)
        if different or state.get("data") != self._fingerprint:
            warnings.warn(
                f"ShardLoader resumed approximately (changed: "
                f"{', '.join(different + (['data'] if state.get('data') != self._fingerprint else []))}"
                f"): epoch {self._epoch}, batch {self._batch} of {self.batches_per_epoch}",
                stacklevel=2,
            )
