"""The job a cluster runs: the trainer wrapped as a submitit `Checkpointable`.

submitit pickles a `TrainJob`, starts it on the allocated node(s) (one task per GPU) and, when
Slurm preempts the job or its time limit nears, sends USR2; submitit then calls `checkpoint()`,
which asks the trainer to save at its next step boundary, waits for it, and hands back a fresh
`TrainJob` for submitit to requeue. The requeued job finds the checkpoint and resumes exactly.

The trainer runs in a worker thread so the main thread stays free to take the signal while a
step is in flight. The job also writes the run folder's `segments.jsonl` (one start and one end
row each time it runs: the local executor's accounting, and the wrapper's view of each segment),
keeps a live dollar figure for metrics and W&B, and, for sweep trials, measures FID at dollar
rungs (`rungs.jsonl`) and at the end (`eval.json`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit

from budget_lab.errors import ConfigError
from budget_lab.io import read_jsonl
from budget_lab.launch.activity import ActivityLog
from budget_lab.launch.local import segment_alive
from budget_lab.launch.notify import notify
from budget_lab.rundir import (
    CutKind,
    RunDir,
    RungRow,
    SegmentRow,
    append_row,
    cut_kind,
    request_stop_file,
    segment_rows,
)

__all__ = ["EvalPlan", "TrainJob"]


@dataclass
class EvalPlan:
    """What a sweep trial measures while it trains (all FID on the EMA weights, same N)."""

    fid_samples: int = 100  # generated images per FID (the reference uses as many val images)
    sampler_steps: int = 16  # Heun steps for those samples
    rungs_usd: list[float] = field(default_factory=list)  # $ spent at which FID is measured
    phase_rung: bool = False  # also measure at the end of every phase but the last
    final_eval: bool = True  # FID of the finished run (eval.json)
    stop_at_usd: float | None = None  # fid_at_budget: stop training once this much is spent
    # fid_at_budget: cumulative $ at which each phase but the last ends (it may end earlier, at
    # its step count); the last phase runs until stop_at_usd.
    phase_end_usd: list[float] = field(default_factory=list)


class TrainJob(submitit.helpers.Checkpointable):
    """Train (and, for sweep trials, evaluate) one run folder; resumable after preemption."""

    # Defaults for fields added later: a job pickled by an older budget-lab still unpickles.
    eval_plan: EvalPlan | None = None
    max_requeues: int = 10
    stop_after_phase: int | None = None
    nice: int = 0
    cluster: Any = None
    price_cache_dir: str | None = None

    def __init__(
        self,
        run_dir: str,
        config: dict[str, Any],
        usd_per_device_hour: float,
        devices: int,
        eval_plan: EvalPlan | None = None,
        max_requeues: int = 10,
        stop_after_phase: int | None = None,
        nice: int = 0,
        cluster: Any = None,
        price_cache_dir: str | None = None,
    ):
        self.run_dir = str(run_dir)
        self.config = config  # the resolved RunConfig as a dict (what config.yaml holds)
        self.usd_per_device_hour = usd_per_device_hour  # the cluster's list price (ledger: truth)
        self.devices = devices  # GPUs over all nodes (1 for a CPU-only machine)
        self.eval_plan = eval_plan
        self.max_requeues = max_requeues
        self.stop_after_phase = stop_after_phase  # phases as dependent jobs: this job's last phase
        self.nice = nice  # the local executor's CPU niceness for the job (ClusterConfig.nice)
        # The cluster (ClusterConfig): its price model prices the live spend as the ledger will
        # (spot: the AWS history, cached in price_cache_dir). None: the flat usd_per_device_hour.
        self.cluster = cluster
        self.price_cache_dir = price_cache_dir
        self._trainer = None
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # the running trainer is not part of the pickle
        state = dict(self.__dict__)
        state.update(_trainer=None, _thread=None, _activity=None, _outcome={})
        state.pop("_prices", None)
        return state

    # -- cost so far ----------------------------------------------------------------------------

    def spent_usd(self, now: float | None = None) -> dict[str, Any]:
        """This run's spend by its own clock: every earlier segment plus this one so far, priced
        through the ledger's price model (`budget_lab.ledger.prices.PriceBook`), so that a dollar
        rung or a cap sees the figure the ledger will settle. `provisional` stays True: the
        ledger's sync settles it (Slurm accounting, a spot history fetched later).

        In the job, the last segment is this one (running); an earlier one without an end row
        was killed hard and counts until its last sign of life, as in the ledger. Outside a job,
        a segment without an end row runs until now only while its process is alive here."""
        now = time.time() if now is None else now
        run_dir = Path(self.run_dir)
        in_job = getattr(self, "_attempt", None) is not None
        if in_job:

            def live(seg: SegmentRow, last: bool) -> bool:
                return last
        else:

            def live(seg: SegmentRow, last: bool) -> bool:
                return segment_alive(seg)

        rows = segment_rows(run_dir)
        # Earlier segments are over: priced once per job (finding a dead one's end reads
        # metrics.jsonl, which grows with every step), then only this one is priced.
        cached = self.__dict__.get("_spent_before")
        if in_job and cached is not None and cached[0] == len(rows):
            seconds, usd, rows = cached[1], cached[2], rows[-1:]
        else:
            rows, seconds, usd = segment_rows(run_dir, live), 0.0, 0.0
            if in_job and rows:
                before = [self._price(s, s["end"], live=False) for s in rows[:-1]]
                self._spent_before = (
                    len(rows),
                    sum(b[0] for b in before),
                    sum(b[1] for b in before),
                )
                rows = rows[-1:]
                seconds, usd = self._spent_before[1], self._spent_before[2]
        source = None
        for seg in rows:
            end = seg["end"] if seg["end"] is not None else now
            gpu_s, cost, source = self._price(seg, end, live=seg["end"] is None, with_source=True)
            seconds += gpu_s
            usd += cost
        return {
            "cost_usd": usd,
            "gpu_hours": seconds / 3600,
            "cost_provisional": True,
            **({"price_source": source} if source else {}),
        }

    def _price(self, seg: SegmentRow, end: float, *, live: bool, with_source: bool = False) -> Any:
        """(device-seconds, dollars[, price source]) of one segment row up to `end`."""
        seconds = max(float(end) - float(seg["start"]), 0.0)
        devices = max(int(seg.get("devices") or 1), 1)
        if self.cluster is None:  # a job pickled without its cluster: the flat list price
            cost = seconds * devices / 3600 * self.usd_per_device_hour
            out: tuple[Any, ...] = (seconds * devices, cost, "list price")
        else:
            # Imported here: budget_lab.ledger's package imports its sync, which imports this module.
            from budget_lab.ledger.prices import PriceBook

            book = self.__dict__.get("_prices")
            if book is None:
                book = self._prices = PriceBook(cache_dir=self.price_cache_dir)
            priced = book.price(self.cluster, float(seg["start"]), seconds, devices, live=live)
            out = (seconds * devices, priced.cost_usd, priced.source)
        return out if with_source else out[:2]

    # -- the job --------------------------------------------------------------------------------

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        if self.nice > os.nice(0):  # lowered once: a requeued job starts a fresh process
            os.nice(self.nice - os.nice(0))
        if env.num_tasks > 1:  # one task per GPU: torch.distributed through env:// for accelerate
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=True)
        rank0 = env.global_rank == 0
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        attempt = len(segment_rows(run_dir))
        started = time.time()
        if rank0:
            append_row(
                RunDir(run_dir).segments,
                {
                    "event": "start",
                    "attempt": attempt,
                    "job_id": env.job_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "devices": self.devices,
                    "nice": os.nice(0),
                    "time": started,
                },
            )
        self._attempt = attempt
        self._activity = ActivityLog(run_dir, attempt, start=started, enabled=rank0)
        # Imported after the start row: torch's import (seconds) is part of the paid segment.
        from budget_lab.config import run_config_from_dict
        from budget_lab.train.trainer import Trainer

        cfg = run_config_from_dict(self.config)
        plan = self.eval_plan
        if (
            cfg.distributed.strategy == "fsdp"
            and env.num_tasks > 1
            and plan is not None
            and (plan.rungs_usd or plan.phase_rung)
        ):
            if rank0:
                self._end_segment("failed")
            raise ConfigError(
                "distributed.strategy=fsdp cannot measure FID at dollar or phase rungs: rank 0 "
                "samples alone mid-run, and a sharded model needs every rank. Run sweep trials "
                "with rungs at distributed.strategy=ddp (or on one GPU); the final FID works with "
                "either"
            )
        self._rungs_done = {
            (r["kind"], r.get("rung_usd")) for r in read_jsonl(RunDir(run_dir).rungs)
        }
        # Rank 0 alone writes the run folder (metrics with their cost, rungs, segment rows) and
        # judges the dollars; the other ranks follow its flags (`Trainer._sync_requests`).
        trainer = Trainer(
            cfg,
            run_dir,
            progress=False,
            cost_fn=self.spent_usd if rank0 else None,
            step_callback=self._after_step if (self.eval_plan and rank0) else None,
            stop_after_phase=self.stop_after_phase,
            activity=self._activity,
        )
        self._trainer = trainer
        self._rank = env.global_rank
        outcome: dict[str, Any] = {}
        self._outcome = outcome

        def work() -> None:
            try:
                outcome["result"] = trainer.run()
            except BaseException as err:  # re-raised in the main thread
                outcome["error"] = err

        self._thread = threading.Thread(target=work, name="trainer", daemon=True)
        self._thread.start()
        while self._thread.is_alive():  # short joins: the main thread must stay free for signals
            self._thread.join(timeout=0.5)
        if "error" in outcome:
            if rank0:
                self._end_segment("failed")
            raise outcome["error"]
        result = outcome["result"]
        _say_stop(env.global_rank, result)
        if rank0 and self.eval_plan is not None and self.eval_plan.final_eval:
            if result.get("status") == "completed" or (
                result.get("status") == "cut" and _budget_cut(result)
            ):
                with self._activity.during("eval"):
                    result["eval"] = self._final_eval()
        if rank0:
            self._end_segment(result.get("status", "completed"))
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Preemption or time limit: checkpoint, stop, and requeue (up to `max_requeues`).

        submitit calls it on rank 0 alone (the other tasks' handlers return): rank 0's stop
        request reaches every rank through the trainer's flag agreement, so all ranks save and
        stop at the same step; the others then return, and rank 0 requeues the whole job."""
        if self._trainer is not None and self._thread is not None:
            self._trainer.request_stop()
            self._thread.join()
            if "result" in self._outcome:
                _say_stop(self._rank, self._outcome["result"])
            self._end_segment("preempted")
        if len(segment_rows(Path(self.run_dir))) > self.max_requeues:
            print(f"not requeued: this run already ran {self.max_requeues + 1} times", flush=True)
            return None
        fresh = type(self)(
            self.run_dir,
            self.config,
            self.usd_per_device_hour,
            self.devices,
            self.eval_plan,
            self.max_requeues,
            self.stop_after_phase,
            self.nice,
            self.cluster,
            self.price_cache_dir,
        )
        return submitit.helpers.DelayedSubmission(fresh)

    # -- pieces ---------------------------------------------------------------------------------

    def _end_segment(self, status: str) -> None:
        activity = self.__dict__.get("_activity")
        if activity is not None:
            activity.close()
        append_row(
            RunDir(self.run_dir).segments,
            {"event": "end", "attempt": self._attempt, "status": status, "time": time.time()},
        )
        notify(self.run_dir)  # the controller that launched us refills the slot without a poll

    def _after_step(self, info: dict[str, Any]) -> None:
        """Dollar rungs, the phase rung and the trial budget of a sweep trial."""
        plan = self.eval_plan
        assert plan is not None
        if RunDir(self.run_dir).stop.is_file():
            return  # asked to stop (pruned, budget cap): no more FIDs paid for
        spent = self.spent_usd()["cost_usd"]
        due = [r for r in plan.rungs_usd if spent >= r and ("usd", r) not in self._rungs_done]
        if due:
            self._measure("usd", max(due), info, spent)
            self._rungs_done.update(("usd", r) for r in due)
        if plan.phase_rung and info["phase_done"] and not info["last_phase"]:
            key = ("phase", None)
            phase_key = ("phase:" + info["phase"].name, None)
            if phase_key not in self._rungs_done:
                self._measure("phase:" + info["phase"].name, None, info, spent)
                self._rungs_done.update({key, phase_key})
        idx = info["phase_index"]
        # How far the phase is through its dollars: its LR schedule ends with them.
        start = plan.phase_end_usd[idx - 1] if 0 < idx <= len(plan.phase_end_usd) else 0.0
        end = plan.phase_end_usd[idx] if idx < len(plan.phase_end_usd) else plan.stop_at_usd
        if end is not None and end > start:
            self._trainer.budget_progress = (spent - start) / (end - start)
        if (
            idx < len(plan.phase_end_usd)
            and not info["last_phase"]
            and spent >= plan.phase_end_usd[idx]
        ):
            self._trainer.request_phase_end()
        if plan.stop_at_usd is not None and spent >= plan.stop_at_usd:
            request_stop_file(
                self.run_dir,
                f"trial budget ${plan.stop_at_usd:.4f} reached",
                kind=CutKind.TRIAL_BUDGET,
            )

    def _measure(self, kind: str, rung: float | None, info: dict[str, Any], spent: float) -> None:
        # Imported in the job (torch), as in __call__.
        from budget_lab.config import run_config_from_dict
        from budget_lab.eval.evaluate import score_model

        plan = self.eval_plan
        assert plan is not None
        with self._activity.during("eval", info["phase"].name):
            scored = score_model(
                info["model"],
                run_config_from_dict(self.config),
                num_samples=plan.fid_samples,
                sampler_steps=plan.sampler_steps,
                device=info["device"],
                progress=False,
            )
        row: RungRow = {
            "kind": kind,
            "rung_usd": rung,
            "cost_usd": spent,
            "fid": scored["fid"],
            "fid_ci95": scored["fid_ci95"],
            "fid_se": scored["fid_se"],
            "kid": scored["kid"],
            "kid_std": scored["kid_std"],
            "alignment": scored["alignment"],
            "alignment_ci95": scored["alignment_ci95"],
            "step": info["state"]["global_step"],
            "phase": info["phase"].name,
            "num_samples": scored["num_samples"],
            "time": time.time(),
        }
        append_row(RunDir(self.run_dir).rungs, row)
        notify(self.run_dir)  # the controller judges the rung (prune?) before our next step

    def _final_eval(self) -> dict[str, Any]:
        # Imported in the job (torch), as in __call__.
        from budget_lab.eval.evaluate import evaluate_run

        plan = self.eval_plan
        assert plan is not None
        result = evaluate_run(
            self.run_dir,
            num_samples=plan.fid_samples,
            sampler_steps=plan.sampler_steps,
            progress=False,
        )
        result["cost_usd"] = self.spent_usd()["cost_usd"]
        return result


def _say_stop(rank: int, result: dict[str, Any]) -> None:
    """One line in the task's own log (submitit's <job>_<task>_log.out): where this rank ended."""
    print(f"rank {rank}: {result.get('status')} at step {result.get('global_step')}", flush=True)


def _budget_cut(result: dict[str, Any]) -> bool:
    return cut_kind(result) == CutKind.TRIAL_BUDGET


def eval_plan_from_dict(d: dict[str, Any] | None) -> EvalPlan | None:
    return None if d is None else EvalPlan(**d)


def eval_plan_to_dict(plan: EvalPlan | None) -> dict[str, Any] | None:
    return None if plan is None else asdict(plan)
