"""Calibration: measured training throughput (images/s per device) per preset, resolution, mask
ratio and device type, kept in the workspace's `calibration.json`. Estimates are built on it.

Sources, the most recent measurement winning over the built-in figures:

- `paper` (built in): MicroDiT-XL/2 on H100, derived from the paper's 504 H100-hours for its
  four-phase recipe (see `PAPER`): the 504 hours are split over the phases in proportion to their
  training FLOPs (images x FLOPs per image), i.e. the same utilization in every phase.
- `reference` (built in): the nano and micro presets on a CPU, from BENCHMARKS.md (a shared
  2-vCPU VM), so that a local launch has an estimate before anything is measured.
- `benchmark`: `calibrate_benchmark` times a few real training steps on this machine's device.
- `run:<name>`: `calibrate_from_run` reads a finished run's metrics.jsonl images_per_s.

The whole job, not only its training steps (`ActivityEntry`, the "activities" of
calibration.json): start-up, training wall clock per phase, checkpoint writes, sample grids, FID
evaluation and the job's own tail, per cluster, device, preset and token routing (training also
per resolution and mask ratio). `learn_from_run` fills them from a settled run: its ledger
segments' split by activity (budget_lab.ledger.sync) and its activity.jsonl, so that a sweep's
second trial is estimated from the first. A run is learned once (calibration.json's "learned"
names it, with its first segment's start): the sweep controller, `budget-lab cost sync` and
`launch --wait` may all see it settle, and it is averaged in only the first time. Until a run has measured them, a CPU has built-in
reference figures; other devices count them as zero (and the estimate says so).

    cal = Calibration.load(workspace)
    cal.lookup("MicroDiT-XL/2", resolution=256, mask_ratio=0.75, device="H100").images_per_s
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from budget_lab.errors import ConfigError, DataError
from budget_lab.io import atomic_write_json, read_jsonl
from budget_lab.rundir import RunDir, read_config, read_eval
from model.config import get_preset

__all__ = [
    "PAPER",
    "CalibrationEntry",
    "Calibration",
    "native_resolution",
    "device_of",
    "paper_entries",
    "builtin_entries",
    "calibrate_benchmark",
    "calibrate_from_run",
    "time_training_step",
    "ActivityEntry",
    "OVERHEAD_ACTIVITIES",
    "routing_key",
    "learn_from_run",
]

#: What an ActivityEntry of each activity measures (its `value`).
OVERHEAD_ACTIVITIES = {
    "startup": "seconds per segment (job start to the first training step)",
    "checkpoint": "seconds per checkpoint write",
    "sample_grid": "seconds per phase sample grid",
    "eval": "seconds per generated sample x sampler step (FID evaluation)",
    "other": "seconds per segment (the trainer's end to the segment's end)",
}
# A CPU's reference figures until a run measures its own (a 2-vCPU VM; BENCHMARKS.md).
_CPU_OVERHEAD_REFERENCE = {
    "startup": 12.0,
    "checkpoint": 0.3,
    "sample_grid": 2.0,
    "other": 1.0,
}
# FID evaluation on a CPU: one sampler step is about this many training steps' worth per image
# (Heun: two evaluations, each conditional + unconditional, forward only), plus a fixed cost.
_CPU_EVAL_STEP_PER_TRAIN_IMAGE = 1.3
_CPU_EVAL_FIXED_S = 5.0


@dataclass(frozen=True)
class _PaperFacts:
    preset: str
    device: str
    gpu_hours: float  # the whole recipe
    usd: float
    usd_per_gpu_hour: float
    # (resolution px, mask ratio, steps, global batch) of each phase of the recipe
    phases: tuple[tuple[int, float, int, int], ...]
    # MicroDiT-XL/2 training FLOPs per image (caption width 1024) at (resolution, mask ratio),
    # counted by model.summary.count_flops (torch's flop counter on the meta device)
    flops_per_image: dict[tuple[int, float], int]


#: The paper's recipe and cost (Sehwag et al. 2024: 2.6 days on 8xH100 at $3.75/H100-hour).
PAPER = _PaperFacts(
    preset="MicroDiT-XL/2",
    device="H100",
    gpu_hours=504.0,
    usd=1890.0,
    usd_per_gpu_hour=3.75,
    phases=(
        (256, 0.75, 250_000, 2048),
        (256, 0.0, 30_000, 2048),
        (512, 0.75, 50_000, 2048),
        (512, 0.0, 5_000, 2048),
    ),
    flops_per_image={
        (256, 0.75): 282_301_280_256,
        (256, 0.0): 714_411_061_248,
        (512, 0.75): 1_069_357_707_264,
        (512, 0.0): 3_002_772_467_712,
    },
)


@dataclass(frozen=True)
class CalibrationEntry:
    """One measured (or derived) training throughput."""

    preset: str  # model preset name (overrides are not told apart)
    resolution: int  # image side in pixels
    mask_ratio: float  # fraction of tokens dropped
    device: str  # GPU type as in clusters/*.yaml (e.g. "H100"), or "cpu"
    images_per_s: float  # training images per second on ONE device
    source: str  # "paper", "benchmark", "run:<name>", or "scaled from ..." (lookups only)
    measured_at: float | None = None  # epoch seconds; None for the paper
    batch_size: int | None = None  # per-device batch the measurement used, if known
    note: str = ""

    def matches(self, preset: str, resolution: int, mask_ratio: float, device: str) -> bool:
        return (
            self.preset == preset
            and self.resolution == resolution
            and abs(self.mask_ratio - mask_ratio) < 1e-6
            and _norm_device(self.device) == _norm_device(device)
        )


def _norm_device(device: str) -> str:
    return device.strip().lower()


#: (preset, mask ratio, images/s) of `bench/model_step.py` on a 2-vCPU x86_64 VM, fp32, batch 32,
#: 32 px (BENCHMARKS.md, 2026-11-23): a CPU starting point until `cost calibrate` measures yours.
_CPU_REFERENCE = (
    ("nano", 0.0, 101.3),
    ("nano", 0.5, 137.0),
    ("nano", 0.75, 165.9),
    ("micro", 0.0, 41.0),
    ("micro", 0.5, 46.0),
    ("micro", 0.75, 73.3),
)
_BUILTIN_SOURCES = ("paper", "reference")


def builtin_entries() -> list[CalibrationEntry]:
    """The paper's MicroDiT-XL/2 on H100 figures and the CPU reference figures."""
    cpu = [
        CalibrationEntry(
            preset=preset,
            resolution=32,
            mask_ratio=r,
            device="cpu",
            images_per_s=ips,
            source="reference",
            note="BENCHMARKS.md: bench/model_step.py, 2-vCPU VM, fp32, batch 32",
        )
        for preset, r, ips in _CPU_REFERENCE
    ]
    return [*paper_entries(), *cpu]


def _measured(e: CalibrationEntry) -> bool:
    return not e.source.startswith(_BUILTIN_SOURCES)


def paper_entries() -> list[CalibrationEntry]:
    """The built-in MicroDiT-XL/2 on H100 throughputs that reproduce the paper's 504 H100-hours."""
    flops = PAPER.flops_per_image
    total_flops = sum(steps * batch * flops[(res, r)] for res, r, steps, batch in PAPER.phases)
    per_device_flops_per_s = total_flops / (PAPER.gpu_hours * 3600)  # about 18% of H100 bf16 peak
    return [
        CalibrationEntry(
            preset=PAPER.preset,
            resolution=res,
            mask_ratio=r,
            device=PAPER.device,
            images_per_s=per_device_flops_per_s / flops[(res, r)],
            source="paper",
            note=f"504 H100-hours for the recipe, split by training FLOPs "
            f"({per_device_flops_per_s / 1e12:.0f} TFLOP/s per GPU)",
        )
        for res, r, _, _ in PAPER.phases
    ]


@cache
def native_resolution(preset: str) -> int:
    """The image side (pixels) a preset is configured for: latent grid x 8 (VAE) or x 1 (pixels)."""

    cfg = get_preset(preset)
    return cfg.input_size * (1 if cfg.in_channels == 3 else 8)


@cache
def _training_flops(preset: str, resolution: int, mask_ratio: float) -> int:
    from model.summary import count_flops  # torch: only for a preset not yet measured

    cfg = get_preset(preset)
    factor = 1 if cfg.in_channels == 3 else 8
    return count_flops(cfg, resolution // factor, mask_ratio).training


def device_of(cluster: Any) -> str:
    """The calibration device type of a cluster: its gpu_type, or "cpu" for a machine without."""
    gpu = getattr(cluster, "gpu_type", None)
    if not gpu or str(gpu).lower() in ("cpu", "none") or not getattr(cluster, "gpus_per_node", 1):
        return "cpu"
    return str(gpu)


@dataclass(frozen=True)
class ActivityEntry:
    """A measured cost of one activity of a job (see OVERHEAD_ACTIVITIES), or the training wall
    clock of one phase configuration ("train": images per second per device, everything in the
    train spans included: data waits, logging)."""

    cluster: str  # cluster name the run ran on
    device: str  # GPU type, or "cpu"
    preset: str  # model preset
    routing: str  # token routing (routing_key), "none" without
    activity: str  # startup | train | checkpoint | sample_grid | eval | other
    value: float  # see OVERHEAD_ACTIVITIES; train: images/s per device (wall clock)
    runs: int = 1  # settled runs averaged into `value`
    resolution: int | None = None  # train only
    mask_ratio: float | None = None  # train only
    source: str = ""  # "run:<name>" of the latest run averaged in
    measured_at: float | None = None

    def key(self) -> tuple[Any, ...]:
        ratio = None if self.mask_ratio is None else round(self.mask_ratio, 6)
        return (
            self.cluster,
            _norm_device(self.device),
            self.preset,
            self.routing,
            self.activity,
            self.resolution,
            ratio,
        )


def routing_key(model: Any) -> str:
    """The token routing of a run's `model` config (dict), as a calibration key."""
    routes = (model or {}).get("routes") if isinstance(model, dict) else None
    if not routes:
        return "none"
    return json.dumps(routes, sort_keys=True, default=str)


@dataclass
class Calibration:
    """The calibration entries of a workspace (plus the built-in paper ones)."""

    path: Path | None = None
    entries: list[CalibrationEntry] = field(default_factory=list)
    activities: list[ActivityEntry] = field(default_factory=list)
    # The settled runs averaged into `activities` ("<run>@<first segment start>" -> when).
    learned: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, workspace_or_path: Any) -> Calibration:
        path = Path(getattr(workspace_or_path, "calibration_path", workspace_or_path))
        entries, activities, learned = [], [], {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                entries = [CalibrationEntry(**e) for e in data.get("entries", [])]
                activities = [ActivityEntry(**e) for e in data.get("activities", [])]
                learned = {str(k): float(v) for k, v in dict(data.get("learned", {})).items()}
            except (ValueError, TypeError) as err:
                raise DataError(
                    f"{path} is not a valid calibration file ({err}); fix or delete it (it is "
                    "rebuilt by `budget-lab cost calibrate`)"
                ) from None
        return cls(path=path, entries=entries, activities=activities, learned=learned)

    def all_entries(self) -> list[CalibrationEntry]:
        return [*builtin_entries(), *self.entries]

    def record(self, *entries: CalibrationEntry) -> None:
        """Add measurements (each replacing one from the same source for the same key); one save."""
        for entry in entries:
            self.entries = [
                e
                for e in self.entries
                if not (
                    e.source == entry.source
                    and e.matches(entry.preset, entry.resolution, entry.mask_ratio, entry.device)
                )
            ]
            self.entries.append(entry)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(
                self.path,
                {
                    "version": 1,
                    "entries": [asdict(e) for e in self.entries],
                    "activities": [asdict(e) for e in self.activities],
                    "learned": self.learned,
                },
            )

    def learn(self, *entries: ActivityEntry, keep: int = 3, run: str | None = None) -> None:
        """Average measurements into the activity entries (one save). The newest run weighs as
        much as up to `keep` earlier ones together, so the figure follows a drifting machine.
        `run`: the run's key (`learned`), recorded so that it is never averaged in twice."""
        if run is not None:
            self.learned[run] = time.time()
        by_key = {e.key(): e for e in self.activities}
        for new in entries:
            old = by_key.get(new.key())
            if old is not None:
                weight = min(old.runs, keep)
                value = (old.value * weight + new.value) / (weight + 1)
                new = ActivityEntry(**{**asdict(new), "value": value, "runs": old.runs + 1})
            by_key[new.key()] = new
        self.activities = list(by_key.values())
        self.save()

    def activity(
        self,
        activity: str,
        *,
        cluster: str,
        device: str,
        preset: str,
        routing: str,
        resolution: int | None = None,
        mask_ratio: float | None = None,
    ) -> ActivityEntry | None:
        """The measured figure for this key: this cluster's, else the same device's on another
        cluster (the newest), else None."""
        want = (_norm_device(device), preset, routing, activity, resolution)
        ratio = None if mask_ratio is None else round(mask_ratio, 6)
        found = [e for e in self.activities if e.key()[1:6] == want and e.key()[6] == ratio]
        if not found:
            return None
        return max(found, key=lambda e: (e.cluster == cluster, e.measured_at or 0.0))

    def overhead_seconds(
        self,
        activity: str,
        *,
        cluster: str,
        device: str,
        preset: str,
        routing: str,
        train_images_per_s: float,
    ) -> tuple[float, str]:
        """(seconds per unit, source) of an overhead activity: measured, else a CPU's reference
        figure, else (0, "not calibrated"). Eval: seconds per sample x sampler step, with its
        fixed part spread over a 100-sample, 16-step FID in the CPU reference."""
        entry = self.activity(
            activity, cluster=cluster, device=device, preset=preset, routing=routing
        )
        if entry is not None:
            return entry.value, entry.source
        if _norm_device(device) != "cpu":
            return 0.0, "not calibrated"
        if activity == "eval":
            per = _CPU_EVAL_STEP_PER_TRAIN_IMAGE / max(train_images_per_s, 1e-9)
            return per + _CPU_EVAL_FIXED_S / (100 * 16), "reference"
        return _CPU_OVERHEAD_REFERENCE.get(activity, 0.0), "reference"

    def lookup(
        self, preset: str, *, resolution: int | None, mask_ratio: float, device: str
    ) -> CalibrationEntry:
        """The throughput for this key: the newest measurement, else a built-in figure, else one
        of the same preset and device scaled by training FLOPs. ConfigError when there is none."""
        resolution = resolution or native_resolution(preset)
        candidates = [
            e for e in self.all_entries() if e.matches(preset, resolution, mask_ratio, device)
        ]
        if candidates:
            return max(candidates, key=lambda e: (_measured(e), e.measured_at or 0.0))
        same = [
            e
            for e in self.all_entries()
            if e.preset == preset and _norm_device(e.device) == _norm_device(device)
        ]
        if same:
            # Prefer a measurement at the same resolution, then the same mask ratio, then newest.
            base = max(
                same,
                key=lambda e: (
                    e.resolution == resolution,
                    abs(e.mask_ratio - mask_ratio) < 1e-6,
                    _measured(e),
                    e.measured_at or 0.0,
                ),
            )
            ratio = _training_flops(preset, base.resolution, base.mask_ratio) / _training_flops(
                preset, resolution, mask_ratio
            )
            return CalibrationEntry(
                preset=preset,
                resolution=resolution,
                mask_ratio=mask_ratio,
                device=device,
                images_per_s=base.images_per_s * ratio,
                source=f"scaled from {base.source} ({base.resolution}px r={base.mask_ratio:g}) by FLOPs",
                measured_at=base.measured_at,
            )
        known = sorted({f"{e.preset} on {e.device}" for e in self.all_entries()})
        raise ConfigError(
            f"no throughput calibration for {preset} on {device!r} (known: {', '.join(known)}). "
            f"Measure it on that device with `budget-lab cost calibrate --preset {preset} "
            f"--mask-ratio {mask_ratio:g}`, or from a finished run there with `budget-lab cost "
            "calibrate --from-run RUN`"
        )


# -- measuring ------------------------------------------------------------------------------------


def time_training_step(
    preset: str,
    *,
    resolution: int | None = None,
    mask_ratio: float = 0.0,
    batch: int = 8,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
    seed: int = 0,
    model_cfg: Any = None,
    dtype: Any = None,
    compile_model: bool = False,
) -> float:
    """Median seconds of one full training step (EDM loss, backward, AdamW) of a preset (or of
    `model_cfg`, a MicroDiTConfig, e.g. with routes) on one device: fp32 on CPU, bf16 autocast on
    a GPU (or `dtype`), the model through torch.compile with `compile_model`. Random inputs: only
    the speed is measured. The benchmarks (bench/model_step.py) time with this one too."""
    # torch and the model: imported by what measures (a benchmark), not by what estimates
    import torch

    from model.edm import EDMPrecond, edm_loss
    from model.microdit import MicroDiT

    cfg = model_cfg if model_cfg is not None else get_preset(preset)
    factor = 1 if cfg.in_channels == 3 else 8
    size = (resolution // factor) if resolution else cfg.input_size
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    net = MicroDiT(cfg).to(dev)
    precond = EDMPrecond(net, sigma_data=0.5)
    step_fn = torch.compile(precond) if compile_model else precond
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    y = torch.randn(batch, cfg.in_channels, size, size, device=dev)
    captions = torch.randn(batch, cfg.caption_len, cfg.caption_dim, device=dev)
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = edm_loss(step_fn, y, captions, mask_ratio=mask_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate_benchmark(
    workspace: Any,
    preset: str,
    *,
    mask_ratio: float,
    resolution: int | None = None,
    device_type: str | None = None,
    batch: int = 8,
    steps: int = 5,
    warmup: int = 2,
) -> CalibrationEntry:
    """Time a short benchmark of `preset` on this machine's device and record it in the
    workspace's calibration.json. `device_type` names the device as clusters/*.yaml do (default:
    "cpu", or the GPU's name with "NVIDIA " dropped)."""
    import torch

    if device_type is None:
        if torch.cuda.is_available():
            device_type = torch.cuda.get_device_name(0).removeprefix("NVIDIA ").split()[0]
        else:
            device_type = "cpu"
    seconds = time_training_step(
        preset,
        resolution=resolution,
        mask_ratio=mask_ratio,
        batch=batch,
        steps=steps,
        warmup=warmup,
    )
    entry = CalibrationEntry(
        preset=preset,
        resolution=resolution or native_resolution(preset),
        mask_ratio=mask_ratio,
        device=device_type,
        images_per_s=batch / seconds,
        source="benchmark",
        measured_at=time.time(),
        batch_size=batch,
        note=f"median of {steps} steps after {warmup} warm-up, batch {batch}",
    )
    Calibration.load(workspace).record(entry)
    return entry


def calibrate_from_run(
    workspace: Any,
    run_dir: str | os.PathLike[str],
    *,
    device_type: str,
    devices: int = 1,
) -> list[CalibrationEntry]:
    """Record the throughput a finished run measured (metrics.jsonl images_per_s, median per
    phase, the first row of each segment left out as warm-up), divided by its `devices`."""
    run = Path(run_dir)
    cfg = read_config(run)
    if cfg is None:
        raise DataError(
            f"{run} holds no run (no run config): pass a run folder (workspace/runs/<run>)"
        )
    preset = str(cfg["model"]["preset"])
    phases = {p["name"]: p for p in cfg.get("phases", [])}
    rows: dict[str, list[float]] = {}
    first_seen: set[Any] = set()
    metrics = RunDir(run).metrics
    for row in read_jsonl(metrics):
        segment = (row.get("segment"), row.get("phase"))
        if segment not in first_seen:  # warm-up (compilation, data loader start) in this window
            first_seen.add(segment)
            continue
        if row.get("phase") in phases and row.get("images_per_s"):
            rows.setdefault(row["phase"], []).append(float(row["images_per_s"]))
    if not rows:
        raise DataError(
            f"{metrics} has no throughput rows past warm-up: let the run log at least two rows "
            "per phase (log_every) before calibrating from it"
        )
    cal = Calibration.load(workspace)
    out = []
    for name, values in rows.items():
        phase = phases[name]
        entry = CalibrationEntry(
            preset=preset,
            resolution=phase.get("resolution") or native_resolution(preset),
            mask_ratio=float(phase.get("mask_ratio", 0.0)),
            device=device_type,
            images_per_s=statistics.median(values) / max(devices, 1),
            source=f"run:{run.name}",
            measured_at=time.time(),
            note=f"median of {len(values)} metrics rows of phase {name} over {devices} device(s)",
        )
        out.append(entry)
    cal.record(*out)
    return out


# -- learning from the ledger -------------------------------------------------------------------


def learn_from_run(
    workspace: Any,
    run_dir: str | os.PathLike[str],
    cluster: Any,
    ledger: Any,
) -> list[ActivityEntry]:
    """Update the workspace's activity calibration from one settled run: the seconds its ledger
    segments spent in each activity (their split, budget_lab.ledger.sync) over how many times
    that activity happened (activity.jsonl), and the training wall clock of each phase (train
    seconds over the images trained, metrics.jsonl). Returns the new measurements (none for a
    run that never reached a training step, or one learned before: call it once the run is
    settled; calling it again is a no-op that reads only the ledger and calibration.json)."""
    run = Path(run_dir)
    if not RunDir(run).config.is_file():
        return []
    segments = ledger.segments(run=run.name, with_parts=True)
    if not segments or not any(s.parts for s in segments):
        return []
    # The run's key: a later run of the same name (a new folder) starts at another time.
    run_key = f"{run.name}@{min(s.start for s in segments):.3f}"
    calibration = Calibration.load(workspace)
    if run_key in calibration.learned:
        return []
    cfg = read_config(run) or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("preset"):
        return []  # not a run config budget-lab wrote: nothing to learn from
    preset = str(model["preset"])
    routing = routing_key(model)
    device = device_of(cluster)
    seconds: dict[tuple[str, str | None], float] = {}
    gpus = max(max(s.gpus for s in segments), 1)
    for seg in segments:
        for part in seg.parts:
            key = (part.activity, part.phase)
            seconds[key] = seconds.get(key, 0.0) + part.seconds
    rows = read_jsonl(RunDir(run).activity)
    count: dict[str, int] = {}
    for r in rows:
        count[str(r.get("activity"))] = count.get(str(r.get("activity")), 0) + 1
    eval_units = _eval_units(run)
    now = time.time()
    base = dict(cluster=str(cluster.name), device=device, preset=preset, routing=routing)
    out: list[ActivityEntry] = []
    source = f"run:{run.name}"

    def total(activity: str) -> float:
        return sum(v for (a, _), v in seconds.items() if a == activity)

    per_segment = {"startup": len(segments), "other": len(segments)}
    for activity in ("startup", "checkpoint", "sample_grid", "other"):
        n = per_segment.get(activity, count.get(activity, 0))
        if n and total(activity) > 0:
            out.append(
                ActivityEntry(
                    **base,
                    activity=activity,
                    value=total(activity) / n,
                    source=source,
                    measured_at=now,
                )
            )
    if eval_units and total("eval") > 0:
        out.append(
            ActivityEntry(
                **base,
                activity="eval",
                value=total("eval") / eval_units,
                source=source,
                measured_at=now,
            )
        )
    # Training wall clock per phase: images trained over train seconds x devices.
    phases = {p["name"]: p for p in cfg.get("phases", [])}
    steps: dict[str, int] = {}
    for r in read_jsonl(RunDir(run).metrics):
        name = r.get("phase")
        if name in phases and isinstance(r.get("phase_step"), int):
            steps[name] = max(steps.get(name, 0), r["phase_step"])
    for name, done in steps.items():
        train_s = seconds.get(("train", name), 0.0)
        if done <= 0 or train_s <= 0:
            continue
        phase = phases[name]
        images = done * int(phase.get("batch_size") or 1)
        out.append(
            ActivityEntry(
                **base,
                activity="train",
                value=images / (train_s * gpus),
                resolution=int(phase.get("resolution") or native_resolution(preset)),
                mask_ratio=float(phase.get("mask_ratio", 0.0)),
                source=source,
                measured_at=now,
            )
        )
    calibration.learn(*out, run=run_key)
    return out


def _eval_units(run: Path) -> int:
    """Generated samples x sampler steps of every FID the run measured (rungs and final)."""
    final = read_eval(run) or {}
    steps = int(final.get("sampler_steps") or 0)
    units = int(final.get("num_samples") or 0) * steps
    for r in read_jsonl(RunDir(run).rungs):
        units += int(r.get("num_samples") or 0) * int(r.get("sampler_steps") or steps)
    return units
