"""Tests for the text-alignment score on the built-in synthetic data (`budget_lab.eval.alignment`).

Everything is real: captions and images come from `budget_lab.data.synth`, the shape classifier
is trained once per module for real (~20 s on 2 CPU cores) and cached in a temporary folder. The
held-out scenes use seed 1, never a training scene (the classifier trains on its own seed).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from budget_lab.data.synth import POSITIONS, render_sample
from budget_lab.errors import ConfigError, DataError
from budget_lab.eval.alignment import (
    ATTRIBUTES,
    AlignmentScorer,
    CaptionClaims,
    GroupClaim,
    ReaderConfig,
    alignment_score,
    parse_caption,
)

HELD_OUT_SEED = 1
N_HELD_OUT = 512


def _render(n: int, seed: int, res: int = 32) -> tuple[torch.Tensor, list[str], list[dict]]:
    """(n, 3, res, res) float images in [0, 1], their captions and metadata."""
    images, captions, metas = [], [], []
    for index in range(n):
        image, caption, meta = render_sample(index, seed, res)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)
        captions.append(caption)
        metas.append(meta)
    return torch.stack(images), captions, metas


def _shuffled(captions: list[str]) -> list[str]:
    """Every image gets another image's caption (a rotation of a fixed permutation)."""
    order = np.random.default_rng(0).permutation(len(captions))
    return [captions[order[(i + 1) % len(order)]] for i in np.argsort(order)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alignment_cache")


@pytest.fixture(scope="module")
def scorer(cache_dir: Path) -> AlignmentScorer:
    """The default scorer, trained for real once for this module."""
    scorer = AlignmentScorer(cache_dir)
    assert scorer.trained and scorer.train_seconds > 0
    return scorer


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[str], list[dict]]:
    assert ReaderConfig().seed != HELD_OUT_SEED  # no training scene among them
    return _render(N_HELD_OUT, HELD_OUT_SEED)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        (
            "two small red circles above a large blue square on a grey background",
            CaptionClaims(
                "grey",
                (GroupClaim(2, "small", "red", "circle"), GroupClaim(1, "large", "blue", "square")),
                relation="above",
            ),
        ),
        (
            "a green triangle to the left of an orange star on a white background",
            CaptionClaims(
                "white",
                (
                    GroupClaim(1, "medium", "green", "triangle"),
                    GroupClaim(1, "medium", "orange", "star"),
                ),
                relation="left of",
            ),
        ),
        (
            "three large black crosses to the right of two yellow diamonds on a beige background",
            CaptionClaims(
                "beige",
                (
                    GroupClaim(3, "large", "black", "cross"),
                    GroupClaim(2, "medium", "yellow", "diamond"),
                ),
                relation="right of",
            ),
        ),
        (
            "an orange square below three small white stars on a grey gradient background",
            CaptionClaims(
                "grey gradient",
                (
                    GroupClaim(1, "medium", "orange", "square"),
                    GroupClaim(3, "small", "white", "star"),
                ),
                relation="below",
            ),
        ),
        (
            "three purple diamonds on a beige background",
            CaptionClaims("beige", (GroupClaim(3, "medium", "purple", "diamond"),)),
        ),
        (
            "two small green crosses on a light blue background",
            CaptionClaims("light blue", (GroupClaim(2, "small", "green", "cross"),)),
        ),
        (
            "a large yellow cross in the top left corner on a blue gradient background",
            CaptionClaims(
                "blue gradient", (GroupClaim(1, "large", "yellow", "cross"),), position="top left"
            ),
        ),
        (
            "an orange circle on the left on a black background",
            CaptionClaims("black", (GroupClaim(1, "medium", "orange", "circle"),), position="left"),
        ),
        (
            "a small red triangle at the bottom on a white background",
            CaptionClaims("white", (GroupClaim(1, "small", "red", "triangle"),), position="bottom"),
        ),
    ],
)
def test_parse_caption_reads_every_scene_kind(caption: str, expected: CaptionClaims) -> None:
    claims = parse_caption(caption)
    assert claims == expected
    assert claims.kind == (
        "relation" if claims.relation else "position" if claims.position else "single"
    )


def test_parse_caption_agrees_with_the_metadata_of_rendered_scenes() -> None:
    kinds = set()
    for index in range(300):
        _, caption, meta = render_sample(index, seed=7, res=32)
        claims = parse_caption(caption)
        kinds.add(claims.kind)
        assert claims.background == meta["background"], caption
        assert claims.relation == meta["relation"], caption
        assert claims.position == meta["objects"][0]["position"], caption
        assert [dataclasses.astuple(g) for g in claims.groups] == [
            (o["count"], o["size"], o["color"], o["shape"]) for o in meta["objects"]
        ], caption
    assert kinds == {"relation", "single", "position"}


@pytest.mark.parametrize(
    ("caption", "names"),
    [
        ("a photo of a cat sitting on a sofa", "'on a BACKGROUND background'"),
        ("a red circle on a pink background", "'pink'"),
        ("two red circle on a grey background", "plural"),
        ("a red circles on a grey background", "singular"),
        ("a red hexagon on a grey background", "'hexagon'"),
        ("four red circles on a grey background", "'four'"),
        ("a medium red circle on a grey background", "'medium'"),
        ("three red stars in the center on a grey background", "only given for one shape"),
        ("a red star next to a blue square on a grey background", "'next'"),
        ("a red star above on a grey background", "a count"),
        ("A red star on a grey background", "'A'"),
    ],
)
def test_parse_caption_rejects_other_captions_and_points_to_clip(caption: str, names: str) -> None:
    with pytest.raises(DataError) as info:
        parse_caption(caption)
    message = str(info.value)
    assert caption in message and names in message
    assert "built-in synthetic data" in message and "CLIP score" in message


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_held_out_real_images_score_high_with_their_own_captions(scorer, held_out) -> None:
    images, captions, _ = held_out
    result = alignment_score(images, captions, scorer=scorer)
    assert result["value"] >= 0.95
    assert set(result["per_attribute"]) == set(ATTRIBUTES) == set(result["claims"])
    for attribute, accuracy in result["per_attribute"].items():
        assert accuracy >= 0.9, (attribute, result["per_attribute"])
    # Every caption claims a background, a layout, and colour, shape, size, count per group.
    assert result["claims"]["background"] == result["claims"]["layout"] == N_HELD_OUT
    assert result["claims"]["color"] == result["claims"]["shape"] == result["claims"]["count"]
    assert 0 < result["claims"]["position"] < N_HELD_OUT


def test_degraded_and_resized_real_images_still_score_high(scorer, held_out) -> None:
    images, captions, _ = held_out
    images, captions = images[:128], captions[:128]
    generator = torch.Generator().manual_seed(0)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    larger = F.interpolate(images, size=64, mode="bilinear")
    as_uint8 = (images * 255).round().to(torch.uint8)
    for name, variant, least in (
        ("3x3 box blur", blurred, 0.85),
        ("noise std 0.05", noisy, 0.9),
        ("64 px", larger, 0.95),
        ("uint8", as_uint8, 0.95),
    ):
        assert scorer.scores(variant, captions).mean() >= least, name


def test_shuffled_captions_and_noise_images_score_low(scorer, held_out) -> None:
    images, captions, _ = held_out
    real = alignment_score(images, captions, scorer=scorer)["value"]
    shuffled = alignment_score(images, _shuffled(captions), scorer=scorer)["value"]
    assert shuffled < 0.6 and shuffled <= real - 0.25
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    noise_score = alignment_score(noise, captions, scorer=scorer)
    assert noise_score["value"] < 0.4
    assert noise_score["per_attribute"]["layout"] < 0.1


def test_score_is_the_fraction_of_claims_that_hold(scorer, held_out) -> None:
    """One wrong colour word costs exactly one claim of the caption's total."""
    images, captions, _ = held_out
    claims_per_kind = {"relation": 10, "single": 6, "position": 7}
    seen = set()
    for index in range(64):
        image, caption = images[index : index + 1], captions[index]
        claims = parse_caption(caption)
        row = scorer.check(image, [caption])[0]
        if not all(all(v) for v in row.values()) or claims.kind in seen:
            continue
        seen.add(claims.kind)
        assert sum(len(v) for v in row.values()) == claims_per_kind[claims.kind]
        subject = claims.groups[0].color
        other = "red" if subject != "red" else "blue"
        wrong = caption.replace(f" {subject} ", f" {other} ", 1)
        assert parse_caption(wrong).groups[0].color == other
        expected = 1.0 - 1.0 / claims_per_kind[claims.kind]
        assert scorer.scores(image, [wrong]).item() == pytest.approx(expected)
        assert scorer.check(image, [wrong])[0]["color"].count(False) == 1
    assert seen == set(claims_per_kind)


_OPPOSITE = {
    " above ": " below ",
    " below ": " above ",
    " to the left of ": " to the right of ",
    " to the right of ": " to the left of ",
}


def test_wrong_relation_or_position_words_cost_their_claims(scorer, held_out) -> None:
    """The relation's direction is read (through which group is where), and the grid cell."""
    images, captions, _ = held_out
    rows = scorer.check(images, captions)
    swapped = moved = 0
    for index, caption in enumerate(captions):
        if not all(all(v) for v in rows[index].values()):
            continue
        claims = parse_caption(caption)
        image = images[index : index + 1]
        first, *rest = claims.groups
        if claims.kind == "relation" and swapped < 8:
            second = rest[0]
            if first.color == second.color or first.shape == second.shape:
                continue
            phrase = next(p for p in _OPPOSITE if p in caption)
            wrong = caption.replace(phrase, _OPPOSITE[phrase], 1)
            row = scorer.check(image, [wrong])[0]
            # The groups are read where the caption now says the other one is.
            assert row["color"] == [False, False] and row["shape"] == [False, False], wrong
            assert row["layout"] == [True] and row["background"] == [True], wrong
            swapped += 1
        if claims.kind == "position" and moved < 8:
            cell = "center" if claims.position != "center" else "top"
            wrong = caption.replace(POSITIONS[claims.position][1], POSITIONS[cell][1], 1)
            assert parse_caption(wrong).position == cell
            assert scorer.check(image, [wrong])[0]["position"] == [False], wrong
            assert scorer.scores(image, [wrong]).item() == pytest.approx(6 / 7)
            moved += 1
    assert swapped == 8 and moved == 8


def test_two_groups_that_look_alike_are_split_as_the_caption_claims(scorer, held_out) -> None:
    """ "two red squares left of a red square" looks like "three red squares": both hold."""
    images, captions, metas = held_out
    twins = [
        i
        for i, meta in enumerate(metas)
        if len(meta["objects"]) == 2
        and all(meta["objects"][0][k] == meta["objects"][1][k] for k in ("shape", "color", "size"))
    ]
    assert len(twins) >= 2
    for index in twins:
        image = images[index : index + 1]
        assert scorer.scores(image, [captions[index]]).item() == 1.0, captions[index]
        shown = scorer.read(image)[0]  # without the caption: one group of all the shapes
        assert shown["layout"] == "one group" and shown["b_color"] is None


def test_read_names_what_an_image_shows(scorer, held_out) -> None:
    images, captions, metas = held_out
    index = next(i for i, m in enumerate(metas) if m["objects"][0]["position"] == "top left")
    shown = scorer.read(images[index : index + 1])[0]
    obj = metas[index]["objects"][0]
    assert shown["background"] == metas[index]["background"]
    assert shown["layout"] == "one group" and shown["cell"] == "top left"
    assert (shown["a_color"], shown["a_shape"], shown["a_size"], shown["a_count"]) == (
        obj["color"],
        obj["shape"],
        obj["size"],
        "1",
    )
    assert shown["b_color"] is None


# --------------------------------------------------------------------------------------------
# Interval
# --------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_mean_shrinks_with_n_and_is_seeded(
    scorer, held_out
) -> None:
    images, captions, _ = held_out
    mixed = captions[: N_HELD_OUT // 2] + _shuffled(captions)[N_HELD_OUT // 2 :]
    order = np.random.default_rng(1).permutation(N_HELD_OUT)  # mix both halves into the first 64
    images, mixed = images[order], [mixed[i] for i in order]

    small = alignment_score(images[:64], mixed[:64], scorer=scorer, resamples=1000, seed=0)
    large = alignment_score(images, mixed, scorer=scorer, resamples=1000, seed=0)
    for result, n in ((small, 64), (large, N_HELD_OUT)):
        lo, hi = result["ci95"]
        assert lo <= result["value"] <= hi
        assert result["n"] == n and result["resamples"] == 1000
        values = scorer.scores(images[:n], mixed[:n]).numpy()
        assert result["value"] == pytest.approx(values.mean())
        assert result["stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(n))
        # A percentile interval of a mean is close to +-1.96 standard errors.
        assert hi - lo == pytest.approx(2 * 1.96 * result["stderr"], rel=0.25)
        assert "bootstrap" in result["method"]
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(large) < 0.6 * width(small)  # ~1 / sqrt(8) expected

    again = alignment_score(images[:64], mixed[:64], scorer=scorer, resamples=1000, seed=0)
    assert again == small
    other_seed = alignment_score(images[:64], mixed[:64], scorer=scorer, resamples=1000, seed=1)
    assert other_seed["ci95"] != small["ci95"] and other_seed["value"] == small["value"]


def test_bad_inputs_raise_clear_errors(scorer, held_out) -> None:
    images, captions, _ = held_out
    with pytest.raises(DataError, match="2 images but 3 captions"):
        scorer.scores(images[:2], captions[:3])
    with pytest.raises(DataError, match="CLIP score"):
        alignment_score(images[:2], [captions[0], "a dog on a beach"], scorer=scorer)
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        scorer.scores(images[:2, :1], captions[:2])
    with pytest.raises(ConfigError, match="resamples"):
        alignment_score(images[:2], captions[:2], scorer=scorer, resamples=0)
    with pytest.raises(ConfigError, match="ReaderConfig.scenes"):
        ReaderConfig(scenes=0)


# --------------------------------------------------------------------------------------------
# Training and the weights cache
# --------------------------------------------------------------------------------------------


def test_a_second_scorer_loads_the_cached_weights(scorer, cache_dir, held_out) -> None:
    images, captions, _ = held_out
    cached = list(cache_dir.iterdir())
    assert cached == [scorer.weights_path] and scorer.weights_path.name.endswith(".pt")

    loaded = AlignmentScorer(cache_dir)
    assert not loaded.trained and loaded.train_seconds == 0.0
    assert loaded.weights_path == scorer.weights_path
    for name, tensor in scorer.net.state_dict().items():
        assert torch.equal(tensor, loaded.net.state_dict()[name]), name
    assert torch.equal(loaded.scores(images, captions), scorer.scores(images, captions))

    # Other settings are another file; a broken file says what to do.
    other = ReaderConfig(epochs=4)
    assert other.cache_name() != ReaderConfig().cache_name()
    broken = cache_dir / other.cache_name()
    broken.write_bytes(b"not a checkpoint")
    try:
        with pytest.raises(DataError, match="delete it to retrain"):
            AlignmentScorer(cache_dir, other)
    finally:
        broken.unlink()


def test_training_is_seeded() -> None:
    """Two trainings with the same (small) settings give the same weights; another seed does not."""
    config = ReaderConfig(scenes=150, epochs=1)
    first, second = AlignmentScorer(None, config), AlignmentScorer(None, config)
    reseeded = AlignmentScorer(None, dataclasses.replace(config, seed=config.seed + 1))
    assert first.weights_path is None
    for name, tensor in first.net.state_dict().items():
        assert torch.equal(tensor, second.net.state_dict()[name]), name
    assert not torch.equal(
        first.net.state_dict()["net.1.weight"], reseeded.net.state_dict()["net.1.weight"]
    )
