"""The built-in synthetic captioned image set: coloured shapes whose captions are true.

It needs no download and is fully deterministic: sample ``index`` of ``seed`` is always the same
scene, at every resolution (the composition is drawn in canvas units, then rendered at ``res``).
It is the default dataset of the demo, the tests and the sweeps.

Scenes
------
One or two *groups* of identical shapes on a plain or gradient background. A group is 1, 2 or 3
shapes of one kind (circle, square, triangle, diamond, star, cross), one colour (`COLORS`) and one
size (small, medium, large). Three kinds of scene:

* two groups and a spatial relation between them (about 60 %): every shape of the first group lies
  entirely on the stated side of every shape of the second (the boxes are separated along that
  axis), and the two groups' centres are further apart along the relation's axis than across it;
* one group on its own (about 20 %);
* one shape at a position on a 3 x 3 grid (about 20 %): its centre lies in that cell.

Shapes never overlap (their boxes are apart), lie inside the canvas, and have a colour that is far
from the background's. Shapes are drawn at 4x the resolution and downsampled with LANCZOS, so
that 32 px images stay clean.

Caption grammar
---------------
::

    caption  := scene " on a " BACKGROUND " background"
    scene    := group " " RELATION " " group      (two groups)
              | group                             (one group)
              | group " " POSITION                (one shape, count 1)
    group    := COUNT " " [SIZE " "] COLOR " " SHAPE     (SHAPE plural when COUNT > 1)
    COUNT    := "a" | "an" | "two" | "three"      ("an" before a vowel: "an orange star")
    SIZE     := "small" | "large"                 (a medium shape has no size word)
    COLOR    := red | orange | yellow | green | blue | purple | white | black
    SHAPE    := circle | square | triangle | diamond | star | cross   (plural: ...s, crosses)
    RELATION := "above" | "below" | "to the left of" | "to the right of"
    POSITION := "in the top left corner" | "at the top" | "in the top right corner"
              | "on the left" | "in the center" | "on the right"
              | "in the bottom left corner" | "at the bottom" | "in the bottom right corner"
    BACKGROUND := white | grey | black | beige | light blue | grey gradient | blue gradient

Examples: "two small red circles above a large blue square on a grey background",
"a green triangle to the left of an orange star on a white background",
"three purple diamonds on a beige background",
"a large yellow cross in the top left corner on a blue gradient background".

Metadata (the ``json`` of each sample)::

    {"background": "grey", "relation": "above" | "below" | "left of" | "right of" | None,
     "objects": [{"shape": "circle", "color": "red", "size": "small", "count": 2,
                  "position": None | "top left" | ...,
                  "boxes": [[x0, y0, x1, y1], ...]}, ...]}

``boxes`` are in pixels of ``res`` (floats, 2 decimals, y downwards), one per shape; the first
object is the caption's subject. A gradient runs from the background's ``top`` colour at the top
row to its ``bottom`` colour at the bottom row (`BACKGROUNDS`).

Dataset on disk
---------------
`synth_dataset` writes webdataset tar shards: ``train-000000.tar`` ... and ``val-000000.tar`` ...,
each sample keyed ``f"{index:08d}"`` with ``png``, ``txt`` and ``json`` members, plus
``synth.json`` (the manifest). The validation split is the *last* ``ceil(n * val_fraction)``
indices (at most ``n - 1``, so train is never empty); train is the indices before them. Shards are
byte-for-byte reproducible and written atomically; a re-run re-uses finished shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from budget_lab.errors import ConfigError, DataError
from budget_lab.io import atomic_write_json

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MANIFEST_NAME",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "render_sample",
    "synth_dataset",
]

RGB = tuple[int, int, int]

#: Shape colours: name -> RGB. Chosen to be far apart from each other.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (140, 50, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

#: Backgrounds: name -> (top RGB, bottom RGB); plain when both are equal.
BACKGROUNDS: dict[str, tuple[RGB, RGB]] = {
    "white": ((240, 240, 240), (240, 240, 240)),
    "grey": ((128, 128, 128), (128, 128, 128)),
    "black": ((25, 25, 25), (25, 25, 25)),
    "beige": ((225, 210, 180), (225, 210, 180)),
    "light blue": ((175, 205, 235), (175, 205, 235)),
    "grey gradient": ((200, 200, 200), (80, 80, 80)),
    "blue gradient": ((170, 200, 240), (20, 30, 80)),
}

#: Shape kinds and their plurals.
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}

#: Size categories: name -> (min, max) side of a shape's box, as a fraction of the canvas.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.18, 0.21),
    "medium": (0.25, 0.29),
    "large": (0.36, 0.42),
}

#: Metadata relation -> caption phrase. "above": the first group is above the second.
RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}

#: Grid positions: name -> ((column, row) in a 3 x 3 grid, caption phrase).
POSITIONS: dict[str, tuple[tuple[int, int], str]] = {
    "top left": ((0, 0), "in the top left corner"),
    "top": ((1, 0), "at the top"),
    "top right": ((2, 0), "in the top right corner"),
    "left": ((0, 1), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((2, 1), "on the right"),
    "bottom left": ((0, 2), "in the bottom left corner"),
    "bottom": ((1, 2), "at the bottom"),
    "bottom right": ((2, 2), "in the bottom right corner"),
}

#: The manifest's file name inside the output folder.
MANIFEST_NAME = "synth.json"

_COUNT_WORDS = {2: "two", 3: "three"}
_MIN_RES, _MAX_RES = 16, 1024
_MAX_VAL_FRACTION = 0.5
_SUPERSAMPLE = 4
_MARGIN = 0.03  # free border around the canvas (canvas units)
_GROUP_GAP = 0.05  # least gap between two groups' boxes
_SHAPE_GAP = 0.03  # least gap between two shapes' boxes in a group
_MIN_COLOR_CONTRAST = 110.0  # least RGB distance between a shape colour and its background
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so that shards are reproducible
_MANIFEST_KIND = "budget-lab-synth"
_MANIFEST_VERSION = 1
# Manifest fields that must match for an existing output folder to be re-used.
_ARG_FIELDS = ("kind", "version", "n", "res", "seed", "val_fraction", "shard_size")

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in canvas units [0, 1]


@dataclass(frozen=True)
class _Group:
    shape: str
    color: str
    size: str
    count: int
    side: float  # side of each shape's box, canvas units


# --------------------------------------------------------------------------------------------
# Composition: what is where (canvas units), decided by a seeded RNG, independent of `res`.
# --------------------------------------------------------------------------------------------


def _rgb_distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


@cache
def _colors_for(background: str) -> tuple[str, ...]:
    """Shape colours that stand out from every part of `background` (top, middle, bottom)."""
    top, bottom = BACKGROUNDS[background]
    middle = tuple((t + b) // 2 for t, b in zip(top, bottom, strict=True))
    return tuple(
        name
        for name, rgb in COLORS.items()
        if min(_rgb_distance(rgb, c) for c in (top, middle, bottom)) >= _MIN_COLOR_CONTRAST  # type: ignore[arg-type]
    )


def _span_needed(group: _Group) -> float:
    """Length a group needs when its shapes are laid out in a row."""
    return group.count * group.side + (group.count - 1) * _SHAPE_GAP


def _draw_group(rng: random.Random, colors: tuple[str, ...], max_count: int) -> _Group:
    """A random group whose row of shapes fits inside the canvas."""
    usable = 1.0 - 2 * _MARGIN
    while True:
        size = rng.choice(tuple(SIZES))
        lo, hi = SIZES[size]
        group = _Group(
            shape=rng.choice(tuple(SHAPES)),
            color=rng.choice(colors),
            size=size,
            count=rng.randint(1, max_count),
            side=rng.uniform(lo, hi),
        )
        if _span_needed(group) <= usable:
            return group


def _row(rng: random.Random, group: _Group, lo: float, hi: float) -> list[float]:
    """Start coordinates of a group's shapes laid out along [lo, hi], in order, gaps >= _SHAPE_GAP.

    The group occupies a random stretch of the interval (so groups are sometimes clustered,
    sometimes spread), and the free space inside it is split at random between the gaps.
    """
    need = _span_needed(group)
    span = rng.uniform(need, hi - lo)
    start = rng.uniform(lo, hi - span)
    weights = [rng.random() + 1e-6 for _ in range(group.count + 1)]
    free = span - need
    parts = [free * w / sum(weights) for w in weights]
    starts = []
    cursor = start + parts[0]
    for i in range(group.count):
        starts.append(cursor)
        cursor += group.side + _SHAPE_GAP + parts[i + 1]
    return starts


def _place_in_band(
    rng: random.Random, group: _Group, band: tuple[float, float], vertical_band: bool
) -> list[Box]:
    """Boxes for a group laid out along a band.

    `band` is the band's extent across its length: rows [y0, y1] for a horizontal band (shapes
    side by side), columns [x0, x1] for a vertical band (shapes stacked). Each shape sits at a
    random place across the band.
    """
    s = group.side
    along = _row(rng, group, _MARGIN, 1.0 - _MARGIN)
    boxes = []
    for a in along:
        across = rng.uniform(band[0], band[1] - s)
        if vertical_band:
            boxes.append((across, a, across + s, a + s))
        else:
            boxes.append((a, across, a + s, across + s))
    return boxes


def _centre(boxes: list[Box]) -> tuple[float, float]:
    xs = [(b[0] + b[2]) / 2 for b in boxes]
    ys = [(b[1] + b[3]) / 2 for b in boxes]
    return sum(xs) / len(xs), sum(ys) / len(ys)


def _compose_relation(
    rng: random.Random, colors: tuple[str, ...]
) -> tuple[str, list[tuple[_Group, list[Box]]]]:
    """Two groups and a relation that holds: separated boxes, dominant along the relation axis."""
    relation = rng.choice(tuple(RELATIONS))
    # "above"/"below": the groups are stacked in y, each group a horizontal row of shapes.
    stacked_in_y = relation in ("above", "below")
    while True:
        subject = _draw_group(rng, colors, 3)
        other = _draw_group(rng, colors, 3)
        # The subject goes first (top / left) for "above" / "left of", second otherwise.
        first, second = (subject, other) if relation in ("above", "left of") else (other, subject)
        # Split the axis: first group's band is [M, split], second's is [split + gap, 1 - M].
        split = rng.uniform(_MARGIN + first.side, 1.0 - _MARGIN - second.side - _GROUP_GAP)
        for _attempt in range(8):
            boxes_first = _place_in_band(rng, first, (_MARGIN, split), not stacked_in_y)
            boxes_second = _place_in_band(
                rng, second, (split + _GROUP_GAP, 1.0 - _MARGIN), not stacked_in_y
            )
            (x1, y1), (x2, y2) = _centre(boxes_first), _centre(boxes_second)
            d_axis, d_across = (y2 - y1, abs(x2 - x1)) if stacked_in_y else (x2 - x1, abs(y2 - y1))
            if d_axis > d_across:
                if first is subject:
                    return relation, [(first, boxes_first), (second, boxes_second)]
                return relation, [(second, boxes_second), (first, boxes_first)]


def _compose_single(rng: random.Random, colors: tuple[str, ...]) -> list[tuple[_Group, list[Box]]]:
    """One group of 1-3 shapes anywhere on the canvas."""
    group = _draw_group(rng, colors, 3)
    vertical = rng.random() < 0.5
    boxes = _place_in_band(rng, group, (_MARGIN, 1.0 - _MARGIN), vertical)
    return [(group, boxes)]


def _compose_position(
    rng: random.Random, colors: tuple[str, ...]
) -> tuple[str, list[tuple[_Group, list[Box]]]]:
    """One shape whose centre lies well inside a cell of the 3 x 3 grid."""
    position = rng.choice(tuple(POSITIONS))
    (col, row), _ = POSITIONS[position]
    group = _draw_group(rng, colors, 1)
    s = group.side
    inset = 0.07  # keep the centre away from the cell's edges, so the position is clear
    centre = []
    for cell in (col, row):
        lo = max(cell / 3 + inset, _MARGIN + s / 2)
        hi = min((cell + 1) / 3 - inset, 1.0 - _MARGIN - s / 2)
        centre.append(rng.uniform(lo, hi))
    cx, cy = centre
    return position, [(group, [(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)])]


def _group_phrase(group: _Group) -> str:
    words = [] if group.size == "medium" else [group.size]
    words += [group.color, SHAPES[group.shape] if group.count > 1 else group.shape]
    if group.count == 1:
        article = "an" if words[0][0] in "aeiou" else "a"
    else:
        article = _COUNT_WORDS[group.count]
    return " ".join([article, *words])


@dataclass(frozen=True)
class _Scene:
    background: str
    relation: str | None
    position: str | None
    groups: list[tuple[_Group, list[Box]]]

    def caption(self) -> str:
        phrases = [_group_phrase(g) for g, _ in self.groups]
        if self.relation is not None:
            scene = f"{phrases[0]} {RELATIONS[self.relation]} {phrases[1]}"
        elif self.position is not None:
            scene = f"{phrases[0]} {POSITIONS[self.position][1]}"
        else:
            scene = phrases[0]
        return f"{scene} on a {self.background} background"

    def metadata(self, res: int) -> dict[str, Any]:
        objects = []
        for group, boxes in self.groups:
            objects.append(
                {
                    "shape": group.shape,
                    "color": group.color,
                    "size": group.size,
                    "count": group.count,
                    "position": self.position,
                    "boxes": [[round(v * res, 2) for v in box] for box in boxes],
                }
            )
        return {"background": self.background, "objects": objects, "relation": self.relation}


def _compose(index: int, seed: int) -> _Scene:
    # A string seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
    rng = random.Random(f"budget-lab-synth/{seed}/{index}")
    background = rng.choice(tuple(BACKGROUNDS))
    colors = _colors_for(background)
    kind = rng.random()
    if kind < 0.6:
        relation, groups = _compose_relation(rng, colors)
        return _Scene(background, relation, None, groups)
    if kind < 0.8:
        return _Scene(background, None, None, _compose_single(rng, colors))
    position, groups = _compose_position(rng, colors)
    return _Scene(background, None, position, groups)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _background_image(name: str, size: int) -> Image.Image:
    """The background at `size` px (cached; callers copy it)."""
    top, bottom = BACKGROUNDS[name]
    if top == bottom:
        return Image.new("RGB", (size, size), top)
    # Row y has weight y / (size - 1) of the bottom colour: exact at the first and last rows.
    column = bytes(round(255 * y / (size - 1)) for y in range(size))
    mask = Image.frombytes("L", (1, size), column).resize((size, size), Image.Resampling.NEAREST)
    return Image.composite(
        Image.new("RGB", (size, size), bottom), Image.new("RGB", (size, size), top), mask
    )


def _shape_points(shape: str, box: Box) -> list[tuple[float, float]]:
    """Polygon vertices of a shape inscribed in `box` (pixel units of the drawing canvas)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    if shape == "triangle":  # apex at the top, base along the bottom
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        cy = (y0 + y1) / 2
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":  # five points; as wide as the box, top point on the box's top edge
        outer = w / (2 * math.sin(math.radians(72)))
        inner = 0.45 * outer
        cy = y0 + outer
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            angle = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    if shape == "cross":  # a plus sign, arms a third of the box thick
        t = 0.34
        a0, a1 = x0 + w * (0.5 - t / 2), x0 + w * (0.5 + t / 2)
        b0, b1 = y0 + h * (0.5 - t / 2), y0 + h * (0.5 + t / 2)
        return [
            (a0, y0), (a1, y0), (a1, b0), (x1, b0), (x1, b1), (a1, b1),
            (a1, y1), (a0, y1), (a0, b1), (x0, b1), (x0, b0), (a0, b0),
        ]  # fmt: skip
    raise AssertionError(f"no polygon for shape {shape!r}")


def _render(scene: _Scene, res: int) -> Image.Image:
    big = res * _SUPERSAMPLE
    image = _background_image(scene.background, big).copy()
    draw = ImageDraw.Draw(image)
    for group, boxes in scene.groups:
        fill = COLORS[group.color]
        for box in boxes:
            px = (box[0] * big, box[1] * big, box[2] * big, box[3] * big)
            if group.shape == "circle":
                draw.ellipse(px, fill=fill)
            elif group.shape == "square":
                draw.rectangle(px, fill=fill)
            else:
                draw.polygon(_shape_points(group.shape, px), fill=fill)
    return image.resize((res, res), Image.Resampling.LANCZOS)


def _check_int(name: str, value: Any, lo: int | None, hi: int | None) -> int:
    valid = (
        (f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}")
        if lo is not None
        else "an integer"
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not valid: expected {valid}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value} is out of range: expected {valid}")
    return value


def render_sample(index: int, seed: int = 0, res: int = 32) -> tuple[Image.Image, str, dict]:
    """Render synthetic sample `index` of `seed` at `res` x `res` pixels.

    Deterministic: the same (index, seed, res) gives identical pixels, caption and metadata; the
    same (index, seed) at another `res` is the same scene, scaled. Returns the RGB image, its
    caption (grammar in the module docstring) and its metadata::

        {"background": name, "relation": "above" | "below" | "left of" | "right of" | None,
         "objects": [{"shape", "color", "size", "count", "position", "boxes": [[x0, y0, x1, y1],
                      ...] in pixels of res}, ...]}

    Raises `ConfigError` for a negative index or a `res` outside 16..1024.
    """
    _check_int("index", index, 0, None)
    _check_int("seed", seed, None, None)
    _check_int("res", res, _MIN_RES, _MAX_RES)
    scene = _compose(index, seed)
    return _render(scene, res), scene.caption(), scene.metadata(res)


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "budget-lab"
    tar.addfile(info, io.BytesIO(data))


def _encode_sample(index: int, seed: int, res: int) -> tuple[bytes, bytes, bytes]:
    image, caption, meta = render_sample(index, seed, res)
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=False, compress_level=6)
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return png.getvalue(), caption.encode("utf-8"), meta_json.encode("utf-8")


def _write_shard(path: Path, indices: range, seed: int, res: int, on_sample: Any) -> None:
    """Write one shard to a temporary name, then rename it into place (atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # truncates a temporary file an interrupted run left behind
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in indices:
                png, txt, meta = _encode_sample(index, seed, res)
                key = f"{index:08d}"
                _tar_member(tar, f"{key}.png", png)
                _tar_member(tar, f"{key}.txt", txt)
                _tar_member(tar, f"{key}.json", meta)
                on_sample()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    # round() first so that e.g. 100 * 0.07 = 7.000000000000001 gives 7, not 8.
    n_val = min(math.ceil(round(n * val_fraction, 9)), n - 1)
    return n - n_val, n_val


def _shard_plan(start: int, count: int, shard_size: int, split: str) -> list[tuple[str, range]]:
    return [
        (f"{split}-{i:06d}.tar", range(lo, min(lo + shard_size, start + count)))
        for i, lo in enumerate(range(start, start + count, shard_size))
    ]


def _validate(n: Any, res: Any, seed: Any, val_fraction: Any, shard_size: Any) -> float:
    _check_int("n", n, 1, None)
    _check_int("res", res, _MIN_RES, _MAX_RES)
    _check_int("seed", seed, None, None)
    _check_int("shard_size", shard_size, 1, None)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise ConfigError(
            f"val_fraction={val_fraction!r} is not valid: expected a number in [0, 0.5]"
        )
    if not 0.0 <= val_fraction <= _MAX_VAL_FRACTION:
        raise ConfigError(
            f"val_fraction={val_fraction} is out of range: expected a number in [0, 0.5]"
        )
    return float(val_fraction)


def _check_existing_manifest(path: Path, wanted: dict[str, Any]) -> bool:
    """True when `path` holds a manifest written with the same arguments; False when absent."""
    if not path.exists():
        return False
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(existing, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path} is not a readable synthetic-dataset manifest ({exc}); "
            "use another --out or delete the folder"
        ) from exc
    differences = [
        f"{field}={existing.get(field)!r} (now {wanted[field]!r})"
        for field in _ARG_FIELDS
        if existing.get(field) != wanted[field]
    ]
    if differences:
        raise ConfigError(
            f"{path.parent} holds a synthetic dataset written with different arguments: "
            f"{', '.join(differences)}; use another --out or delete the folder"
        )
    return True


def synth_dataset(
    out: str | os.PathLike[str],
    n: int,
    res: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `n` synthetic samples as webdataset shards under `out`; return the manifest.

    Writes ``out/train-000000.tar`` ... and ``out/val-000000.tar`` ... (at most `shard_size`
    samples each), every sample keyed ``f"{index:08d}"`` with ``png``, ``txt`` (utf-8 caption)
    and ``json`` (metadata) members, and ``out/synth.json``::

        {"kind": "budget-lab-synth", "version": 1, "n", "n_train", "n_val", "res", "seed",
         "val_fraction", "shard_size", "complete": bool,
         "shards": {"train": [file names], "val": [file names]}}

    Validation is the last ``ceil(n * val_fraction)`` indices (capped at ``n - 1``), train the
    ones before; the two are disjoint. The manifest is written first with ``"complete": false``
    and rewritten with ``true`` once every shard exists.

    Each shard is written to ``<name>.tmp`` and renamed when complete, so an interrupted run never
    leaves a partial shard under its final name. Re-running with the same arguments re-uses the
    finished shards and gives byte-for-byte identical files (fixed tar mtimes, owners and modes).

    Raises `ConfigError` (naming the value and the valid range) for n < 1, res outside 16..1024,
    val_fraction outside [0, 0.5], shard_size < 1, `out` being a file, or an existing manifest
    written with other arguments; `DataError` for an unreadable existing manifest.
    """
    val_fraction = _validate(n, res, seed, val_fraction, shard_size)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={str(out_dir)!r} is a file: expected a folder (new or existing)")
    n_train, n_val = _split_sizes(n, val_fraction)
    plan = _shard_plan(0, n_train, shard_size, "train") + _shard_plan(
        n_train, n_val, shard_size, "val"
    )
    manifest: dict[str, Any] = {
        "kind": _MANIFEST_KIND,
        "version": _MANIFEST_VERSION,
        "n": n,
        "n_train": n_train,
        "n_val": n_val,
        "res": res,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "complete": False,
        "shards": {
            "train": [name for name, _ in plan if name.startswith("train-")],
            "val": [name for name, _ in plan if name.startswith("val-")],
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    # Finished shards are trusted only when the manifest says they were made with these arguments.
    resuming = _check_existing_manifest(manifest_path, manifest)
    if not resuming:
        atomic_write_json(manifest_path, manifest)

    todo = [
        (name, indices) for name, indices in plan if not (resuming and _finished(out_dir / name))
    ]
    from tqdm.auto import tqdm

    with tqdm(
        total=n,
        initial=n - sum(len(indices) for _, indices in todo),
        desc=f"synth {out_dir.name}",
        unit="img",
        disable=not progress,
    ) as bar:
        for name, indices in todo:
            _write_shard(out_dir / name, indices, seed, res, lambda: bar.update(1))

    for name, _ in plan:  # a stray temporary file next to a finished shard
        (out_dir / f"{name}.tmp").unlink(missing_ok=True)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return manifest


def _finished(path: Path) -> bool:
    """A shard renamed into place is complete; the size check only catches a truncated copy."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return size > 0 and size % tarfile.RECORDSIZE == 0
