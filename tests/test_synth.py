"""Tests for the built-in synthetic captioned image set (`budget_lab.data.synth`).

The captions are checked against the pixels and the boxes with an independent parser of the
caption grammar, so a caption that stops being true of its image fails here.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from budget_lab.data import render_sample, synth_dataset
from budget_lab.data import synth as synth_module
from budget_lab.data.synth import BACKGROUNDS, COLORS, SIZES
from budget_lab.errors import ConfigError, UserError

# The caption vocabulary, written out here rather than imported, so a change to it is noticed.
COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3}
SHAPE_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "square": "square",
    "squares": "square",
    "triangle": "triangle",
    "triangles": "triangle",
    "diamond": "diamond",
    "diamonds": "diamond",
    "star": "star",
    "stars": "star",
    "cross": "cross",
    "crosses": "cross",
}
COLOR_WORDS = {"red", "orange", "yellow", "green", "blue", "purple", "white", "black"}
RELATION_PHRASES = {
    "above": "above",
    "below": "below",
    "to the left of": "left of",
    "to the right of": "right of",
}
# position -> (column, row) of the 3 x 3 grid its centre lies in
POSITION_PHRASES = {
    "in the top left corner": ("top left", 0, 0),
    "at the top": ("top", 1, 0),
    "in the top right corner": ("top right", 2, 0),
    "on the left": ("left", 0, 1),
    "in the center": ("center", 1, 1),
    "on the right": ("right", 2, 1),
    "in the bottom left corner": ("bottom left", 0, 2),
    "at the bottom": ("bottom", 1, 2),
    "in the bottom right corner": ("bottom right", 2, 2),
}

_GROUP = r"(a|an|two|three) (?:(small|large) )?([a-z]+) ([a-z]+)"
_REL = "|".join(re.escape(p) for p in RELATION_PHRASES)
_POS = "|".join(re.escape(p) for p in POSITION_PHRASES)
_RE_RELATION = re.compile(rf"^{_GROUP} ({_REL}) {_GROUP} on a ([a-z ]+) background$")
_RE_POSITION = re.compile(rf"^{_GROUP} ({_POS}) on a ([a-z ]+) background$")
_RE_SINGLE = re.compile(rf"^{_GROUP} on a ([a-z ]+) background$")


def _group(count: str, size: str | None, color: str, shape: str) -> dict:
    assert color in COLOR_WORDS, color
    assert shape in SHAPE_WORDS, shape
    n = COUNT_WORDS[count]
    plural = shape != SHAPE_WORDS[shape]
    assert plural == (n > 1), f"number agreement: {count} {shape}"
    if n == 1:  # "an" exactly before a vowel
        assert (count == "an") == ((size or color)[0] in "aeiou"), (
            f"article: {count} {size} {color}"
        )
    return {
        "count": n,
        "size": size or "medium",
        "color": color,
        "shape": SHAPE_WORDS[shape],
    }


def parse_caption(caption: str) -> dict:
    """Caption -> {"groups": [...], "relation", "position", "background"}; fails if off-grammar."""
    if m := _RE_RELATION.match(caption):
        g = m.groups()
        return {
            "groups": [_group(*g[0:4]), _group(*g[5:9])],
            "relation": RELATION_PHRASES[g[4]],
            "position": None,
            "background": g[9],
        }
    if m := _RE_POSITION.match(caption):
        g = m.groups()
        return {
            "groups": [_group(*g[0:4])],
            "relation": None,
            "position": POSITION_PHRASES[g[4]][0],
            "background": g[5],
        }
    if m := _RE_SINGLE.match(caption):
        g = m.groups()
        return {"groups": [_group(*g[0:4])], "relation": None, "position": None, "background": g[4]}
    raise AssertionError(f"caption does not follow the grammar: {caption!r}")


def _background_at(name: str, row: int, res: int) -> tuple[float, float, float]:
    """The expected background colour of pixel row `row` (gradients: top to bottom)."""
    top, bottom = BACKGROUNDS[name]
    # A res-pixel row averages 4 rows of the 4x canvas, whose weights run 0..1 top to bottom.
    t = (4 * row + 1.5) / (4 * res - 1)
    return tuple(a + (b - a) * t for a, b in zip(top, bottom, strict=True))


def _nearest_color(rgb: tuple[int, ...]) -> tuple[str, float]:
    name = min(COLORS, key=lambda c: math.dist(COLORS[c], rgb))
    return name, math.dist(COLORS[name], rgb)


def _centre(box: list[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check_sample(index: int, seed: int, res: int) -> dict:
    """Every claim of the caption holds for the metadata boxes and for the pixels."""
    image, caption, meta = render_sample(index, seed, res)
    assert image.mode == "RGB" and image.size == (res, res)
    parsed = parse_caption(caption)
    assert parsed["background"] == meta["background"]
    assert parsed["relation"] == meta["relation"]
    assert len(parsed["groups"]) == len(meta["objects"])  # the caption names every object

    pixels = image.load()
    all_boxes = []
    for said, obj in zip(parsed["groups"], meta["objects"], strict=True):
        assert said == {k: obj[k] for k in ("count", "size", "color", "shape")}
        assert obj["position"] == parsed["position"]
        assert len(obj["boxes"]) == said["count"]  # the count word is the number of shapes
        lo, hi = SIZES[obj["size"]]
        for box in obj["boxes"]:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= res and 0 <= y0 < y1 <= res, box
            side = x1 - x0
            assert lo * res - 0.02 <= side <= hi * res + 0.02, (obj["size"], side / res)
            # the pixel at the box centre has the named colour, which stands out from the background
            cx, cy = _centre(box)
            rgb = pixels[int(cx), int(cy)]
            name, dist = _nearest_color(rgb)
            assert name == obj["color"] and dist < 60, (caption, box, rgb)
            assert math.dist(rgb, _background_at(meta["background"], int(cy), res)) > 80
            all_boxes.append(box)

    for a, b in itertools.combinations(all_boxes, 2):  # shapes never overlap
        assert not _overlap(a, b), (caption, a, b)

    if meta["relation"] is not None:
        first, second = (obj["boxes"] for obj in meta["objects"])
        if meta["relation"] == "above":
            assert max(b[3] for b in first) < min(b[1] for b in second), caption
        elif meta["relation"] == "below":
            assert min(b[1] for b in first) > max(b[3] for b in second), caption
        elif meta["relation"] == "left of":
            assert max(b[2] for b in first) < min(b[0] for b in second), caption
        else:
            assert min(b[0] for b in first) > max(b[2] for b in second), caption
        # and the relation is the dominant direction between the two groups
        (ax, ay), (bx, by) = (
            tuple(sum(v) / len(v) for v in zip(*map(_centre, boxes), strict=True))
            for boxes in (first, second)
        )
        vertical = meta["relation"] in ("above", "below")
        assert abs(by - ay if vertical else bx - ax) > abs(bx - ax if vertical else by - ay)

    if parsed["position"] is not None:
        col, row = next(v[1:] for v in POSITION_PHRASES.values() if v[0] == parsed["position"])
        cx, cy = _centre(meta["objects"][0]["boxes"][0])
        assert col * res / 3 < cx < (col + 1) * res / 3, (caption, cx / res)
        assert row * res / 3 < cy < (row + 1) * res / 3, (caption, cy / res)

    # nothing is drawn outside the boxes: away from them (LANCZOS rings for up to 3 px) is background
    for y in range(res):
        expected = _background_at(meta["background"], y, res)
        for x in range(res):
            if any(
                b[0] - 3 < x + 0.5 < b[2] + 3 and b[1] - 3 < y + 0.5 < b[3] + 3 for b in all_boxes
            ):
                continue
            assert max(abs(p - e) for p, e in zip(pixels[x, y], expected, strict=True)) <= 4, (
                caption,
                x,
                y,
            )
    return meta


# ------------------------------------------------------------------------------------------
# render_sample
# ------------------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent() -> None:
    a = render_sample(7, seed=3, res=32)
    b = render_sample(7, seed=3, res=32)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    others = [render_sample(7, seed=4, res=32), render_sample(8, seed=3, res=32)]
    for other in others:
        assert other[0].tobytes() != a[0].tobytes()


def test_different_seeds_give_different_datasets_of_captions() -> None:
    captions = {seed: [render_sample(i, seed)[1] for i in range(40)] for seed in (0, 1)}
    assert sum(x != y for x, y in zip(captions[0], captions[1], strict=True)) > 30


def test_same_scene_at_every_resolution() -> None:
    _, caption32, meta32 = render_sample(11, seed=0, res=32)
    for res in (16, 64, 128, 256):
        image, caption, meta = render_sample(11, seed=0, res=res)
        assert image.size == (res, res) and image.mode == "RGB"
        assert caption == caption32
        for obj, obj32 in zip(meta["objects"], meta32["objects"], strict=True):
            for box, box32 in zip(obj["boxes"], obj32["boxes"], strict=True):
                assert box == pytest.approx(
                    [v * res / 32 for v in box32], abs=0.006 * (res / 32 + 1)
                )


@pytest.mark.parametrize(("res", "count"), [(32, 400), (64, 120), (16, 60)])
def test_captions_are_true_of_boxes_and_pixels(res: int, count: int) -> None:
    metas = [check_sample(i, seed=5, res=res) for i in range(count)]
    if res == 32:  # the generator covers the whole vocabulary
        objects = [o for m in metas for o in m["objects"]]
        assert {o["shape"] for o in objects} == set(SHAPE_WORDS.values())
        assert {o["color"] for o in objects} == COLOR_WORDS
        assert {o["size"] for o in objects} == {"small", "medium", "large"}
        assert {o["count"] for o in objects} == {1, 2, 3}
        assert {m["relation"] for m in metas} == {None, *RELATION_PHRASES.values()}
        assert {m["background"] for m in metas} == set(BACKGROUNDS)
        assert {o["position"] for o in objects} == {None} | {
            v[0] for v in POSITION_PHRASES.values()
        }


# Where each shape is filled, at points given as fractions of its box (x, y):
_PROBES = [(0.1, 0.1), (0.12, 0.9), (0.1, 0.5), (0.22, 0.22), (0.3, 0.3), (0.5, 0.9), (0.5, 0.55)]
_SIGNATURES = {
    "square": (1, 1, 1, 1, 1, 1, 1),
    "circle": (0, 0, 1, 1, 1, 1, 1),
    "triangle": (0, 1, 0, 0, 0, 1, 1),
    "diamond": (0, 0, 1, 0, 1, 1, 1),
    "cross": (0, 0, 1, 0, 0, 1, 1),
    "star": (0, 0, 0, 0, 0, 0, 1),
}


def test_drawn_shape_is_the_named_shape() -> None:
    seen = set()
    for index in range(80):
        image, _, meta = render_sample(index, seed=2, res=128)
        pixels = image.load()
        for obj in meta["objects"]:
            colour = COLORS[obj["color"]]
            for x0, y0, x1, y1 in obj["boxes"]:
                filled = []
                for fx, fy in _PROBES:
                    x, y = int(x0 + fx * (x1 - x0)), int(y0 + fy * (y1 - y0))
                    background = _background_at(meta["background"], y, 128)
                    rgb = pixels[x, y]
                    filled.append(int(math.dist(rgb, colour) < math.dist(rgb, background)))
                assert tuple(filled) == _SIGNATURES[obj["shape"]], (index, obj["shape"], filled)
                seen.add(obj["shape"])
    assert seen == set(_SIGNATURES)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"index": -1}, ["index=-1", ">= 0"]),
        ({"index": 0, "res": 15}, ["res=15", "16..1024"]),
        ({"index": 0, "res": 1025}, ["res=1025", "16..1024"]),
        ({"index": 0, "res": 32.0}, ["res=32.0", "integer"]),
    ],
)
def test_render_rejects_bad_values(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        render_sample(**kwargs)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# synth_dataset
# ------------------------------------------------------------------------------------------

N, SHARD, VAL = 45, 16, 0.2  # 36 train (3 shards), 9 val (1 shard)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _read(paths: list[Path]) -> list[dict]:
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    return list(dataset)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ref"
    manifest = synth_dataset(
        out, N, res=32, seed=1, val_fraction=VAL, shard_size=SHARD, progress=False
    )
    return out, manifest


def test_manifest_and_shards(reference: tuple[Path, dict]) -> None:
    out, manifest = reference
    assert manifest == json.loads((out / "synth.json").read_text())
    assert manifest["kind"] == "budget-lab-synth" and manifest["version"] == 1
    assert (manifest["n"], manifest["n_train"], manifest["n_val"]) == (45, 36, 9)
    assert (manifest["res"], manifest["seed"], manifest["val_fraction"]) == (32, 1, 0.2)
    assert manifest["complete"] is True
    assert manifest["shards"] == {
        "train": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
        "val": ["val-000000.tar"],
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["synth.json", *manifest["shards"]["train"], *manifest["shards"]["val"]]
    )


def test_shards_read_back_with_webdataset(reference: tuple[Path, dict]) -> None:
    out, manifest = reference
    train = _read([out / name for name in manifest["shards"]["train"]])
    val = _read([out / name for name in manifest["shards"]["val"]])
    train_keys = [s["__key__"] for s in train]
    val_keys = [s["__key__"] for s in val]
    # val is the last ceil(45 * 0.2) = 9 indices, train the ones before: disjoint, complete
    assert train_keys == [f"{i:08d}" for i in range(36)]
    assert val_keys == [f"{i:08d}" for i in range(36, 45)]
    assert not set(train_keys) & set(val_keys)
    for sample in train[:10] + val[:5]:
        assert set(sample) >= {"__key__", "png", "txt", "json"}
        index = int(sample["__key__"])
        image, caption, meta = render_sample(index, seed=1, res=32)
        decoded = Image.open(io.BytesIO(sample["png"]))
        assert decoded.mode == "RGB" and decoded.tobytes() == image.tobytes()
        assert sample["txt"].decode("utf-8") == caption
        assert json.loads(sample["json"]) == meta


def test_same_arguments_same_bytes_other_seed_other_bytes(
    reference: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = reference
    synth_dataset(
        tmp_path / "again", N, res=32, seed=1, val_fraction=VAL, shard_size=SHARD, progress=False
    )
    assert _files(tmp_path / "again") == _files(out)
    synth_dataset(
        tmp_path / "seed2", N, res=32, seed=2, val_fraction=VAL, shard_size=SHARD, progress=False
    )
    other = _files(tmp_path / "seed2")
    for name, data in _files(out).items():
        if name.endswith(".tar"):
            assert other[name] != data, name


def test_resume_rewrites_only_missing_shards(reference: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = reference
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in _files(out).items():
        (copy / name).write_bytes(data)
    (copy / "train-000001.tar").unlink()
    (copy / "val-000000.tar.tmp").write_bytes(b"half a shard")  # left by an interrupted run
    (copy / "train-000002.tar").touch()  # so a rewrite would show in its mtime
    kept = (copy / "train-000002.tar").stat().st_mtime_ns
    synth_dataset(copy, N, res=32, seed=1, val_fraction=VAL, shard_size=SHARD, progress=False)
    assert (copy / "train-000002.tar").stat().st_mtime_ns == kept  # re-used, not rewritten
    assert _files(copy) == _files(out)  # the temporary file is gone, the shard is back


def test_interrupted_run_leaves_no_partial_shard(
    reference: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = reference
    encode = synth_module._encode_sample
    calls = []

    def failing(index: int, seed: int, res: int) -> tuple[bytes, bytes, bytes]:
        calls.append(index)
        if len(calls) > 20:  # in the middle of the second shard
            raise KeyboardInterrupt
        return encode(index, seed, res)

    monkeypatch.setattr(synth_module, "_encode_sample", failing)
    target = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        synth_dataset(target, N, res=32, seed=1, val_fraction=VAL, shard_size=SHARD, progress=False)
    assert (target / "train-000000.tar").exists()
    assert not (target / "train-000001.tar").exists()  # only under its temporary name
    assert json.loads((target / "synth.json").read_text())["complete"] is False

    monkeypatch.setattr(synth_module, "_encode_sample", encode)
    manifest = synth_dataset(
        target, N, res=32, seed=1, val_fraction=VAL, shard_size=SHARD, progress=False
    )
    assert manifest["complete"] is True
    assert _files(target) == _files(out)


def test_split_edge_cases(tmp_path: Path) -> None:
    one = synth_dataset(tmp_path / "one", 1, val_fraction=0.5, progress=False)
    assert (one["n_train"], one["n_val"], one["shards"]["val"]) == (1, 0, [])  # train never empty
    none = synth_dataset(tmp_path / "none", 5, val_fraction=0.0, shard_size=2, progress=False)
    assert (none["n_train"], none["n_val"]) == (5, 0)
    assert none["shards"]["train"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    exact = synth_dataset(tmp_path / "exact", 100, val_fraction=0.07, progress=False)
    assert (exact["n_train"], exact["n_val"]) == (
        93,
        7,
    )  # 100 * 0.07 == 7.000000000000001 in floats


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"n": 0}, ["n=0", ">= 1"]),
        ({"res": 8}, ["res=8", "16..1024"]),
        ({"res": 2048}, ["res=2048", "16..1024"]),
        ({"val_fraction": 0.6}, ["val_fraction=0.6", "[0, 0.5]"]),
        ({"val_fraction": -0.1}, ["val_fraction=-0.1", "[0, 0.5]"]),
        ({"shard_size": 0}, ["shard_size=0", ">= 1"]),
        ({"n": 2.5}, ["n=2.5", "integer"]),
    ],
)
def test_dataset_rejects_bad_values(kwargs: dict, words: list[str], tmp_path: Path) -> None:
    args = {"n": 4, **kwargs}
    with pytest.raises(ConfigError) as info:
        synth_dataset(tmp_path / "out", progress=False, **args)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written
    assert isinstance(info.value, UserError)


def test_out_must_not_be_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="a-file"):
        synth_dataset(target, 4, progress=False)


def test_existing_folder_with_other_arguments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    synth_dataset(out, 4, res=32, progress=False)
    before = _files(out)
    with pytest.raises(ConfigError) as info:
        synth_dataset(out, 6, res=64, progress=False)
    message = str(info.value)
    assert "n=4 (now 6)" in message and "res=32 (now 64)" in message
    assert "seed" not in message  # only what differs
    assert "--out" in message and "delete" in message
    assert _files(out) == before  # untouched
