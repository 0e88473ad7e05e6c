"""MicroDiT and EDM in pure PyTorch: tensors in, tensors out (no I/O, logging or cost logic)."""

from model.config import PRESETS, MicroDiTConfig, ModelConfigError, RouteConfig, get_preset
from model.microdit import ExpertChoiceMoE, MicroDiT

__all__ = [
    "PRESETS",
    "MicroDiTConfig",
    "ModelConfigError",
    "RouteConfig",
    "get_preset",
    "MicroDiT",
    "ExpertChoiceMoE",
]
