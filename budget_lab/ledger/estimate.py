"""Estimates: what a run will cost before it is launched: the whole job, not only its steps.

An estimate is start-up + training per phase + checkpoint writes + sample grids + FID evaluation
(the final FID of N samples at S sampler steps, and the rung FIDs a sweep plans) + the job's
tail, each from the workspace's calibration (`budget_lab.ledger.calibration`). For each phase,
GPU-hours = steps x batch / (images/s per device) / 3600: the training wall clock a settled run
of this cluster, preset, resolution, mask ratio and routing measured (every settled run updates
it, `learn_from_run`), else the measured step throughput on this GPU type, or the built-in paper
figures for MicroDiT-XL/2 on H100. The other activities hold every device of the job too.
Devices are assumed to scale linearly, so GPU-hours do not depend on how many GPUs run it (the
wall clock does). Dollars = GPU-hours x the cluster's price; both the on-demand and the spot
figure are shown when the cluster's price model knows them.

    est = estimate_run(cfg, cluster, workspace)
    print(format_estimate(est))            # `budget-lab launch --dry-run`
    check_budget(est.usd, budget_usd=...)  # budget_lab.ledger.caps
    write_estimate(run_dir, est)           # estimate.json: what was expected before it ran
    print(estimate_vs_settled(read_estimate(run_dir), settled_usd))  # `cost report --run`
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_lab.io import atomic_write_json
from budget_lab.ledger.calibration import (
    PAPER,
    Calibration,
    device_of,
    native_resolution,
    routing_key,
)
from budget_lab.rundir import RunDir
from budget_lab.units import usd

__all__ = [
    "PhaseEstimate",
    "Estimate",
    "estimate_run",
    "format_estimate",
    "write_estimate",
    "read_estimate",
    "estimate_vs_settled",
]


@dataclass(frozen=True)
class PhaseEstimate:
    """The estimate of one phase."""

    name: str
    steps: int
    batch_size: int
    mask_ratio: float
    resolution: int  # pixels
    images_per_s: float  # per device, from calibration
    gpu_hours: float
    source: str  # the calibration's source ("paper", "benchmark", "run:<name>", "scaled ...")


@dataclass(frozen=True)
class Estimate:
    """What a run is expected to take and cost on a cluster."""

    run: str
    preset: str
    cluster: str
    device: str  # GPU type, or "cpu"
    gpus: int  # devices the launch holds (a CPU-only machine counts 1)
    phases: tuple[PhaseEstimate, ...]
    gpu_hours: float  # the whole job: training + every overhead activity
    wall_hours: float  # gpu_hours / gpus
    price_kind: str  # the cluster's price model: fixed | on_demand | spot
    usd_per_gpu_hour: float  # the rate this cluster is charged at (spot: its catalog figure)
    on_demand_usd_per_gpu_hour: float | None  # for the on-demand vs spot comparison
    spot_usd_per_gpu_hour: float | None
    paper_recipe: bool  # the phases are the paper's (compare with its 504 H100-hours)
    # GPU-hours of each activity besides training (startup, checkpoint, sample_grid, eval,
    # other), and where each figure came from ("run:<name>", "reference", "not calibrated").
    overheads: dict[str, float] = field(default_factory=dict)
    overhead_sources: dict[str, str] = field(default_factory=dict)
    fid_evals: int = 0  # FID evaluations planned (rungs + final)

    @property
    def training_gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.phases)

    @property
    def by_activity_usd(self) -> dict[str, float]:
        """Dollars per activity at the cluster's rate (train included)."""
        out = {"train": self.training_gpu_hours * self.usd_per_gpu_hour}
        out.update({k: v * self.usd_per_gpu_hour for k, v in self.overheads.items()})
        return out

    @property
    def usd(self) -> float:
        """The estimate at the cluster's own rate."""
        return self.gpu_hours * self.usd_per_gpu_hour

    @property
    def cost_usd(self) -> float:
        """Same as `usd`."""
        return self.usd

    @property
    def usd_on_demand(self) -> float | None:
        r = self.on_demand_usd_per_gpu_hour
        return None if r is None else self.gpu_hours * r

    @property
    def usd_spot(self) -> float | None:
        r = self.spot_usd_per_gpu_hour
        return None if r is None else self.gpu_hours * r


def _is_paper_recipe(preset: str, phases: list[tuple[int, float, int, int]]) -> bool:
    return preset == PAPER.preset and tuple(phases) == PAPER.phases


def estimate_run(
    cfg: Any,
    cluster: Any,
    workspace: Any,
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    gpus: int | None = None,
    calibration: Calibration | None = None,
    fid_samples: int = 0,
    sampler_steps: int = 0,
    fid_evals: int = 0,
) -> Estimate:
    """Estimate a `RunConfig` on a cluster: GPU-hours per phase from calibration, times price.

    The launch holds `gpus` devices, by default nodes x gpus_per_node (default: the cluster's;
    a CPU-only machine counts 1). `calibration` defaults to the workspace's calibration.json plus
    the built-in paper entries. `fid_evals` FID evaluations of `fid_samples` samples at
    `sampler_steps` steps are planned (a sweep trial's rungs and final FID; 0 for a plain launch).
    """
    calibration = calibration or Calibration.load(workspace)
    preset = str(cfg.model["preset"])
    device = device_of(cluster)
    if gpus_per_node is None:
        gpus_per_node = int(getattr(cluster, "gpus_per_node", 0) or 0)
    held = gpus if gpus is not None else nodes * gpus_per_node
    held = max(held, 1)
    routing = routing_key(cfg.model if isinstance(cfg.model, dict) else None)
    where = dict(cluster=str(cluster.name), device=device, preset=preset, routing=routing)
    phases = []
    keys = []
    checkpoints, step = 0, 0
    every = max(int(getattr(getattr(cfg, "checkpoint", None), "every", 0) or 0), 1)
    for phase in cfg.phases:
        resolution = phase.resolution or native_resolution(preset)
        entry = calibration.lookup(
            preset, resolution=resolution, mask_ratio=phase.mask_ratio, device=device
        )
        ips, source = entry.images_per_s, entry.source
        wall = calibration.activity(
            "train", **where, resolution=resolution, mask_ratio=phase.mask_ratio
        )
        if wall is not None:  # a settled run's training wall clock wins
            ips, source = wall.value, f"{wall.source} (wall clock)"
        images = phase.steps * phase.batch_size
        phases.append(
            PhaseEstimate(
                name=phase.name,
                steps=phase.steps,
                batch_size=phase.batch_size,
                mask_ratio=phase.mask_ratio,
                resolution=resolution,
                images_per_s=ips,
                gpu_hours=images / ips / 3600,
                source=source,
            )
        )
        keys.append((resolution, phase.mask_ratio, phase.steps, phase.batch_size))
        # The trainer saves at every multiple of checkpoint.every and at each phase's end.
        end = step + phase.steps
        checkpoints += end // every - step // every + (1 if end % every else 0)
        step = end
    train_ips = max((p.images_per_s for p in phases), default=1.0)
    counts = {
        "startup": 1.0,
        "checkpoint": float(checkpoints),
        "sample_grid": float(len(phases) if getattr(cfg.eval, "grid_size", 0) > 0 else 0),
        "eval": float(fid_evals * fid_samples * sampler_steps),
        "other": 1.0,
    }
    overheads, overhead_sources = {}, {}
    for activity, n in counts.items():
        seconds, source = calibration.overhead_seconds(
            activity, **where, train_images_per_s=train_ips
        )
        overheads[activity] = n * seconds * held / 3600
        overhead_sources[activity] = source
    gpu_hours = sum(p.gpu_hours for p in phases) + sum(overheads.values())

    price = cluster.price
    kind = str(price.kind)
    rate = float(price.usd_per_gpu_hour)
    on_demand = getattr(price, "on_demand_usd_per_gpu_hour", None)
    if kind == "on_demand":
        on_demand = rate
    spot = rate if kind == "spot" else None
    return Estimate(
        run=str(getattr(cfg, "name", "run")),
        preset=preset,
        cluster=str(cluster.name),
        device=device,
        gpus=held,
        phases=tuple(phases),
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / held,
        price_kind=kind,
        usd_per_gpu_hour=rate,
        on_demand_usd_per_gpu_hour=float(on_demand) if on_demand is not None else None,
        spot_usd_per_gpu_hour=spot,
        paper_recipe=_is_paper_recipe(preset, keys),
        overheads=overheads,
        overhead_sources=overhead_sources,
        fid_evals=fid_evals,
    )


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:,.3g}"


def format_estimate(est: Estimate, *, cfg: Any = None, cluster: Any = None) -> str:
    """The estimate as text for `launch --dry-run`: a line per phase, GPU-hours, $ on-demand vs
    spot, and for the paper's recipe the paper's own figures next to ours. (`cfg` and `cluster`
    are accepted for callers that have them at hand; the estimate already holds what is shown.)"""
    lines = [
        f"estimate for {est.run} ({est.preset}) on {est.cluster}: {est.gpus} x {est.device}",
    ]
    width = max(len(p.name) for p in est.phases)
    for p in est.phases:
        lines.append(
            f"  {p.name:<{width}}  {p.steps:>9,} steps x {p.batch_size:<5} {p.resolution}px "
            f"r={p.mask_ratio:<4g} {p.images_per_s:>10,.1f} img/s/device  "
            f"{_hours(p.gpu_hours):>8} GPU-h  [{p.source}]"
        )
    extra = {k: v for k, v in est.overheads.items() if v > 0}
    if extra:
        lines.append(
            "  + "
            + ", ".join(
                f"{k} {_hours(v)} GPU-h [{est.overhead_sources[k]}]" for k, v in extra.items()
            )
        )
    missing = [k for k, src in est.overhead_sources.items() if src == "not calibrated"]
    if missing:
        lines.append(
            f"  not yet calibrated on {est.device} (counted as 0 until a run there settles): "
            + ", ".join(missing)
        )
    lines.append(
        f"  total: {_hours(est.gpu_hours)} {est.device}-hours "
        f"({_hours(est.wall_hours)} h wall clock on {est.gpus} device(s))"
    )
    prices = []
    if est.on_demand_usd_per_gpu_hour is not None:
        prices.append(
            f"${est.usd_on_demand:,.2f} on-demand (${est.on_demand_usd_per_gpu_hour:.2f}/GPU-h)"
        )
    if est.spot_usd_per_gpu_hour is not None:
        prices.append(
            f"${est.usd_spot:,.2f} spot at the catalog ${est.spot_usd_per_gpu_hour:.2f}/GPU-h "
            "(the ledger charges the real spot history)"
        )
    if est.price_kind == "fixed":
        prices.append(f"${est.usd:,.2f} at the fixed ${est.usd_per_gpu_hour:.2f}/device-hour")
    lines.append("  cost: " + "; ".join(prices))
    if est.paper_recipe:
        lines.append(
            f"  paper (Sehwag et al. 2024): {PAPER.gpu_hours:,.0f} {PAPER.device}-hours, "
            f"${PAPER.usd:,.0f} at ${PAPER.usd_per_gpu_hour:.2f}/{PAPER.device}-hour; this "
            f"estimate: {_hours(est.gpu_hours)} {est.device}-hours, ${est.usd:,.0f} on "
            f"{est.cluster}"
        )
    return "\n".join(lines)


# -- estimate.json: the estimate a run was launched with --------------------------------------


def write_estimate(
    run_dir: str | os.PathLike[str], estimate: Estimate, usd: float | None = None
) -> Path:
    """Write the run folder's estimate.json: what was expected before it ran (`cost report
    --run`, `launch --wait` and the sweep summary print it against the settled dollars). `usd`:
    the figure the launch was checked with, when it differs from the estimate's (a sweep trial
    capped at its trial budget)."""
    path = RunDir(run_dir).estimate
    atomic_write_json(
        path,
        {
            "usd": estimate.usd if usd is None else usd,
            "gpu_hours": estimate.gpu_hours,
            "wall_hours": estimate.wall_hours,
            "usd_per_gpu_hour": estimate.usd_per_gpu_hour,
            "price_kind": estimate.price_kind,
            "by_activity_usd": estimate.by_activity_usd,
            "phases": {p.name: p.gpu_hours * estimate.usd_per_gpu_hour for p in estimate.phases},
            "sources": {
                "train": sorted({p.source for p in estimate.phases}),
                **estimate.overhead_sources,
            },
            "time": time.time(),
        },
    )
    return path


def read_estimate(run_dir: str | os.PathLike[str]) -> float | None:
    """The dollars of a run folder's estimate.json; None when it has none (a run launched
    before estimates were kept) or it is unreadable."""
    try:
        value = json.loads(RunDir(run_dir).estimate.read_text())["usd"]
        return float(value)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_vs_settled(estimate_usd: float | None, settled_usd: float) -> str | None:
    """``estimate $X vs settled $Y: error +Z% (settled / estimate - 1)``; None without an
    estimate."""
    if estimate_usd is None:
        return None
    error = f"{settled_usd / estimate_usd - 1:+.0%}" if estimate_usd > 0 else "n/a"
    return (
        f"estimate {usd(estimate_usd)} vs settled {usd(settled_usd)}: error {error} "
        "(settled / estimate - 1)"
    )
