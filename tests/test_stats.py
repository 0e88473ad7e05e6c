"""Scores as measurements: FID intervals, KID, means over repeats (budget_lab/eval/stats.py).

The statistical tests draw Gaussian feature sets with a fixed seed and check the intervals'
coverage against a known truth, so they fail when an interval is too narrow or off-centre.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budget_lab.errors import ConfigError, DataError
from budget_lab.eval.stats import (
    Measurement,
    fid_measurement,
    kid_measurement,
    mean_over_repeats,
    paired_fid_difference,
)


def _gaussians(dim: int, seed: int = 0, decay: float = 1.0):
    """A reference (mu_r, S_r) and a generator N(mu_g, S_g) with decaying spectra, like
    Inception features."""
    rng = np.random.default_rng(seed)
    eig = np.arange(1, dim + 1) ** -decay
    u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    v, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    s_r = (u * eig) @ u.T
    s_g = (v * eig * 1.3) @ v.T
    mu_r = np.zeros(dim)
    mu_g = rng.normal(size=dim) * 0.1
    return mu_r, s_r, mu_g, np.linalg.cholesky(s_g + 1e-12 * np.eye(dim)), s_g


def _population_fid(mu_r, s_r, mu_g, s_g) -> float:
    e, v = np.linalg.eigh(s_r)
    root = (v * np.sqrt(e.clip(min=0))) @ v.T
    inner = np.linalg.eigvalsh(root @ s_g @ root)
    trace_sqrt = np.sqrt(inner.clip(min=0)).sum()
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r) + np.trace(s_g) - 2 * trace_sqrt)


def test_fid_matches_the_torchmetrics_value():
    from torchmetrics.image.fid import _compute_fid

    mu_r, s_r, mu_g, chol, _ = _gaussians(32)
    x = mu_g + np.random.default_rng(1).normal(size=(50, 32)) @ chol.T
    m = fid_measurement(x, mu_r, s_r)
    expected = _compute_fid(
        torch.tensor(mu_r), torch.tensor(s_r), torch.tensor(x.mean(0)), torch.tensor(np.cov(x.T))
    )
    assert m.value == pytest.approx(float(expected), rel=1e-6)
    assert m.lo < m.value < m.hi and m.n == 50


@pytest.mark.parametrize("method", ["jackknife", "bootstrap"])
def test_fid_interval_covers_the_fid_at_n_in_90_percent_of_draws(method):
    """N = 64 images in 128 dimensions (N below D, as 256 samples are below Inception's 2048):
    the truth is the mean FID at that N over 400 draws; the interval of one draw must hold it
    in >= 90 % of 60 draws."""
    dim, n = 128, 64
    mu_r, s_r, mu_g, chol, _ = _gaussians(dim)
    rng = np.random.default_rng(2)

    def draw():
        return mu_g + rng.normal(size=(n, dim)) @ chol.T

    truth = np.mean([fid_measurement(draw(), mu_r, s_r, resamples=2).value for _ in range(400)])
    resamples = 20 if method == "jackknife" else 200
    hits = [
        (m := fid_measurement(draw(), mu_r, s_r, method=method, resamples=resamples, seed=k)).lo
        <= truth
        <= m.hi
        for k in range(60)
    ]
    assert np.mean(hits) >= 0.9, f"{method}: coverage {np.mean(hits):.2f}"


def test_paired_difference_covers_the_true_difference_and_is_narrower_than_unpaired():
    """Two generators whose row i shares a component (same caption, same noise): the paired
    interval of F_a - F_b holds the mean difference at N in >= 90 % of draws, and is narrower
    than the two unpaired intervals side by side (what the pairing is for)."""
    dim, n = 64, 48
    mu_r, s_r, mu_g, chol, _ = _gaussians(dim, seed=3)
    rng = np.random.default_rng(4)
    shift = rng.normal(size=dim) * 0.15

    def draw():
        shared = rng.normal(size=(n, dim)) @ chol.T
        a = mu_g + 0.9 * shared + 0.45 * rng.normal(size=(n, dim)) @ chol.T
        b = mu_g + shift + 0.9 * shared + 0.45 * rng.normal(size=(n, dim)) @ chol.T
        return a, b

    def diff(a, b):
        return (
            fid_measurement(a, mu_r, s_r, resamples=2).value
            - fid_measurement(b, mu_r, s_r, resamples=2).value
        )

    truth = np.mean([diff(*draw()) for _ in range(300)])
    assert truth < 0  # a is the better generator
    hits, ratios = [], []
    for k in range(60):
        a, b = draw()
        m = paired_fid_difference(a, b, mu_r, s_r, seed=k)
        hits.append(m.lo <= truth <= m.hi)
        unpaired = np.hypot(
            fid_measurement(a, mu_r, s_r, seed=k).se, fid_measurement(b, mu_r, s_r, seed=k).se
        )
        ratios.append(m.se / unpaired)
    assert np.mean(hits) >= 0.9, f"coverage {np.mean(hits):.2f}"
    assert np.median(ratios) < 0.8, f"paired se / unpaired se: {np.median(ratios):.2f}"
    with pytest.raises(DataError, match="one shape"):
        paired_fid_difference(a[:10], b, mu_r, s_r)


def test_fid_interval_covers_the_population_fid_at_large_n():
    """With N far above the dimension the FID's bias is small beside its noise: the interval
    holds the analytic FID between the two Gaussians."""
    dim, n = 4, 2000
    mu_r, s_r, mu_g, chol, s_g = _gaussians(dim, seed=3)
    truth = _population_fid(mu_r, s_r, mu_g, s_g)
    rng = np.random.default_rng(4)
    hits = []
    for k in range(60):
        m = fid_measurement(mu_g + rng.normal(size=(n, dim)) @ chol.T, mu_r, s_r, seed=k)
        hits.append(m.lo <= truth <= m.hi)
    assert np.mean(hits) >= 0.9


def test_fid_interval_shrinks_with_n():
    mu_r, s_r, mu_g, chol, _ = _gaussians(64)
    rng = np.random.default_rng(5)
    widths = {}
    for n in (32, 128, 512):
        ms = [
            fid_measurement(mu_g + rng.normal(size=(n, 64)) @ chol.T, mu_r, s_r) for _ in range(5)
        ]
        widths[n] = np.mean([m.hi - m.lo for m in ms])
    assert widths[32] > 1.5 * widths[128] and widths[128] > 1.5 * widths[512]


def test_fid_measurement_is_deterministic_and_checks_its_input():
    mu_r, s_r, mu_g, chol, _ = _gaussians(16)
    x = mu_g + np.random.default_rng(6).normal(size=(40, 16)) @ chol.T
    assert fid_measurement(x, mu_r, s_r, seed=3) == fid_measurement(x, mu_r, s_r, seed=3)
    with pytest.raises(ConfigError, match="jackknife, bootstrap"):
        fid_measurement(x, mu_r, s_r, method="bayes")
    with pytest.raises(DataError, match="do not match the reference"):
        fid_measurement(x[:, :8], mu_r, s_r)
    with pytest.raises(ConfigError, match="resamples"):
        fid_measurement(x, mu_r, s_r, resamples=1)


def test_kid_is_near_zero_for_two_draws_of_one_distribution_and_not_otherwise():
    mu_r, s_r, mu_g, chol, _ = _gaussians(32, seed=7)
    rng = np.random.default_rng(8)
    e, v = np.linalg.eigh(s_r)
    ref_chol = v * np.sqrt(e.clip(min=0))
    a = rng.normal(size=(300, 32)) @ ref_chol.T
    b = rng.normal(size=(300, 32)) @ ref_chol.T
    other = mu_g + rng.normal(size=(300, 32)) @ chol.T
    same = kid_measurement(b, a, subsets=30, subset_size=200)
    diff = kid_measurement(other, a, subsets=30, subset_size=200)
    # Unbiased: zero within its spread for one distribution, clearly positive for two.
    assert abs(same["kid"]) < 2 * same["kid_std"] + 1e-6
    assert diff["kid"] > 10 * max(abs(same["kid"]), same["kid_std"])
    assert diff["kid"] - 3 * diff["kid_std"] > same["kid"] + 3 * same["kid_std"]
    assert same["n"] == 300 and same["subset_size"] == 200
    with pytest.raises(DataError, match="subset_size"):
        kid_measurement(b[:10], a, subset_size=50)


def test_mean_over_repeats_widens_with_seed_spread_and_uses_t():
    tight = [Measurement(v, v - 1, v + 1, 0.5, 100, "jackknife-20") for v in (10.0, 10.2, 9.9)]
    loose = [Measurement(v, v - 1, v + 1, 0.5, 100, "jackknife-20") for v in (5.0, 10.0, 15.0)]
    m_tight, m_loose = mean_over_repeats(tight), mean_over_repeats(loose)
    assert m_tight.value == pytest.approx(np.mean([10.0, 10.2, 9.9]))
    # k = 3: se = sqrt(max(s^2, mean se_i^2) / 3), t(0.975, 2) = 4.303
    assert m_tight.se == pytest.approx(np.sqrt(0.25 / 3))
    assert m_tight.hi - m_tight.value == pytest.approx(4.303 * np.sqrt(0.25 / 3), rel=1e-3)
    assert m_loose.se == pytest.approx(np.sqrt(25.0 / 3))
    assert m_loose.n == 300 and "3 repeats" in m_loose.method
    assert mean_over_repeats(tight[:1]) == tight[0]
