"""Evaluation: FID (standard InceptionV3 features), CLIP score and image grids.

Names are imported lazily, so `from budget_lab.eval import save_grid` does not load torchmetrics
or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from budget_lab.eval.clip_score import CLIPScorer
    from budget_lab.eval.fid import (
        FIDEvaluator,
        ImageSource,
        InceptionFeatures,
        ReferenceStats,
        fid_between,
        inception_weights_path,
    )
    from budget_lab.eval.grid import save_grid

__all__ = [
    "CLIPScorer",
    "FIDEvaluator",
    "ImageSource",
    "InceptionFeatures",
    "ReferenceStats",
    "fid_between",
    "inception_weights_path",
    "save_grid",
]

_HOME = {
    "CLIPScorer": "budget_lab.eval.clip_score",
    "FIDEvaluator": "budget_lab.eval.fid",
    "ImageSource": "budget_lab.eval.fid",
    "InceptionFeatures": "budget_lab.eval.fid",
    "ReferenceStats": "budget_lab.eval.fid",
    "fid_between": "budget_lab.eval.fid",
    "inception_weights_path": "budget_lab.eval.fid",
    "save_grid": "budget_lab.eval.grid",
}


def __getattr__(name: str) -> Any:
    """Import the public name's module on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
