"""EDM (Karras et al., 2022) around MicroDiT: preconditioning, the training loss, the Heun sampler.

Written to follow the equations: D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)), with
  c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),
  c_noise = ln(σ) / 4,
and the loss  E_{σ, y, n} [ λ(σ) ‖D(y + n; σ) − y‖² ],  ln σ ~ N(P_mean, P_std²),
  λ(σ) = (σ² + σ_d²) / (σ σ_d)²,
averaged over the patches the network kept (masked patches carry no loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from model.config import EDMConfig
from model.microdit import BatchRandom, MicroDiT, batch_draw

__all__ = ["EDMConfig", "EDMPrecond", "edm_loss", "edm_sampler", "sigma_steps"]


class EDMPrecond(nn.Module):
    """The denoiser D(x; σ, caption) built from the raw network F = MicroDiT."""

    def __init__(self, net: MicroDiT, sigma_data: float = 0.9):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise for noise levels sigma (any shape)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        captions: Tensor,
        caption_mask: Tensor | None = None,
        mask_ratio: float = 0.0,
        generator: torch.Generator | BatchRandom | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) noisy input, sigma (N,) -> (denoised (N, C, H, W), keep (N, T))."""
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x, keep = self.net(
            (c_in * x).to(x.dtype), c_noise.flatten(), captions, caption_mask, mask_ratio, generator
        )
        D_x = c_skip * x + c_out * F_x.to(torch.float32)  # (N, C, H, W)
        return D_x, keep


def edm_loss(
    precond: EDMPrecond,
    y: Tensor,
    captions: Tensor,
    caption_mask: Tensor | None = None,
    mask_ratio: float = 0.0,
    P_mean: float = -0.6,
    P_std: float = 1.2,
    generator: torch.Generator | BatchRandom | None = None,
) -> Tensor:
    """The EDM loss on clean data y (N, C, H, W), averaged over kept patches: a scalar.

    `precond` may be wrapped for data parallelism; `generator` may be a `BatchRandom` (this batch
    is some rows of a larger one, and draws the noise those rows get there)."""
    N = y.shape[0]
    inner = getattr(precond, "module", precond)  # under a DistributedDataParallel wrapper
    sigma_data = inner.sigma_data
    p = inner.net.cfg.patch_size
    # Sample noise levels ln σ ~ N(P_mean, P_std) and the noise.
    rnd = batch_draw(torch.randn, (N,), y.device, generator)  # (N,)
    sigma = (rnd * P_std + P_mean).exp()  # (N,)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # λ(σ), (N,)
    n = batch_draw(torch.randn, tuple(y.shape), y.device, generator) * sigma.view(-1, 1, 1, 1)
    D_yn, keep = precond(y + n, sigma, captions, caption_mask, mask_ratio, generator)
    # Weighted squared error, averaged over the values of kept patches only.
    err = weight.view(-1, 1, 1, 1) * (D_yn - y) ** 2  # (N, C, H, W)
    H, W = y.shape[-2:]
    keep_px = keep.view(N, 1, H // p, 1, W // p, 1).expand(N, 1, H // p, p, W // p, p)
    keep_px = keep_px.reshape(N, 1, H, W).to(err.dtype)  # (N, 1, H, W)
    return (err * keep_px).sum() / (keep_px.sum() * y.shape[1])


def sigma_steps(cfg: EDMConfig, device: torch.device | str = "cpu") -> Tensor:
    """The sampler's noise levels: σ_max ... σ_min spaced by ρ, then 0; (num_steps + 1,)."""
    i = torch.arange(cfg.num_steps, dtype=torch.float64, device=device)
    n = max(cfg.num_steps - 1, 1)
    inv_rho = 1 / cfg.rho
    t = (
        cfg.sigma_max**inv_rho + i / n * (cfg.sigma_min**inv_rho - cfg.sigma_max**inv_rho)
    ) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def edm_sampler(
    precond: EDMPrecond,
    captions: Tensor,
    caption_mask: Tensor | None = None,
    latents: Tensor | None = None,
    shape: tuple[int, int, int] | None = None,
    cfg: EDMConfig = EDMConfig(),
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Deterministic EDM Heun sampler with classifier-free guidance.

    captions (N, L, Cd); the starting noise is `latents` (N, C, H, W) ~ N(0, I) or drawn with
    `generator` for `shape` = (C, H, W). The unconditional branch uses all-zero captions, as in
    training's caption dropout. Returns x_0 (N, C, H, W) in float32.
    """
    N = captions.shape[0]
    device = captions.device
    if latents is None:
        if shape is None:
            raise ValueError("edm_sampler needs either latents or shape=(C, H, W)")
        latents = torch.randn((N, *shape), device=device, generator=generator)
    guided = cfg.cfg_scale != 1.0
    if guided:
        captions_in = torch.cat([captions, torch.zeros_like(captions)])  # (2N, L, Cd)
        mask_in = None if caption_mask is None else torch.cat([caption_mask, caption_mask])
    else:
        captions_in, mask_in = captions, caption_mask

    def denoise(x: Tensor, sigma: float) -> Tensor:
        x_in = torch.cat([x, x]) if guided else x
        s = torch.full((x_in.shape[0],), sigma, device=device)
        d, _ = precond(x_in, s, captions_in, mask_in)
        if not guided:
            return d
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + cfg.cfg_scale * (d_cond - d_uncond)

    t_steps = sigma_steps(cfg, device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        # 1. Euler step from t_cur to t_next.
        denoised = denoise(x_cur.float(), float(t_cur)).to(torch.float64)
        d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        # 2. Second-order (Heun) correction, except on the last step to σ = 0.
        if i < cfg.num_steps - 1:
            denoised = denoise(x_next.float(), float(t_next)).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next.float()
