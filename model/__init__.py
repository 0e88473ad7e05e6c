"""MicroDiT and EDM in pure PyTorch: tensors in, tensors out (no I/O, logging or cost logic).

`model.config` (the config dataclass and the presets) imports no torch, so a program that only
needs preset names (the command line's help) does not load it; the modules, imported on first
use of their names, do.
"""

from importlib import import_module
from typing import Any

from model.config import PRESETS, MicroDiTConfig, ModelConfigError, RouteConfig, get_preset

__all__ = [
    "PRESETS",
    "MicroDiTConfig",
    "ModelConfigError",
    "RouteConfig",
    "get_preset",
    "MicroDiT",
    "ExpertChoiceMoE",
]

_TORCH_NAMES = {"MicroDiT": "model.microdit", "ExpertChoiceMoE": "model.microdit"}


def __getattr__(name: str) -> Any:
    """`from model import MicroDiT` imports model.microdit (and torch) only then (PEP 562)."""
    if name in _TORCH_NAMES:
        return getattr(import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
