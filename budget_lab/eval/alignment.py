"""Text alignment on the built-in synthetic data: does each image show what its caption says?

FID compares the distribution of generated images with the real one; it cannot tell whether an
image generated for "two red circles above a blue square" shows two red circles above a blue
square. On the built-in captioned shapes (`budget_lab.data.synth`) the caption is a closed
grammar and every word of it is checkable, so the question can be answered claim by claim.

Claims
------
`parse_caption` turns a caption of the built-in grammar into what it claims: the background, and
for each group of shapes its count, size, colour and shape; for two groups the relation between
them, for one lone shape its cell of the 3 x 3 grid. The score of one image is the fraction of
its caption's claims the image satisfies, in [0, 1]. Claims, grouped into attributes:

* ``background``: the background (one of `synth.BACKGROUNDS`);
* ``color``, ``shape``, ``size``, ``count``: one claim each per group (one or two groups);
* ``layout``: one group; or two groups stacked (above / below); or two side by side (left /
  right of). For two groups this is the relation's axis, and the relation's direction is
  checked through the groups' attributes: "A above B" is read as "top group = A, bottom
  group = B", so the swapped image fails A's and B's claims where the groups differ;
* ``position``: the 3 x 3 grid cell of a lone shape ("in the top left corner").

The reader
----------
The image is asked the same questions in a canonical order that needs no caption: the
background; the layout; the top (or left, or only) group's colour, shape, size and count; the
bottom (or right) group's; the grid cell of a single group. A caption's claims are the answers
it requires (`_targets`), so checking a caption is comparing two sets of answers. Reading an
image, in four steps:

1. Background (rules). The median colours of the top and bottom rows are the background's top
   and bottom colours (shapes keep a margin from the border); the nearest pair in
   `synth.BACKGROUNDS` names it, and rows in between are interpolated as `synth` draws
   gradients.
2. Shapes (rules). A pixel belongs to a shape when its RGB distance from its row's background
   is above 0.25 and above 0.7 of the highest distance within 2 px: the relative threshold
   splits shapes one anti-aliased pixel apart, also in blurred images. Each 4-connected
   component of 5 pixels or more is one shape; its colour is the `synth.COLORS` entry nearest
   to its contrast-weighted mean colour, its place the centre of its bounding box. On 1000
   held-out rendered scenes this finds exactly the right number of shapes in every one.
3. Shape kind and size (learned). A small MLP (`_ShapeNet`) reads a 16 x 16 window centred on
   each shape (the distance map divided by the shape's peak, and the shape's own mask) and
   names its kind and size class. It is trained on the shapes that steps 1-2 find in scenes
   rendered in memory with `synth.render_sample` (`ReaderConfig`: by default 3000 scenes of a
   dedicated seed, none of them a scene of a dataset made with the default seed 0), each shape
   labelled from the metadata box that holds it. Half of the training images are degraded
   with a random Gaussian blur and additive noise, as generated images are. It takes about
   20 s on 2 busy CPU cores, seeded and deterministic on a given machine and torch build. With a
   `cache_dir` the weights are written there (atomically, under a name keyed by a version
   string and a hash of the settings) and later scorers load them instead of training again.
4. Scene (rules). Shapes of one colour, kind and size form a group. One group: layout "one
   group", and the cell of its centre. Two groups: "stacked" when their centres are further
   apart in y than in x, else "side by side"; the top (left) one is group a. Three groups or
   more (a stray blob, a shape of the wrong colour) give no layout, and groups a and b are the
   two largest; a group of four shapes or more has no count. "a red square left of two red
   squares" and "three red squares" can be the same picture, so when a caption claims two
   groups that look alike, one group of all their shapes is split along the claimed axis
   before it is judged (`_split_look_alikes`).

Images of any size are resized to the 32 px the reader works at (bilinear, antialiased).

Aggregate
---------
`alignment_score` returns the mean per-image score with a 95 % percentile bootstrap interval
over images (images resampled with replacement, a seeded numpy generator), the standard error
``std / sqrt(N)``, and the accuracy of each attribute over all claims of that attribute, which
says what fails (colour? count? position?).

Measured on 512 held-out rendered scenes (the tests check the same, with margins): 0.999 with
their own captions (0.99 with a blur of sigma up to 0.8 px or noise of std 0.05, 0.96 after a
3 x 3 box blur, 0.995 at 64 or 256 px); 0.22 with shuffled captions; 0.17 for uniform noise
images. On 1000 held-out scenes one claim failed: two shapes placed almost exactly on a
diagonal, whose relation is decided by less than a pixel.

Limits
------
It only knows the built-in grammar: any other caption raises `DataError`. For real captioned
data use the CLIP score (`budget_lab.eval.clip_score.CLIPScorer`, ``eval.clip_model`` in a run's
configuration). Its rules assume the built-in scenes' look (a background reaching the border,
shapes of palette colours apart from each other), so it measures alignment only for images that
try to look like them; an image unlike any scene scores low, which is the point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from budget_lab.data.synth import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    render_sample,
)
from budget_lab.errors import ConfigError, DataError
from budget_lab.io import atomic_write

__all__ = [
    "ATTRIBUTES",
    "AlignmentScorer",
    "CaptionClaims",
    "GroupClaim",
    "ReaderConfig",
    "alignment_score",
    "parse_caption",
]

#: Attributes the claims are grouped into, in the order reports list them.
ATTRIBUTES: tuple[str, ...] = (
    "background",
    "color",
    "shape",
    "size",
    "count",
    "layout",
    "position",
)

_VERSION = "alignment-reader-1"  # bump when the network, the targets or the training change
_RES = 32  # the reader's input size; generated images on the built-in data are 32 px
_MAX_COUNT = 3  # a group holds 1-3 shapes
_COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3}
_SIZE_WORDS = tuple(size for size in SIZES if size != "medium")  # medium has no word
_LAYOUTS = ("one group", "stacked", "side by side")
_CLIP_HINT = (
    "the alignment score only works on captions of the built-in synthetic data "
    "(budget_lab.data.synth); for real captioned data use the CLIP score "
    "(budget_lab.eval.clip_score.CLIPScorer, set eval.clip_model)"
)


# --------------------------------------------------------------------------------------------
# Captions -> claims
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupClaim:
    """One group of identical shapes as a caption states it."""

    count: int  # 1, 2 or 3
    size: str  # a key of synth.SIZES ("medium" when the caption has no size word)
    color: str  # a key of synth.COLORS
    shape: str  # a key of synth.SHAPES (singular)


@dataclass(frozen=True)
class CaptionClaims:
    """What a caption of the built-in grammar claims about its image.

    `groups` is in caption order (the first is the subject). `relation` is a key of
    `synth.RELATIONS` ("above", "below", "left of", "right of") for two groups, `position` a key
    of `synth.POSITIONS` for one shape at a grid cell; both are None for one group on its own.
    """

    background: str
    groups: tuple[GroupClaim, ...]
    relation: str | None = None
    position: str | None = None

    @property
    def kind(self) -> str:
        """The scene kind: "relation", "position" or "single"."""
        if self.relation is not None:
            return "relation"
        return "position" if self.position is not None else "single"


def _phrase_table(phrases: dict[str, str]) -> list[tuple[tuple[str, ...], str]]:
    """(words of the phrase, value) pairs, longest phrase first, for greedy matching."""
    table = [(tuple(phrase.split()), value) for phrase, value in phrases.items()]
    return sorted(table, key=lambda item: -len(item[0]))


_SHAPE_WORDS = {singular: (singular, 1) for singular in SHAPES} | {
    plural: (singular, 2) for singular, plural in SHAPES.items()
}
_RELATION_PHRASES = _phrase_table({phrase: name for name, phrase in RELATIONS.items()})
_POSITION_PHRASES = _phrase_table({phrase: name for name, (_, phrase) in POSITIONS.items()})


class _Words:
    """A cursor over a caption's words that raises `DataError` naming what it expected."""

    def __init__(self, caption: str, words: list[str]) -> None:
        self.caption, self.words, self.i = caption, words, 0

    def fail(self, expected: str) -> DataError:
        got = repr(self.words[self.i]) if self.i < len(self.words) else "the end of the scene"
        return DataError(
            f"caption {self.caption!r} is not of the built-in grammar: expected {expected} at "
            f"word {self.i + 1}, got {got}; {_CLIP_HINT}"
        )

    def take(self, choices: Sequence[str], what: str) -> str:
        if self.i < len(self.words) and self.words[self.i] in choices:
            self.i += 1
            return self.words[self.i - 1]
        raise self.fail(f"{what} ({' | '.join(choices)})")

    def take_phrase(self, table: list[tuple[tuple[str, ...], str]]) -> str | None:
        for phrase, value in table:
            if tuple(self.words[self.i : self.i + len(phrase)]) == phrase:
                self.i += len(phrase)
                return value
        return None

    def group(self) -> GroupClaim:
        count = _COUNT_WORDS[self.take(tuple(_COUNT_WORDS), "a count")]
        size = "medium"
        if self.i < len(self.words) and self.words[self.i] in _SIZE_WORDS:
            size = self.words[self.i]
            self.i += 1
        color = self.take(tuple(COLORS), "a size or colour" if size == "medium" else "a colour")
        shape_word = self.take(tuple(_SHAPE_WORDS), "a shape")
        shape, number = _SHAPE_WORDS[shape_word]
        if (number > 1) != (count > 1):
            self.i -= 1
            form = "plural" if count > 1 else "singular"
            raise self.fail(f"the {form} of {shape!r} after a count of {count}")
        return GroupClaim(count=count, size=size, color=color, shape=shape)


def parse_caption(caption: str) -> CaptionClaims:
    """The claims of a caption of the built-in grammar (`budget_lab.data.synth`'s docstring).

    ``"a" / "an"`` are both accepted for a count of one; everything else must follow the
    grammar exactly (lower case, single spaces, plural after "two" / "three"). Examples::

        "two small red circles above a large blue square on a grey background"
        -> CaptionClaims(background="grey", relation="above", position=None, groups=(
               GroupClaim(2, "small", "red", "circle"), GroupClaim(1, "large", "blue", "square")))
        "an orange star in the top left corner on a blue gradient background"
        -> CaptionClaims(background="blue gradient", relation=None, position="top left",
               groups=(GroupClaim(1, "medium", "orange", "star"),))

    Raises `DataError` naming the first word that does not fit (the alignment score only works
    on the built-in data; the CLIP score is the one for real captions).
    """
    if not isinstance(caption, str):
        raise DataError(f"caption {caption!r} is not a string; {_CLIP_HINT}")
    scene, sep, background = caption.rpartition(" on a ")
    if not sep or not background.endswith(" background"):
        raise DataError(
            f"caption {caption!r} is not of the built-in grammar: it does not end in "
            f"'on a BACKGROUND background'; {_CLIP_HINT}"
        )
    background = background[: -len(" background")]
    if background not in BACKGROUNDS:
        raise DataError(
            f"caption {caption!r} is not of the built-in grammar: unknown background "
            f"{background!r} (valid: {', '.join(BACKGROUNDS)}); {_CLIP_HINT}"
        )
    words = _Words(caption, scene.split(" "))
    groups = [words.group()]
    relation = position = None
    if words.i < len(words.words):
        relation = words.take_phrase(_RELATION_PHRASES)
        if relation is not None:
            groups.append(words.group())
        else:
            position = words.take_phrase(_POSITION_PHRASES)
            if position is None:
                raise words.fail("a relation ('above', 'to the left of', ...) or a position")
            if groups[0].count != 1:
                raise DataError(
                    f"caption {caption!r} is not of the built-in grammar: a position is only "
                    f"given for one shape, not {groups[0].count}; {_CLIP_HINT}"
                )
    if words.i < len(words.words):
        raise words.fail("'on a BACKGROUND background'")
    return CaptionClaims(background, tuple(groups), relation, position)


# --------------------------------------------------------------------------------------------
# Questions: what an image shows, asked in a canonical order that does not need its caption
# --------------------------------------------------------------------------------------------

# Question -> answer names. Group "a" is the top (stacked), left (side by side) or only group,
# group "b" the other one; "cell" is the grid cell of a scene's only group.
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "layout": _LAYOUTS,
    "a_color": tuple(COLORS),
    "a_shape": tuple(SHAPES),
    "a_size": tuple(SIZES),
    "a_count": tuple(str(c) for c in range(1, _MAX_COUNT + 1)),
    "b_color": tuple(COLORS),
    "b_shape": tuple(SHAPES),
    "b_size": tuple(SIZES),
    "b_count": tuple(str(c) for c in range(1, _MAX_COUNT + 1)),
    "cell": tuple(POSITIONS),
}
_NO_ANSWER = -1  # the image answers none of the valid ones (no second group, four shapes, ...)
_CELLS = {cell: i for i, (cell, _) in enumerate(POSITIONS.values())}  # (column, row) -> answer


def _targets(claims: CaptionClaims) -> dict[str, int]:
    """Question -> answer index the caption claims; questions it says nothing about are absent."""
    first, *rest = claims.groups
    order: tuple[GroupClaim, ...] = (first,)
    layout = 0
    if claims.relation is not None:
        second = rest[0]
        layout = 1 if claims.relation in ("above", "below") else 2
        # The subject is the top / left group for "above" / "left of", the other one otherwise.
        order = (first, second) if claims.relation in ("above", "left of") else (second, first)
    out = {"background": _QUESTIONS["background"].index(claims.background), "layout": layout}
    for prefix, group in zip(("a", "b"), order, strict=False):
        out[f"{prefix}_color"] = _QUESTIONS["a_color"].index(group.color)
        out[f"{prefix}_shape"] = _QUESTIONS["a_shape"].index(group.shape)
        out[f"{prefix}_size"] = _QUESTIONS["a_size"].index(group.size)
        out[f"{prefix}_count"] = group.count - 1
    if claims.position is not None:
        out["cell"] = _QUESTIONS["cell"].index(claims.position)
    return out


def _attribute(question: str) -> str:
    """The attribute a question's claims are reported under (`ATTRIBUTES`)."""
    if question == "cell":
        return "position"
    return question.split("_", 1)[-1]


# --------------------------------------------------------------------------------------------
# Finding the shapes: background, contrast, connected components (no learning)
# --------------------------------------------------------------------------------------------

_MIN_CONTRAST = 0.25  # least RGB distance from the background of a shape pixel (0-1 units)
_PEAK_FRACTION = 0.7  # ... and least fraction of the highest contrast in its 5 x 5 neighbourhood
_MIN_AREA = 5  # pixels; smaller components are noise (a small shape has 7 or more)
_MAX_OBJECTS = 8  # the largest components kept per image (a scene has at most 6 shapes)
_WINDOW = 16  # side of the window around each shape that the shape classifier sees, px


@dataclass
class _Objects:
    """The shapes found in a batch of images, one row per shape."""

    image: Tensor  # (K,) index of the image the shape is in
    centre: Tensor  # (K, 2) x, y of its bounding box's centre, px (y downwards)
    area: Tensor  # (K,) pixels of its component
    color: Tensor  # (K,) index into COLORS nearest to its contrast-weighted mean colour
    window: Tensor  # (K, 2, _WINDOW, _WINDOW): contrast / its peak contrast; its own mask


def _background(x: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) -> ((N,) index into BACKGROUNDS, (N, 3, H, 1) background colour of each row).

    The top and bottom rows are the background's top and bottom colours (shapes keep a margin
    from the border; the median ignores a shape that touches it); rows in between are linearly
    interpolated, as `synth` draws gradients.
    """
    top = x[:, :, 0, :].median(dim=2).values  # (N, 3)
    bottom = x[:, :, -1, :].median(dim=2).values  # (N, 3)
    table = torch.tensor([[*t, *b] for t, b in BACKGROUNDS.values()]) / 255.0  # (B, 6)
    background = torch.cdist(torch.cat([top, bottom], dim=1), table).argmin(dim=1)  # (N,)
    t = torch.linspace(0.0, 1.0, x.shape[2]).view(1, 1, -1, 1)  # (1, 1, H, 1)
    rows = top[:, :, None, None] * (1 - t) + bottom[:, :, None, None] * t  # (N, 3, H, 1)
    return background, rows


def _label_components(mask: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, H, W) int64: 0 off the mask, else an id per 4-connected component.

    Every pixel starts with its own id and takes the largest id among its neighbours on the
    mask until nothing changes (as many rounds as the longest path inside a component); images
    that stopped changing leave the batch. Ids are float32, exact up to 2^24 pixels.
    """
    n, h, w = mask.shape
    on = mask.float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w) * on  # (N, H, W)
    active = torch.arange(n)
    while len(active):
        current = labels[active]  # (A, H, W)
        p = F.pad(current, (1, 1, 1, 1))  # (A, H + 2, W + 2), zeros around
        up_down = torch.maximum(p[:, :-2, 1:-1], p[:, 2:, 1:-1])
        left_right = torch.maximum(p[:, 1:-1, :-2], p[:, 1:-1, 2:])
        new = torch.maximum(current, torch.maximum(up_down, left_right)) * on[active]
        labels[active] = new
        active = active[(new != current).flatten(1).any(dim=1)]
    return labels.long()


def _find_objects(x: Tensor) -> tuple[Tensor, _Objects]:
    """(N, 3, H, W) images in [0, 1] -> ((N,) background index, the shapes found in them).

    A shape pixel is far from the background (`_MIN_CONTRAST`) and not much fainter than the
    brightest contrast around it (`_PEAK_FRACTION`), so that the anti-aliased one-pixel gap
    between two shapes splits them, also when the image is blurred. Each 4-connected component
    of at least `_MIN_AREA` pixels is a shape; its colour is the palette colour nearest to its
    contrast-weighted mean colour, its place the centre of its bounding box.
    """
    n, _, h, w = x.shape
    background, rows = _background(x)
    contrast = (x - rows).norm(dim=1)  # (N, H, W)
    peak = F.max_pool2d(contrast[:, None], 5, stride=1, padding=2)[:, 0]  # (N, H, W)
    mask = (contrast > _MIN_CONTRAST) & (contrast > _PEAK_FRACTION * peak)
    labels = _label_components(mask)  # (N, H, W)

    # One row per (image, component): sums and extremes over the component's pixels.
    on = labels > 0
    key = (torch.arange(n).view(n, 1, 1) * (h * w + 1) + labels)[on]  # (P,)
    keys, row, area = torch.unique(key, return_inverse=True, return_counts=True)  # (K,), (P,)
    k = len(keys)
    weight = contrast[on]  # (P,)
    total = torch.zeros(k).index_add_(0, row, weight)  # (K,)
    pixels = x.permute(0, 2, 3, 1)[on]  # (P, 3)
    rgb = torch.zeros(k, 3).index_add_(0, row, weight[:, None] * pixels) / total[:, None]
    color = torch.cdist(rgb, torch.tensor(list(COLORS.values())) / 255.0).argmin(dim=1)  # (K,)
    top = torch.zeros(k).scatter_reduce(0, row, weight, reduce="amax")  # (K,) peak contrast
    # Where the shape is, in pixel units (pixel j spans [j, j + 1)): the centre of its bounding
    # box (synth's relations and grid cells are about box centres), and its contrast-weighted
    # centroid (sub-pixel, where its window is centred).
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (H, W)
    centre, centroid = [], []
    for coord, size in ((xs, w), (ys, h)):
        values = coord.expand(n, h, w)[on]  # (P,)
        low = torch.full((k,), size).scatter_reduce(0, row, values, reduce="amin")
        high = torch.zeros(k, dtype=torch.long).scatter_reduce(0, row, values, reduce="amax")
        centre.append((low + high + 1) / 2)
        centroid.append(torch.zeros(k).index_add_(0, row, weight * values) / total + 0.5)
    image, label = keys // (h * w + 1), keys % (h * w + 1)

    # Keep components of at least _MIN_AREA pixels, the _MAX_OBJECTS largest of each image.
    order = torch.argsort(area, descending=True, stable=True)
    order = order[torch.argsort(image[order], stable=True)]  # by image, then largest first
    per_image = torch.bincount(image[order], minlength=n)  # (N,)
    rank = torch.arange(k) - (torch.cumsum(per_image, 0) - per_image)[image[order]]
    keep = order[(rank < _MAX_OBJECTS) & (area[order] >= _MIN_AREA)]

    # The window around each kept shape, centred on its centroid (zero outside the image):
    # pixels floor(centroid) - half + j, which are floor(centroid) + j in the padded image.
    half = _WINDOW // 2
    r = centroid[1][keep].floor().long()[:, None] + torch.arange(_WINDOW)  # (K', W) padded rows
    c = centroid[0][keep].floor().long()[:, None] + torch.arange(_WINDOW)  # (K', W) padded cols
    i = image[keep][:, None, None]
    padded_contrast = F.pad(contrast, (half, half, half, half))  # (N, H + 16, W + 16)
    padded_labels = F.pad(labels, (half, half, half, half))
    win_contrast = padded_contrast[i, r[:, :, None], c[:, None, :]]  # (K', W, W)
    win_mask = padded_labels[i, r[:, :, None], c[:, None, :]] == label[keep][:, None, None]
    window = torch.stack(
        [win_contrast / top[keep].clamp(min=1e-6)[:, None, None], win_mask.float()], dim=1
    )  # (K', 2, W, W)
    objects = _Objects(
        image=image[keep],
        centre=torch.stack(centre, dim=1)[keep],
        area=area[keep],
        color=color[keep],
        window=window,
    )
    return background, objects


# --------------------------------------------------------------------------------------------
# Reading each shape (learned) and the scene (rules)
# --------------------------------------------------------------------------------------------


class _ShapeNet(nn.Module):
    """(K, 2, 16, 16) windows centred on shapes -> (K, shapes) and (K, sizes) logits.

    An MLP is enough: the window is centred on the shape, so the classes do not have to be found
    anywhere in it, and it trains several times faster than a CNN of the same accuracy on CPU.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),  # (K, 2 * 16 * 16)
            nn.Linear(2 * _WINDOW * _WINDOW, hidden),  # (K, hidden)
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),  # (K, hidden / 2)
            nn.ReLU(),
            nn.Linear(hidden // 2, len(SHAPES) + len(SIZES)),  # (K, shapes + sizes)
        )

    def forward(self, window: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(window)  # (K, shapes + sizes)
        return logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]


_Key = tuple[int, int, int]  # a group's (colour, shape, size) answer indices


def _split_look_alikes(
    groups: list[tuple[_Key, list[int]]], targets: dict[str, int], centre: list[list[float]]
) -> list[tuple[_Key, list[int]]]:
    """Two claimed groups that look alike, seen as one group of all their shapes, split in two.

    "a red square to the left of two red squares" and "three red squares" can be the same
    picture: when the caption claims two groups of one colour, kind and size, and the image
    shows exactly one group of that look with as many shapes as both together, its shapes are
    split along the claimed axis, the first ``a_count`` of them (top or left) being group a.
    Whether the split groups really lie along that axis is then judged like any two groups.
    """
    if targets.get("layout") not in (1, 2) or len(groups) != 1:
        return groups
    key_a = (targets["a_color"], targets["a_shape"], targets["a_size"])
    key_b = (targets["b_color"], targets["b_shape"], targets["b_size"])
    ((key, members),) = groups
    if not key == key_a == key_b or len(members) != targets["a_count"] + targets["b_count"] + 2:
        return groups
    axis = 1 if targets["layout"] == 1 else 0  # y for stacked groups, x for side by side
    members = sorted(members, key=lambda k: centre[k][axis])
    cut = targets["a_count"] + 1
    return [(key, members[:cut]), (key, members[cut:])]


def _read_scenes(
    n: int,
    background: Tensor,
    objects: _Objects,
    shape: Tensor,
    size: Tensor,
    wanted: Sequence[dict[str, int]] | None = None,
) -> dict[str, list[int]]:
    """Question -> one answer index per image (or _NO_ANSWER), from the shapes found.

    Shapes of the same colour, kind and size form a group (two groups that look alike are
    split when the caption in `wanted` claims them, `_split_look_alikes`). One group: layout
    "one group" and the grid cell of its centre. Two groups: "stacked" when their centres are
    further apart in y than in x, else "side by side"; group a is the top (left) one. More than
    two groups: no layout, and a / b are the two largest groups. A group of more than three
    shapes has no count.
    """
    answers = {q: [_NO_ANSWER] * n for q in _QUESTIONS}
    answers["background"] = background.tolist()
    found: list[dict[_Key, list[int]]] = [{} for _ in range(n)]
    image, color = objects.image.tolist(), objects.color.tolist()
    for k, (i, c, s, z) in enumerate(zip(image, color, shape.tolist(), size.tolist(), strict=True)):
        found[i].setdefault((c, s, z), []).append(k)
    centre, area = objects.centre.tolist(), objects.area.tolist()
    for i in range(n):
        groups = list(found[i].items())
        if wanted is not None:
            groups = _split_look_alikes(groups, wanted[i], centre)
        if not groups:
            continue
        # The two largest groups (by area), with their mean centres.
        ranked = sorted(groups, key=lambda group: -sum(area[k] for k in group[1]))[:2]
        centres = [
            (sum(centre[k][0] for k in ks) / len(ks), sum(centre[k][1] for k in ks) / len(ks))
            for _, ks in ranked
        ]
        if len(ranked) == 2:
            (x0, y0), (x1, y1) = centres
            stacked = abs(y1 - y0) > abs(x1 - x0)
            if (y1 < y0) if stacked else (x1 < x0):
                ranked, centres = ranked[::-1], centres[::-1]
            if len(groups) == 2:
                answers["layout"][i] = 1 if stacked else 2
        else:
            answers["layout"][i] = 0
            col, row = (min(int(v * 3 / _RES), 2) for v in centres[0])
            answers["cell"][i] = _CELLS[(col, row)]
        for prefix, ((c, s, z), ks) in zip(("a", "b"), ranked, strict=False):
            answers[f"{prefix}_color"][i] = c
            answers[f"{prefix}_shape"][i] = s
            answers[f"{prefix}_size"][i] = z
            answers[f"{prefix}_count"][i] = len(ks) - 1 if len(ks) <= _MAX_COUNT else _NO_ANSWER
    return answers


# --------------------------------------------------------------------------------------------
# Training the shape classifier on rendered scenes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderConfig:
    """How the shape classifier is trained. Every field is part of the weights' cache key."""

    scenes: int = 3000  # scenes rendered with synth.render_sample(i, seed, 32), i < scenes
    seed: int = 14_000  # scene seed and training seed; not 0, the default dataset's seed
    copies: int = 2  # versions of each scene: the clean one and copies - 1 degraded ones
    blur: float = 1.0  # max sigma (px) of the Gaussian blur of a degraded copy
    noise: float = 0.06  # max std of the additive Gaussian noise of a degraded copy
    epochs: int = 5  # passes over the shapes found (~17,000 of them by default)
    batch_size: int = 128  # shapes per optimiser step
    lr: float = 3e-3  # AdamW peak learning rate, one-cycle schedule
    hidden: int = 256  # width of the classifier's first hidden layer (the second is half)

    def __post_init__(self) -> None:
        for name, least in (
            ("scenes", 1),
            ("copies", 1),
            ("epochs", 1),
            ("batch_size", 1),
            ("hidden", 2),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"ReaderConfig.{name}={value!r} is invalid: expected an int >= {least}"
                )
        for name in ("lr", "blur", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"ReaderConfig.{name}={value!r} is invalid: expected a number")
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ConfigError(f"ReaderConfig.{name}={value!r} is invalid: expected {bound}")

    def cache_name(self) -> str:
        """File name of the weights: the version and a hash of every setting."""
        settings = json.dumps([_VERSION, dataclasses.asdict(self)], sort_keys=True)
        digest = hashlib.sha256(settings.encode("utf-8")).hexdigest()[:16]
        return f"{_VERSION}-{digest}.pt"


def _degrade(x: Tensor, config: ReaderConfig, generator: torch.Generator) -> Tensor:
    """Blur and noise each image, at random strengths: generated images are rarely crisp."""
    n = x.shape[0]
    radius = 3
    sigma = (torch.rand(n, generator=generator) * config.blur).clamp(min=1e-3)  # (N,)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (T,)
    kernel = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))  # (N, T)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # (N * 3, T)
    # A separable blur as grouped convolutions, one group per (image, channel).
    flat = F.pad(x.reshape(1, n * 3, *x.shape[2:]), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * 3)  # along x
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * 3)  # along y
    std = torch.rand(n, 1, 1, 1, generator=generator) * config.noise
    noisy = flat.reshape(x.shape) + std * torch.randn(x.shape, generator=generator)
    return noisy.clamp(0.0, 1.0)


def _training_shapes(config: ReaderConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Windows of the shapes found in rendered training scenes, with their shape and size.

    The shapes are found exactly as at scoring time (`_find_objects`), in the clean scenes and
    in degraded copies; each is labelled with the metadata object whose box holds its centre
    (components that lie in no box, e.g. noise, are left out).
    """
    pixels = np.empty((config.scenes, _RES, _RES, 3), dtype=np.uint8)
    boxes: list[list[tuple[list[float], int, int]]] = []  # per scene: (box, shape, size)
    for i in range(config.scenes):
        image, _caption, meta = render_sample(i, config.seed, _RES)
        pixels[i] = np.asarray(image)
        boxes.append(
            [
                (box, list(SHAPES).index(obj["shape"]), list(SIZES).index(obj["size"]))
                for obj in meta["objects"]
                for box in obj["boxes"]
            ]
        )
    clean = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)  # (S, 3, 32, 32)
    generator = torch.Generator().manual_seed(config.seed)
    windows, shapes, sizes = [], [], []
    for copy in range(config.copies):
        x = clean if copy == 0 else _degrade(clean, config, generator)
        _, objects = _find_objects(x)
        keep = []
        for k, (i, (cx, cy)) in enumerate(
            zip(objects.image.tolist(), objects.centre.tolist(), strict=True)
        ):
            for (x0, y0, x1, y1), shape, size in boxes[i]:
                if x0 - 0.5 <= cx <= x1 + 0.5 and y0 - 0.5 <= cy <= y1 + 0.5:
                    keep.append(k)
                    shapes.append(shape)
                    sizes.append(size)
                    break
        windows.append(objects.window[keep])
    return torch.cat(windows), torch.tensor(shapes), torch.tensor(sizes)


def _train(config: ReaderConfig) -> _ShapeNet:
    """Fit the shape classifier on the training shapes (CPU, seeded)."""
    windows, shapes, sizes = _training_shapes(config)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = _ShapeNet(config.hidden)
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    net.train()
    for _epoch in range(config.epochs):
        order = torch.randperm(len(windows), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            shape_logits, size_logits = net(windows[batch])
            loss = F.cross_entropy(shape_logits, shapes[batch]) + F.cross_entropy(
                size_logits, sizes[batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _as_images(images: Any) -> Tensor:
    """Validate (N, 3, H, W) images (float in [0, 1] or uint8) and resize them to 32 x 32."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise DataError(f"images must be a (N, 3, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise DataError("images is empty: the alignment score needs at least one image")
    x = images.detach().cpu()
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all():
        raise DataError("images hold NaN or infinite values: expected floats in [0, 1]")
    x = x.clamp(0.0, 1.0)
    if x.shape[-2:] != (_RES, _RES):
        x = F.interpolate(x, size=(_RES, _RES), mode="bilinear", antialias=True).clamp(0.0, 1.0)
    return x


def _fraction(row: dict[str, list[bool]]) -> float:
    """The fraction of one image's claims that hold."""
    return sum(sum(claims) for claims in row.values()) / sum(len(c) for c in row.values())


class AlignmentScorer:
    """Reads back from images whether they show what their built-in captions say.

    Trains the shape classifier (module docstring) on construction, or loads its weights from
    ``cache_dir / config.cache_name()`` when an earlier scorer left them there. `trained` says
    which happened, `train_seconds` how long training took (0.0 when loaded).

    Args:
        cache_dir: folder for the classifier's weights (created if missing); None trains in
            memory every time.
        config: training settings (`ReaderConfig`); part of the cache key.
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str] | None = None, config: ReaderConfig | None = None
    ) -> None:
        self.config = config or ReaderConfig()
        self.weights_path = (
            None if cache_dir is None else Path(cache_dir) / self.config.cache_name()
        )
        self.trained = False
        self.train_seconds = 0.0
        if self.weights_path is not None and self.weights_path.is_file():
            self.net = self._load(self.weights_path)
            return
        start = time.perf_counter()
        self.net = _train(self.config)
        self.train_seconds = time.perf_counter() - start
        self.trained = True
        if self.weights_path is not None:
            state = {"version": _VERSION, "config": dataclasses.asdict(self.config)}
            state["weights"] = self.net.state_dict()
            atomic_write(self.weights_path, lambda f: torch.save(state, f))

    def _load(self, path: Path) -> _ShapeNet:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["version"] != _VERSION or state["config"] != dataclasses.asdict(self.config):
                raise ValueError("written by another version or with other settings")
            net = _ShapeNet(self.config.hidden)
            net.load_state_dict(state["weights"])
        except (
            OSError,
            EOFError,
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            UnpicklingError,
        ) as exc:
            raise DataError(
                f"{path} is not a usable alignment classifier cache ({exc}); delete it to retrain"
            ) from exc
        return net.eval()

    def read(self, images: Tensor) -> list[dict[str, str | None]]:
        """What each of (N, 3, H, W) images in [0, 1] shows, to see why an image fails.

        One dict per image: "background", "layout" ("one group", "stacked", "side by side"),
        "a_color", "a_shape", "a_size", "a_count" (the top, left or only group), "b_..." (the
        other group) and "cell" (a `synth.POSITIONS` key, for one group); None where the image
        shows no valid answer (no second group, four shapes in a group, ...).
        """
        answers = self._answers(images)
        return [
            {
                question: (names[answers[question][i]] if answers[question][i] >= 0 else None)
                for question, names in _QUESTIONS.items()
            }
            for i in range(len(answers["background"]))
        ]

    @torch.no_grad()
    def _answers(
        self, images: Tensor, wanted: Sequence[dict[str, int]] | None = None
    ) -> dict[str, list[int]]:
        """Question -> answer index into `_QUESTIONS` per image (`_NO_ANSWER`: none)."""
        x = _as_images(images)
        background, objects = _find_objects(x)
        if len(objects.image):
            shape_logits, size_logits = self.net(objects.window)
            shape, size = shape_logits.argmax(dim=1), size_logits.argmax(dim=1)
        else:
            shape = size = torch.zeros(0, dtype=torch.long)
        return _read_scenes(x.shape[0], background, objects, shape, size, wanted)

    def check(self, images: Tensor, captions: Sequence[str]) -> list[dict[str, list[bool]]]:
        """Per image: attribute -> one bool per claim of that attribute (True: it holds).

        Raises `DataError` for a caption outside the built-in grammar, or when the number of
        captions differs from the number of images.
        """
        if isinstance(captions, str):
            raise DataError("captions must be a sequence of strings, one per image, not a string")
        n = images.shape[0] if hasattr(images, "shape") else None
        if n != len(captions):
            raise DataError(f"got {n} images but {len(captions)} captions: expected one each")
        wanted = [_targets(parse_caption(caption)) for caption in captions]
        answers = self._answers(images, wanted)
        rows = []
        for i, targets in enumerate(wanted):
            row: dict[str, list[bool]] = {attribute: [] for attribute in ATTRIBUTES}
            for question, target in targets.items():
                row[_attribute(question)].append(answers[question][i] == target)
            rows.append(row)
        return rows

    def scores(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """(N,) float64 scores in [0, 1]: the fraction of each caption's claims its image meets."""
        rows = self.check(images, captions)
        return torch.tensor([_fraction(row) for row in rows], dtype=torch.float64)


def _bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values`, resampling them with replacement."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, (1 << 22) // n)  # index blocks of at most ~4M entries
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def alignment_score(
    images: Tensor,
    captions: Sequence[str],
    *,
    scorer: AlignmentScorer | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean text alignment of `images` with their built-in `captions`, with a bootstrap interval.

    Args:
        images: (N, 3, H, W) floats in [0, 1] (uint8 accepted), any H x W (resized to 32).
        captions: N captions of the built-in grammar, one per image.
        scorer: a trained `AlignmentScorer`; default: a new one with `cache_dir`.
        cache_dir: where a new scorer caches its classifier's weights (ignored with `scorer`).
        resamples: bootstrap resamples for the interval (>= 1).
        seed: seed of the bootstrap's numpy generator; the same seed gives the same interval.

    Returns::

        {"value": mean score, "ci95": [lo, hi] (percentile bootstrap over images),
         "stderr": std(ddof=1) / sqrt(N) (0 for N = 1), "n": N, "resamples": B,
         "method": description, "per_attribute": {attribute: accuracy over its claims, or None
         when no caption claims it}, "claims": {attribute: number of claims}}

    Raises `DataError` for captions outside the built-in grammar (use the CLIP score for real
    data) or mismatched lengths, `ConfigError` for resamples < 1.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"resamples={resamples!r} is invalid: expected an int >= 1 (e.g. 1000)")
    scorer = scorer or AlignmentScorer(cache_dir)
    rows = scorer.check(images, captions)
    values = np.array([_fraction(row) for row in rows])
    n = len(values)
    lo, hi = _bootstrap_ci(values, resamples, seed)
    met = {a: sum(sum(row[a]) for row in rows) for a in ATTRIBUTES}
    claims = {a: sum(len(row[a]) for row in rows) for a in ATTRIBUTES}
    return {
        "value": float(values.mean()),
        "ci95": [lo, hi],
        "stderr": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "n": n,
        "resamples": resamples,
        "method": (
            "fraction of the caption's claims read back from the image (background, shapes and "
            "groups by rules; shape kind and size by an MLP trained on the built-in synthetic "
            f"data, {scorer.config.cache_name()}); 95% percentile bootstrap over images"
        ),
        "per_attribute": {a: (met[a] / claims[a] if claims[a] else None) for a in ATTRIBUTES},
        "claims": claims,
    }
