"""Scores as measurements: FID with its interval, KID with its spread, means over seeds.

Every score budget-lab prints is an estimate from N samples. This module gives each one an
uncertainty so that decisions (best, front, prune) can ignore differences smaller than the noise.

What an FID interval covers
---------------------------
FID computed from N generated images is biased upwards, and at N below the feature dimension
(2048) the bias does not even fall like 1/N, so no extrapolation from a few hundred samples to
N = infinity is trustworthy (``../shared/reference/measurement.md``; checked on Gaussian features
in the tests). What N samples *can* pin down is the FID *at that N* against a fixed reference:
the mean of the estimator over draws of N generated images, the quantity every trial of a sweep
shares (same N, same reference, same sampler settings). The interval is for that quantity; two
FIDs are comparable only at equal N, and N travels with every score.

The noise is estimated by resampling the generated features with the reference fixed:

* ``jackknife`` (default): delete-a-group jackknife over ``resamples`` groups; standard error
  ``se = sqrt((g - 1) / g * sum_j (F_(j) - mean F_(.))^2)``, interval ``F ± z * se``. On Gaussian
  features with N well below the dimension its standard error matches the true spread of F
  within a few per cent, where the bootstrap's is up to 2-3 times too wide (its resamples hold
  duplicates, which shrink the generated covariance's rank).
* ``bootstrap``: ``resamples`` draws of N with replacement; percentile interval re-centred on F
  (the bootstrap distribution sits above F by the bootstrap's own bias):
  ``[F - (mean* - q_lo), F + (q_hi - mean*)]``, se the bootstrap standard deviation.

Both need FID on many subsets of the same features, which is cheap in the N x N Gram form: with
X the (N, D) generated features, reference (mu_r, S_r), and a subset's centred rows C,

    FID = |mu_r - mean|^2 + tr S_r + tr(C C^T) / (n - 1) - 2 * sum sqrt(eig(C S_r C^T / (n - 1)))

(the nonzero eigenvalues of S_r^1/2 S_g S_r^1/2 are those of C S_r C^T / (n - 1)), so
``X S_r X^T`` and ``X X^T`` are computed once and each subset costs one n x n symmetric eigen-
decomposition.

Paired differences
------------------
Two trials of a sweep sample the same captions with the same sampler noise (same seed, same N):
their generated sets share much of their sampling noise, which cancels in the difference of
their FIDs (common random numbers; ``../shared/reference/measurement.md``). `paired_fid_difference`
jackknifes F_a - F_b over the same deleted groups of sample indices in both sets, which measures
the difference's own noise: on the main job's trials its standard error was ~0.6-0.8x the
unpaired sqrt(se_a^2 + se_b^2). Decisions use it where both trials allow it (`budget_lab.sweep.
decide`).

Seed-to-seed noise (training the same recipe with another seed) is not in these intervals: a
sweep with ``repeats: k`` measures it, and `mean_over_repeats` combines the k scores.

KID (Bińkowski et al. 2018) is unbiased at any N: the squared MMD with the cubic polynomial
kernel on the same features, reported as mean ± std over random subsets (torchmetrics'
estimator, `torchmetrics.image.kid.poly_mmd`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.image.kid import poly_mmd

from budget_lab.errors import ConfigError, DataError
from budget_lab.eval.measurement import Measurement, mean_over_repeats, normal_quantile

__all__ = [
    "INTERVAL_METHODS",
    "Measurement",
    "fid_measurement",
    "paired_fid_difference",
    "kid_measurement",
    "mean_over_repeats",
    "normal_quantile",
]

INTERVAL_METHODS = ("jackknife", "bootstrap")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class _SubsetFID:
    """FID of subsets (index arrays, repeats allowed) of fixed generated features X (N, D)
    against a fixed reference, each in the cheaper of two equivalent forms (module docstring):
    n x n Gram matrices while a subset has no more rows than features, else D x D covariances
    with the reference's square root computed once."""

    def __init__(self, x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.x, self.mu, self.sigma = x, mu, sigma
        self.mu_sq = float(mu @ mu)
        self.trace_ref = float(np.trace(sigma))
        self._gram: tuple[np.ndarray, np.ndarray] | None = None
        self._root: np.ndarray | None = None

    def __call__(self, idx: np.ndarray) -> float:
        n, dim = len(idx), self.x.shape[1]
        if n <= dim:
            if self._gram is None:
                self._gram = (self.x @ self.sigma @ self.x.T, self.x @ self.x.T)
            gram_ref, gram = self._gram
            centre = np.eye(n) - 1.0 / n  # C = centre @ X[idx]
            inner = centre @ gram_ref[np.ix_(idx, idx)] @ centre / (n - 1)  # C S_r C^T / (n-1)
            g = gram[np.ix_(idx, idx)]
            trace_gen = float(np.trace(centre @ g @ centre)) / (n - 1)  # tr S_g
            mean_gen = self.x[idx].mean(axis=0)
        else:
            if self._root is None:
                evals, evecs = np.linalg.eigh((self.sigma + self.sigma.T) / 2)
                self._root = (evecs * np.sqrt(evals.clip(min=0))) @ evecs.T
            rows = self.x[idx]
            mean_gen = rows.mean(axis=0)
            cov = np.cov(rows, rowvar=False)  # S_g, (D, D)
            inner = self._root @ cov @ self._root
            trace_gen = float(np.trace(cov))
        mean_term = float(((self.mu - mean_gen) ** 2).sum())
        eig = np.linalg.eigvalsh((inner + inner.T) / 2)
        return mean_term + self.trace_ref + trace_gen - 2 * float(np.sqrt(eig.clip(min=0)).sum())

    def many(self, subsets: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([self(idx) for idx in subsets])


def fid_measurement(
    features: Any,
    ref_mu: Any,
    ref_sigma: Any,
    *,
    method: str = "jackknife",
    resamples: int = 20,
    confidence: float = 0.95,
    seed: int = 0,
) -> Measurement:
    """FID of generated `features` (N, D) against the fixed reference (mu (D,), sigma (D, D)),
    with an interval for the FID at this N from resampling the generated set (module docstring).

    `resamples`: jackknife groups (at most N; 20 by default) or bootstrap draws (~500 useful).
    """
    if method not in INTERVAL_METHODS:
        raise ConfigError(
            f"interval method {method!r} is invalid: expected one of {', '.join(INTERVAL_METHODS)}"
        )
    x = _as_numpy(features)
    mu = _as_numpy(ref_mu)
    sigma = _as_numpy(ref_sigma)
    if x.ndim != 2 or mu.shape != (x.shape[1],) or sigma.shape != (x.shape[1],) * 2:
        raise DataError(
            f"FID features {x.shape} do not match the reference (mu {mu.shape}, sigma "
            f"{sigma.shape}); recompute the reference with the same feature extractor"
        )
    n = x.shape[0]
    if n < 4:
        raise DataError(f"an FID interval needs at least 4 generated images, got {n}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise ConfigError(f"resamples={resamples!r} is invalid: expected an integer >= 2")
    subset_fid = _SubsetFID(x, mu, sigma)
    value = subset_fid(np.arange(n))
    z = normal_quantile(confidence)
    if method == "jackknife":
        subsets = _groups(n, resamples, seed)
        se = _jackknife_se(subset_fid.many(subsets))
        lo, hi = value - z * se, value + z * se
        label = f"jackknife-{len(subsets)}"
    else:
        rng = np.random.default_rng(seed)
        subsets = [rng.integers(0, n, n) for _ in range(resamples)]
        theta = subset_fid.many(subsets)
        alpha = (1 - confidence) / 2
        q_lo, q_hi = np.quantile(theta, [alpha, 1 - alpha])
        centre = float(theta.mean())
        lo, hi = value - (centre - float(q_lo)), value + (float(q_hi) - centre)
        se = float(theta.std(ddof=1))
        label = f"bootstrap-{resamples}"
    return Measurement(value, float(lo), float(hi), float(se), n, label, confidence)


def _groups(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """The jackknife's leave-one-group-out subsets of range(n): the same for the same (n,
    resamples, seed), which is what pairs two trials' jackknifes."""
    groups = min(resamples, n // 2)  # each leave-out subset keeps at least half the images
    labels = np.random.default_rng(seed).permutation(n) % groups
    return [np.flatnonzero(labels != j) for j in range(groups)]


def _jackknife_se(theta: np.ndarray) -> float:
    g = len(theta)
    return math.sqrt((g - 1) / g * float(((theta - theta.mean()) ** 2).sum()))


def paired_fid_difference(
    features_a: Any,
    features_b: Any,
    ref_mu: Any,
    ref_sigma: Any,
    *,
    resamples: int = 20,
    confidence: float = 0.95,
    seed: int = 0,
) -> Measurement:
    """FID_a - FID_b with its interval, for two generated sets whose row i was sampled for the same
    caption with the same noise (module docstring, "Paired differences"): a delete-a-group
    jackknife of the difference over the same groups of rows in both sets."""
    a, b = _as_numpy(features_a), _as_numpy(features_b)
    mu, sigma = _as_numpy(ref_mu), _as_numpy(ref_sigma)
    if a.shape != b.shape or a.ndim != 2 or mu.shape != (a.shape[1],):
        raise DataError(
            f"paired FID needs two feature sets of one shape matching the reference, got "
            f"{a.shape} and {b.shape} (reference mu {mu.shape})"
        )
    n = a.shape[0]
    if n < 4:
        raise DataError(f"a paired FID interval needs at least 4 images a side, got {n}")
    fid_a, fid_b = _SubsetFID(a, mu, sigma), _SubsetFID(b, mu, sigma)
    value = fid_a(np.arange(n)) - fid_b(np.arange(n))
    subsets = _groups(n, resamples, seed)
    se = _jackknife_se(fid_a.many(subsets) - fid_b.many(subsets))
    z = normal_quantile(confidence)
    label = f"paired jackknife-{len(subsets)}"
    return Measurement(value, value - z * se, value + z * se, se, n, label, confidence)


def kid_measurement(
    features: Any,
    ref_features: Any,
    *,
    subsets: int = 50,
    subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """KID (unbiased squared MMD, cubic polynomial kernel) as mean ± std over `subsets` random
    subsets of `subset_size` generated and reference features each (default: half the smaller
    set, at most 1000, so that the subsets differ and their spread means something). Returns {"kid", "kid_std", "subsets", "subset_size", "n", "n_ref"}."""
    gen = torch.as_tensor(_as_numpy(features))
    ref = torch.as_tensor(_as_numpy(ref_features))
    size = subset_size or max(2, min(gen.shape[0] // 2, ref.shape[0] // 2, 1000))
    if size < 2 or size > min(gen.shape[0], ref.shape[0]):
        raise DataError(
            f"KID subset_size={size} needs 2 <= size <= min(generated {gen.shape[0]}, reference "
            f"{ref.shape[0]})"
        )
    gen_rng = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        g = gen[torch.randperm(gen.shape[0], generator=gen_rng)[:size]]
        r = ref[torch.randperm(ref.shape[0], generator=gen_rng)[:size]]
        values.append(float(poly_mmd(r, g)))
    return {
        "kid": float(np.mean(values)),
        "kid_std": float(np.std(values)),
        "subsets": subsets,
        "subset_size": size,
        "n": int(gen.shape[0]),
        "n_ref": int(ref.shape[0]),
    }
