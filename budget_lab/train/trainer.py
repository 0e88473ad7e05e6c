"""The phased MicroDiT trainer: accelerate for devices, exact resume, nothing lost on a crash.

What a run writes into its run folder (`budget_lab.rundir.RunDir`), from the main process:
  RunDir.config          the resolved configuration (YAML < CLI overrides), written once
  RunDir.metrics         append-only: step, phase, loss, images/s, lr, wall clock (a row per log_every)
  RunDir.checkpoints     atomic checkpoints (model, EMA, optimizer, scheduler, data position, RNG
                         states: `budget_lab.train.checkpoint`), and a RunDir.checkpoint_log row each
  RunDir.phase_grid      a sample grid (PNG) at the end of each phase, from the EMA weights
  RunDir.result          status (running / completed / failed / interrupted / cut) and the figures

Resume is exact: the checkpoint holds every source of randomness and the data position, so on a
CPU an interrupted-and-resumed run ends with weights bit-identical to an uninterrupted one.

`Trainer.run` reads as its steps: prepare the run folder, set up accelerate, build the model,
resume from the latest checkpoint, spread the model over the devices, open the outputs, then each
phase (`_run_phase`: a fresh optimizer, the step loop with its signposts, the sample grid).
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from budget_lab.config import (
    PhaseConfig,
    RunConfig,
    edm_config,
    model_config,
    run_config_from_dict,
    run_config_to_dict,
)
from budget_lab.data.loader import ShardLoader
from budget_lab.errors import ConfigError, DataError, TrainingError, UserError
from budget_lab.eval.sampling import sample_grid_for_run
from budget_lab.io import atomic_write_text, yaml_dump, yaml_load
from budget_lab.launch.activity import ActivityLog
from budget_lab.report.wandb_log import init_wandb_run
from budget_lab.rundir import (
    CheckpointRow,
    MetricsRow,
    RunDir,
    StopRequest,
    read_result,
    read_stop,
    write_result,
)
from budget_lab.train.checkpoint import (
    CheckpointStore,
    TrainState,
    checkpoint_payload,
    restore_payload,
    restore_phase_states,
    rng_states,
)
from budget_lab.train.optim import build_optimizer, build_scheduler
from model.edm import EDMConfig, EDMPrecond, edm_loss
from model.microdit import BatchRandom, MicroDiT, batch_draw

__all__ = ["Trainer"]


@dataclass
class _Phase:
    """What one phase trains with (`Trainer._start_phase`)."""

    index: int  # its place in cfg.phases
    config: PhaseConfig
    last: bool  # the run's last phase
    loader: ShardLoader
    optimizer: torch.optim.Optimizer  # AdamW, wrapped by accelerate
    scheduler: LambdaLR
    accum: int  # micro-batches per optimizer step on each rank
    P_mean: float  # the EDM noise-level distribution (the phase's, else the run's)
    P_std: float


class Trainer:
    """Runs the phases of a `RunConfig` in `run_dir`, resuming from its latest checkpoint."""

    # The run in progress, set by `run`'s steps (`_setup_accelerator` ... `_open_outputs`).
    accelerator: Accelerator
    device: torch.device
    net: MicroDiT  # the network being trained
    ema: AveragedModel | None  # its EMA copy (sample grids, FID); None when optim.ema_decay is 0
    gen: torch.Generator  # the noise generator, the same on every rank
    precond: torch.nn.Module  # EDM preconditioning around net (wrapped by accelerate for DDP)
    step_fn: Callable[..., torch.Tensor]  # precond, compiled when cfg.compile
    fsdp: bool  # net (and ema) are sharded with FSDP
    state: TrainState  # the counters: phase, steps, images seen, training seconds
    segment: int  # this segment's number: 0 for a fresh run, the checkpoint's + 1 on resume

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
        self.files = RunDir(self.run_dir)
        self.progress = progress
        # Test and tooling hook: behave as if a stop signal arrived after this global step.
        self.stop_at_step = stop_at_step
        # Set by the job wrapper: returns the run's spend so far ({"cost_usd", "gpu_hours"},
        # previous segments included) so metrics and W&B carry cost as a monotonic axis.
        self.cost_fn = cost_fn
        self._cost_warned = False
        # Called after every optimizer step (after any checkpoint) with {"state", "phase",
        # "phase_index", "phase_done", "last_phase", "model" (EMA weights if any), "device"}:
        # sweep jobs use it to measure FID at dollar rungs. Main process only.
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
        self.store = CheckpointStore(self.files.checkpoints, keep=cfg.checkpoint.keep)
        self._checkpoint_requested = threading.Event()
        self._phase_end_requested = threading.Event()
        self._stop_requested = threading.Event()
        # Only the main process writes the run folder (result.json, config.yaml); set again from
        # accelerate once it runs, from torch.distributed's RANK before.
        self._main = int(os.environ.get("RANK", "0")) == 0
        self._use_gpu = False
        # The checkpoint's state of the phase in progress, until that phase has taken it.
        self._phase_states: dict[str, Any] | None = None
        # The STOP request this run obeys, once it saw one: it then ends "cut".
        self._cut: StopRequest | None = None
        # Outputs open while the phases run (`_open_outputs`, `_close_outputs`).
        self._wandb: Any = None  # a SafeRun
        self._old_handlers: dict[int, Any] = {}
        self._metrics_file: IO[str] | None = None
        self._bar: tqdm | None = None

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

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train every phase (resuming if the run folder has a checkpoint). Returns result.json."""
        self._prepare_run_dir()
        if self.activity is None:
            self.activity = ActivityLog(self.run_dir, None)
        stop = read_stop(self.run_dir)
        if stop is not None:  # cut before it started (or while queued)
            return self._result(status="cut", **stop.result_fields())
        self._setup_accelerator()
        self._build_model()
        self._resume()
        self._result(status="running", segment=self.segment, started_at=time.time())

        # From here on, whatever happens ends in result.json (completed, failed, ...).
        self._cut = None
        self._wandb, self._old_handlers, self._metrics_file, self._bar = None, {}, None, None
        try:
            self._parallelize()
            self._open_outputs()
            if self.stop_after_phase is not None and self.state.phase > self.stop_after_phase:
                return self._result(  # this phase's job ran already (e.g. a requeued duplicate)
                    status="phase-completed",
                    completed_phase=self.stop_after_phase,
                    **self.state.as_dict(),
                )
            for index in range(self.state.phase, len(self.cfg.phases)):
                ended = self._run_phase(index)
                if ended is not None:  # stopped, cut, or the next phase is another job's
                    return ended
            return self._result(
                status="completed",
                **self.state.as_dict(),
                phases=[asdict(p) for p in self.cfg.phases],
            )
        except BaseException as err:
            self._result(status="failed", error=_error_text(err), **self.state.as_dict())
            raise
        finally:
            self._close_outputs()

    # -- the run's steps, in order -------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        """Create the run folder and write its resolved config; a resumed run must match it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_config_to_dict(self.cfg)
        path = self.files.config
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

    def _setup_accelerator(self) -> None:
        """accelerate on the GPU if there is one (bf16 unless the config says otherwise), else the
        CPU. From here on only its main process writes the run folder and the activity log."""
        self._use_gpu = torch.cuda.is_available()
        precision = self.cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if self._use_gpu else "no"
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not self._use_gpu)
        self.device = self.accelerator.device
        self._main = self.accelerator.is_main_process
        self.activity.enabled = self.activity.enabled and self._main

    def _build_model(self) -> None:
        """The model, its EMA and the noise generator; everything random is seeded from cfg.seed."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        net = MicroDiT(self.model_cfg)
        ema = None
        if cfg.optim.ema_decay > 0:
            ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay))
        self.net = net.to(self.device)
        self.ema = ema.to(self.device) if ema is not None else None
        # The same noise generator on every rank: each draws the noise of the whole global batch
        # and keeps its samples' rows (`BatchRandom`), so a run is the same on any world size.
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed * 1000)

    def _resume(self) -> None:
        """Pick up from the latest checkpoint that loads (weights, EMA, random states, counters;
        the phase in progress once its optimizer exists), or start at step 0. A checkpoint that
        cannot be used fails the run in result.json before anything trains."""
        self.state = TrainState()
        self.segment = 0
        self._phase_states = None
        if self._main:  # what a save killed mid-write left (a checkpoint's size each)
            self.store.remove_temp_files()
        try:
            loaded = self.store.load_latest(map_location="cpu")
        except Exception as err:  # unreadable or refused: say so in result.json, start nothing
            self._result(status="failed", error=_error_text(err))
            raise
        if loaded is not None:
            payload, path = loaded
            point = restore_payload(payload, self.net, self.ema, self.gen, cuda=self._use_gpu)
            self.state, self.segment = point.state, point.segment
            self._phase_states = point.phase_states
            if self._main:
                print(
                    f"resuming {self.run_dir.name} from {path.name} "
                    f"(phase {self.state.phase}, step {self.state.global_step})",
                    flush=True,
                )
                world = self.accelerator.num_processes
                if point.world_size != world:
                    print(_world_size_change_note(point.world_size, world), flush=True)
        if self.state.phase < len(self.cfg.phases):
            self.activity.set_phase(self.cfg.phases[self.state.phase].name)

    def _parallelize(self) -> None:
        """EDM preconditioning around the network, spread over the devices: FSDP shards it after
        the (whole) checkpoint has loaded; otherwise accelerate wraps it (DDP). Compiled if asked."""
        precond = EDMPrecond(self.net, self.edm_cfg.sigma_data)
        self.fsdp = self.cfg.distributed.strategy == "fsdp" and self.accelerator.num_processes > 1
        if self.fsdp:
            _fsdp_shard(self.net, self.ema)
        else:
            precond = self.accelerator.prepare_model(precond)
        self.precond = precond
        self.step_fn = torch.compile(precond) if self.cfg.compile else precond

    def _open_outputs(self) -> None:
        """W&B, the signal handlers, metrics.jsonl (kept open: a row per window) and the progress
        bar; the files and W&B on the main process only. `_close_outputs` closes them."""
        main = self._main
        self._wandb = self._init_wandb(self.segment) if (self.cfg.wandb.enabled and main) else None
        self._old_handlers = self._install_signal_handlers()
        self._metrics_file = open(self.files.metrics, "a") if main else None
        if main and self.progress:
            self._bar = tqdm(
                total=sum(p.steps for p in self.cfg.phases),
                initial=self.state.global_step,
                unit="step",
                dynamic_ncols=True,
            )

    def _run_phase(self, index: int) -> dict[str, Any] | None:
        """Train phase `index` to its end, then its sample grid. Returns the run's result when the
        run ends here (stopped, cut, or the next phase is another job's); None to go on."""
        ph = self._start_phase(index)
        cfg, phase, state = self.cfg, ph.config, self.state
        batches = iter(ph.loader)
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        if self.activity.activity != "idle":
            self.activity.switch("train", phase.name)
        while state.phase_step < phase.steps:
            # One optimizer step over the global batch.
            t0 = time.perf_counter()
            step_loss = self._train_step(ph, batches)
            state.phase_step += 1
            state.global_step += 1
            state.images_seen += phase.batch_size
            dt = time.perf_counter() - t0
            state.train_seconds += dt
            window_loss += step_loss
            window_steps += 1
            window_time += dt

            # A metrics row every log_every steps and at the phase's end.
            if state.global_step % cfg.log_every == 0 or state.phase_step == phase.steps:
                self._log_window(ph, window_loss, window_steps, window_time)
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            if self._bar is not None:
                self._bar.update(1)

            # Requests to stop, checkpoint or end the phase, the same on every rank.
            self._take_requests()
            if self._phase_end_requested.is_set() and not ph.last:
                self._phase_end_requested.clear()
                state.phase_step = phase.steps  # ended early: the phase counts as done

            # Checkpoint at the interval, at the phase's end, and when asked.
            phase_done = state.phase_step == phase.steps
            if (
                state.global_step % cfg.checkpoint.every == 0
                or phase_done
                or self._checkpoint_requested.is_set()
                or self._stop_requested.is_set()
            ):
                self._save(ph)
                self._checkpoint_requested.clear()

            if self.step_callback is not None and self._main:
                self.step_callback(
                    {
                        "state": state.as_dict(),
                        "phase": phase,
                        "phase_index": index,
                        "phase_done": phase_done,
                        "last_phase": ph.last,
                        "model": self.ema.module if self.ema is not None else self.net,
                        "device": self.device,
                    }
                )

            # Stop, checkpoint written, unless that was the run's last step anyway.
            if self._stop_requested.is_set() and not (phase_done and ph.last):
                cut = self._cut
                status = "interrupted" if cut is None else "cut"
                extra = {} if cut is None else cut.result_fields()
                return self._result(status=status, **extra, **state.as_dict())

        # End of phase: a sample grid from the EMA weights (cosmetic: never fails a run).
        self._sample_grid(phase)
        self._phase_states = None
        if self.stop_after_phase is not None and not ph.last and index >= self.stop_after_phase:
            # The next phase is another job's.
            return self._result(status="phase-completed", completed_phase=index, **state.as_dict())
        return None

    def _close_outputs(self) -> None:
        """Close what `run` opened, whatever happened; the activity log goes on when it is the
        job's."""
        if self._own_activity:
            self.activity.close()
        else:  # the job goes on (final FID, end row): its own spans from here
            self.activity.switch("other")
        if self._bar is not None:
            self._bar.close()
        if self._metrics_file is not None:
            self._metrics_file.close()
        self._restore_signal_handlers(self._old_handlers)
        if self._wandb is not None:
            self._wandb.finish()  # a SafeRun: never raises

    # -- a phase ---------------------------------------------------------------------------------------

    def _start_phase(self, index: int) -> _Phase:
        """Phase `index`'s loader, fresh AdamW (its own learning rate) and schedule; put back where
        the checkpoint left them when the run resumes inside this phase."""
        cfg, phase = self.cfg, self.cfg.phases[index]
        if index != self.state.phase:
            self.state.phase, self.state.phase_step = index, 0
            self._phase_states = None
        world = self.accelerator.num_processes
        micro = phase.micro_batch_size or max(phase.batch_size // world, 1)
        if phase.batch_size % (micro * world):
            raise ConfigError(
                f"phases[{phase.name}].batch_size={phase.batch_size} is not a multiple of "
                f"micro_batch_size x devices = {micro} x {world}; pick a batch size that is"
            )
        saved = self._phase_states
        loader = self._loader(phase, micro, saved["loader"] if saved is not None else None)
        optimizer = build_optimizer(self.net, cfg.optim, phase)
        self.budget_progress = None  # the job sets it again after this phase's steps
        scheduler = build_scheduler(optimizer, phase, lambda: self.budget_progress)
        if saved is not None:
            # Under FSDP the checkpoint's whole optimizer state is cut into this rank's shards.
            shard = partial(_shard_optimizer_state, optimizer=optimizer) if self.fsdp else None
            restore_phase_states(saved, optimizer, scheduler, loader, shard)
        return _Phase(
            index=index,
            config=phase,
            last=index == len(cfg.phases) - 1,
            loader=loader,
            optimizer=self.accelerator.prepare_optimizer(optimizer),
            scheduler=scheduler,
            accum=phase.batch_size // (micro * world),
            P_mean=self.edm_cfg.P_mean if phase.P_mean is None else phase.P_mean,
            P_std=self.edm_cfg.P_std if phase.P_std is None else phase.P_std,
        )

    def _loader(self, phase: PhaseConfig, micro: int, saved: dict | None = None) -> ShardLoader:
        """The phase's loader. Its lanes: data.lanes, else the checkpoint's when they fit this
        world size (so the data order carries over exactly), else world size x workers."""
        data_dir = Path(self.cfg.data.path)
        if not (data_dir / "manifest.json").is_file():
            raise DataError(
                f"no prepared data at data.path={str(data_dir)!r} (no manifest.json). Make it with "
                "`budget-lab data synth --out data/synth && budget-lab data prepare --images "
                "data/synth --out data/synth-latents --vae pixel --text-encoder minilm`, or set "
                "data.path=FOLDER"
            )
        accelerator = self.accelerator
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

    def _train_step(self, ph: _Phase, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """One optimizer step: EDM loss and backward over the rank's micro-batches, gradient
        clipping, AdamW, the schedule, the EMA. Returns this rank's loss of the step."""
        cfg, phase, accelerator, device = self.cfg, ph.config, self.accelerator, self.device
        state = self.state
        step_loss = 0.0
        step_rng = self.gen.get_state()
        for micro_idx in range(ph.accum):
            batch = next(batches)
            y = batch["latents"].to(device, non_blocking=True)
            captions = batch["captions"].to(device, non_blocking=True)
            caption_mask = batch["caption_mask"].to(device, non_blocking=True)
            # Every micro-batch of every rank draws the step's noise for the whole global batch
            # and keeps its rows (the samples' places in the step).
            self.gen.set_state(step_rng)
            rows = (batch["index"] % phase.batch_size).to(device)
            draws = BatchRandom(self.gen, rows, phase.batch_size)
            # Caption dropout for classifier-free guidance: zeroed embeddings.
            if cfg.optim.caption_dropout > 0:
                drop = (
                    batch_draw(torch.rand, (y.shape[0],), device, draws) < cfg.optim.caption_dropout
                )
                captions = captions * (~drop).view(-1, 1, 1).to(captions.dtype)
            sync = micro_idx == ph.accum - 1
            ctx = accelerator.no_sync(self.precond) if not sync else contextlib.nullcontext()
            if self.fsdp:  # reduce-scatter the gradients at the last micro-batch only
                self.net.set_requires_gradient_sync(sync)
            with ctx, accelerator.autocast():
                loss = edm_loss(
                    self.step_fn,
                    y,
                    captions,
                    caption_mask,
                    phase.mask_ratio,
                    ph.P_mean,
                    ph.P_std,
                    draws,
                )
            accelerator.backward(loss / ph.accum)
            step_loss += loss.detach().float().item() / ph.accum
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"non-finite loss ({step_loss}) at phase {phase.name!r}, step "
                f"{state.phase_step} (global {state.global_step}): the run is stopped "
                f"and nothing was saved from this step. Last good checkpoint: "
                f"{self.store.latest_path() or 'none'}. Lower phases[{phase.name}].lr or "
                "optim.grad_clip, or check the data"
            )
        if cfg.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        ph.optimizer.step()
        ph.scheduler.step()
        ph.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return step_loss

    def _log_window(self, ph: _Phase, loss: float, steps: int, seconds: float) -> None:
        """The metrics row of the last `steps` steps (their summed `loss` and `seconds`): to
        metrics.jsonl, W&B and the progress bar. Every rank calls it (the loss is averaged over
        the global batch)."""
        phase, state = ph.config, self.state
        if self.accelerator.num_processes > 1:  # the loss of the global batch
            loss = self.accelerator.reduce(
                torch.tensor(loss, device=self.device), reduction="mean"
            ).item()
        row: MetricsRow = {
            "step": state.global_step,
            "phase": phase.name,
            "phase_step": state.phase_step,
            "loss": loss / steps,
            "images_per_s": steps * phase.batch_size / max(seconds, 1e-9),
            "lr": ph.scheduler.get_last_lr()[0],
            "mask_ratio": phase.mask_ratio,
            "images_seen": state.images_seen,
            "train_seconds": state.train_seconds,
            "segment": self.segment,
            "time": time.time(),
        }
        if self.cost_fn is not None:
            row.update(self._cost())  # type: ignore[typeddict-item]
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(row) + "\n")
            self._metrics_file.flush()
        if self._wandb is not None:
            # No explicit step: after a requeue the global step repeats the steps lost since the
            # checkpoint, and W&B would drop those rows.
            self._wandb.log(
                {f"train/{k}": v for k, v in row.items() if k != "phase"}
                | {"train/phase_index": ph.index}
            )
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"{phase.name} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s"
            )

    def _take_requests(self) -> None:
        """After each step: `stop_at_step`, the run folder's STOP file (the run then ends "cut",
        with its reason) and, with more than one process, the flags every rank must agree on."""
        if self.stop_at_step is not None and self.state.global_step >= self.stop_at_step:
            self._stop_requested.set()
        stop_file = self.files.stop
        if self._cut is None and stop_file.is_file():
            self._cut = read_stop(self.run_dir)
            self._stop_requested.set()
            self.activity.switch("idle")  # what follows buys nothing: the run is cut
        if self.accelerator.num_processes > 1:
            # A signal reaches one rank (submitit checkpoints on rank 0 only): every rank must
            # save and stop at the same step, so agree on the flags.
            self._sync_requests()
            if self._cut is None and self._stop_requested.is_set():
                # Another rank saw STOP first: this one ends "cut" with it too.
                if stop_file.is_file():
                    self._cut = read_stop(self.run_dir)
                    self.activity.switch("idle")

    def _save(self, ph: _Phase) -> Path | None:
        """A checkpoint of the run as it stands. A collective: every rank calls it, the main
        process writes it; no rank goes on before it is on disk. Its path on the main process."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        with self.activity.during("checkpoint"):
            parts = {
                "model": accelerator.unwrap_model(self.precond).net.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": ph.optimizer.state_dict(),
            }
            if self.fsdp:  # the full state, shard by shard (every rank takes part)
                parts = _gather_full(parts, keep=self._main)
            path = self._write_checkpoint(ph, parts) if self._main else None
        accelerator.wait_for_everyone()
        return path

    def _write_checkpoint(self, ph: _Phase, parts: dict[str, Any]) -> Path:
        """The checkpoint file (`checkpoint_payload`) and its checkpoints.jsonl row."""
        payload = checkpoint_payload(
            self.state,
            model=parts["model"],
            ema=parts["ema"],
            optimizer=parts["optimizer"],
            scheduler=ph.scheduler.state_dict(),
            loader=ph.loader.state_dict(),
            rng=rng_states(self.gen, self._use_gpu),
            segment=self.segment,
            phase_name=ph.config.name,
            world_size=self.accelerator.num_processes,
        )
        path = self.store.save(self.state.global_step, payload)
        # What the ledger needs to price work lost at a preemption. A plain append, not
        # `append_row`: no fsync per row on top of the checkpoint's own.
        row: CheckpointRow = {
            "step": self.state.global_step,
            "phase": ph.config.name,
            "segment": self.segment,
            "time": time.time(),
            "path": str(path),
        }
        with open(self.files.checkpoint_log, "a") as f:
            f.write(json.dumps(row) + "\n")
        return path

    def _sample_grid(self, phase: PhaseConfig) -> None:
        """The phase's sample grid from the EMA weights, by the main process (under FSDP every
        rank first helps gather a whole copy). A failure of the sampling (a validation split
        smaller than the grid, no split at all, a full disk) is a warning, never a failed run."""
        if not (self._main or self.fsdp) or self.cfg.eval.grid_size <= 0:
            return
        net: MicroDiT | None = self.ema.module if self.ema is not None else self.net
        if self.fsdp:  # rank 0 samples from a whole copy (every rank takes part)
            whole = _gather_full(net.state_dict(), keep=self._main)
            net = MicroDiT(self.model_cfg).to(self.device) if self._main else None
            if net is not None:
                net.load_state_dict(whole)
        if net is None or not self._main:
            return
        path = self.files.phase_grid(self.cfg.phases.index(phase), phase.name)
        with self.activity.during("sample_grid", phase.name):
            was_training = net.training
            try:
                sample_grid_for_run(net, self.cfg, self.edm_cfg, path, device=self.device)
            except Exception as err:  # noqa: BLE001 - cosmetic
                warnings.warn(
                    f"no sample grid for phase {phase.name!r} ({type(err).__name__}: {err}); "
                    "training goes on",
                    stacklevel=2,
                )
            finally:
                net.train(was_training)

    # -- pieces ----------------------------------------------------------------------------------------

    def _result(self, **fields: Any) -> dict[str, Any]:
        """result.json with `fields` (and the time) merged in; written by the main process only."""
        result: dict[str, Any] = dict(read_result(self.run_dir) or {})
        result.update(fields, run_dir=str(self.run_dir), updated_at=time.time())
        if self._main:
            write_result(self.run_dir, result)
        return result

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
            return init_wandb_run(self.cfg, self.run_dir, segment)
        except Exception as err:  # noqa: BLE001
            warnings.warn(
                f"W&B could not start ({err!r}); training goes on without it", stacklevel=2
            )
            return None

    def _sync_requests(self) -> None:
        """Every rank takes the flags any rank has (sum-reduced)."""
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
            device=self.accelerator.device,
        )
        flags = self.accelerator.reduce(flags, reduction="sum")
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


def _error_text(err: BaseException) -> str:
    """What result.json says of a failure: a user error's own words, else the exception's."""
    return str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"


# -- FSDP ------------------------------------------------------------------------------------------
# torch.distributed's FSDP and DTensor modules are imported in the functions that use them: they
# take about a second to import, and only an FSDP run on more than one process needs them.


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
