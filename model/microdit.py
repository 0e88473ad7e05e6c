"""MicroDiT: a sparse diffusion transformer for micro-budget text-to-image pretraining.

Reads top to bottom: helpers -> embedders -> attention and feed-forward layers -> the block ->
the patch-mixer -> the final layer -> the model. Tensors in, tensors out: no I/O, no logging.

Shape legend: N batch, C latent channels, H/W latent height/width, T tokens (all patches),
K kept tokens (after masking), L caption tokens, D width, E experts, k tokens per expert (capacity),
F FFN hidden width, P = patch_size^2 * C values per patch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MicroDiTConfig, round_up

__all__ = [
    "MicroDiT",
    "ExpertChoiceMoE",
    "random_keep_indices",
    "BatchRandom",
    "batch_draw",
    "patchify",
    "unpatchify",
    "sincos_pos_embed",
]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """The bias-free LayerNorm used everywhere (a learned scale, no shift)."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int) -> Tensor:
    """Fixed 2-D sin-cos positions, (grid_h * grid_w, dim).

    Positions are measured in units of the base grid (the one the model was configured for), so a
    larger grid (e.g. 512 px after pretraining at 256 px) interpolates between the trained positions
    instead of extrapolating beyond them.
    """
    assert dim % 4 == 0, "position embedding width must be a multiple of 4"
    ys = torch.arange(grid_h, dtype=torch.float64) * (base_size / grid_h)  # (H,)
    xs = torch.arange(grid_w, dtype=torch.float64) * (base_size / grid_w)  # (W,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    out_y = yy.reshape(-1, 1) * omega  # (T, D/4)
    out_x = xx.reshape(-1, 1) * omega  # (T, D/4)
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (T, D)
    return emb.float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of a scalar per sample: t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device) / half
    )  # (dim/2,)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)  # (N, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)  # (N, dim)


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, T, p*p*C), tokens in row-major order."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p)  # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(N, (H // p) * (W // p), p * p * C)  # (N, T, P)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(N, T, p*p*C) -> (N, C, h*p, w*p); the inverse of `patchify`."""
    N, T, P = x.shape
    C = P // (p * p)
    x = x.reshape(N, h, w, p, p, C)  # (N, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
    return x.reshape(N, C, h * p, w * p)  # (N, C, H, W)


class BatchRandom:
    """A generator for `rows` of a larger batch of `total` samples: every draw is made for all
    `total` samples and the rows' part is returned. So a sample's noise depends on its row, not on
    how the batch is split over devices or micro-batches (every part draws the same numbers)."""

    def __init__(self, generator: torch.Generator, rows: Tensor, total: int):
        self.generator = generator
        self.rows = rows  # (N,) int64 in [0, total)
        self.total = total

    def draw(self, fn: Callable[..., Tensor], shape: tuple[int, ...], device) -> Tensor:
        """fn (torch.rand / torch.randn) of shape (N, *shape[1:]) for the rows."""
        full = fn((self.total, *shape[1:]), device=device, generator=self.generator)  # (total, ...)
        return full[self.rows.to(full.device)]  # (N, ...)


def batch_draw(
    fn: Callable[..., Tensor],
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | BatchRandom | None,
) -> Tensor:
    """torch.rand / torch.randn of `shape` from a plain generator or a `BatchRandom`."""
    if isinstance(generator, BatchRandom):
        return generator.draw(fn, shape, device)
    return fn(shape, device=device, generator=generator)


def random_keep_indices(
    N: int,
    T: int,
    keep: int,
    device: torch.device,
    generator: torch.Generator | BatchRandom | None = None,
) -> Tensor:
    """Indices of `keep` tokens per sample, chosen uniformly at random, sorted: (N, keep)."""
    noise = batch_draw(torch.rand, (N, T), device, generator)  # (N, T)
    ids = noise.argsort(dim=1)[:, :keep]  # (N, keep)
    return ids.sort(dim=1).values


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x (N, T, D), ids (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: Tensor, ids: Tensor, values: Tensor) -> Tensor:
    """A copy of base (N, T, D) with rows ids (N, K) replaced by values (N, K, D)."""
    return base.scatter(1, ids.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)


# --------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Noise level -> conditioning vector: sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (N, D)


class CaptionMLP(nn.Module):
    """Linear -> GELU(tanh) -> LayerNorm -> Linear, with biases: maps text-encoder width to D."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x), approximate="tanh")))


# --------------------------------------------------------------------------------------------------
# Attention and feed-forward layers
# --------------------------------------------------------------------------------------------------


def _attend(q: Tensor, k: Tensor, v: Tensor, head_dim: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head SDPA with QK-norm. q (N, Tq, h), k/v (N, Tk, h) -> (N, Tq, h)."""
    N, Tq, h = q.shape
    # QK-norm: a parameter-free LayerNorm over the whole q / k vector.
    q = F.layer_norm(q, (h,))
    k = F.layer_norm(k, (h,))
    q = q.view(N, Tq, h // head_dim, head_dim).transpose(1, 2)  # (N, heads, Tq, hd)
    k = k.view(N, -1, h // head_dim, head_dim).transpose(1, 2)  # (N, heads, Tk, hd)
    v = v.view(N, -1, h // head_dim, head_dim).transpose(1, 2)  # (N, heads, Tk, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, heads, Tq, hd)
    return out.transpose(1, 2).reshape(N, Tq, h)  # (N, Tq, h)


class SelfAttention(nn.Module):
    """Self-attention of hidden width `width` (may be narrower than the residual stream `dim`)."""

    def __init__(self, dim: int, width: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        # key_mask (N, T) bool: which tokens may be attended to (caption padding is not).
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, h) each
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, T)
        return self.proj(_attend(q, k, v, self.head_dim, mask))  # (N, T, D)


class CrossAttention(nn.Module):
    """Attention from image tokens (width dim) to caption tokens (width ctx_dim)."""

    def __init__(self, dim: int, ctx_dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)  # (N, L, D) each
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]  # (N, 1, 1, L)
        return self.proj(_attend(self.q(x), k, v, self.head_dim, mask))  # (N, T, D)


class SwiGLU(nn.Module):
    """Dense gated FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture of experts (no auxiliary loss).

    Every token gets a softmax gate over the E experts. Each expert then picks, within each sample,
    the k = capacity_factor * T / E tokens with the highest gate for it, runs its 2-layer GELU MLP on
    them, and adds the output, weighted by the gate, back at their places. So every expert does the
    same work (perfect balance by construction); a token may be picked by several experts or none
    (then only the residual carries it). Experts run as one batched matmul over gathered tokens.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity_factor: float):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, F)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, F, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like a Linear layer (xavier uniform) of its own.
        for w in (self.w1, self.w2):
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)

    def capacity(self, T: int) -> int:
        """Tokens each expert takes per sample: capacity_factor * T / E, at least 1, at most T."""
        return max(1, min(T, int(self.capacity_factor * T / self.num_experts)))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate probabilities and each expert's choice.

        x (N, T, D) -> probs (N, T, E) summing to 1 over experts, and for each expert its chosen
        tokens idx (N, E, k) and their gate values gate (N, E, k) = probs at those tokens.
        """
        probs = self.router(x).float().softmax(dim=-1)  # (N, T, E)
        gate, idx = probs.transpose(1, 2).topk(self.capacity(x.shape[1]), dim=-1)  # (N, E, k) each
        return probs, gate, idx

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        E = self.num_experts
        _, gate, idx = self.route(x)  # (N, E, k) each
        k = idx.shape[-1]
        flat_idx = idx.reshape(N, E * k)  # (N, E*k)
        # Gather each expert's tokens and run all experts in one batched matmul.
        xe = gather_tokens(x, flat_idx)  # (N, E*k, D)
        xe = xe.view(N, E, k, D).transpose(0, 1).reshape(E, N * k, D)  # (E, N*k, D)
        h = F.gelu(torch.bmm(xe, self.w1.to(xe.dtype)), approximate="tanh")  # (E, N*k, F)
        ye = torch.bmm(h, self.w2.to(xe.dtype))  # (E, N*k, D)
        ye = ye.view(E, N, k, D).transpose(0, 1).reshape(N, E * k, D)  # (N, E*k, D)
        ye = ye * gate.reshape(N, E * k, 1).to(ye.dtype)  # weighted by the gate
        # Scatter-add back: a token chosen by several experts sums their weighted outputs.
        out = torch.zeros_like(x)  # (N, T, D)
        return out.scatter_add_(1, flat_idx.unsqueeze(-1).expand(-1, -1, D), ye)  # (N, T, D)


# --------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------


class MicroDiTBlock(nn.Module):
    """adaLN-zero gated self-attention -> cross-attention to the caption -> adaLN gated FFN."""

    def __init__(
        self, dim: int, attn_width: int, ffn: nn.Module, cond_dim: int, head_dim: int, eps: float
    ):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, attn_width, head_dim)
        self.norm2 = layer_norm(dim, eps)
        self.cross = CrossAttention(dim, dim, head_dim)
        self.norm3 = layer_norm(dim, eps)
        self.ffn = ffn
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        # x (N, T, D), c (N, Dc), ctx (N, L, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # (N, D) each
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        x = x + gate2.unsqueeze(1) * self.ffn(modulate(self.norm3(x), shift2, scale2))
        return x  # (N, T, D)


def make_ffn(cfg: MicroDiTConfig, dim: int, base: int, moe: bool) -> nn.Module:
    """SwiGLU with hidden 2/3 * base, or an expert-choice MoE whose experts have hidden `base`."""
    if moe:
        hidden = round_up(base, cfg.ffn_multiple_of)
        return ExpertChoiceMoE(dim, hidden, cfg.num_experts, cfg.capacity_factor)
    return SwiGLU(dim, round_up(int(2 / 3 * base), cfg.ffn_multiple_of))


class CaptionRefiner(nn.Module):
    """One pre-norm transformer block over the projected caption tokens (no conditioning)."""

    def __init__(self, dim: int, head_dim: int, ffn_hidden: int, eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim, head_dim)
        self.norm2 = layer_norm(dim, eps)
        self.ffn = SwiGLU(dim, ffn_hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ffn(self.norm2(x))  # (N, L, D)


# --------------------------------------------------------------------------------------------------
# Patch-mixer and final layer
# --------------------------------------------------------------------------------------------------


class PatchMixer(nn.Module):
    """A few (usually narrower) blocks over ALL tokens before masking, so that the kept tokens carry
    information about the dropped ones (deferred masking)."""

    def __init__(self, cfg: MicroDiTConfig):
        super().__init__()
        D, Dm, eps = cfg.dim, cfg.mixer_dim, cfg.norm_eps
        proj = cfg.has_mixer_proj

        def projection(d_in: int, d_out: int) -> nn.Module:
            # LayerNorm + bias-free Linear between the backbone and mixer widths.
            if not proj:
                return nn.Identity()
            return nn.Sequential(layer_norm(d_in, eps), nn.Linear(d_in, d_out, bias=False))

        self.proj_in = projection(D, Dm)
        self.proj_ctx = projection(D, Dm)
        base = int(Dm * cfg.mixer_ffn_ratio)
        self.blocks = nn.ModuleList(
            MicroDiTBlock(
                Dm, Dm, make_ffn(cfg, Dm, base, cfg.mixer_is_moe(j)), D, cfg.head_dim, eps
            )
            for j in range(cfg.mixer_depth)
        )
        # Applied after masking, on the kept tokens only.
        self.proj_out = projection(Dm, D)

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        x = self.proj_in(x)  # (N, T, Dm)
        ctx = self.proj_ctx(ctx)  # (N, L, Dm)
        for block in self.blocks:
            x = block(x, c, ctx, ctx_mask)  # (N, T, Dm)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm -> Linear to the values of one patch."""

    def __init__(self, dim: int, patch_values: int, eps: float):
        super().__init__()
        self.norm = layer_norm(dim, eps)
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # (N, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, K, P)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MicroDiT(nn.Module):
    """The denoiser network F(x, c_noise, caption) of EDM; see model/edm.py for the wrapper.

    forward(x, noise_labels, captions, caption_mask, mask_ratio) returns the prediction for every
    patch (a zero token at masked places) and the boolean mask of kept tokens (N, T).
    """

    def __init__(self, cfg: MicroDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, eps, p = cfg.dim, cfg.norm_eps, cfg.patch_size

        # Embedders: patches, noise level, caption tokens and the pooled caption.
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embed = TimestepEmbedder(D, cfg.time_freq_dim)
        self.caption_embed = CaptionMLP(cfg.caption_dim, D, eps)
        hidden = round_up(int(2 / 3 * cfg.caption_ffn_ratio * D), cfg.ffn_multiple_of)
        self.caption_refiner = CaptionRefiner(D, cfg.head_dim, hidden, eps)
        self.pooled_embed = CaptionMLP(cfg.caption_dim, D, eps)

        # Patch-mixer (before masking) and the backbone (on kept tokens only).
        self.mixer = PatchMixer(cfg) if cfg.mixer_depth > 0 else None
        self.blocks = nn.ModuleList(
            MicroDiTBlock(
                D,
                cfg.attn_width(i),
                make_ffn(cfg, D, cfg.ffn_base(i), cfg.is_moe(i)),
                D,
                cfg.head_dim,
                eps,
            )
            for i in range(cfg.depth)
        )
        self.final = FinalLayer(D, p * p * cfg.in_channels, eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN, cross-attention outputs and the final linear start at zero, so
        every block starts as the identity and the network as F = 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        blocks = list(self.blocks) + (list(self.mixer.blocks) if self.mixer is not None else [])
        for block in blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            nn.init.zeros_(block.cross.proj.weight)
        for lin in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def moe_parameter_names(self) -> list[str]:
        """Names of the mixture-of-experts parameters (router and experts); the recipe trains them
        at their own (half) learning rate."""
        return [
            f"{mod_name}.{p_name}"
            for mod_name, mod in self.named_modules()
            if isinstance(mod, ExpertChoiceMoE)
            for p_name, _ in mod.named_parameters()
        ]

    def condition(
        self, noise_labels: Tensor, captions: Tensor, caption_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Conditioning vector c (N, D) and caption tokens ctx (N, L, D) for the blocks."""
        if caption_mask is not None:
            caption_mask = caption_mask.bool()
            caption_mask = caption_mask | ~caption_mask.any(dim=1, keepdim=True)  # never all-masked
            m = caption_mask.unsqueeze(-1).to(captions.dtype)  # (N, L, 1)
            pooled = (captions * m).sum(1) / m.sum(1)  # (N, Cd)
        else:
            pooled = captions.mean(dim=1)  # (N, Cd)
        c = self.t_embed(noise_labels) + self.pooled_embed(pooled)  # (N, D)
        ctx = self.caption_refiner(self.caption_embed(captions), caption_mask)  # (N, L, D)
        return c, ctx, caption_mask

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        captions: Tensor,
        caption_mask: Tensor | None = None,
        mask_ratio: float = 0.0,
        generator: torch.Generator | BatchRandom | None = None,
        route: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W), noise_labels (N,), captions (N, L, Cd), caption_mask (N, L) bool.

        mask_ratio r in [0, 1): keep int(T * (1 - r)) random tokens per sample. `route` turns token
        routing on (default: in training mode only; sampling always sends every token everywhere).
        Returns (out (N, C, H, W), keep (N, T) bool).
        """
        cfg = self.cfg
        p = cfg.patch_size
        N, C, H, W = x.shape
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit the model: expected {cfg.in_channels} "
                f"channels and height/width divisible by patch_size={p}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} is invalid: expected a value in [0, 1)")
        h, w = H // p, W // p
        T = h * w
        route = self.training if route is None else route

        c, ctx, ctx_mask = self.condition(noise_labels, captions, caption_mask)  # (N, D), (N, L, D)

        # Patch embedding and fixed positions (interpolated when the grid is larger than configured).
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        pos = sincos_pos_embed(cfg.dim, h, w, cfg.grid_size).to(
            tokens.device, tokens.dtype
        )  # (T, D)
        tokens = tokens + pos.unsqueeze(0)  # (N, T, D)

        # Which tokens survive masking.
        keep_n = int(T * (1 - mask_ratio))
        ids_keep = None
        if keep_n < T:
            ids_keep = random_keep_indices(N, T, keep_n, x.device, generator)  # (N, K)

        # Naive masking drops tokens before any mixing; deferred masking after the patch-mixer.
        if ids_keep is not None and cfg.masking == "naive":
            tokens = gather_tokens(tokens, ids_keep)  # (N, K, D)
        if self.mixer is not None:
            tokens = self.mixer(tokens, c, ctx, ctx_mask)  # (N, T or K, Dm)
        if ids_keep is not None and cfg.masking == "deferred":
            tokens = gather_tokens(tokens, ids_keep)  # (N, K, Dm)
        if self.mixer is not None:
            tokens = self.mixer.proj_out(tokens)  # (N, K, D)

        # Backbone over the kept tokens; routed tokens (TREAD) skip the blocks of their route.
        routes = {r.start: r for r in cfg.routes if route and r.ratio > 0} if cfg.routes else {}
        skipped = None  # (full token set, ids of the tokens that went on) while a route is open
        for i, block in enumerate(self.blocks):
            if skipped is not None and i == skipped[2]:
                tokens = scatter_tokens(skipped[0], skipped[1], tokens)  # re-join: (N, K, D)
                skipped = None
            if i in routes:
                K = tokens.shape[1]
                go_on = K - int(K * routes[i].ratio)
                ids_on = random_keep_indices(N, K, go_on, x.device, generator)  # (N, K')
                skipped = (tokens, ids_on, routes[i].end)
                tokens = gather_tokens(tokens, ids_on)  # (N, K', D)
            tokens = block(tokens, c, ctx, ctx_mask)  # (N, K or K', D)
        if skipped is not None:  # a route that ends after the last block
            tokens = scatter_tokens(skipped[0], skipped[1], tokens)

        # Final layer, then the zero token at masked places.
        out = self.final(tokens, c)  # (N, K, P)
        keep = torch.ones(N, T, dtype=torch.bool, device=x.device)  # (N, T)
        if ids_keep is not None:
            full = out.new_zeros(N, T, out.shape[-1])  # (N, T, P)
            out = scatter_tokens(full, ids_keep, out)  # (N, T, P)
            keep = torch.zeros_like(keep).scatter(1, ids_keep, True)
        return unpatchify(out, p, h, w), keep  # (N, C, H, W), (N, T)
