"""Estimates: what a run will cost before it is launched.

For each phase, GPU-hours = steps x batch / (images/s per device) / 3600, the throughput coming
from the workspace's calibration (`budget_lab.ledger.calibration`: measured on this GPU type for
this preset, resolution and mask ratio, or the built-in paper figures for MicroDiT-XL/2 on H100).
Devices are assumed to scale linearly, so GPU-hours do not depend on how many GPUs run it (the
wall clock does). Dollars = GPU-hours x the cluster's price; both the on-demand and the spot
figure are shown when the cluster's price model knows them.

    est = estimate_run(cfg, cluster, workspace)
    print(format_estimate(est))            # `budget-lab launch --dry-run`
    check_budget(est.usd, budget_usd=...)  # budget_lab.ledger.caps
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from budget_lab.ledger.calibration import PAPER, Calibration, device_of, native_resolution

__all__ = ["PhaseEstimate", "Estimate", "estimate_run", "format_estimate"]


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
    gpu_hours: float
    wall_hours: float  # gpu_hours / gpus
    price_kind: str  # the cluster's price model: fixed | on_demand | spot
    usd_per_gpu_hour: float  # the rate this cluster is charged at (spot: its catalog figure)
    on_demand_usd_per_gpu_hour: float | None  # for the on-demand vs spot comparison
    spot_usd_per_gpu_hour: float | None
    paper_recipe: bool  # the phases are the paper's (compare with its 504 H100-hours)

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
) -> Estimate:
    """Estimate a `RunConfig` on a cluster: GPU-hours per phase from calibration, times price.

    The launch holds `gpus` devices, by default nodes x gpus_per_node (default: the cluster's;
    a CPU-only machine counts 1). `calibration` defaults to the workspace's calibration.json plus
    the built-in paper entries.
    """
    calibration = calibration or Calibration.load(workspace)
    preset = str(cfg.model["preset"])
    device = device_of(cluster)
    if gpus_per_node is None:
        gpus_per_node = int(getattr(cluster, "gpus_per_node", 0) or 0)
    held = gpus if gpus is not None else nodes * gpus_per_node
    held = max(held, 1)
    phases = []
    keys = []
    for phase in cfg.phases:
        resolution = phase.resolution or native_resolution(preset)
        entry = calibration.lookup(
            preset, resolution=resolution, mask_ratio=phase.mask_ratio, device=device
        )
        images = phase.steps * phase.batch_size
        phases.append(
            PhaseEstimate(
                name=phase.name,
                steps=phase.steps,
                batch_size=phase.batch_size,
                mask_ratio=phase.mask_ratio,
                resolution=resolution,
                images_per_s=entry.images_per_s,
                gpu_hours=images / entry.images_per_s / 3600,
                source=entry.source,
            )
        )
        keys.append((resolution, phase.mask_ratio, phase.steps, phase.batch_size))
    gpu_hours = sum(p.gpu_hours for p in phases)

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
