"""CLIP score with a tiny random CLIP saved to disk and loaded back by path (offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from budget_lab.errors import ConfigError, DataError, UserError
from budget_lab.eval import CLIPScorer

CAPTIONS = ["a red circle", "two blue squares", "green stripes on white", "a yellow dog 42"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir: Path) -> CLIPScorer:
    return CLIPScorer(tiny_clip_dir, device="cpu", batch_size=3)


def _cosines_by_hand(path: Path, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """cos(image_i, caption_i) through CLIPModel.forward's own logits (logit_scale divided out)."""
    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    pil = [Image.fromarray(np.ascontiguousarray(p), "RGB") for p in pixels]
    inputs = processor(text=captions, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_scores_equal_an_independent_computation(
    scorer: CLIPScorer, tiny_clip_dir: Path, images: torch.Tensor
) -> None:
    cos = _cosines_by_hand(tiny_clip_dir, images, CAPTIONS)
    expected = 100 * cos.clamp(min=0)
    got = scorer.scores(images, CAPTIONS)
    print(f"cos {cos.tolist()} -> scores {got.tolist()}")
    assert got.shape == (len(CAPTIONS),)
    assert torch.allclose(got, expected, atol=1e-4)
    assert (cos.abs() > 1e-3).all() and (expected > 0).any()  # a non-trivial comparison
    assert scorer.score(images, CAPTIONS) == pytest.approx(float(expected.mean()), abs=1e-4)
    # pairs matter: another pairing of the same images and captions scores differently
    shuffled = scorer.scores(images, CAPTIONS[1:] + CAPTIONS[:1])
    assert not torch.allclose(shuffled, got)


def test_scores_are_finite_bounded_and_deterministic(
    scorer: CLIPScorer, tiny_clip_dir: Path, images: torch.Tensor
) -> None:
    first = scorer.scores(images, CAPTIONS)
    assert torch.isfinite(first).all()
    assert ((first >= 0) & (first <= 100)).all()
    assert torch.equal(scorer.scores(images, CAPTIONS), first)
    reloaded = CLIPScorer(str(tiny_clip_dir), batch_size=64)  # other batching, fresh load
    assert torch.allclose(reloaded.scores(images, CAPTIONS), first, atol=1e-5)
    # embeddings are unit vectors; a caption longer than the 32 positions is truncated, not fatal
    assert torch.allclose(scorer.embed_images(images).norm(dim=-1), torch.ones(len(CAPTIONS)))
    long = scorer.embed_texts(["a very long caption " * 10])
    assert long.shape == (1, 16) and torch.isfinite(long).all()


def test_user_mistakes_are_reported(
    scorer: CLIPScorer, tiny_clip_dir: Path, images: torch.Tensor, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="one caption per image"):
        scorer.scores(images, CAPTIONS[:2])
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        scorer.scores(images[0], CAPTIONS[:1])
    with pytest.raises(UserError, match="does not exist"):
        CLIPScorer(tmp_path / "no_such_model")
    with pytest.raises(ConfigError, match="is a file"):
        CLIPScorer(tiny_clip_dir / "config.json")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(UserError, match="could not load CLIP"):
        CLIPScorer(empty)
    with pytest.raises(ConfigError, match="batch_size"):
        CLIPScorer(tiny_clip_dir, batch_size=0)
