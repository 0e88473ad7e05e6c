"""The sweep controller: Optuna ask/tell over launched jobs, judged on FID and dollars.

    ask → compose the trial's run config → estimate its cost (ledger) → launch (submitit)
        → follow: FID at dollar rungs → report → prune (STOP file) → job ends → sync ledger → tell

Slots are refilled as soon as one frees. Every trial's run folder is `runs/<sweep>-<NNN>` and the
trial's user attributes hold it (and the job ids), so a controller that is killed and started
again with the same command re-attaches to running jobs, tells Optuna about the ones that ended
meanwhile, and launches a trial that was asked but never submitted: nothing runs twice, nothing
is lost. The total budget is a hard cap: no trial starts when its estimate exceeds what remains,
and running trials are cut (checkpoint, status "cut") once the spend reaches it.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from budget_lab.config import model_config, run_config_from_dict
from budget_lab.errors import ConfigError, UserError
from budget_lab.io import atomic_write_json, read_jsonl
from budget_lab.launch import launch_run, read_launch
from budget_lab.launch.job import EvalPlan
from budget_lab.launch.notify import Listener
from budget_lab.launch.status import FINAL_STATES, cancel_run, run_status
from budget_lab.launch.submit import crash_point
from budget_lab.ledger import (
    Ledger,
    calibrate_benchmark,
    calibrate_from_run,
    estimate_run,
    sync_run,
)
from budget_lab.ledger.calibration import device_of, learn_from_run, time_training_step
from budget_lab.ledger.cap_policy import (
    KILL_TERM_S,
    SLURM_KILL_WAIT_S,
    UNMEASURED_STEP_S,
    CapJob,
    CapPolicy,
    launch_headroom,
)
from budget_lab.ledger.estimate import write_estimate
from budget_lab.rundir import (
    CutKind,
    RunDir,
    SweepDir,
    cut_kind,
    is_prepared_data,
    read_config,
    read_eval,
    read_stop,
    request_stop_file,
    segment_rows,
    write_launch,
)
from budget_lab.sweep.compose import TrialComposer, budget_steps
from budget_lab.sweep.decide import config_from_rows, decide, group_repeats, pair_trials
from budget_lab.sweep.objectives import objective_values
from budget_lab.sweep.pruner import make_pruner, report_fid, resolve_rungs, should_prune
from budget_lab.sweep.sampler import grid_search_space, make_sampler, study_directions, suggest
from budget_lab.sweep.spec import REPEAT_PARAM
from budget_lab.sweep.storage import default_storage, open_storage

__all__ = ["SweepController", "SweepSummary", "default_storage"]


@dataclass
class SweepSummary:
    sweep: str
    objective: str
    stop_reason: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[int] = field(default_factory=list)  # trials of the noise-aware front's configs
    best: dict[str, Any] | None = None  # the best configuration's first trial row
    configs: list[dict[str, Any]] = field(default_factory=list)  # merged over repeats, scored
    tied: list[str] = field(default_factory=list)  # configurations tied with the best
    tiers: list[list[str]] = field(default_factory=list)  # groups apart beyond the noise
    front: list[str] = field(default_factory=list)  # pareto: configurations on the front
    indistinguishable: list[list[str]] = field(default_factory=list)  # front points not apart
    verdict: str = ""  # what the sweep found and could not tell apart, in words
    spent_usd: float = 0.0
    budget_usd: float | None = None
    study_storage: str = ""
    summary_path: str | None = None
    report_path: str | None = None


class SweepController:
    """Runs (or resumes) one sweep to its end: trials done, budget spent, or nothing fits."""

    def __init__(
        self,
        spec,
        workspace,
        cluster,
        *,
        budget_usd: float | None = None,
        n_trials: int | None = None,
        storage: str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        poll_s: float = 0.25,
        progress: bool = True,
        placement=None,
    ):
        self.spec = spec
        self.workspace = workspace.ensure()
        self._folder = SweepDir(self.workspace.sweep_dir(spec.name))
        self.cluster = cluster
        self.budget_usd = budget_usd if budget_usd is not None else spec.budget_usd
        self.n_trials = n_trials if n_trials is not None else spec.n_trials
        self.storage = storage or default_storage(workspace, spec.name)
        self.overrides = list(overrides)
        self.poll_s = poll_s
        self.placement = placement  # nodes × GPUs per trial (default: one whole node)
        self.progress = progress
        self.ledger = Ledger.for_workspace(workspace)
        self._composer: TrialComposer | None = None  # the trials' configs, the recipe composed once
        self._base_estimate_usd: float | None = None  # rung_fractions scale: the base trial's $
        self._spent_cache: tuple[float, float] | None = None  # (monotonic time, $) of _spent()
        # The budget guard's period: the spend is synced from every running trial's files
        # (~10 ms each), so not at every poll; the guard's stop margin accounts for the period.
        self.guard_s = max(poll_s, 1.0)
        # trial number → {"trial" (the live optuna.Trial), "run_dir", "estimate_usd", ...}
        self.active: dict[int, dict[str, Any]] = {}
        self.stop_reason: str | None = None

    # -- the study --------------------------------------------------------------------------------

    def _study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            study_name=self.spec.name,
            storage=open_storage(self.storage),
            sampler=make_sampler(self.spec),
            pruner=make_pruner(self.spec),
            directions=study_directions(self.spec),
            load_if_exists=True,
        )

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- one trial --------------------------------------------------------------------------------

    def _run_name(self, number: int) -> str:
        return f"{self.spec.name}-{number:03d}"

    def _trial_config(self, params: dict[str, Any], extra: list[str] | tuple[str, ...] = ()):
        """The trial's run config: the recipe with the sweep's base overrides and eval settings
        (composed once per controller), then the params' targets, the command line's overrides
        and `extra`; composing validates it."""
        cfg = self._trials().compose(params, extra)
        cfg.data.path = str(Path(cfg.data.path).resolve())
        return cfg

    def _trials(self) -> TrialComposer:
        """The trials' configs: the recipe with the sweep's base overrides and eval settings
        (composed once, at the first trial), then the params and the command line's overrides."""
        if self._composer is None:
            self._composer = TrialComposer(self.spec, self.overrides)
        return self._composer

    def _eval_plan(self, cfg, estimate_usd: float) -> EvalPlan:
        """FID settings from the trial's eval config (the sweep's `eval` overrides applied); the
        dollar rungs: absolute `rungs_usd` plus `rung_fractions` of the trial's budget (its
        estimate when it has none)."""
        spec = self.spec
        pruning = spec.pruner != "none"
        rungs = resolve_rungs(spec, self._base_estimate_usd or estimate_usd) if pruning else []
        return EvalPlan(
            fid_samples=cfg.eval.fid_samples,
            sampler_steps=cfg.eval.sampler_steps,
            rungs_usd=rungs,
            phase_rung=bool(spec.phase_rung) and pruning,
            final_eval=True,
            stop_at_usd=spec.trial_budget_usd if spec.objective == "fid_at_budget" else None,
            phase_end_usd=self._phase_end_usd(cfg),
        )

    def _phase_end_usd(self, cfg) -> list[float]:
        """fid_at_budget with a budget_split: the cumulative $ at which each phase but the last
        must end, so that a trial whose steps were sized on a rough throughput still spends its
        budget in the intended shares."""
        spec = self.spec
        if spec.objective != "fid_at_budget" or not spec.budget_split or not spec.trial_budget_usd:
            return []
        ends, total = [], 0.0
        for share in spec.budget_split[: len(cfg.phases) - 1]:
            total += share * spec.trial_budget_usd
            ends.append(total)
        return ends

    def _gpus(self) -> int:
        """GPUs per trial: the placement's, else a whole node's."""
        if self.placement is not None and self.placement.gpus_per_node is not None:
            return self.placement.gpus_per_node
        return self.cluster.gpus_per_node

    def _estimate(self, cfg, *, measure: bool = True):
        """The trial's cost estimate; on this machine, a missing throughput calibration is
        measured first (a few training steps; not when `measure` is False: a dry run), elsewhere
        it is an error that says how to get one."""
        evals = self._eval_counts(cfg)
        try:
            return estimate_run(
                cfg, self.cluster, self.workspace, gpus_per_node=self._gpus(), **evals
            )
        except ConfigError:
            if self.cluster.executor != "local" or not measure:
                raise
        phase = cfg.phases[0]
        self._say(f"calibrating {cfg.model['preset']} throughput on this machine (a few steps)")
        calibrate_benchmark(
            self.workspace,
            str(cfg.model["preset"]),
            mask_ratio=phase.mask_ratio,
            device_type=device_of(self.cluster),
            batch=min(phase.batch_size, 32),
        )
        return estimate_run(cfg, self.cluster, self.workspace, gpus_per_node=self._gpus(), **evals)

    def _eval_counts(self, cfg) -> dict[str, int]:
        """The FIDs a trial pays for (its rungs, its phase rungs, the final one), for estimates."""
        plan = self._eval_plan(cfg, 1.0)
        rungs = len(plan.rungs_usd) + (len(cfg.phases) - 1 if plan.phase_rung else 0)
        return {
            "fid_samples": plan.fid_samples,
            "sampler_steps": plan.sampler_steps,
            "fid_evals": rungs + (1 if plan.final_eval else 0),
        }

    def _usd_per_step(self, cfg, estimate) -> list[float]:
        """$ of one optimizer step of each phase. On this machine: timed on the trial's exact
        model (routes and all, a few steps); elsewhere: from the estimate's calibration."""
        if self.cluster.executor != "local":
            return _usd_per_step(cfg, estimate)
        rate = estimate.usd_per_gpu_hour * max(self._gpus(), 1) / 3600
        out = []
        for phase in cfg.phases:
            seconds = time_training_step(
                str(cfg.model["preset"]),
                mask_ratio=phase.mask_ratio,
                batch=phase.batch_size,
                steps=3,
                warmup=1,
                model_cfg=model_config(cfg),
            )
            out.append(seconds * rate)
        return out

    def _spent(self, max_age_s: float = 0.0) -> float:
        """The sweep's spend: the ledger's settled segments plus live figures of active runs
        (each active trial's own part kept as its "seen_usd"). A figure taken less than
        `max_age_s` ago is reused: a launch right after a loop pass needs no second sync."""
        cached = self._spent_cache
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        for info in self.active.values():
            try:
                segments = sync_run(self.ledger, info["run_dir"], self.cluster, sacct_wait_s=0)
            except UserError:
                continue  # accounting lags (sacct rows appear a little after the job): next poll
            info["seen_usd"] = sum(seg.cost_usd for seg in segments)
        spent = self.ledger.spent(sweep=self.spec.name)  # useful + wasted
        self._spent_cache = (time.monotonic(), spent)
        return spent

    def _launch(self, study: optuna.Study, trial: optuna.Trial, params: dict[str, Any]) -> bool:
        """Estimate and launch one trial; False (and the trial told FAIL) when it does not fit."""
        try:
            cfg = self._trial_config(params)
        except ConfigError as err:
            # A combination of valid values that does not compose (dim 96 with head_dim 64):
            # this trial fails with the reason; the sweep goes on with the next one. (Errors
            # of the sweep as a whole, from the estimate or the submission, still stop it.)
            trial.set_user_attr("error", f"invalid configuration: {err}")
            study.tell(trial, state=TrialState.FAIL)
            self._say(f"trial {trial.number}: FAIL, invalid configuration: {err}")
            return True
        return self._launch_config(study, trial, params, cfg)

    def _launch_config(
        self, study: optuna.Study, trial: optuna.Trial, params: dict[str, Any], cfg
    ) -> bool:
        estimate = self._estimate(cfg)
        if self.spec.objective == "fid_at_budget":
            # Size the phases so the trial spends its budget (the job still stops at it).
            per_step = self._usd_per_step(cfg, estimate)
            sized = budget_steps(self.spec, cfg, per_step)
            # The job ends each phase at its share of the budget and stops at the budget; the
            # step counts get room (x2) so that a throughput estimate a little high never ends a
            # trial below its budget. The schedules (warmup, cosine) follow the sized counts.
            sized = [
                f"{o.split('=')[0]}={2 * int(o.split('=')[1])}" if ".steps=" in o else o
                for o in sized
            ]
            cfg = self._trial_config(params, sized)
            estimate = self._estimate(cfg)
        est = self._trial_usd(estimate)
        if self.budget_usd is not None:
            # What is spent plus what the running trials may still spend: the figure of the
            # budget guard's last check is reused (the running trials' remaining estimates
            # cover what they spent since).
            headroom = launch_headroom(
                self.budget_usd,
                self._spent(max_age_s=self.guard_s),
                (i["estimate_usd"] - i.get("seen_usd", 0.0) for i in self.active.values()),
            )
            if est > headroom:
                trial.set_user_attr(
                    "not_started", f"estimate ${est:.4f} exceeds the remaining ${headroom:.4f}"
                )
                study.tell(trial, state=TrialState.FAIL)
                self.stop_reason = (
                    f"budget: the next trial's estimate ${est:.4f} exceeds the remaining "
                    f"${max(headroom, 0):.4f} of ${self.budget_usd:.4f}"
                )
                return False
        name = self._run_name(trial.number)
        # The trial's side of the trial <-> run link before anything is submitted: a controller
        # killed during the submission finds the run folder (and its launch record) again.
        run_dir = str((Path(self.workspace.runs_dir) / name).resolve())
        for key, value in {"run": name, "run_dir": run_dir, "estimate_usd": est}.items():
            trial.set_user_attr(key, value)
        record = launch_run(
            cfg,
            self.cluster,
            self.workspace,
            name,
            self.placement,
            sweep=self.spec.name,
            trial=trial.number,
            eval_plan=self._eval_plan(cfg, est),
        )
        crash_point("after-launch-record")
        write_estimate(record.run_dir, estimate, est)
        trial.set_user_attr("job_ids", record.job_ids)
        self.active[trial.number] = {
            "trial": trial,
            "run_dir": record.run_dir,
            "estimate_usd": est,
            "reported": set(),
            "pruned": False,
            "launched_at": time.time(),
        }
        self._say(
            f"trial {trial.number}: launched {name} (job {record.job_ids[0]}, est. ${est:.4f}) "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        )
        return True

    def _follow(self, study: optuna.Study, number: int, info: dict[str, Any]) -> bool:
        """Report new rungs, prune, and tell a finished trial. True when the trial is over."""
        run_dir = Path(info["run_dir"])
        trial: optuna.Trial = info["trial"]
        for row in self._new_rows(info, RunDir(run_dir).rungs):
            key = (row["kind"], row.get("rung_usd"))
            if key in info["reported"]:
                continue
            info["reported"].add(key)
            se = row.get("fid_se")
            if row["kind"] == "usd":
                report_fid(trial, row["fid"], row["cost_usd"], rung_usd=row["rung_usd"], se=se)
            else:  # "phase:<name>": the end of a masked phase
                phase = row["kind"].split(":", 1)[1]
                report_fid(trial, row["fid"], row["cost_usd"], phase=phase, se=se)
            if not info["pruned"] and should_prune(trial):
                reason = f"pruned at ${row['cost_usd']:.4f} (FID {row['fid']:.1f})"
                request_stop_file(run_dir, reason, kind=CutKind.PRUNED)
                info["pruned"] = True
                self._say(
                    f"trial {number}: pruned at ${row['cost_usd']:.4f} ({row['kind']}, "
                    f"FID {row['fid']:.1f})"
                )
        st = run_status(run_dir)
        if st.state not in FINAL_STATES:
            return False
        try:  # no waiting on sacct here: a lagging row is picked up at the next pass
            segments = sync_run(self.ledger, run_dir, self.cluster, sacct_wait_s=0)
        except UserError:
            segments = None
        # A final state and not one start (cancelled or failed while pending): nothing ran and
        # nothing is charged; waiting for accounting rows would wait for ever.
        never_ran = not segments and not segment_rows(run_dir)
        if (
            not never_ran
            and self.cluster.executor == "slurm"
            and (not segments or any(seg.state == "RUNNING" for seg in segments))
        ):
            return False  # accounting rows not complete yet: tell once they are
        cost = self.ledger.spent(run=run_dir.name)  # useful + wasted
        if self._spent_cache is not None:  # the sweep's figure gains what the trial spent since
            at, spent = self._spent_cache
            self._spent_cache = (at, spent + cost - info.get("seen_usd", 0.0))
        trial.set_user_attr("cost_usd", cost)
        trial.set_user_attr("status", st.state)
        result = st.result or {}
        scores = result.get("eval") or {}
        if scores.get("fid") is None:
            scores = read_eval(run_dir) or scores
        fid = scores.get("fid")
        budget_cut = cut_kind(result) == CutKind.TRIAL_BUDGET
        if info.get("cap_killed"):
            trial.set_user_attr("cost_usd", cost)
            trial.set_user_attr("status", st.state)
            trial.set_user_attr("cut_reason", "budget cap reached (killed)")
            study.tell(number, state=TrialState.PRUNED)
            self._say(f"trial {number}: cut by the budget cap (killed), ${cost:.4f}")
            return True
        if segments:  # what this settled trial really took refines the next estimates
            learn_from_run(self.workspace, run_dir, self.cluster, self.ledger)
            estimate = info.get("estimate_usd") or 0.0
            if estimate > 0:
                trial.set_user_attr("estimate_error", cost / estimate - 1)
        if st.state == "completed":  # measured throughput refines the next estimates
            try:
                calibrate_from_run(
                    self.workspace,
                    run_dir,
                    device_type=device_of(self.cluster),
                    devices=max(self.cluster.gpus_per_node, 1),
                )
            except UserError:
                pass
        if st.state == "completed" or (st.state == "cut" and budget_cut and fid is not None):
            for key, value in _score_attrs(scores).items():
                trial.set_user_attr(key, value)
            values = objective_values(self.spec, fid, cost, self._fid_ref(run_dir))
            study.tell(number, values)
            lo, hi = scores.get("fid_ci95") or (math.nan, math.nan)
            self._say(
                f"trial {number}: done, FID {fid:.1f} [{lo:.1f}, {hi:.1f}] "
                f"N={scores.get('num_samples')}, ${cost:.4f}"
            )
        elif st.state == "cut":
            trial.set_user_attr("cut_reason", result.get("cut_reason"))
            study.tell(number, state=TrialState.PRUNED)
            self._say(f"trial {number}: cut ({result.get('cut_reason')}), ${cost:.4f}")
        else:
            trial.set_user_attr("error", (st.error or st.state)[-1000:])
            study.tell(number, state=TrialState.FAIL)
            self._say(f"trial {number}: {st.state}, ${cost:.4f}: {(st.error or '').strip()[-200:]}")
        return True

    @staticmethod
    def _new_rows(info: dict[str, Any], path: Path) -> list[dict[str, Any]]:
        """The rows of a trial's rungs.jsonl, or none when the file has not changed since the last
        pass (a stat instead of a read and parse at every poll)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        mark = (st.st_mtime_ns, st.st_size)
        if info.get("rungs_mark") == mark:
            return []
        info["rungs_mark"] = mark
        return read_jsonl(path)

    def _fid_ref(self, run_dir: Path) -> float | None:
        """fid_per_dollar's reference F0: the untrained model's FID at the same N on the same
        data (the trial's own config, initial weights), measured once per data set and kept in
        sweeps/<name>/fid_ref.json."""
        if self.spec.objective != "fid_per_dollar":
            return None
        # Imported here: scoring a model imports torch (only fid_per_dollar sweeps need it).
        import torch

        from budget_lab.eval.evaluate import score_model
        from model.microdit import MicroDiT

        cfg = run_config_from_dict(read_config(run_dir) or {})
        key = f"{cfg.data.path}|{cfg.eval.fid_samples}|{cfg.eval.sampler_steps}|{cfg.model}"
        path = self._folder.fid_ref
        refs = json.loads(path.read_text()) if path.is_file() else {}
        if key not in refs:
            torch.manual_seed(cfg.seed)
            net = MicroDiT(model_config(cfg))
            scored = score_model(net, cfg, progress=False)
            refs[key] = scored["fid"]
            atomic_write_json(path, refs)
        return refs[key]

    # -- the loop ---------------------------------------------------------------------------------

    @property
    def _scope(self) -> str:
        return f"sweep:{self.spec.name}"

    def _running_jobs(self):
        """The active trials as the budget cap's policy sees them: burn rate and step time (a
        STOP is seen at the next step; one not obeyed within a step plus KILL_GRACE_S is killed)."""
        jobs = []
        for info in self.active.values():
            run_dir = Path(info["run_dir"])
            record_devices = max(self._gpus(), 1)
            rate = self.cluster.price.usd_per_gpu_hour * record_devices
            jobs.append(
                CapJob(
                    run=run_dir.name,
                    usd_per_hour=rate,
                    step_s=_step_seconds(run_dir),
                    started_at=info.get("launched_at", 0.0),
                    stopping=bool(info.get("stopping")),
                )
            )
        return jobs

    def plan(self) -> dict[str, Any]:
        """What `run()` would do, priced and launching nothing (`budget-lab sweep --dry-run`): the
        trials (every grid point, or the sampler's trial count priced at the base config), the
        phases of a trial, cluster and slots, $ and wall hours per trial and in total against the
        budget, from the same estimates (and calibration) the launches use. No study is opened."""
        spec = self.spec
        trials: list[dict[str, Any]] = []
        if spec.sampler == "grid":
            space = grid_search_space(spec)
            points = list(itertools.product(*space.values()))
            for values in points[: self.n_trials]:
                params = dict(zip(space, values, strict=True))
                trials.append({"params": params, **self._plan_trial(params)})
            count = len(trials)
        else:
            count = self.n_trials
            trials.append({"params": {}, **self._plan_trial({})})
        each = trials[0]
        total_usd = sum(t["usd"] for t in trials) * (count if spec.sampler != "grid" else 1)
        total_wall_h = sum(t["wall_hours"] for t in trials) * (
            count if spec.sampler != "grid" else 1
        )
        price = self.cluster.price
        source = {
            "fixed": f"fixed ${price.usd_per_gpu_hour:.4g}/device-hour",
            "on_demand": f"on-demand catalog ${price.usd_per_gpu_hour:.4g}/GPU-hour",
            "spot": f"spot catalog ${price.usd_per_gpu_hour:.4g}/GPU-hour (the ledger charges "
            "the AWS spot history)",
        }.get(str(price.kind), str(price.kind))
        if not trials or not isinstance(each.get("usd"), float):
            raise ConfigError(f"sweep {spec.name}: no trial configuration composes")
        return {
            "sweep": spec.name,
            "objective": spec.objective,
            "sampler": spec.sampler,
            "trials": count,
            "trial_plans": trials,
            "phases": each["phases"],
            "cluster": self.cluster.name,
            "slots": spec.slots,
            "gpus_per_trial": max(self._gpus(), 1),
            "price_source": source,
            "total_usd": total_usd,
            "wall_hours": total_wall_h / max(spec.slots, 1),
            "budget_usd": self.budget_usd,
        }

    def _trial_usd(self, estimate) -> float:
        """What a trial is expected to cost: its estimate, or for fid_at_budget (steps sized to
        spend the trial budget, then stopped at it) the budget plus what follows the stop (the
        final FID and the job's tail)."""
        est = estimate.cost_usd
        if self.spec.objective == "fid_at_budget" and self.spec.trial_budget_usd:
            split = estimate.by_activity_usd
            after = split.get("eval", 0.0) / max(estimate.fid_evals, 1) + split.get("other", 0.0)
            est = self.spec.trial_budget_usd + after  # sized steps run out after the budget
        return est

    def _plan_trial(self, params: dict[str, Any]) -> dict[str, Any]:
        """One trial of the plan: its phases and its estimate ($, wall hours, by activity)."""
        cfg = self._trial_config(params)
        estimate = self._estimate(cfg, measure=False)
        usd = self._trial_usd(estimate)
        split = dict(estimate.by_activity_usd)
        if usd != estimate.cost_usd:  # a budget-sized trial trains for what the rest leaves
            split["train"] = max(usd - (sum(split.values()) - split["train"]), 0.0)
        wall = usd / max(estimate.usd_per_gpu_hour * estimate.gpus, 1e-12)
        if estimate.usd_per_gpu_hour <= 0:
            wall = estimate.wall_hours
        return {
            "usd": float(usd),
            "wall_hours": float(wall),
            "by_activity_usd": split,
            "phases": [f"{p.name} ({p.steps} steps x {p.batch_size})" for p in estimate.phases],
            "sources": sorted({p.source for p in estimate.phases}),
        }

    def _warm_up(self) -> None:
        """Before the first launch: the base config, and the cost estimate of each grid point (up
        to 64 of them), so that what an estimate computes once (a FLOP count for a mask ratio with
        no calibration of its own: torch imported, the model traced, ~0.3 s each) is not paid
        inside a trial's launch. Other samplers pay it at the first trial of each new value."""
        if self.spec.sampler != "grid":
            return
        space = grid_search_space(self.spec)
        if math.prod(len(v) for v in space.values()) > 64:
            return
        for values in itertools.product(*space.values()):
            try:
                self._estimate(self._trial_config(dict(zip(space, values, strict=True))))
            except ConfigError:
                continue  # that trial fails at its launch, with this error

    def _prepare_eval(self) -> None:
        """The FID/KID reference of the trials' data and the alignment reader, made once here
        (cached beside the data) rather than inside the first trial, which would pay for them."""
        # Imported here: the FID reference imports torch (a sweep on a cluster does not need it).
        from budget_lab.eval.evaluate import prepare_references

        if self.cluster.executor != "local":
            return  # the data may live where only the cluster's nodes see it
        cfg = self._trials().without_params()
        cfg.data.path = str(Path(cfg.data.path).resolve())
        if not is_prepared_data(cfg.data.path):
            return  # the trials fail with the data error; nothing to prepare
        self._say("preparing the FID reference and the alignment reader (once per data set)")
        done = prepare_references(cfg, device="cpu")
        self._say(
            f"reference: {done['num_reference']} validation images; alignment "
            f"{'on' if done['alignment'] else 'off (not the built-in data)'} "
            f"({done['seconds']:.0f} s)"
        )

    @staticmethod
    def _started(study: optuna.Study) -> int:
        """Trials that count against n_trials: not enqueued-and-waiting, not refused by the
        budget before they started."""
        return sum(
            1
            for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.WAITING and not t.user_attrs.get("not_started")
        )

    def _reattach(self, study: optuna.Study) -> None:
        """After a restart: follow RUNNING trials again; launch those that were never submitted."""
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            name = self._run_name(frozen.number)
            run_dir = str((Path(self.workspace.runs_dir) / name).resolve())
            record = read_launch(run_dir)
            ours = (
                record is not None
                and record.sweep == self.spec.name
                and record.trial == frozen.number
                and bool(record.job_ids)
            )
            if not ours:  # asked, never submitted (the controller died in between)
                trial = _live_trial(study, frozen)
                if self.stop_reason is not None:  # the budget refused an earlier one
                    trial.set_user_attr("not_started", self.stop_reason)
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                self._say(f"trial {frozen.number}: launching (asked before a restart)")
                self._launch(study, trial, dict(frozen.params))
                continue
            trial = _live_trial(study, frozen)
            if frozen.user_attrs.get("run_dir") is None:  # died between submission and link
                trial.set_user_attr("run", name)
                trial.set_user_attr("run_dir", run_dir)
            if frozen.user_attrs.get("job_ids") is None:
                trial.set_user_attr("job_ids", record.job_ids)
                # ids recovered from the submitit folder: into launch.json for every reader
                write_launch(record)
            self.active[frozen.number] = {
                "trial": trial,
                "run_dir": run_dir,
                "estimate_usd": frozen.user_attrs.get("estimate_usd", 0.0),
                "reported": set(),
                "pruned": read_stop(run_dir) is not None,  # asked to stop: not pruned again
            }
            self._say(f"trial {frozen.number}: re-attached to {Path(run_dir).name}")

    def _hold_lock(self):
        """One controller per sweep: an exclusive lock on sweeps/<name>/controller.lock, held
        while this controller runs and released by the kernel when its process ends (even by
        SIGKILL). A second controller is refused with the holder's pid and host."""
        path = self._folder.lock
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held open for the controller's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(
                f"sweep {self.spec.name!r} is already being run by another controller "
                f"({holder}); one controller per sweep: wait for it to end, or stop it (Ctrl-C, "
                f"or kill its pid) and run this command again, which resumes the sweep"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n")
        fh.flush()
        return fh

    def run(self) -> SweepSummary:
        lock = self._hold_lock()
        try:
            return self._run()
        finally:
            lock.close()

    def _run(self) -> SweepSummary:
        study = self._study()
        self._warm_up()
        self._prepare_eval()
        cap = None
        if self.budget_usd is not None:
            cap = CapPolicy(
                self.budget_usd,
                poll_s=self.poll_s,
                guard_s=self.guard_s,
                kill_term_s=SLURM_KILL_WAIT_S if self.cluster.executor == "slurm" else KILL_TERM_S,
                crossed=self.ledger.crossed_thresholds(self._scope),
            )
        if self.cluster.executor == "local" and self.spec.slots > 1:
            # Share this machine's cores between the parallel local jobs.
            per_job = max((os.cpu_count() or 1) // self.spec.slots, 1)
            os.environ["OMP_NUM_THREADS"] = str(per_job)
        with Listener() as wake:  # the jobs launched from here on wake the loop when a row lands
            self._reattach(study)
            self._loop(study, cap, self._started(study), wake)
        if self.stop_reason is None:
            self.stop_reason = f"all {self.n_trials} trials done"
        return self.summarize(study)

    def _loop(self, study: optuna.Study, cap, started: int, wake: Listener) -> None:
        """Follow → refill → budget guard, then wait `poll_s` or until a job notifies."""
        while True:
            # Follow the running ones: report rungs, prune, tell the ended ones.
            for number in list(self.active):
                if self._follow(study, number, self.active[number]):
                    del self.active[number]
            # Refill the freed slots in the same pass (the count of started trials is read
            # again first: controllers sharing the study start trials too).
            if self.stop_reason is None and len(self.active) < self.spec.slots:
                started = self._started(study)
            while (
                self.stop_reason is None
                and len(self.active) < self.spec.slots
                and started < self.n_trials
            ):
                trial = study.ask()
                params = suggest(trial, self.spec)
                if not self._launch(study, trial, params):
                    break
                started += 1
            # The budget cap: stop runs (at their next step, with a checkpoint) before the
            # spend can pass the cap by the next check; report 50 / 80 / 100 % once each.
            now = time.monotonic()
            if cap is not None and self.active and cap.due(now):
                check = cap.check(now, self._spent(), self._running_jobs())
                decision = check.decision
                for fraction in decision.crossed:
                    self.ledger.record_threshold(
                        self._scope, fraction, decision.spent_usd, self.budget_usd
                    )
                    self._say(
                        f"budget: {fraction:.0%} of ${self.budget_usd:.4f} reached "
                        f"(${decision.spent_usd:.4f} spent)"
                    )
                for run, deadline in check.deadlines.items():
                    info = next(i for i in self.active.values() if Path(i["run_dir"]).name == run)
                    if not info.get("stopping"):
                        request_stop_file(
                            info["run_dir"], "budget cap reached", kind=CutKind.BUDGET_CAP
                        )
                        info["stopping"] = True
                        info["stop_deadline"] = deadline
                if decision.stop and self.stop_reason is None:  # no new trial after a cut
                    self.stop_reason = (
                        f"budget cap: ${decision.spent_usd:.4f} spent of ${self.budget_usd:.4f}; "
                        f"{len(decision.stop)} running trial(s) cut at their next step"
                    )
                    self._say(self.stop_reason)
            if cap is not None:
                self._kill_overruns(cap)
            if not self.active and (self.stop_reason is not None or started >= self.n_trials):
                return
            wake.wait(self.poll_s)

    def _kill_overruns(self, cap) -> None:
        """A cap is a promise: a job asked to stop for the budget that is still running past its
        step time plus KILL_GRACE_S (in a rung or final FID, a checkpoint write, a hung step) is
        cancelled (local: SIGTERM then SIGKILL; Slurm: scancel) and charged what it spent. Each
        kill runs in a thread of its own: the loop (the next budget check, the other deadlines)
        never waits for a kill's SIGTERM -> SIGKILL delay."""
        waiting = {
            number: info["stop_deadline"]
            for number, info in self.active.items()
            if info.get("stop_deadline") is not None and not info.get("cap_killed")
        }
        overdue = [
            number
            for number in cap.overdue(time.monotonic(), waiting)
            if run_status(Path(self.active[number]["run_dir"]), scheduler=False).state
            not in FINAL_STATES
        ]
        for number in overdue:
            run_dir = self.active[number]["run_dir"]
            threading.Thread(
                target=cancel_run, args=(run_dir,), name="cap-kill", daemon=True
            ).start()
            self.active[number]["cap_killed"] = True
            self._say(
                f"trial {number}: killed, it did not stop within {cap.kill_grace_s:.0f} s of the "
                f"budget cap's request"
            )

    # -- the end ----------------------------------------------------------------------------------

    def summarize(self, study: optuna.Study | None = None) -> SweepSummary:
        """The sweep's trials and its decisions (budget_lab.sweep.decide): configurations merged
        over repeats, best and ties, tiers, the noise-aware front and the verdict in words."""
        study = study or self._study()
        rows = []
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get("not_started"):
                continue
            rows.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "params": dict(t.params),
                    **{k: t.user_attrs.get(k) for k in _SCORE_ATTRS},
                    "cost_usd": t.user_attrs.get("cost_usd", 0.0),
                    "estimate_usd": t.user_attrs.get("estimate_usd"),
                    "estimate_error": t.user_attrs.get("estimate_error"),
                    "run": t.user_attrs.get("run"),
                    "run_dir": t.user_attrs.get("run_dir"),
                    "values": list(t.values) if t.values else None,
                    "error": t.user_attrs.get("error") or t.user_attrs.get("cut_reason"),
                }
            )
        done = [r for r in rows if r["state"] == "COMPLETE" and r["fid"] is not None]
        baseline = None
        if self.spec.objective == "fid_per_dollar" and done and done[0].get("run_dir"):
            baseline = self._fid_ref(Path(done[0]["run_dir"]))
        configs = []
        for key, params, group in group_repeats(done, REPEAT_PARAM):
            for r in group:  # a trial of an older study has no interval: exact at its FID
                if not r.get("fid_ci95"):
                    r["fid_ci95"], r["fid_se"] = [r["fid"], r["fid"]], 0.0
            config = config_from_rows(key, params, group, self.spec.objective, baseline)
            if config is not None:
                configs.append(config)
        pair_trials(configs, done, self.spec.objective)
        decision = decide(configs, self.spec.objective, self.spec.cost_tolerance)
        by_key = {c.key: c for c in configs}
        pareto = sorted(n for k in decision.front for n in by_key[k].trials)
        best = None
        if decision.best is not None:
            first = by_key[decision.best].trials[0]
            best = next(r for r in done if r["number"] == first)
        spent = self.ledger.spent(sweep=self.spec.name)
        return SweepSummary(
            sweep=self.spec.name,
            objective=self.spec.objective,
            stop_reason=self.stop_reason or "not run",
            trials=rows,
            pareto=pareto,
            best=best,
            configs=[_config_dict(c) for c in configs],
            tied=decision.tied_with_best,
            tiers=decision.tiers,
            front=decision.front,
            indistinguishable=decision.indistinguishable,
            verdict=decision.verdict,
            spent_usd=spent,
            budget_usd=self.budget_usd,
            study_storage=self.storage,
        )


def _live_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """The live `optuna.Trial` of a RUNNING trial that an earlier controller process asked for.

    Optuna offers no public way back to it: a live Trial comes from `study.ask()` (always a new
    trial) or from the constructor `Trial(study, trial_id)`, whose storage id a FrozenTrial holds
    only privately (`_trial_id`). This is the one place that reads it; everything else sets
    attributes with `Trial.set_user_attr` and ends a trial with `study.tell`."""
    return optuna.trial.Trial(study, frozen._trial_id)


def _config_dict(config) -> dict[str, Any]:
    """A scored configuration as plain data (summary.json, W&B)."""
    out = {
        "key": config.key,
        "params": config.params,
        "trials": config.trials,
        "fid": config.fid.as_dict(),
        "cost_usd": config.cost_usd,
        "score": config.score.as_dict(),
        "alignment": None if config.alignment is None else config.alignment.as_dict(),
        "paired": {k: m.as_dict() for k, m in config.paired.items()},
    }
    return out


def _step_seconds(run_dir: Path) -> float:
    """Seconds per optimizer step of a run, from its metrics (UNMEASURED_STEP_S, 5 s, before
    the first row)."""
    try:  # the last rows only: this runs at every budget-guard check of every running trial
        with open(RunDir(run_dir).metrics, "rb") as f:
            start = max(f.seek(0, os.SEEK_END) - 4096, 0)
            f.seek(start)
            tail = f.read().decode(errors="ignore").splitlines()[1 if start else 0 :]
    except OSError:
        tail = []
    rows = []
    for line in tail:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    last = next((r for r in reversed(rows) if r.get("train_seconds") and r.get("step")), None)
    if last is None:
        return UNMEASURED_STEP_S
    return float(last["train_seconds"]) / max(int(last["step"]), 1)


#: Scores of a trial's eval.json kept as its user attributes (name in the study: name in eval).
_SCORE_ATTRS = {
    "fid": "fid",
    "fid_ci95": "fid_ci95",
    "fid_se": "fid_se",
    "fid_method": "fid_method",
    "fid_n": "num_samples",
    "fid_n_ref": "num_reference",
    "kid": "kid",
    "kid_std": "kid_std",
    "alignment": "alignment",
    "alignment_ci95": "alignment_ci95",
    "alignment_se": "alignment_se",
}


def _score_attrs(scores: dict[str, Any]) -> dict[str, Any]:
    return {attr: scores.get(key) for attr, key in _SCORE_ATTRS.items() if key in scores}


def _usd_per_step(cfg, estimate) -> list[float]:
    """$ of one optimizer step of each phase, from the estimate's per-phase figures."""
    rate = estimate.usd_per_gpu_hour
    return [max(p.gpu_hours * rate / max(p.steps, 1), 1e-12) for p in estimate.phases]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)
