"""The phased MicroDiT trainer: accelerate for devices, exact resume, nothing lost on a crash.

A run folder holds:
  config.yaml      the resolved configuration (YAML < CLI overrides), written once
  metrics.jsonl    append-only: step, phase, loss, images/s, lr, wall clock (one row per log_every)
  checkpoints/     atomic checkpoints (model, EMA, optimizer, scheduler, data position, RNG states)
  samples/         a sample grid (PNG) at the end of each phase, from the EMA weights
  result.json      status (running / completed / failed / interrupted) and the final figures

Resume is exact: the checkpoint holds every source of randomness and the data position, so on a
CPU an interrupted-and-resumed run ends with weights bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from budget_lab.config import (
    RunConfig,
    edm_config,
    model_config,
    run_config_from_dict,
    run_config_to_dict,
)
from budget_lab.config.schema import PhaseConfig
from budget_lab.errors import ConfigError, DataError, TrainingError, UserError
from budget_lab.io import atomic_write_json, atomic_write_text, yaml_dump, yaml_load
from budget_lab.launch.activity import ActivityLog
from budget_lab.rundir import STOP_FILE, StopRequest, read_stop, request_stop_file
from budget_lab.train.checkpoint import CheckpointStore
from model.edm import EDMConfig, EDMPrecond, edm_loss
from model.microdit import BatchRandom, MicroDiT, batch_draw

__all__ = ["Trainer", "read_result", "lr_factor", "request_stop_file", "STOP_FILE"]

_RESULT = "result.json"


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


def read_result(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(run_dir) / _RESULT
    return json.loads(path.read_text()) if path.is_file() else None


class Trainer:
    """Runs the phases of a `RunConfig` in `run_dir`, resuming from its latest checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike[str],
        progress: bool = True,
        stop_at_step: int | None = None,
        cost_fn: Callable[[], dict[str, float]] | None = None,
        step_callback: Callable[[dict[str, Any]], None] | None = None,
        stop_after_phase: int | None = None,
        activity: ActivityLog | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        # Test and tooling hook: behave as if a stop signal arrived after this global step.
        self.stop_at_step = stop_at_step
        # Set by the job wrapper: returns the run's spend so far ({"cost_usd", "gpu_hours"},
        # previous segments included) so metrics and W&B carry cost as a monotonic axis.
        self.cost_fn = cost_fn
        self._cost_warned = False
        # Called after every optimizer step (after any checkpoint) with {"state", "phase",
        # "phase_done", "last_phase", "model" (EMA weights if any), "device"}: sweep jobs use it to
        # measure FID at dollar rungs. Main process only.
        self.step_callback = step_callback
        # Phases as separate (dependent) jobs: end with status "phase-completed" after this phase.
        self.stop_after_phase = stop_after_phase
        # Set by a job whose phases end at a dollar figure (`lr_factor`'s budget_progress) after
        # each step, for the current phase; None: the schedule follows the step count alone.
        self.budget_progress: float | None = None
        # The run's own clock (activity.jsonl): startup, train, checkpoint, sample_grid, idle
        # spans. The job wrapper passes its own (opened at the segment's start, shared with its
        # evals); otherwise the trainer keeps one from run() on and closes it when it returns.
        self.activity = activity
        self._own_activity = activity is None
        self.model_cfg = model_config(cfg)
        self.edm_cfg: EDMConfig = edm_config(cfg)
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self._checkpoint_requested = threading.Event()
        self._phase_end_requested = threading.Event()
        self._stop_requested = threading.Event()
        # Only the main process writes the run folder (result.json, config.yaml); set again from
        # accelerate once it runs, from torch.distributed's RANK before.
        self._main = int(os.environ.get("RANK", "0")) == 0

    # -- requests from signals or a job wrapper (submitit's checkpoint()) ----------------------------

    def request_checkpoint(self) -> None:
        """Save a checkpoint at the next step boundary and go on."""
        self._checkpoint_requested.set()

    def request_phase_end(self) -> None:
        """End the current phase at the next step boundary (it counts as done; the next phase
        starts). Sweep trials with a dollar budget per phase use it."""
        self._phase_end_requested.set()

    def request_stop(self) -> None:
        """Save a checkpoint at the next step boundary and stop (status 'interrupted')."""
        self._stop_requested.set()

    # -- run folder ----------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_config_to_dict(self.cfg)
        path = self.run_dir / "config.yaml"
        if path.is_file():
            saved = yaml_load(path.read_text())
            if isinstance(saved, dict) and saved != resolved:  # fields added since: defaults
                with contextlib.suppress(ConfigError):
                    saved = run_config_to_dict(run_config_from_dict(saved))
            if saved != resolved:
                diff = sorted(
                    k for k in set(saved) | set(resolved) if saved.get(k) != resolved.get(k)
                )
                raise ConfigError(
                    f"{self.run_dir} already holds a run with a different configuration (differs in: "
                    f"{', '.join(diff)}); resume it with the same recipe and overrides, or use a new "
                    "--run-dir"
                )
        elif self._main:
            atomic_write_text(path, yaml_dump(resolved))

    def _result(self, **fields: Any) -> dict[str, Any]:
        result = read_result(self.run_dir) or {}
        result.update(fields, run_dir=str(self.run_dir), updated_at=time.time())
        if self._main:
            atomic_write_json(self.run_dir / _RESULT, result)
        return result

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train every phase (resuming if the run folder has a checkpoint). Returns result.json."""
        from accelerate import Accelerator

        cfg = self.cfg
        self._prepare_run_dir()
        if self.activity is None:
            self.activity = ActivityLog(self.run_dir, None)
        stop = read_stop(self.run_dir)
        if stop is not None:  # cut before it started (or while queued)
            return self._result(status="cut", **stop.result_fields())
        use_gpu = torch.cuda.is_available()
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if use_gpu else "no"
        accelerator = Accelerator(mixed_precision=precision, cpu=not use_gpu)
        device = accelerator.device
        main = self._main = accelerator.is_main_process
        activity = self.activity
        activity.enabled = activity.enabled and main

        # Model, EMA and the noise generator; everything random is seeded from cfg.seed.
        torch.manual_seed(cfg.seed)
        net = MicroDiT(self.model_cfg)
        ema = None
        if cfg.optim.ema_decay > 0:
            ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay))
        net = net.to(device)
        if ema is not None:
            ema = ema.to(device)
        # The same noise generator on every rank: each draws the noise of the whole global batch
        # and keeps its samples' rows (`BatchRandom`), so a run is the same on any world size.
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed * 1000)

        state = {
            "phase": 0,
            "phase_step": 0,
            "global_step": 0,
            "images_seen": 0,
            "train_seconds": 0.0,
        }
        phase_states: dict[str, Any] | None = None
        if main:  # what a save killed mid-write left (a checkpoint's size each)
            self.store.remove_temp_files()
        try:
            loaded = self.store.load_latest(map_location="cpu")
        except Exception as err:  # unreadable or refused: say so in result.json, start nothing
            error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            self._result(status="failed", error=error)
            raise
        segment = 0
        if loaded is not None:
            ckpt, ckpt_path = loaded
            net.load_state_dict(ckpt["model"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            gen.set_state(ckpt["rng"]["gen"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if use_gpu and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            state.update({k: ckpt[k] for k in state})
            phase_states = ckpt.get("phase_states")
            segment = ckpt.get("segment", 0) + 1
            if main:
                print(
                    f"resuming {self.run_dir.name} from {ckpt_path.name} "
                    f"(phase {state['phase']}, step {state['global_step']})",
                    flush=True,
                )
                saved_world = ckpt.get("world_size", 1)
                if saved_world != accelerator.num_processes:
                    print(
                        _world_size_change_note(saved_world, accelerator.num_processes), flush=True
                    )
        if state["phase"] < len(cfg.phases):
            activity.set_phase(cfg.phases[state["phase"]].name)
        self._result(status="running", segment=segment, started_at=time.time())

        # From here on, whatever happens ends in result.json (completed, failed, ...).
        status = "completed"
        cut: StopRequest | None = None  # the STOP request this run obeys, once it saw one
        wandb_run = None
        old_handlers: dict[int, Any] = {}
        metrics_file = None
        bar = None
        try:
            precond = EDMPrecond(net, self.edm_cfg.sigma_data)
            # FSDP: sharded after the (full) checkpoint is loaded; DDP: accelerate wraps it.
            fsdp = cfg.distributed.strategy == "fsdp" and accelerator.num_processes > 1
            if fsdp:
                _fsdp_shard(net, ema)
            else:
                precond = accelerator.prepare_model(precond)
            step_fn = torch.compile(precond) if cfg.compile else precond
            moe_names = set(net.moe_parameter_names())
            total_steps = sum(p.steps for p in cfg.phases)

            wandb_run = self._init_wandb(segment) if (cfg.wandb.enabled and main) else None
            old_handlers = self._install_signal_handlers()
            metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
            if main and self.progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total_steps,
                    initial=state["global_step"],
                    unit="step",
                    dynamic_ncols=True,
                )
            if self.stop_after_phase is not None and state["phase"] > self.stop_after_phase:
                return self._result(  # this phase's job ran already (e.g. a requeued duplicate)
                    status="phase-completed", completed_phase=self.stop_after_phase, **state
                )
            for phase_idx in range(state["phase"], len(cfg.phases)):
                phase = cfg.phases[phase_idx]
                if phase_idx != state["phase"]:
                    state.update(phase=phase_idx, phase_step=0)
                    phase_states = None
                world = accelerator.num_processes
                micro = phase.micro_batch_size or max(phase.batch_size // world, 1)
                if phase.batch_size % (micro * world):
                    raise ConfigError(
                        f"phases[{phase.name}].batch_size={phase.batch_size} is not a multiple of "
                        f"micro_batch_size x devices = {micro} x {world}; pick a batch size that is"
                    )
                accum = phase.batch_size // (micro * world)
                saved_loader = phase_states["loader"] if phase_states is not None else None
                loader = self._loader(phase, micro, accelerator, saved_loader)

                # Fresh AdamW per phase (its own learning rate); MoE parameters at their own scale,
                # no weight decay on norms and biases.
                groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
                for name, p in net.named_parameters():
                    groups.setdefault((name in moe_names, p.ndim >= 2), []).append(p)
                param_groups = [
                    {
                        "params": ps,
                        "lr": phase.lr * (cfg.optim.moe_lr_scale if moe else 1.0),
                        "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                    }
                    for (moe, decay), ps in sorted(groups.items())
                ]
                optimizer = torch.optim.AdamW(
                    param_groups,
                    betas=(cfg.optim.beta1, cfg.optim.beta2),
                    eps=cfg.optim.eps,
                    foreach=True,
                )
                self.budget_progress = None  # the job sets it again after this phase's steps
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda s, ph=phase: lr_factor(ph, s, self.budget_progress)
                )
                if phase_states is not None:
                    saved_optim = phase_states["optimizer"]
                    if fsdp:  # the full state, cut into this rank's shards
                        saved_optim = _shard_optimizer_state(saved_optim, optimizer)
                    optimizer.load_state_dict(saved_optim)
                    scheduler.load_state_dict(phase_states["scheduler"])
                    # Exact unless the lanes had to change with the world size (then the loader
                    # warns that it resumes at the same fraction of the epoch).
                    exact = phase_states["loader"].get("lanes") == loader.lanes
                    loader.load_state_dict(phase_states["loader"], strict=exact)
                optimizer = accelerator.prepare_optimizer(optimizer)
                P_mean = self.edm_cfg.P_mean if phase.P_mean is None else phase.P_mean
                P_std = self.edm_cfg.P_std if phase.P_std is None else phase.P_std

                def save(
                    phase=phase, optimizer=optimizer, scheduler=scheduler, loader=loader
                ) -> Path | None:
                    accelerator.wait_for_everyone()
                    with activity.during("checkpoint"):
                        parts = {
                            "model": accelerator.unwrap_model(precond).net.state_dict(),
                            "ema": ema.state_dict() if ema is not None else None,
                            "optimizer": optimizer.state_dict(),
                        }
                        if fsdp:  # the full state, shard by shard (every rank takes part)
                            parts = _gather_full(parts, keep=main)
                        path = write_checkpoint(phase, parts, scheduler, loader) if main else None
                    accelerator.wait_for_everyone()  # no rank goes on before it is on disk
                    return path

                def write_checkpoint(phase, parts, scheduler, loader) -> Path:
                    path = self.store.save(
                        state["global_step"],
                        {
                            "version": 1,
                            "model": parts["model"],
                            "ema": parts["ema"],
                            "phase_states": {
                                "optimizer": parts["optimizer"],
                                "scheduler": scheduler.state_dict(),
                                "loader": loader.state_dict(),
                            },
                            "rng": {
                                "gen": gen.get_state(),
                                "torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state() if use_gpu else None,
                            },
                            "segment": segment,
                            "phase_name": phase.name,
                            "world_size": accelerator.num_processes,
                            **state,
                        },
                    )
                    # What the ledger needs to price work lost at a preemption.
                    with open(self.run_dir / "checkpoints.jsonl", "a") as f:
                        row = {
                            "step": state["global_step"],
                            "phase": phase.name,
                            "segment": segment,
                            "time": time.time(),
                            "path": str(path),
                        }
                        f.write(json.dumps(row) + "\n")
                    return path

                batches = iter(loader)
                window_loss, window_steps, window_time = 0.0, 0, 0.0
                if activity.activity != "idle":
                    activity.switch("train", phase.name)
                while state["phase_step"] < phase.steps:
                    t0 = time.perf_counter()
                    step_loss = 0.0
                    step_rng = gen.get_state()
                    for micro_idx in range(accum):
                        batch = next(batches)
                        y = batch["latents"].to(device, non_blocking=True)
                        captions = batch["captions"].to(device, non_blocking=True)
                        caption_mask = batch["caption_mask"].to(device, non_blocking=True)
                        # Every micro-batch of every rank draws the step's noise for the whole
                        # global batch and keeps its rows (the samples' places in the step).
                        gen.set_state(step_rng)
                        rows = (batch["index"] % phase.batch_size).to(device)
                        draws = BatchRandom(gen, rows, phase.batch_size)
                        # Caption dropout for classifier-free guidance: zeroed embeddings.
                        if cfg.optim.caption_dropout > 0:
                            drop = (
                                batch_draw(torch.rand, (y.shape[0],), device, draws)
                                < cfg.optim.caption_dropout
                            )
                            captions = captions * (~drop).view(-1, 1, 1).to(captions.dtype)
                        sync = micro_idx == accum - 1
                        ctx = accelerator.no_sync(precond) if not sync else contextlib.nullcontext()
                        if fsdp:  # reduce-scatter the gradients at the last micro-batch only
                            net.set_requires_gradient_sync(sync)
                        with ctx, accelerator.autocast():
                            loss = edm_loss(
                                step_fn,
                                y,
                                captions,
                                caption_mask,
                                phase.mask_ratio,
                                P_mean,
                                P_std,
                                draws,
                            )
                        accelerator.backward(loss / accum)
                        step_loss += loss.detach().float().item() / accum
                    if not math.isfinite(step_loss):
                        raise TrainingError(
                            f"non-finite loss ({step_loss}) at phase {phase.name!r}, step "
                            f"{state['phase_step']} (global {state['global_step']}): the run is stopped "
                            f"and nothing was saved from this step. Last good checkpoint: "
                            f"{self.store.latest_path() or 'none'}. Lower phases[{phase.name}].lr or "
                            "optim.grad_clip, or check the data"
                        )
                    if cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update_parameters(net)
                    state["phase_step"] += 1
                    state["global_step"] += 1
                    images = phase.batch_size
                    state["images_seen"] += images
                    dt = time.perf_counter() - t0
                    state["train_seconds"] += dt
                    window_loss += step_loss
                    window_steps += 1
                    window_time += dt

                    if (
                        state["global_step"] % cfg.log_every == 0
                        or state["phase_step"] == phase.steps
                    ):
                        if accelerator.num_processes > 1:  # the loss of the global batch
                            window_loss = accelerator.reduce(
                                torch.tensor(window_loss, device=device), reduction="mean"
                            ).item()
                        row = {
                            "step": state["global_step"],
                            "phase": phase.name,
                            "phase_step": state["phase_step"],
                            "loss": window_loss / window_steps,
                            "images_per_s": window_steps * images / max(window_time, 1e-9),
                            "lr": scheduler.get_last_lr()[0],
                            "mask_ratio": phase.mask_ratio,
                            "images_seen": state["images_seen"],
                            "train_seconds": state["train_seconds"],
                            "segment": segment,
                            "time": time.time(),
                        }
                        if self.cost_fn is not None:
                            row.update(self._cost())
                        if metrics_file is not None:
                            metrics_file.write(json.dumps(row) + "\n")
                            metrics_file.flush()
                        if wandb_run is not None:
                            # No explicit step: after a requeue the global step repeats the
                            # steps lost since the checkpoint, and W&B would drop those rows.
                            wandb_run.log(
                                {f"train/{k}": v for k, v in row.items() if k != "phase"}
                                | {"train/phase_index": phase_idx}
                            )
                        if bar is not None:
                            bar.set_postfix_str(
                                f"{phase.name} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s"
                            )
                        window_loss, window_steps, window_time = 0.0, 0, 0.0
                    if bar is not None:
                        bar.update(1)

                    if self.stop_at_step is not None and state["global_step"] >= self.stop_at_step:
                        self._stop_requested.set()
                    stop_file = self.run_dir / STOP_FILE
                    if cut is None and stop_file.is_file():
                        cut = read_stop(self.run_dir)
                        self._stop_requested.set()
                        activity.switch("idle")  # what follows buys nothing: the run is cut
                    if accelerator.num_processes > 1:
                        # A signal reaches one rank (submitit checkpoints on rank 0 only): every
                        # rank must save and stop at the same step, so agree on the flags.
                        self._sync_requests(accelerator)
                        if cut is None and self._stop_requested.is_set():
                            # Another rank saw STOP first: this one ends "cut" with it too.
                            if stop_file.is_file():
                                cut = read_stop(self.run_dir)
                                activity.switch("idle")
                    if self._phase_end_requested.is_set() and phase_idx < len(cfg.phases) - 1:
                        self._phase_end_requested.clear()
                        state["phase_step"] = phase.steps  # ended early: the phase counts as done
                    at_interval = state["global_step"] % cfg.checkpoint.every == 0
                    phase_done = state["phase_step"] == phase.steps
                    if (
                        at_interval
                        or phase_done
                        or self._checkpoint_requested.is_set()
                        or self._stop_requested.is_set()
                    ):
                        save()
                        self._checkpoint_requested.clear()
                    if self.step_callback is not None and main:
                        self.step_callback(
                            {
                                "state": dict(state),
                                "phase": phase,
                                "phase_index": phase_idx,
                                "phase_done": phase_done,
                                "last_phase": phase_idx == len(cfg.phases) - 1,
                                "model": ema.module if ema is not None else net,
                                "device": device,
                            }
                        )
                    if self._stop_requested.is_set() and not (
                        phase_done and phase_idx == len(cfg.phases) - 1
                    ):
                        status = "interrupted" if cut is None else "cut"
                        extra = {} if cut is None else cut.result_fields()
                        return self._result(status=status, **extra, **state)

                # End of phase: a sample grid from the EMA weights (cosmetic: never fails a run).
                if (main or fsdp) and cfg.eval.grid_size > 0:
                    grid_net = ema.module if ema is not None else net
                    if fsdp:  # rank 0 samples from a whole copy (every rank takes part)
                        whole = _gather_full(grid_net.state_dict(), keep=main)
                        grid_net = MicroDiT(self.model_cfg).to(device) if main else None
                        if grid_net is not None:
                            grid_net.load_state_dict(whole)
                    if main:
                        with activity.during("sample_grid", phase.name):
                            self._sample_grid(grid_net, phase, device)
                phase_states = None
                if self.stop_after_phase is not None and phase_idx < len(cfg.phases) - 1:
                    if phase_idx >= self.stop_after_phase:  # the next phase is another job's
                        return self._result(
                            status="phase-completed", completed_phase=phase_idx, **state
                        )
            return self._result(status=status, **state, phases=[asdict(p) for p in cfg.phases])
        except BaseException as err:
            error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            self._result(status="failed", error=error, **state)
            raise
        finally:
            if self._own_activity:
                activity.close()
            else:  # the job goes on (final FID, end row): its own spans from here
                activity.switch("other")
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            self._restore_signal_handlers(old_handlers)
            if wandb_run is not None:
                wandb_run.finish()  # a SafeRun: never raises

    # -- pieces ------------------------------------------------------------------------------------------

    def _loader(self, phase: PhaseConfig, micro: int, accelerator, saved: dict | None = None):
        """The phase's loader. Its lanes: data.lanes, else the checkpoint's when they fit this
        world size (so the data order carries over exactly), else world size x workers."""
        from budget_lab.data.loader import ShardLoader

        data_dir = Path(self.cfg.data.path)
        if not (data_dir / "manifest.json").is_file():
            raise DataError(
                f"no prepared data at data.path={str(data_dir)!r} (no manifest.json). Make it with "
                "`budget-lab data synth --out data/synth && budget-lab data prepare --images "
                "data/synth --out data/synth-latents --vae pixel --text-encoder minilm`, or set "
                "data.path=FOLDER"
            )
        world, workers = accelerator.num_processes, max(self.cfg.data.num_workers, 1)
        lanes = self.cfg.data.lanes
        if lanes is None and saved is not None:
            old = saved.get("lanes")
            if old and old % (world * workers) == 0 and (micro * world) % old == 0:
                lanes = old
        return ShardLoader(
            data_dir,
            split="train",
            lanes=lanes if lanes is not None else world * workers,
            global_batch=phase.batch_size,
            resolution=phase.resolution,
            batch_size=micro,
            seed=self.cfg.seed * 1000 + self.cfg.phases.index(phase),
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            num_workers=self.cfg.data.num_workers,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            expect={
                "latent_channels": self.model_cfg.in_channels,
                "caption_dim": self.model_cfg.caption_dim,
            },
            pin_memory=accelerator.device.type == "cuda",
        )

    def _sample_grid(self, net: MicroDiT, phase: PhaseConfig, device: torch.device) -> None:
        """The phase's sample grid; any failure (a validation split smaller than the grid, no
        split at all, a full disk) is a warning, never a failed run."""
        from budget_lab.eval.sampling import sample_grid_for_run

        path = self.run_dir / "samples" / f"{self.cfg.phases.index(phase):02d}-{phase.name}.png"
        was_training = net.training
        try:
            sample_grid_for_run(net, self.cfg, self.edm_cfg, path, device=device)
        except Exception as err:  # noqa: BLE001 - cosmetic
            warnings.warn(
                f"no sample grid for phase {phase.name!r} ({type(err).__name__}: {err}); "
                "training goes on",
                stacklevel=2,
            )
        finally:
            net.train(was_training)

    def _cost(self) -> dict[str, float]:
        """The spend so far from `cost_fn`, or nothing (with one warning) when it fails: a metric,
        never a reason to fail a run."""
        try:
            return self.cost_fn()
        except Exception as err:  # noqa: BLE001
            if not self._cost_warned:
                self._cost_warned = True
                warnings.warn(
                    f"cost_fn failed ({type(err).__name__}: {err}); metrics go on without cost",
                    stacklevel=2,
                )
            return {}

    def _init_wandb(self, segment: int):
        """A W&B run that never raises (`SafeRun`), or None: W&B never fails training."""
        try:
            from budget_lab.report.wandb_log import init_wandb_run

            return init_wandb_run(self.cfg, self.run_dir, segment)
        except Exception as err:  # noqa: BLE001
            warnings.warn(
                f"W&B could not start ({err!r}); training goes on without it", stacklevel=2
            )
            return None

    def _sync_requests(self, accelerator) -> None:
        # The job's dollar checks (phase end, budget progress) run on the main process only:
        # every rank must follow them, or their learning rates and phases drift apart.
        progress = self.budget_progress
        flags = torch.tensor(
            [
                self._checkpoint_requested.is_set(),
                self._stop_requested.is_set(),
                self._phase_end_requested.is_set(),
                progress if (self._main and progress is not None) else 0.0,
                float(self._main and progress is not None),
            ],
            dtype=torch.float64,
            device=accelerator.device,
        )
        flags = accelerator.reduce(flags, reduction="sum")
        if flags[0] > 0:
            self._checkpoint_requested.set()
        if flags[1] > 0:
            self._stop_requested.set()
        if flags[2] > 0:
            self._phase_end_requested.set()
        if flags[4] > 0:
            self.budget_progress = float(flags[3])

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGUSR1: checkpoint now; SIGTERM / SIGINT: checkpoint and stop. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        handlers = {
            signal.SIGUSR1: lambda *_: self.request_checkpoint(),
            signal.SIGTERM: lambda *_: self.request_stop(),
            signal.SIGINT: lambda *_: self.request_stop(),
        }
        return {sig: signal.signal(sig, h) for sig, h in handlers.items()}

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _fsdp_shard(net: MicroDiT, ema: AveragedModel | None) -> None:
    """torch FSDP2 over every rank: one shard unit per transformer block (the patch mixer's too),
    then the rest (embedders, final layer). Each parameter is split along its first axis, so the
    MoE experts' w1 (E, D, F) and w2 (E, F, D) split by expert. The EMA copy is sharded alike, so
    that its update pairs each rank's shards; parameter names do not change (the MoE learning-rate
    group still finds its own)."""
    from torch.distributed.fsdp import fully_shard

    for model in (net, ema.module if ema is not None else None):
        if model is None:
            continue
        blocks = list(model.blocks) + (list(model.mixer.blocks) if model.mixer is not None else [])
        for block in blocks:
            fully_shard(block)
        fully_shard(model)


def _gather_full(obj: Any, keep: bool) -> Any:
    """`obj` (a state dict, nested) with each sharded tensor (DTensor) gathered whole onto the CPU:
    the checkpoint stays the same at any world size and with or without FSDP. A collective: every
    rank calls it on the same structure; ranks with keep=False drop each gathered tensor at once
    (None in its place), so they never hold the whole state."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        whole = obj.full_tensor()
        return whole.cpu() if keep else None
    if isinstance(obj, dict):
        return {k: _gather_full(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_gather_full(v, keep) for v in obj)
    return obj


def _shard_optimizer_state(full: dict[str, Any], optimizer) -> dict[str, Any]:
    """A whole optimizer state dict (a checkpoint's) cut like `optimizer`'s sharded parameters:
    each per-parameter tensor of the parameter's shape (AdamW's moments) becomes this rank's shard;
    scalars (the step) stay. A collective, like `_gather_full`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, entry in full["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    return {**full, "state": state}


def _world_size_change_note(saved: int, now: int) -> str:
    """What carries over when a checkpoint moves to another world size, and what does not."""
    return (
        f"note: the checkpoint was written at world size {saved}, this run has {now}. The global "
        "batch of every phase, the data order (when data.lanes fits both world sizes; otherwise "
        "the loader says it resumes approximately), the noise, optimizer and EMA state carry over "
        "exactly; the gradients are summed in another order, so the weights follow the "
        f"world-size-{saved} run within float rounding, not bit for bit"
    )
