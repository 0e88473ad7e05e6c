"""Typed run configuration: what a training run is, validated on construction.

A run is a model, an EDM noise setup, data, and a list of phases (the recipe: masked pretraining
at r = 0.75, then unmasked finetuning). Recipes are YAML files that fill these dataclasses;
precedence is YAML < CLI overrides (see `budget_lab.config.compose`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from budget_lab.errors import ConfigError

__all__ = [
    "PhaseConfig",
    "OptimConfig",
    "DataConfig",
    "EvalConfig",
    "CheckpointConfig",
    "WandbConfig",
    "DistributedConfig",
    "RunConfig",
]


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {valid}")


@dataclass
class PhaseConfig:
    """One phase of a run; it starts from the previous phase's weights (and EMA)."""

    name: str = "pretrain"  # shown in logs, metrics and checkpoints
    steps: int = 1000  # optimizer steps in this phase
    mask_ratio: float = 0.0  # fraction of tokens dropped (paper: 0.75 pretrain, 0 finetune)
    batch_size: int = 64  # global batch: images per optimizer step over all devices
    micro_batch_size: int | None = None  # images per device per forward; None = batch / devices
    lr: float = 1e-4  # peak learning rate (MoE parameters get optim.moe_lr_scale of it)
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    resolution: int | None = None  # which prepared resolution to train on; None = the only one
    P_mean: float | None = None  # overrides edm.P_mean in this phase (paper: 0.0 at 512 px)
    P_std: float | None = None  # overrides edm.P_std in this phase (paper: 0.6 at 512 px)

    def __post_init__(self) -> None:
        p = f"phases[{self.name}]"
        _check(self.steps >= 1, f"{p}.steps", self.steps, "expected >= 1")
        _check(0.0 <= self.mask_ratio < 1.0, f"{p}.mask_ratio", self.mask_ratio, "expected [0, 1)")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "expected >= 1")
        mb = self.micro_batch_size
        _check(mb is None or mb >= 1, f"{p}.micro_batch_size", mb, "expected >= 1 or null")
        _check(self.lr > 0, f"{p}.lr", self.lr, "expected > 0")
        _check(
            self.schedule in ("cosine", "constant"),
            f"{p}.schedule",
            self.schedule,
            "expected 'cosine' or 'constant'",
        )
        _check(
            0 <= self.warmup_steps <= self.steps,
            f"{p}.warmup_steps",
            self.warmup_steps,
            f"expected 0..steps={self.steps}",
        )
        _check(
            0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", self.min_lr_ratio, "expected [0, 1]"
        )


@dataclass
class OptimConfig:
    """AdamW and the training tricks of the recipe."""

    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.999  # the paper found 0.999 better than 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    moe_lr_scale: float = 0.5  # MoE (router + expert) learning rate / base learning rate
    ema_decay: float = 0.999  # EMA of weights used for sampling and FID; 0 = off
    caption_dropout: float = 0.1  # fraction of captions zeroed, for classifier-free guidance

    def __post_init__(self) -> None:
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "expected >= 0")
        for n in ("beta1", "beta2", "ema_decay", "caption_dropout"):
            v = getattr(self, n)
            _check(0 <= v < 1, f"optim.{n}", v, "expected [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "expected >= 0 (0 = off)")
        _check(self.moe_lr_scale > 0, "optim.moe_lr_scale", self.moe_lr_scale, "expected > 0")


@dataclass
class DataConfig:
    """Where the prepared shards are (`budget-lab data prepare --out`) and how to read them."""

    path: str = "data/synth-latents"  # folder with manifest.json (relative to the working dir)
    num_workers: int = 0  # DataLoader workers per process (may change between segments)
    shuffle_buffer: int = 1000  # samples in each lane's shuffle buffer
    # Lanes an epoch is cut into (budget_lab.data.loader): the data order depends on these, not on
    # the world size. null: world size x workers. Pin it (e.g. 64: a multiple of every world size
    # x workers you use, dividing every micro-batch x world size) to move a run between sizes.
    lanes: int | None = None

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "expected >= 0")
        _check(self.lanes is None or self.lanes >= 1, "data.lanes", self.lanes, "expected >= 1")
        _check(
            self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "expected >= 1"
        )


@dataclass
class EvalConfig:
    """Sampling for sample grids and FID."""

    fid_samples: int = 500  # generated images compared with the validation split
    sampler_steps: int = 20  # Heun steps
    cfg_scale: float = 2.0  # classifier-free guidance scale (paper: 5 at scale)
    batch_size: int = 100  # images per sampling batch
    grid_size: int = 16  # images in the sample grid saved after each phase
    clip_model: str | None = (
        None  # CLIP hub id or local folder: adds a CLIP score to eval; None = off
    )
    reference_samples: int | None = None  # FID/KID reference images; None = the whole val split
    interval: str = "jackknife"  # FID interval: jackknife (accurate se) or bootstrap
    resamples: int = 20  # jackknife groups (or bootstrap draws, ~500) for the FID interval
    confidence: float = 0.95  # of every interval (FID, alignment)
    kid_subsets: int = 50  # random subsets for KID's mean and std
    alignment: str = (
        "auto"  # text alignment on the built-in data: auto (when captions parse), on, off
    )

    def __post_init__(self) -> None:
        _check(self.fid_samples >= 4, "eval.fid_samples", self.fid_samples, "expected >= 4")
        _check(
            self.reference_samples is None or self.reference_samples >= 4,
            "eval.reference_samples",
            self.reference_samples,
            "expected >= 4, or null for the whole validation split",
        )
        _check(
            self.interval in ("jackknife", "bootstrap"),
            "eval.interval",
            self.interval,
            "expected jackknife or bootstrap",
        )
        _check(self.resamples >= 2, "eval.resamples", self.resamples, "expected >= 2")
        _check(0 < self.confidence < 1, "eval.confidence", self.confidence, "expected (0, 1)")
        _check(self.kid_subsets >= 1, "eval.kid_subsets", self.kid_subsets, "expected >= 1")
        _check(
            self.alignment in ("auto", "on", "off"),
            "eval.alignment",
            self.alignment,
            "expected auto, on or off",
        )
        _check(self.sampler_steps >= 1, "eval.sampler_steps", self.sampler_steps, "expected >= 1")
        _check(self.cfg_scale >= 0, "eval.cfg_scale", self.cfg_scale, "expected >= 0")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "expected >= 1")
        _check(self.grid_size >= 0, "eval.grid_size", self.grid_size, "expected >= 0")


@dataclass
class CheckpointConfig:
    every: int = 200  # optimizer steps between checkpoints (and at each phase end)
    keep: int = (
        2  # checkpoints kept; older ones are deleted (>= 2 so a corrupt latest has a fallback)
    )

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every", self.every, "expected >= 1")
        _check(self.keep >= 2, "checkpoint.keep", self.keep, "expected >= 2")


@dataclass
class WandbConfig:
    enabled: bool = False  # log to W&B (offline automatically when no API key is set)
    project: str = "budget-lab"
    entity: str | None = None
    mode: str = "auto"  # auto: online with WANDB_API_KEY, else offline; or online/offline

    def __post_init__(self) -> None:
        _check(
            self.mode in ("auto", "online", "offline"),
            "wandb.mode",
            self.mode,
            "expected auto, online or offline",
        )


@dataclass
class DistributedConfig:
    """How a run spreads over its processes (one per GPU); one process ignores it."""

    # ddp: every rank holds the whole model, EMA and optimizer state; gradients are all-reduced.
    # fsdp: torch FSDP2, one shard unit per transformer block (MoE experts split along the expert
    # axis): parameters, gradients, optimizer and EMA state split over the ranks, for models whose
    # AdamW state does not fit one device. Checkpoints hold the full state either way.
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        _check(
            self.strategy in ("ddp", "fsdp"),
            "distributed.strategy",
            self.strategy,
            "expected ddp (replicated, the default) or fsdp (sharded, for large models)",
        )


@dataclass
class RunConfig:
    """A whole training run."""

    name: str = "run"  # run name; the run folder defaults to runs/<name>
    seed: int = 0  # seeds weights, data order, noise, masks
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "nano"})  # preset + overrides
    edm: dict[str, Any] = field(default_factory=dict)  # EDMConfig fields (sigma_data, P_mean, ...)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    mixed_precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or "no" / "bf16"
    compile: bool = False  # torch.compile the model (GPU)
    log_every: int = 10  # optimizer steps between metrics.jsonl rows

    def __post_init__(self) -> None:
        _check(bool(self.phases), "phases", self.phases, "a run needs at least one phase")
        names = [p.name for p in self.phases]
        _check(len(set(names)) == len(names), "phases", names, "phase names must be unique")
        _check(
            self.mixed_precision in ("auto", "no", "bf16"),
            "mixed_precision",
            self.mixed_precision,
            "expected auto, no or bf16",
        )
        _check(self.log_every >= 1, "log_every", self.log_every, "expected >= 1")
        _check("preset" in self.model, "model", self.model, "expected a 'preset' key (e.g. nano)")
