"""Precompute training inputs: captioned images -> latents + caption embeddings in webdataset shards.

`prepare_dataset` reads captioned images, centre-crops and resizes each one (LANCZOS) to every
requested resolution, encodes it with an image encoder (``"pixel"`` or a VAE) and its caption with
a text encoder (`budget_lab.data.encoders`), and writes the results as webdataset shards that
`budget_lab.data.loader.ShardLoader` streams during training.

Inputs (``images``)
-------------------
* a folder of images (``.jpg .jpeg .png .webp .bmp``, searched recursively) each with a caption in
  a ``.txt`` file of the same name beside it (``cat.jpg`` + ``cat.txt``);
* webdataset tar shards whose samples hold an image (``jpg``/``jpeg``/``png``/``webp``/``bmp``) and
  a ``txt`` caption: a folder of ``.tar`` files, a single ``.tar``, or a brace pattern such as
  ``"shards/part-{000000..000099}.tar"``. Only local files are read.

Splits: a folder with ``train/`` and/or ``val/`` subfolders (each holding images or tars) keeps
them as the ``train`` and ``val`` splits (nothing else in the folder is read); tars named
``train-*.tar`` / ``val-*.tar`` (as ``budget-lab data synth`` writes) do the same. Otherwise
everything is ``train``.

Skipped inputs
--------------
Never fatal; counted per resolution and split in the manifest and in the final summary line:

* ``unreadable``: the image cannot be decoded (corrupt, truncated, not an image, too many pixels);
* ``too_small``: the image's short side is smaller than the resolution. Images are never
  upscaled, so an image can be kept at 256 px and skipped at 512 px;
* ``no_caption``: no ``.txt`` beside the image (an empty caption file is a valid, empty caption);
* ``no_image``: a tar sample without an image member.

Output (``out``)
----------------
``out/<res>/<split>-000000.tar`` ...: shard ``i`` of a split is made from inputs
``[i * shard_size, (i + 1) * shard_size)`` of that split (in sorted order), minus the skipped ones,
so shards may hold fewer than ``shard_size`` samples. Each sample, keyed by its input index
``f"{index:08d}"`` (unique within the split), has::

    latent.npy   float16 (C, H, W)   image latent, already scaled (see encoders)
    emb.npy      float16 (L, D)      caption token embeddings, L = max_tokens, zeros at padding
    mask.npy     uint8   (L,)        1 for real tokens, 0 for padding
    txt          the caption (utf-8)
    json         {"key": source key, "source": image or tar file, "orig_size": [w, h],
                  "index": input index}

and ``out/manifest.json`` (`MANIFEST_NAME`)::

    {"kind": "budget-lab-shards", "version": 1, "complete": bool,
     "created_at": ISO time, "updated_at": ISO time,
     "settings": {"source", "resolutions", "vae", "text_encoder", "max_tokens", "shard_size"},
     "image_encoder": {"name", "channels", "downsample", "scaling_factor", "shift_factor",
                       "latent_sampling": "mean", "dtype": "float16"},
     "text_encoder": {"name", "width", "max_tokens", "dtype": "float16"},
     "inputs": {split: number of inputs read},
     "resolutions": {"<res>": {
         "latent_shape": [C, H, W], "count": samples over all splits,
         "skipped": {reason: n},
         "splits": {split: {"count": n, "skipped": {reason: n},
                            "shards": [{"index", "name", "count", "sha256",
                                        "inputs": [start, end], "skipped": {reason: n}}]}}}}}

Resuming
--------
Each shard is written to ``<name>.partial``, renamed when complete, and then recorded in the
manifest (rewritten atomically after every shard). Re-running the same command skips recorded
shards whose file still has the recorded sha256 and redoes the others (missing, corrupt or never
recorded), so an interrupted run continues where it stopped and a run whose shards were damaged
repairs them. Tar files are byte-for-byte reproducible (fixed mtimes and owners), so a resumed run
writes exactly what an uninterrupted one would. Re-running into the same ``out`` with a different
source, resolutions, encoders, max_tokens or shard_size raises `ConfigError`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from budget_lab.data.encoders import (
    ImageEncoder,
    TextEncoder,
    encoder_name,
    images_to_tensor,
    load_image_encoder,
    load_text_encoder,
)
from budget_lab.data.loader import MANIFEST_KIND, MANIFEST_NAME, MANIFEST_VERSION, sha256_file
from budget_lab.errors import ConfigError, DataError
from budget_lab.io import atomic_write_json

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "discover_sources",
    "prepare_dataset",
    "summary_lines",
]

#: Image file extensions read from folders and tar samples.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Why an input can be skipped (see the module docstring).
SKIP_REASONS = ("unreadable", "too_small", "no_caption", "no_image")
#: The split names kept from ``train/`` / ``val/`` folders and ``train-*`` / ``val-*`` tars.
SPLITS = ("train", "val")

_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so that shards are reproducible
_SETTING_FIELDS = ("source", "resolutions", "vae", "text_encoder", "max_tokens", "shard_size")
_SOURCE_HELP = (
    "pass a folder of images with same-name .txt captions, a folder of webdataset .tar shards, "
    "a single .tar, or a brace pattern such as 'shards/part-{000000..000009}.tar'"
)


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One input: an image (a path or encoded bytes) and its caption, either may be missing."""

    key: str
    origin: str
    caption: str | None
    image: Path | bytes | None


class _Source(ABC):
    """The inputs of one split, in a fixed order."""

    @abstractmethod
    def count(self) -> int:
        """How many inputs `__iter__` yields."""

    @abstractmethod
    def __iter__(self) -> Iterator[_Item]:
        """The inputs, in a fixed order."""

    @abstractmethod
    def describe(self) -> str:
        """A short description for messages."""


class _FolderSource(_Source):
    """Images under a folder (recursive, sorted by relative path) with same-stem .txt captions."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = sorted(
            (
                p
                for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            ),
            key=lambda p: p.relative_to(root).as_posix(),
        )

    def count(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return f"image folder {self.root}"

    def __iter__(self) -> Iterator[_Item]:
        for path in self.files:
            caption_path = path.with_suffix(".txt")
            try:
                caption: str | None = caption_path.read_text(encoding="utf-8", errors="replace")
            except (FileNotFoundError, IsADirectoryError):
                caption = None
            yield _Item(
                key=path.relative_to(self.root).as_posix(),
                origin=str(path),
                caption=caption.strip() if caption is not None else None,
                image=path,
            )


class _TarSource(_Source):
    """Samples of webdataset tars (in the given order), read with webdataset's tar iterator."""

    def __init__(self, tars: Sequence[Path]) -> None:
        self.tars = list(tars)
        self._count: int | None = None

    def describe(self) -> str:
        if len(self.tars) == 1:
            return f"tar {self.tars[0]}"
        return f"{len(self.tars)} tars in {self.tars[0].parent}"

    def count(self) -> int:
        if self._count is None:
            self._count = sum(_count_tar_samples(tar) for tar in self.tars)
        return self._count

    def __iter__(self) -> Iterator[_Item]:
        from webdataset.tariterators import tarfile_samples

        for tar in self.tars:
            try:
                for sample in tarfile_samples([{"url": str(tar)}]):
                    yield _tar_item(tar, sample)
            except DataError:
                raise
            except Exception as err:  # tarfile / gopen raise many kinds; all mean a broken tar
                raise DataError(
                    f"source tar {tar} cannot be read ({_first_line(err)}): re-download or "
                    "re-create it, or leave it out (pass the other tars as a brace pattern); "
                    "the shards finished so far are kept, re-run to continue"
                ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _count_tar_samples(tar: Path) -> int:
    """Number of samples in a tar, as webdataset groups them (consecutive members sharing a key)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    count = 0
    previous = None
    try:
        with tarfile.open(tar, "r:*") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                name = member.name
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                prefix, _ = base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != previous:
                    count += 1
                    previous = prefix
    except (OSError, tarfile.TarError) as err:
        raise DataError(
            f"source tar {tar} cannot be read ({_first_line(err)}): re-download or re-create it, "
            "or leave it out (pass the other tars as a brace pattern)"
        ) from err
    return count


def _tar_item(tar: Path, sample: dict[str, Any]) -> _Item:
    image = next(
        (sample[ext[1:]] for ext in IMAGE_EXTENSIONS if isinstance(sample.get(ext[1:]), bytes)),
        None,
    )
    text = sample.get("txt")
    caption = text.decode("utf-8", errors="replace").strip() if isinstance(text, bytes) else None
    return _Item(
        key=f"{tar.name}/{sample['__key__']}", origin=str(tar), caption=caption, image=image
    )


def _tar_split(name: str) -> str | None:
    lowered = name.lower()
    for split in SPLITS:
        if lowered.startswith((f"{split}-", f"{split}_", f"{split}.")):
            return split
    return None


def _split_tars(tars: Sequence[Path], where: str) -> dict[str, _Source]:
    by_split = {tar: _tar_split(tar.name) for tar in tars}
    if all(split is None for split in by_split.values()):
        return {"train": _TarSource(tars)}
    unknown = [tar.name for tar, split in by_split.items() if split is None]
    if unknown:
        raise DataError(
            f"{where}: some tars are named by split (train-*.tar / val-*.tar) and some are not "
            f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}): rename them, or "
            "pass only the tars you want as a brace pattern"
        )
    return {
        split: _TarSource([tar for tar, s in by_split.items() if s == split])
        for split in SPLITS
        if split in by_split.values()
    }


def _dir_source(folder: Path) -> _Source:
    tars = sorted(folder.glob("*.tar"))
    return _TarSource(tars) if tars else _FolderSource(folder)


def discover_sources(images: str | os.PathLike[str]) -> dict[str, _Source]:
    """Find the inputs under `images` (see the module docstring), keyed by split.

    Raises `DataError` naming `images` when it does not exist or holds no inputs.
    """
    spec = os.fspath(images)
    if any(c in spec for c in "{}*?["):
        import glob

        from webdataset.shardlists import expand_urls

        paths: list[Path] = []
        for expanded in expand_urls(spec):
            matches = sorted(glob.glob(os.path.expanduser(expanded)))
            if not matches:
                raise DataError(f"--images {spec!r}: {expanded!r} matches no file; {_SOURCE_HELP}")
            paths.extend(Path(m).absolute() for m in matches)
        not_tars = [p.name for p in paths if p.suffix != ".tar"]
        if not_tars:
            raise DataError(
                f"--images {spec!r} matches files that are not .tar shards ({not_tars[0]}, ...): "
                "a pattern must name webdataset tars; pass a folder for images"
            )
        sources = _split_tars(paths, spec)
    else:
        path = Path(spec).expanduser().absolute()
        if not path.exists():
            raise DataError(f"--images {spec!r}: no such file or folder; {_SOURCE_HELP}")
        if path.is_file():
            if path.suffix != ".tar":
                raise DataError(f"--images {spec!r} is a file but not a .tar shard; {_SOURCE_HELP}")
            sources = _split_tars([path], spec)
        elif any((path / split).is_dir() for split in SPLITS):
            sources = {
                split: _dir_source(path / split) for split in SPLITS if (path / split).is_dir()
            }
        else:
            tars = sorted(path.glob("*.tar"))
            sources = _split_tars(tars, spec) if tars else {"train": _FolderSource(path)}
    sources = {split: source for split, source in sources.items() if source.count() > 0}
    if not sources:
        raise DataError(
            f"--images {spec!r} holds no inputs (no {'/'.join(IMAGE_EXTENSIONS)} images, no "
            f"samples in tars); {_SOURCE_HELP}"
        )
    return sources


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def _open_rgb(image: Path | bytes, max_res: int) -> tuple[Any, tuple[int, int]]:
    """Decode an image to RGB (transparency over white, EXIF orientation applied).

    Returns the image and its original (width, height) after orientation. JPEGs are decoded at
    the smallest power-of-two reduction that keeps both sides >= `max_res` (PIL's draft mode).
    Raises whatever PIL raises for a broken file.
    """
    from PIL import Image, ImageOps

    with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
        width, height = opened.size
        if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
        if min(width, height) >= max_res:
            opened.draft("RGB", (max_res, max_res))
        im = ImageOps.exif_transpose(opened)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = im.convert("RGB")
        rgb.load()
    return rgb, (width, height)


def _crop_resize(image: Any, res: int) -> Any:
    """Centre square crop, resized to `res` x `res` with LANCZOS (never called to upscale)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize(
        (res, res), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side)
    )


@dataclass
class _Loaded:
    """An input after decoding: per-resolution images, or the reason it is skipped everywhere."""

    index: int
    item: _Item
    reason: str | None = None
    size: tuple[int, int] = (0, 0)
    images: dict[int, Any] | None = None

    def kept_at(self, res: int) -> bool:
        """Whether this input is a sample at `res` (readable, captioned, large enough)."""
        return self.reason is None and min(self.size) >= res


def _load(index: int, item: _Item, todo: Sequence[int], resolutions: Sequence[int]) -> _Loaded:
    """Decode an input and crop it to each resolution in `todo`.

    The decode depends on all the run's `resolutions` (not only `todo`), so that a shard redone
    for some resolutions gets exactly the pixels an uninterrupted run would have.
    """
    if item.image is None:
        return _Loaded(index, item, reason="no_image")
    if item.caption is None:
        return _Loaded(index, item, reason="no_caption")
    try:
        rgb, size = _open_rgb(item.image, max(resolutions))
    except MemoryError:
        raise
    except Exception:  # PIL's plugins raise OSError, ValueError, SyntaxError, ...: all unreadable
        return _Loaded(index, item, reason="unreadable")
    images = {res: _crop_resize(rgb, res) for res in todo if min(size) >= res}
    return _Loaded(index, item, size=size, images=images)


# ------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _zero_skips() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def _read_existing(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest already in `out` when it was made with `settings`; None when there is none."""
    path = out / MANIFEST_NAME
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"out={str(out)!r} is not empty and has no {MANIFEST_NAME}: prepare writes into a "
                "new folder (or one it wrote before, to resume); pick another --out"
            )
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path} is not readable JSON ({_first_line(err)}): delete the folder {out} and "
            "re-run prepare"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise ConfigError(
            f"{path} is not a budget-lab shard manifest (kind {kind!r}, expected "
            f"{MANIFEST_KIND!r}): pick another --out"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(
            f"{path} has manifest version {manifest.get('version')!r}, this budget-lab writes "
            f"version {MANIFEST_VERSION}: delete the folder {out} and re-run prepare"
        )
    old = manifest.get("settings", {})
    different = [
        f"{field}: {old.get(field)!r} there, {settings[field]!r} now"
        for field in _SETTING_FIELDS
        if old.get(field) != settings[field]
    ]
    if different:
        raise ConfigError(
            f"out={str(out)!r} was prepared with other arguments ({'; '.join(different)}). "
            "Re-run with the same arguments to resume it, or pick a new --out (or delete it) "
            "to prepare with these"
        )
    return manifest


def _new_manifest(
    settings: dict[str, Any], image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> dict[str, Any]:
    now = _now()
    return {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "complete": False,
        "created_at": now,
        "updated_at": now,
        "settings": settings,
        "image_encoder": image_encoder.info(),
        "text_encoder": text_encoder.info(),
        "inputs": {},
        "resolutions": {
            str(res): {
                "latent_shape": list(image_encoder.latent_shape(res)),
                "count": 0,
                "skipped": _zero_skips(),
                "splits": {},
            }
            for res in settings["resolutions"]
        },
    }


def _split_entry(manifest: dict[str, Any], res: int, split: str) -> dict[str, Any]:
    splits = manifest["resolutions"][str(res)]["splits"]
    return splits.setdefault(split, {"count": 0, "skipped": _zero_skips(), "shards": []})


def _recorded(manifest: dict[str, Any], res: int, split: str, shard: int) -> dict[str, Any] | None:
    shards = _split_entry(manifest, res, split)["shards"]
    return next((s for s in shards if s.get("index") == shard), None)


def _record(manifest: dict[str, Any], res: int, split: str, entry: dict[str, Any]) -> None:
    shards = _split_entry(manifest, res, split)["shards"]
    shards[:] = [s for s in shards if s.get("index") != entry["index"]] + [entry]
    shards.sort(key=lambda s: s["index"])


def _totals(manifest: dict[str, Any]) -> None:
    """Recompute the split and resolution counts and skip totals from the shard records."""
    for info in manifest["resolutions"].values():
        total = 0
        skipped: Counter[str] = Counter(_zero_skips())
        for split in info["splits"].values():
            split["count"] = sum(s["count"] for s in split["shards"])
            split_skips: Counter[str] = Counter(_zero_skips())
            for shard in split["shards"]:
                split_skips.update(shard["skipped"])
            split["skipped"] = dict(split_skips)
            total += split["count"]
            skipped.update(split_skips)
        info["count"] = total
        info["skipped"] = dict(skipped)


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per resolution: samples per split and skipped inputs by reason."""
    lines = []
    for res, info in manifest["resolutions"].items():
        counts = " + ".join(f"{s['count']} {name}" for name, s in info["splits"].items())
        skipped = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items() if n)
        shape = "x".join(str(d) for d in info["latent_shape"])
        lines.append(
            f"{res} px: {counts or 0} samples (latents {shape}); skipped: {skipped or 'none'}"
        )
    return lines


# ------------------------------------------------------------------------------------------
# Writing shards
# ------------------------------------------------------------------------------------------


class _ShardWriter:
    """A shard being written: a webdataset TarWriter on ``<name>.partial``, renamed on `finish`."""

    def __init__(self, path: Path) -> None:
        from webdataset import TarWriter

        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._tar = TarWriter(self._file, user="budget-lab", group="budget-lab", mtime=_TAR_MTIME)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.count += 1

    def finish(self) -> str:
        """Close, move into place, return the sha256 of the finished file."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._tar.close()
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _check_finite(array: np.ndarray, what: str, shard: Path, keys: Sequence[str]) -> None:
    if not np.isfinite(array).all():
        raise DataError(
            f"the {what} of samples {', '.join(keys[:3])} for {shard} are not finite in float16 "
            "(the encoder's outputs overflow float16, or it produced NaNs): check the encoder"
        )


@dataclass
class _Job:
    """Everything `_encode_shard` needs, fixed for one prepare run."""

    out: Path
    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    batch_size: int
    manifest: dict[str, Any]


def _encode_shard(
    job: _Job,
    split: str,
    shard: int,
    start: int,
    items: Iterable[_Item],
    resolutions: Sequence[int],
    on_batch: Any,
) -> int:
    """Encode one chunk of inputs into one shard per resolution; record them. Returns #inputs."""
    name = f"{split}-{shard:06d}.tar"
    writers = {res: _ShardWriter(job.out / str(res) / name) for res in resolutions}
    skipped = {res: Counter(_zero_skips()) for res in resolutions}
    index = start
    try:
        all_resolutions = job.manifest["settings"]["resolutions"]
        for batch in _batched(items, job.batch_size):
            loaded = [
                _load(index + i, item, resolutions, all_resolutions) for i, item in enumerate(batch)
            ]
            index += len(batch)
            for x in loaded:
                for res in resolutions:
                    if not x.kept_at(res):
                        skipped[res][x.reason or "too_small"] += 1
            # Captions are encoded in the same batches whichever resolutions are being (re)done.
            usable = [x for x in loaded if x.kept_at(min(all_resolutions))]
            if usable:
                text = job.text_encoder.encode([x.item.caption or "" for x in usable])
                embeddings = text.embeddings.numpy()
                masks = text.mask.numpy().astype(np.uint8)
                keys = [f"{x.index:08d}" for x in usable]
                _check_finite(embeddings, "caption embeddings", writers[resolutions[0]].path, keys)
                row = {x.index: i for i, x in enumerate(usable)}
                for res in resolutions:
                    kept = [x for x in usable if x.kept_at(res)]
                    if not kept:
                        continue
                    pixels = images_to_tensor([x.images[res] for x in kept])  # type: ignore[index]
                    latents = job.image_encoder.encode(pixels).numpy().astype(np.float16)
                    _check_finite(latents, "latents", writers[res].path, keys)
                    for x, latent in zip(kept, latents, strict=True):
                        writers[res].write(
                            {
                                "__key__": f"{x.index:08d}",
                                "latent.npy": np.ascontiguousarray(latent),
                                "emb.npy": np.ascontiguousarray(embeddings[row[x.index]]),
                                "mask.npy": np.ascontiguousarray(masks[row[x.index]]),
                                "txt": x.item.caption or "",
                                "json": {
                                    "key": x.item.key,
                                    "source": x.item.origin,
                                    "orig_size": list(x.size),
                                    "index": x.index,
                                },
                            }
                        )
            on_batch(len(batch))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for res in resolutions:
        digest = writers[res].finish()
        entry = {
            "index": shard,
            "name": name,
            "count": writers[res].count,
            "sha256": digest,
            "inputs": [start, index],
            "skipped": dict(skipped[res]),
        }
        _record(job.manifest, res, split, entry)
        job.manifest["updated_at"] = _now()
        atomic_write_json(job.out / MANIFEST_NAME, job.manifest)
    return index - start


def _shard_is_done(job: _Job, res: int, split: str, shard: int, start: int) -> bool:
    entry = _recorded(job.manifest, res, split, shard)
    if entry is None:
        return False
    if entry.get("inputs", [None])[0] != start:
        raise DataError(
            f"{job.out / str(res) / entry['name']} was made from inputs starting at "
            f"{entry.get('inputs')}, but that shard now starts at input {start}: the source "
            f"changed since. Delete {job.out} and prepare again"
        )
    path = job.out / str(res) / entry["name"]
    return path.is_file() and sha256_file(path) == entry.get("sha256")


def _prepare_split(job: _Job, split: str, source: _Source, shard_size: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    resolutions = job.manifest["settings"]["resolutions"]
    with tqdm(
        total=source.count(), desc=f"prepare {split}", unit="img", disable=not progress
    ) as bar:
        iterator = iter(source)
        index = 0
        for shard in itertools.count():
            first = next(iterator, None)
            if first is None:
                break
            chunk = itertools.chain([first], itertools.islice(iterator, shard_size - 1))
            todo = [res for res in resolutions if not _shard_is_done(job, res, split, shard, index)]
            if todo:
                n = _encode_shard(job, split, shard, index, chunk, todo, bar.update)
            else:
                n = sum(1 for _ in chunk)
                bar.update(n)
            for res in resolutions:
                entry = _recorded(job.manifest, res, split, shard)
                if entry is not None and entry["inputs"] != [index, index + n]:
                    raise DataError(
                        f"{job.out / str(res) / entry['name']} was made from inputs "
                        f"{entry['inputs']}, now that shard is inputs {[index, index + n]}: the "
                        f"source changed since. Delete {job.out} and prepare again"
                    )
            index += n
        n_shards = shard
    for res in resolutions:
        stale = [
            s["name"]
            for s in _split_entry(job.manifest, res, split)["shards"]
            if s["index"] >= n_shards
        ]
        if stale:
            raise DataError(
                f"{job.out / str(res)} has shards {', '.join(stale[:3])} beyond the {n_shards} the "
                f"source now fills: the source changed since. Delete {job.out} and prepare again"
            )
    job.manifest["inputs"][split] = index


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not valid: expected an integer >= 1")
    return value


def _source_name(images: str | os.PathLike[str]) -> str:
    """`images` as recorded in the manifest: an absolute path (or pattern)."""
    return os.path.abspath(os.path.expanduser(os.fspath(images)))


def prepare_dataset(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    resolutions: Sequence[int] = (32,),
    vae: str | ImageEncoder = "pixel",
    text_encoder: str | TextEncoder = "minilm",
    max_tokens: int = 77,
    shard_size: int = 1000,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the captioned images in `images` into latent shards under `out`; return the manifest.

    Args:
        images: a folder of images + .txt captions, a folder of tars, a .tar, or a brace pattern.
        out: the output folder (new, or one this function wrote before: resumed).
        resolutions: square resolutions in pixels; each a multiple of the encoder's downsample.
        vae: ``"pixel"``, a diffusers AutoencoderKL hub id or local folder, or an `ImageEncoder`.
        text_encoder: ``"minilm"``, a transformers hub id or local folder, or a `TextEncoder`.
        max_tokens: caption length L (padded / truncated).
        shard_size: inputs per shard (shards hold fewer samples when inputs are skipped).
        batch_size: images and captions encoded per forward pass.
        device: where the encoders run ("cpu", "cuda", ...).
        progress: show a progress bar and print the summary lines to stderr at the end.

    Raises:
        ConfigError: an invalid argument, an encoder that cannot be loaded, or an `out` prepared
            with other arguments.
        DataError: `images` is missing or empty, a source tar is broken, or the source changed
            under a resumed `out`.
    """
    if isinstance(resolutions, int):
        resolutions = (resolutions,)
    res_list = sorted({_check_positive("resolution", r) for r in resolutions})
    if not res_list:
        raise ConfigError("resolutions is empty: pass at least one, e.g. (256,)")
    _check_positive("max_tokens", max_tokens)
    _check_positive("shard_size", shard_size)
    _check_positive("batch_size", batch_size)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={str(out_dir)!r} is a file: expected a folder (new or existing)")
    sources = discover_sources(images)
    settings = {
        "source": _source_name(images),
        "resolutions": res_list,
        "vae": encoder_name(vae),
        "text_encoder": encoder_name(text_encoder),
        "max_tokens": max_tokens,
        "shard_size": shard_size,
    }
    existing = _read_existing(out_dir, settings)

    image_encoder = load_image_encoder(vae, device)
    for res in res_list:
        image_encoder.check_resolution(res)
    text_encoder_ = load_text_encoder(text_encoder, max_tokens, device)
    manifest = existing or _new_manifest(settings, image_encoder, text_encoder_)
    manifest["complete"] = False
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)

    job = _Job(out_dir, image_encoder, text_encoder_, batch_size, manifest)
    for split, source in sources.items():
        _prepare_split(job, split, source, shard_size, progress)
    _totals(manifest)
    manifest["complete"] = True
    manifest["updated_at"] = _now()
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    if progress:
        for line in summary_lines(manifest):
            print(line, file=sys.stderr)
    return manifest
