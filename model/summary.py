"""What a MicroDiT costs: parameters (total and active per token), FLOPs per training image, and a
layer table. Everything is measured on the meta device, so even MicroDiT-XL/2 allocates nothing.
FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions and attention), not estimated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import MicroDiTConfig
from model.microdit import ExpertChoiceMoE, MicroDiT

__all__ = ["ParamCounts", "FlopCounts", "LayerRow", "count_params", "count_flops", "layer_table"]


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter
    moe: int  # router and expert parameters
    active_per_token: int  # parameters one token meets on average (experts: capacity_factor of E)


@dataclass(frozen=True)
class FlopCounts:
    forward: int  # one forward pass for one image
    training: int  # forward + backward (3x forward) for one image
    backbone: int  # forward FLOPs of the backbone blocks
    mixer: int  # forward FLOPs of the patch-mixer
    tokens: int  # tokens per image
    kept_tokens: int  # tokens the backbone sees


@dataclass(frozen=True)
class LayerRow:
    part: str  # "mixer" or "backbone"
    index: int
    width: int  # residual stream width
    attn_width: int  # self-attention hidden width
    heads: int
    ffn: str  # "swiglu" or "moe"
    ffn_hidden: int  # SwiGLU hidden, or hidden of one expert
    params: int


def meta_model(cfg: MicroDiTConfig) -> MicroDiT:
    """The model with shapes but no storage."""
    with torch.device("meta"):
        return MicroDiT(cfg)


def count_params(cfg: MicroDiTConfig) -> ParamCounts:
    model = meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    moe = 0
    inactive = 0.0
    for mod in model.modules():
        if isinstance(mod, ExpertChoiceMoE):
            moe += sum(p.numel() for p in mod.parameters())
            experts = mod.w1.numel() + mod.w2.numel()
            # Each token is processed by capacity_factor experts on average (E * c*T/E slots / T).
            inactive += experts * (1 - mod.capacity_factor / mod.num_experts)
    return ParamCounts(total=total, moe=moe, active_per_token=int(round(total - inactive)))


def count_flops(
    cfg: MicroDiTConfig,
    latent_size: int | None = None,
    mask_ratio: float = 0.0,
    route: bool = True,
    batch: int = 1,
) -> FlopCounts:
    """FLOPs for one image of side `latent_size` (default: the configured grid) at `mask_ratio`.

    route=True counts training with token routing (if the config has routes); training FLOPs are
    3x the forward pass (backward = 2x forward for matmuls).
    """
    size = latent_size or cfg.input_size
    model = meta_model(cfg)
    with torch.device("meta"):
        x = torch.empty(batch, cfg.in_channels, size, size)
        sigma = torch.empty(batch)
        captions = torch.empty(batch, cfg.caption_len, cfg.caption_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, sigma, captions, None, mask_ratio, route=route)
    by_module = counter.get_flop_counts()

    def module_flops(prefix: str) -> int:
        # Direct children of `prefix` (e.g. MicroDiT.blocks.3), so nothing is counted twice.
        depth = prefix.count(".") + 1
        return sum(
            sum(ops.values())
            for name, ops in by_module.items()
            if name.startswith(prefix + ".") and name.count(".") == depth
        )

    forward = counter.get_total_flops() // batch
    tokens = (size // cfg.patch_size) ** 2
    return FlopCounts(
        forward=forward,
        training=3 * forward,
        backbone=module_flops("MicroDiT.blocks") // batch,
        mixer=module_flops("MicroDiT.mixer.blocks") // batch,
        tokens=tokens,
        kept_tokens=int(tokens * (1 - mask_ratio)),
    )


def layer_table(cfg: MicroDiTConfig) -> list[LayerRow]:
    """One row per transformer block: mixer blocks first, then the backbone."""
    model = meta_model(cfg)
    rows = []
    parts = [("mixer", list(model.mixer.blocks) if model.mixer is not None else [])]
    parts.append(("backbone", list(model.blocks)))
    for part, blocks in parts:
        for i, block in enumerate(blocks):
            ffn = block.ffn
            moe = isinstance(ffn, ExpertChoiceMoE)
            attn_width = block.attn.proj.in_features
            rows.append(
                LayerRow(
                    part=part,
                    index=i,
                    width=block.norm1.normalized_shape[0],
                    attn_width=attn_width,
                    heads=attn_width // cfg.head_dim,
                    ffn=f"moe x{ffn.num_experts}" if moe else "swiglu",
                    ffn_hidden=ffn.w1.shape[-1] if moe else ffn.w1.out_features,
                    params=sum(p.numel() for p in block.parameters()),
                )
            )
    return rows
