"""The optimizer of a training phase: AdamW over parameter groups, and its learning-rate schedule.

Every phase gets a fresh AdamW (its own learning rate, fresh moments) and a schedule of linear
warm-up then cosine decay (or constant). Parameters fall into up to four groups, always in the same
order (a checkpoint's optimizer state is matched to them by position):

    (moe, decay):  (False, False)  norms and biases             lr,                no weight decay
                   (False, True)   matrices                     lr,                weight decay
                   (True,  False)  MoE router / expert vectors  lr x moe_lr_scale, no weight decay
                   (True,  True)   MoE router / expert matrices lr x moe_lr_scale, weight decay

Groups with no parameter are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from budget_lab.config import OptimConfig, PhaseConfig
from model.microdit import MicroDiT

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_factor"]


def param_groups(model: MicroDiT, optim: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """`model`'s parameters in AdamW groups (see the module's docstring for the order): the MoE
    ones (router and experts) at `moe_lr_scale` times the phase's `lr`, and no weight decay on
    vectors (norms, biases). Parameter names survive FSDP sharding, so it works on a sharded model."""
    moe_names = set(model.moe_parameter_names())
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        groups.setdefault((name in moe_names, p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "lr": lr * (optim.moe_lr_scale if moe else 1.0),
            "weight_decay": optim.weight_decay if decay else 0.0,
        }
        for (moe, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: MicroDiT, optim: OptimConfig, phase: PhaseConfig) -> torch.optim.AdamW:
    """A fresh AdamW for `phase` over `param_groups` (the multi-tensor `foreach` kernels)."""
    # Looked up on torch.optim at each call, so a test can spy on it.
    return torch.optim.AdamW(
        param_groups(model, optim, phase.lr),
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        foreach=True,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    phase: PhaseConfig,
    budget_progress: Callable[[], float | None],
) -> LambdaLR:
    """The phase's schedule: `lr_factor` at each step. `budget_progress()` is asked at every step
    (the job updates it as the phase's dollars are spent; None: the step count alone)."""
    return LambdaLR(optimizer, lambda step: lr_factor(phase, step, budget_progress()))


def lr_factor(phase: PhaseConfig, step: int, budget_progress: float | None = None) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of a phase.

    `budget_progress` (0..1), for a phase that ends at a dollar figure (a sweep's equal-dollar
    trials), is how much of the phase's dollars are spent: the decay follows the further along of
    it and the step count, so a phase that ends at its budget before its step count still ends
    its cosine at `min_lr_ratio`."""
    if step < phase.warmup_steps:
        return (step + 1) / phase.warmup_steps
    if phase.schedule == "constant":
        return 1.0
    span = max(phase.steps - phase.warmup_steps, 1)
    progress = min((step - phase.warmup_steps) / span, 1.0)
    if budget_progress is not None:
        progress = max(progress, min(budget_progress, 1.0))
    return phase.min_lr_ratio + (1 - phase.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
