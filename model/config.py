"""MicroDiT configuration: one typed dataclass, validated on construction, and presets as data.

Every switch the paper ablates is a field here, so sweeps can turn parts on and off:
deferred vs naive masking and the patch-mixer depth, expert-choice MoE (expert count, capacity,
placement), layer-wise scaling, and the caption path. The presets at the bottom reproduce the
paper's MicroDiT-XL/2 (1,165,442,320 parameters with a 1024-wide caption encoder) and
MicroDiT-Tiny/2 (200,692,752 with a 768-wide one), plus small CPU presets for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ModelConfigError",
    "MicroDiTConfig",
    "EDMConfig",
    "RouteConfig",
    "PRESETS",
    "get_preset",
    "round_up",
]


class ModelConfigError(ValueError):
    """An invalid model configuration; the message names the field, the value and the valid range."""


def round_up(x: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x."""
    return int(math.ceil(x / multiple) * multiple)


@dataclass(frozen=True)
class RouteConfig:
    """A token route (TREAD): a fraction of tokens skips blocks [start, end) and re-joins at `end`."""

    start: int  # first backbone block the routed tokens skip (0-based)
    end: int  # the routed tokens re-join before this block; start < end <= depth
    ratio: float  # fraction of the (kept) tokens that take the route, in [0, 1)


@dataclass(frozen=True)
class MicroDiTConfig:
    """Shape and switches of a MicroDiT. Defaults are MicroDiT-XL/2 at 256 px on SDXL-VAE latents."""

    # Input.
    in_channels: int = 4  # latent channels: 4 for SD/SDXL VAEs, 16 for SD3/Flux VAEs, 3 for pixels
    input_size: int = 32  # latent grid side the positions are laid out for (256 px / 8)
    patch_size: int = 2  # side of a patch in latent cells; tokens = (input_size / patch_size)^2

    # Backbone transformer.
    dim: int = 1024  # backbone width
    depth: int = 28  # backbone blocks
    head_dim: int = 64  # width of one attention head (all attentions)
    norm_eps: float = 1e-6  # LayerNorm epsilon

    # Layer-wise scaling: attention width and FFN ratio grow linearly from the first block to the last.
    layerwise_scaling: bool = True  # False: every block uses the end values (a plain DiT)
    attn_ratio: tuple[float, float] = (0.5, 1.0)  # attention width / dim, first block -> last block
    ffn_ratio: tuple[float, float] = (0.5, 4.0)  # FFN hidden base / dim, first block -> last block
    ffn_multiple_of: int = 256  # FFN hidden sizes are rounded up to a multiple of this

    # Mixture of experts, expert-choice routing (no auxiliary loss).
    num_experts: int = 8  # experts per MoE layer; 0 = dense SwiGLU everywhere
    capacity_factor: float = 2.0  # each expert takes capacity_factor * T / E tokens of a sample
    moe_every: int = 2  # MoE FFN in blocks i with i % moe_every == moe_every - 1 (never the last)

    # Patch-mixer and masking.
    mixer_depth: int = 6  # transformer blocks over all tokens before masking; 0 = no mixer
    mixer_dim: int = 768  # mixer width; != dim adds in/out projections and a caption projection
    mixer_ffn_ratio: float = 4.0  # mixer FFN hidden base / mixer_dim
    masking: Literal["deferred", "naive"] = (
        "deferred"  # deferred: mask after the mixer; naive: before
    )

    # Caption conditioning.
    caption_dim: int = 1024  # width of the text encoder's token embeddings (CLIP ViT-H: 1024)
    caption_len: int = 77  # tokens per caption (only used to count FLOPs)
    caption_ffn_ratio: float = 4.0  # SwiGLU ratio in the caption refiner block

    # Timestep embedding.
    time_freq_dim: int = 512  # sinusoidal features of the noise level before the MLP

    # Token routing (TREAD); empty = off. Training only: sampling sends every token through every block.
    routes: tuple[RouteConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, valid: str) -> ModelConfigError:
            return ModelConfigError(f"model.{name}={value!r} is invalid: {valid}")

        for name in ("in_channels", "input_size", "patch_size", "dim", "depth", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "expected a positive integer")
        if self.input_size % self.patch_size:
            raise bad(
                "patch_size",
                self.patch_size,
                f"it must divide the latent grid side input_size={self.input_size} "
                f"(valid: {[p for p in range(1, self.input_size + 1) if self.input_size % p == 0]})",
            )
        if self.dim % self.head_dim:
            raise bad("head_dim", self.head_dim, f"it must divide dim={self.dim}")
        for name in ("attn_ratio", "ffn_ratio"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise bad(name, (lo, hi), "expected (first, last) with 0 < first <= last")
        if self.attn_ratio[1] > 1.0:
            raise bad("attn_ratio", self.attn_ratio, "the last block's ratio must be <= 1.0")
        if self.ffn_multiple_of < 1:
            raise bad("ffn_multiple_of", self.ffn_multiple_of, "expected a positive integer")
        if not isinstance(self.num_experts, int) or self.num_experts < 0 or self.num_experts == 1:
            raise bad("num_experts", self.num_experts, "expected 0 (dense FFN) or an integer >= 2")
        if self.num_experts > self.num_tokens:
            raise bad(
                "num_experts",
                self.num_experts,
                f"more experts than tokens per image ({self.num_tokens}); "
                f"use at most {self.num_tokens} or a smaller patch size",
            )
        if self.num_experts and not (0 < self.capacity_factor <= self.num_experts):
            raise bad(
                "capacity_factor",
                self.capacity_factor,
                f"expected 0 < capacity_factor <= num_experts={self.num_experts}",
            )
        if self.moe_every < 1:
            raise bad("moe_every", self.moe_every, "expected a positive integer")
        if self.mixer_depth < 0:
            raise bad("mixer_depth", self.mixer_depth, "expected >= 0")
        if self.mixer_depth and self.mixer_dim % self.head_dim:
            raise bad(
                "mixer_dim", self.mixer_dim, f"it must be a multiple of head_dim={self.head_dim}"
            )
        if self.masking not in ("deferred", "naive"):
            raise bad("masking", self.masking, "expected 'deferred' or 'naive'")
        if self.caption_dim < 1 or self.caption_len < 1:
            raise bad(
                "caption_dim", self.caption_dim, "expected positive caption_dim and caption_len"
            )
        if self.time_freq_dim % 2:
            raise bad("time_freq_dim", self.time_freq_dim, "expected an even integer")
        for k, r in enumerate(self.routes):
            if not (0 <= r.start < r.end <= self.depth):
                raise bad(
                    f"routes[{k}]",
                    (r.start, r.end),
                    f"expected 0 <= start < end <= depth={self.depth}",
                )
            if not (0.0 <= r.ratio < 1.0):
                raise bad(f"routes[{k}].ratio", r.ratio, "expected a ratio in [0, 1)")
            for j, other in enumerate(self.routes[:k]):
                if r.start < other.end and other.start < r.end:
                    raise bad(
                        f"routes[{k}]",
                        (r.start, r.end),
                        f"it overlaps routes[{j}]=({other.start}, {other.end}); routes must not overlap",
                    )

    # Derived shapes -------------------------------------------------------------------------------

    @property
    def grid_size(self) -> int:
        """Tokens per side at the configured input size."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the configured input size."""
        return self.grid_size**2

    @property
    def has_mixer_proj(self) -> bool:
        """True when the mixer is narrower/wider than the backbone and needs projections."""
        return self.mixer_depth > 0 and self.mixer_dim != self.dim

    def attn_width(self, i: int) -> int:
        """Self-attention hidden width of backbone block i (a multiple of 2 * head_dim)."""
        q = self._lerp(self.attn_ratio, i)
        if q >= 1.0:
            return self.dim
        return min(round_up(int(self.dim * q), 2 * self.head_dim), self.dim)

    def ffn_base(self, i: int) -> int:
        """FFN hidden base of backbone block i (before SwiGLU's 2/3 and rounding)."""
        return int(self.dim * self._lerp(self.ffn_ratio, i))

    def is_moe(self, i: int) -> bool:
        """Whether backbone block i has an MoE FFN (every moe_every-th block, never the last)."""
        return (
            self.num_experts > 0 and i % self.moe_every == self.moe_every - 1 and i < self.depth - 1
        )

    def mixer_is_moe(self, j: int) -> bool:
        """Whether mixer block j has an MoE FFN (every moe_every-th block)."""
        return self.num_experts > 0 and j % self.moe_every == self.moe_every - 1

    def _lerp(self, pair: tuple[float, float], i: int) -> float:
        if not self.layerwise_scaling:
            return pair[1]
        if self.depth == 1:
            return pair[1]
        lo, hi = pair
        # Same arithmetic as numpy.linspace(lo, hi, depth)[i], so widths match the released model.
        step = (hi - lo) / (self.depth - 1)
        return hi if i == self.depth - 1 else lo + i * step

    def replace(self, **changes: Any) -> MicroDiTConfig:
        """A copy with some fields changed (validated again). Unknown fields are rejected."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ModelConfigError(
                f"unknown model field(s) {unknown}; valid fields: {', '.join(sorted(names))}"
            )
        if "routes" in changes:
            changes["routes"] = tuple(
                r if isinstance(r, RouteConfig) else RouteConfig(**r) for r in changes["routes"]
            )
        for name in ("attn_ratio", "ffn_ratio"):
            if name in changes:
                changes[name] = tuple(changes[name])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["routes"] = [dataclasses.asdict(r) for r in self.routes]
        return d


# Presets are data. The paper's two models, then CPU-sized ones for tests and the demo.
PRESETS: dict[str, MicroDiTConfig] = {
    "MicroDiT-XL/2": MicroDiTConfig(),
    "MicroDiT-Tiny/2": MicroDiTConfig(
        dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512, caption_dim=768
    ),
    # ~2M parameters: 32 px pixels with patch 4 (64 tokens); trains on a 2-core CPU in minutes.
    "micro": MicroDiTConfig(
        in_channels=3,
        input_size=32,
        patch_size=4,
        dim=192,
        depth=6,
        head_dim=32,
        ffn_multiple_of=32,
        num_experts=4,
        mixer_depth=2,
        mixer_dim=128,
        caption_dim=384,
        caption_len=32,
        time_freq_dim=128,
    ),  # fmt: skip
    # ~0.7M parameters: the smallest model that still has every part (mixer, MoE, layer-wise scaling).
    "nano": MicroDiTConfig(
        in_channels=3,
        input_size=32,
        patch_size=4,
        dim=128,
        depth=4,
        head_dim=32,
        ffn_multiple_of=32,
        num_experts=4,
        mixer_depth=1,
        mixer_dim=128,
        caption_dim=384,
        caption_len=32,
        time_freq_dim=128,
    ),  # fmt: skip
}


def get_preset(name: str, **overrides: Any) -> MicroDiTConfig:
    """The named preset, with optional field overrides; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ModelConfigError(
            f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}"
        )
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


@dataclass(frozen=True)
class EDMConfig:
    """Noise schedule and sampler settings (paper values at 256 px)."""

    sigma_data: float = (
        0.9  # std of the training data (the paper's latents); 0.5 suits [-1, 1] pixels
    )
    P_mean: float = -0.6  # mean of ln σ in training (0.0 at 512 px in the paper)
    P_std: float = 1.2  # std of ln σ in training (0.6 at 512 px)
    sigma_min: float = 0.002  # smallest noise level the sampler visits
    sigma_max: float = 80.0  # largest noise level (the sampler starts here)
    rho: float = 7.0  # time-step exponent of the sampler's schedule
    num_steps: int = 30  # Heun steps (2 network calls each but the last)
    cfg_scale: float = 5.0  # classifier-free guidance scale; 1.0 = no guidance

    def __post_init__(self) -> None:
        if self.sigma_data <= 0 or self.P_std <= 0:
            raise ModelConfigError(
                f"edm.sigma_data={self.sigma_data} / edm.P_std={self.P_std}: both must be > 0"
            )
        if not 0 < self.sigma_min < self.sigma_max:
            raise ModelConfigError(
                f"edm.sigma_min={self.sigma_min}, edm.sigma_max={self.sigma_max}: "
                "expected 0 < sigma_min < sigma_max"
            )
        if self.num_steps < 1:
            raise ModelConfigError(f"edm.num_steps={self.num_steps}: expected >= 1")
        if self.cfg_scale < 0:
            raise ModelConfigError(
                f"edm.cfg_scale={self.cfg_scale}: expected >= 0 (1 = no guidance)"
            )
