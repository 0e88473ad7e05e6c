"""EDM: preconditioning equations, the masked loss, the Heun sampler, and overfitting one batch."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfigError, get_preset
from model.edm import EDMConfig, EDMPrecond, edm_loss, edm_sampler, sigma_steps
from model.microdit import MicroDiT


def nano(seed=0, **kw):
    torch.manual_seed(seed)
    return MicroDiT(get_preset("nano", **kw))


@pytest.mark.parametrize("sigma,sd", [(0.002, 0.9), (0.9, 0.9), (1.0, 0.5), (80.0, 0.9)])
def test_preconditioning_coefficients(sigma, sd):
    pre = EDMPrecond(nano(), sigma_data=sd)
    c_skip, c_out, c_in, c_noise = (
        v.item() for v in pre.coefficients(torch.tensor(sigma, dtype=torch.float64))
    )
    assert c_skip == pytest.approx(sd**2 / (sigma**2 + sd**2))
    assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2))
    assert c_in == pytest.approx(1 / math.sqrt(sd**2 + sigma**2))
    assert c_noise == pytest.approx(math.log(sigma) / 4)
    if sigma == sd:  # the midpoint: equal skip and network shares
        assert c_skip == pytest.approx(0.5)


def test_precond_at_init_is_c_skip_times_x():
    # The network starts at F = 0 (zero-initialised final layer), so D(x) = c_skip x.
    pre = EDMPrecond(nano(), sigma_data=0.5)
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.3, 2.0])
    d, _ = pre(x, sigma, torch.randn(2, 32, 384))
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(d, c_skip.view(-1, 1, 1, 1) * x)


def test_loss_ignores_masked_patches():
    torch.manual_seed(0)
    net = nano()
    with torch.no_grad():
        net.final.linear.weight.normal_(0, 0.1)
    pre = EDMPrecond(net, 0.5)
    y = torch.randn(2, 3, 32, 32)
    cap = torch.randn(2, 32, 384)

    def loss_of(y_):
        return edm_loss(pre, y_, cap, mask_ratio=0.75, generator=torch.Generator().manual_seed(5))

    # Find which patches were kept by re-running the forward with the same generator stream.
    g = torch.Generator().manual_seed(5)
    torch.randn(2, generator=g)  # sigma draw
    torch.randn(y.shape, generator=g)  # noise draw
    _, keep = net(y, torch.zeros(2), cap, None, 0.75, g)
    y2 = y.clone().view(2, 3, 8, 4, 8, 4)
    dropped = ~keep.view(2, 8, 8)
    y2.permute(0, 2, 4, 1, 3, 5)[dropped] += 5.0  # change only dropped patches
    torch.testing.assert_close(loss_of(y), loss_of(y2.view(2, 3, 32, 32)), rtol=0, atol=0)
    y3 = y.clone().view(2, 3, 8, 4, 8, 4)
    y3.permute(0, 2, 4, 1, 3, 5)[~dropped] += 5.0  # change kept patches: the loss moves
    assert loss_of(y3.view(2, 3, 32, 32)) != loss_of(y)


def test_loss_at_init_is_about_one():
    # With F = 0 and data of std sigma_data, E[λ(σ)(c_skip(y+n) − y)²] = 1 for every σ.
    pre = EDMPrecond(nano(), sigma_data=1.0)
    y = torch.randn(64, 3, 32, 32)
    loss = edm_loss(pre, y, torch.randn(64, 32, 384), generator=torch.Generator().manual_seed(0))
    assert 0.9 < loss.item() < 1.1


def test_sigma_steps_schedule():
    cfg = EDMConfig(num_steps=18)
    t = sigma_steps(cfg)
    assert t.shape == (19,) and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002)
    assert (t[:-1].diff() < 0).all()


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampler_shapes_finite_and_seeded(cfg_scale):
    net = nano().eval()
    with torch.no_grad():  # a non-trivial network
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    pre = EDMPrecond(net, 0.5)
    cap = torch.randn(3, 32, 384)
    cfg = EDMConfig(num_steps=4, cfg_scale=cfg_scale)
    a = edm_sampler(
        pre, cap, shape=(3, 32, 32), cfg=cfg, generator=torch.Generator().manual_seed(0)
    )
    b = edm_sampler(
        pre, cap, shape=(3, 32, 32), cfg=cfg, generator=torch.Generator().manual_seed(0)
    )
    c = edm_sampler(
        pre, cap, shape=(3, 32, 32), cfg=cfg, generator=torch.Generator().manual_seed(1)
    )
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_changes_the_sample():
    net = nano().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    pre = EDMPrecond(net, 0.5)
    cap = torch.randn(2, 32, 384)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = edm_sampler(pre, cap, latents=noise, cfg=EDMConfig(num_steps=3, cfg_scale=1.0))
    guided = edm_sampler(pre, cap, latents=noise, cfg=EDMConfig(num_steps=3, cfg_scale=5.0))
    assert not torch.allclose(plain, guided)


def test_nano_overfits_one_fixed_batch():
    # One fixed batch (images, captions, noise levels and noise): the loss falls >= 10x.
    torch.manual_seed(0)
    net = MicroDiT(get_preset("nano"))
    pre = EDMPrecond(net, sigma_data=0.5)
    y = torch.rand(4, 3, 32, 32) * 2 - 1
    cap = torch.randn(4, 32, 384)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss = edm_loss(pre, y, cap, generator=torch.Generator().manual_seed(1234))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) * 10 <= losses[0], (losses[0], losses[-10:])


def test_bad_edm_config():
    with pytest.raises(ModelConfigError, match="sigma_min"):
        EDMConfig(sigma_min=100.0)
    with pytest.raises(ModelConfigError, match="num_steps"):
        EDMConfig(num_steps=0)
