"""Sweep controller overhead per trial, and slot utilisation with short jobs.

Runs a real `SweepController` (Optuna ask/tell, the dollar ledger, submitit) over a tiny sweep
written to a temporary folder: nano trials of 4 + 2 steps at batch 8 on 160 prepared images, a
final FID of 4 samples at 2 sampler steps, a grid over the mask ratios of `sweeps/mask_ratio.yaml`
(× a second param so that ratios repeat), `slots` trials at a time, a sweep budget so that the
budget guard works as it does in a real sweep. The controller's methods are wrapped (in this
process only) to time what it does itself:

- per trial: Optuna `ask` + `suggest` + `_launch` (compose the run config, estimate its cost,
  the budget check against the ledger, `launch_run`, the trial's user attributes) + the final
  `_follow` (status, ledger sync, calibration from the run, `tell`). Reported with and without
  the part spent inside submitit's `executor.submit` (the local executor's Popen of the job
  controller; `sbatch` on Slurm): the job's start-up and run time are never counted;
- per poll: one pass of the controller's loop while trials run (status of every running trial,
  the ledger sync and the budget guard, Optuna's trial list), without its wait between passes
  (`poll_s`, or until a job's notification wakes it: budget_lab/launch/notify.py).

Wall time is `time.perf_counter`; CPU time is the controller thread's (`time.thread_time`; the
CPU of `sbatch`/`squeue`/`sacct` children is not in it, their wall time is).

Slot utilisation = Σ job running time / (slots × (last job end − first launch)), a job running
from its "start" row to its "end" row in segments.jsonl (the job's Python running our code: what
the local ledger prices); the slot time lost is split into job start-up (launch → start row),
detection (end row → the controller tells Optuna), refill (tell → the next launch) and the tail
(slots left idle once no trial is left to start).

    python bench/sweep_overhead.py                                 # local, 10 trials, 2 slots
    python bench/sweep_overhead.py --cluster slurm-local --trials 6
    python bench/sweep_overhead.py --out bench/results/sweep_overhead.md
    python bench/sweep_overhead.py --cluster slurm-local --out bench/results/sweep_overhead.md \
        --append                                                   # a second section
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the jobs inherit it: see BENCHMARKS.md

import argparse  # noqa: E402
import functools  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_overhead import (  # noqa: E402
    machine_line,
    percentile,
    prepare_tiny_data,
    slurm_up,
    slurm_version,
)

#: The mask ratios of sweeps/mask_ratio.yaml; a second param makes them repeat across trials.
MASK_RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
EMA_DECAYS = (0.9, 0.95, 0.98)

TRIAL_OVERRIDES = (
    "phases.0.steps={steps}",
    "phases.0.warmup_steps=1",
    "phases.0.batch_size=8",
    "phases.1.steps={finetune}",
    "phases.1.batch_size=8",
    "checkpoint.every=1000",
    "log_every=1",
)


# ------------------------------------------------------------------------------------------------
# Timing what the controller does.
# ------------------------------------------------------------------------------------------------


@dataclass
class Span:
    """One timed call: wall and controller-thread CPU seconds, and when it began (epoch)."""

    wall: float
    cpu: float
    began: float
    tag: Any = None


@dataclass
class Probe:
    """Named lists of spans; `wrap` times a function, `patch` swaps an attribute for a timed one."""

    spans: dict[str, list[Span]] = field(default_factory=lambda: defaultdict(list))
    _undo: list[tuple[Any, str, Any]] = field(default_factory=list)

    def wrap(self, name: str, fn: Callable[..., Any], tag: Callable[..., Any] | None = None):
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began, w0, c0 = time.time(), time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                span = Span(time.perf_counter() - w0, time.thread_time() - c0, began)
                span.tag = tag(*args, **kwargs) if tag is not None else None
                self.spans[name].append(span)

        return timed

    def patch(self, owner: Any, attr: str, name: str, tag: Callable[..., Any] | None = None):
        original = getattr(owner, attr)
        self._undo.append((owner, attr, original))
        setattr(owner, attr, self.wrap(name, original, tag))

    def undo(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)

    def total(self, name: str, what: str = "wall") -> float:
        return sum(getattr(s, what) for s in self.spans.get(name, []))


def instrument(probe: Probe):
    """Wrap the controller's steps and what it calls; returns the controller class to use."""
    import optuna

    import budget_lab.launch
    import budget_lab.launch.notify as notify_mod
    import budget_lab.launch.submit as submit_mod
    import budget_lab.ledger
    import budget_lab.ledger.calibration as calibration_mod
    import budget_lab.sweep
    import budget_lab.sweep.controller as controller_mod
    from budget_lab.sweep.controller import SweepController

    probe.patch(optuna.study.Study, "ask", "ask")
    probe.patch(optuna.study.Study, "tell", "tell")
    probe.patch(optuna.study.Study, "get_trials", "get_trials")
    # The controller's own names (its imports are at its top): patched where they are called.
    probe.patch(controller_mod, "suggest", "suggest")
    probe.patch(budget_lab.ledger.BudgetGuard, "check", "guard")
    probe.patch(controller_mod, "sync_run", "sync_run")
    probe.patch(controller_mod, "calibrate_from_run", "calibrate_from_run")
    probe.patch(calibration_mod, "_training_flops", "flops")  # a FLOP count (torch, meta device)
    probe.patch(controller_mod, "run_status", "run_status")
    probe.patch(
        controller_mod,
        "launch_run",
        "launch_run",
        tag=lambda cfg, cluster, workspace, name, *a, **k: name,
    )
    make_executor = submit_mod.make_executor

    def timed_executor(*args: Any, **kwargs: Any) -> Any:
        executor = make_executor(*args, **kwargs)
        executor.submit = probe.wrap("submit", executor.submit)
        executor.submit_array = probe.wrap("submit", executor.submit_array)
        return executor

    probe._undo.append((submit_mod, "make_executor", make_executor))
    submit_mod.make_executor = timed_executor
    # The loop's wait between passes: poll_s, or less when a job's notification wakes it.
    wait = notify_mod.Listener.wait

    def timed_wait(self: Any, timeout_s: float) -> list[str]:
        began, w0 = time.time(), time.perf_counter()
        messages = wait(self, timeout_s)
        span = Span(time.perf_counter() - w0, 0.0, began)
        span.tag = len(messages)
        probe.spans["sleep"].append(span)
        return messages

    probe._undo.append((notify_mod.Listener, "wait", wait))
    notify_mod.Listener.wait = timed_wait
    # Disk flushes made from Python (atomic file writes, Optuna's journal); SQLite's own (in C,
    # on each ledger commit) are not seen here.
    probe.patch(os, "fsync", "fsync")

    class TimedController(SweepController):
        """The controller, its steps timed (the behaviour is the parent's)."""

        def _trial_config(self, params, extra=()):
            return probe.wrap("compose", super()._trial_config)(params, extra)

        def _estimate(self, cfg):
            return probe.wrap("estimate", super()._estimate)(cfg)

        def _spent(self, max_age_s=0.0):
            return probe.wrap("spent", super()._spent)(max_age_s)

        def _warm_up(self):
            return probe.wrap("warm_up", super()._warm_up)()

        def _launch(self, study, trial, params):
            return probe.wrap("launch", super()._launch, tag=lambda s, t, p: t.number)(
                study, trial, params
            )

        def _follow(self, study, number, info):
            began, w0, c0 = time.time(), time.perf_counter(), time.thread_time()
            over = super()._follow(study, number, info)
            span = Span(time.perf_counter() - w0, time.thread_time() - c0, began, number)
            probe.spans["follow_final" if over else "follow_poll"].append(span)
            return over

        def run(self):
            return probe.wrap("run", super().run)()

    return TimedController


# ------------------------------------------------------------------------------------------------
# The sweep.
# ------------------------------------------------------------------------------------------------


def write_sweep(folder: Path, data: Path, trials: int, slots: int, steps: int) -> Path:
    """A tiny sweep file for the bench (format: sweeps/README.md)."""
    overrides = [o.format(steps=steps, finetune=max(steps // 2, 1)) for o in TRIAL_OVERRIDES]
    decays = EMA_DECAYS[: -(-trials // len(MASK_RATIOS))]
    spec = {
        "description": "bench/sweep_overhead.py: short nano trials to time the controller",
        "recipe": "nano",
        "base_overrides": [f"data.path={data.resolve()}", *overrides],
        "params": [
            {
                "name": "mask_ratio",
                "target": "mask_ratio",
                "type": "float",
                "low": 0.0,
                "high": 0.9,
                "grid": list(MASK_RATIOS),
            },
            {
                "name": "ema_decay",
                "target": "optim.ema_decay",
                "type": "categorical",
                "choices": list(decays),
            },
        ],
        "objective": "pareto",
        "sampler": "grid",
        "seed": 0,
        "n_trials": trials,
        "slots": slots,
        "pruner": "none",
        "eval": {"fid_samples": 4, "sampler_steps": 2, "grid_size": 0},
        "cluster": "local",
    }
    path = folder / "bench_overhead.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@dataclass
class TrialTimes:
    """One trial's life, epoch seconds (None: not seen)."""

    number: int
    run: str
    launched: float
    start: float | None
    end: float | None
    told: float | None
    state: str


def trial_times(probe: Probe, controller: Any) -> list[TrialTimes]:
    from budget_lab.rundir import segment_rows

    launched = {s.tag: s.began for s in probe.spans["launch_run"]}
    told = {s.tag: s.began + s.wall for s in probe.spans["follow_final"]}
    out = []
    for number in sorted(told.keys() | {s.tag for s in probe.spans["launch"]}):
        name = controller._run_name(number)
        if name not in launched:
            continue
        segs = segment_rows(controller.workspace.run_dir(name))
        start = segs[0]["start"] if segs else None
        end = segs[-1]["end"] if segs else None
        state = segs[-1]["status"] if segs else "no segment"
        out.append(TrialTimes(number, name, launched[name], start, end, told.get(number), state))
    return out


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------


@dataclass
class Times:
    """Wall and controller-CPU seconds of one part: one value per trial, per pass or per call."""

    wall: list[float]
    cpu: list[float]

    def __sub__(self, other: Times) -> Times:
        return Times(
            [a - b for a, b in zip(self.wall, other.wall, strict=True)],
            [a - b for a, b in zip(self.cpu, other.cpu, strict=True)],
        )

    def __add__(self, other: Times) -> Times:
        return Times(
            [a + b for a, b in zip(self.wall, other.wall, strict=True)],
            [a + b for a, b in zip(self.cpu, other.cpu, strict=True)],
        )


def calls(probe: Probe, name: str) -> Times:
    """Every call of `name`, one value each."""
    spans = probe.spans.get(name, [])
    return Times([s.wall for s in spans], [s.cpu for s in spans])


def per_trial(probe: Probe, name: str, numbers: list[int], key: str = "tag") -> Times:
    """`name`'s time per trial number: spans tagged with the number (key="tag"), or the n-th
    span for trial n (key="order": Optuna numbers a fresh study's trials 0, 1, 2, ...)."""
    wall: dict[int, float] = defaultdict(float)
    cpu: dict[int, float] = defaultdict(float)
    for i, span in enumerate(probe.spans.get(name, [])):
        number = i if key == "order" else span.tag
        wall[number] += span.wall
        cpu[number] += span.cpu
    return Times([wall[n] for n in numbers], [cpu[n] for n in numbers])


def within(probe: Probe, child: str, parent: str, numbers: list[int]) -> Times:
    """`child`'s time inside the `parent` span(s) of each trial (parents tagged with numbers)."""
    wall: dict[int, float] = defaultdict(float)
    cpu: dict[int, float] = defaultdict(float)
    parents = probe.spans.get(parent, [])
    for span in probe.spans.get(child, []):
        for p in parents:
            if p.began <= span.began <= p.began + p.wall:
                wall[p.tag] += span.wall
                cpu[p.tag] += span.cpu
                break
    return Times([wall[n] for n in numbers], [cpu[n] for n in numbers])


def outside(probe: Probe, child: str, parent: str) -> Times:
    """Calls of `child` that are not inside any `parent` span, one value each."""
    parents = probe.spans.get(parent, [])
    spans = [
        s
        for s in probe.spans.get(child, [])
        if not any(p.began <= s.began <= p.began + p.wall for p in parents)
    ]
    return Times([s.wall for s in spans], [s.cpu for s in spans])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def row(label: str, times: Times) -> str:
    """| part | wall median | wall p90 | wall max | CPU median | CPU p90 | n |"""
    w, c = times.wall, times.cpu
    if not w:
        return f"| {label} | – | – | – | – | – | 0 |"
    return (
        f"| {label} | {_ms(percentile(w, 50))} | {_ms(percentile(w, 90))} | {_ms(max(w))} "
        f"| {_ms(percentile(c, 50))} | {_ms(percentile(c, 90))} | {len(w)} |"
    )


TABLE_HEAD = [
    "| part | wall median | wall p90 | wall max | CPU median | CPU p90 | n |",
    "|---|---|---|---|---|---|---|",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", default="local", help="cluster name or YAML (default local)")
    parser.add_argument("--trials", type=int, default=10, help="trials (at most 15; default 10)")
    parser.add_argument("--slots", type=int, default=2, help="trials at a time (default 2)")
    parser.add_argument("--poll", type=float, default=0.2, help="controller poll_s (default 0.2)")
    parser.add_argument("--steps", type=int, default=4, help="masked steps per trial (default 4)")
    parser.add_argument("--budget", type=float, default=1.0, help="sweep budget $ (0: none)")
    parser.add_argument("--data", default=None, help="prepared data (default: made here, ~20 s)")
    parser.add_argument("--out", default=None, help="also write the Markdown here")
    parser.add_argument("--append", action="store_true", help="append to --out, not replace it")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument(
        "--storage",
        choices=("journal", "sqlite"),
        default="journal",
        help="the study's storage: the default journal file, or an SQLite file (default journal)",
    )
    args = parser.parse_args()
    if not 1 <= args.trials <= len(MASK_RATIOS) * len(EMA_DECAYS):
        parser.error(f"--trials must be in 1..{len(MASK_RATIOS) * len(EMA_DECAYS)}")

    from budget_lab.launch.cluster import load_cluster
    from budget_lab.rundir import SweepDir
    from budget_lab.sweep import load_sweep
    from budget_lab.workspace import Workspace

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = datetime.now().astimezone()
    machine = machine_line()
    print(f"machine: {machine}\ncommand: {command}\ndate: {started:%Y-%m-%d %H:%M %Z}", flush=True)

    cluster = load_cluster(args.cluster)
    cluster_note = ""
    if cluster.executor == "slurm":
        why = slurm_up()
        if why is not None:
            sys.exit(f"Slurm not reachable ({why}): start it with scripts/slurm/start-slurm.sh")
        if cluster.gpus_per_node:  # trials take a whole node's (fake) GPUs: one at a time
            cluster = load_cluster(args.cluster, ["gpus_per_node=0", "gpu_type=cpu"])
            cluster_note = " with `gpus_per_node=0 gpu_type=cpu` (CPU trials, priced per node-hour)"

    tmp = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    probe = Probe()
    try:
        data = Path(args.data) if args.data else prepare_tiny_data(tmp / "data")
        spec = load_sweep(write_sweep(tmp, data, args.trials, args.slots, args.steps))
        workspace = Workspace(tmp / "ws").ensure()
        controller_cls = instrument(probe)
        controller = controller_cls(
            spec,
            workspace,
            cluster,
            budget_usd=args.budget or None,
            poll_s=args.poll,
            progress=True,
            storage=(
                f"sqlite:///{SweepDir(workspace.sweep_dir(spec.name)).legacy_db}"
                if args.storage == "sqlite"
                else None
            ),
        )
        workspace.sweep_dir(spec.name).mkdir(parents=True, exist_ok=True)
        cpu0 = time.thread_time()
        summary = controller.run()
        run_cpu = time.thread_time() - cpu0
        probe.undo()
        trials = trial_times(probe, controller)
    finally:
        probe.undo()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    lines = report(args, probe, trials, summary, run_cpu, machine, command, started, cluster)
    lines[4:4] = [f"Cluster: `{cluster.name}`{cluster_note}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if args.append and Path(args.out).is_file():
            text = Path(args.out).read_text().rstrip("\n") + "\n\n" + text
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


def report(args, probe, trials, summary, run_cpu, machine, command, started, cluster) -> list[str]:
    """The Markdown: per-trial controller time, per-poll time, slot utilisation and its losses."""
    import submitit

    numbers = [t.number for t in trials]
    n = len(numbers)
    ask = per_trial(probe, "ask", numbers, key="order")
    suggest = per_trial(probe, "suggest", numbers, key="order")
    launch = per_trial(probe, "launch", numbers)
    final = per_trial(probe, "follow_final", numbers)
    total = ask + suggest + launch + final
    submit = within(probe, "submit", "launch", numbers)
    own = total - submit
    compose = within(probe, "compose", "launch", numbers)
    estimate = within(probe, "estimate", "launch", numbers)
    flops = within(probe, "flops", "launch", numbers)
    spent = within(probe, "spent", "launch", numbers)
    launch_run = within(probe, "launch_run", "launch", numbers)
    attrs = launch - compose - estimate - spent - launch_run
    status = within(probe, "run_status", "follow_final", numbers)
    sync = within(probe, "sync_run", "follow_final", numbers)
    calibrate = within(probe, "calibrate_from_run", "follow_final", numbers)
    tell = within(probe, "tell", "follow_final", numbers)
    warm = calls(probe, "warm_up")
    fsyncs = calls(probe, "fsync")
    fsync_per_trial = sum(fsyncs.wall) / max(n, 1)

    # Per pass of the loop: everything but the sleep and the per-trial work above.
    run_wall = probe.total("run")
    sleep = probe.total("sleep")
    passes = len(probe.spans.get("sleep", [])) + 1
    woken = sum(1 for span in probe.spans.get("sleep", []) if span.tag)
    per_pass = (run_wall - sleep - sum(total.wall)) / max(passes, 1)
    poll_follow = calls(probe, "follow_poll")
    poll_status = calls(probe, "run_status")  # includes the final follows' (n of them)
    guard_spent = outside(probe, "spent", "launch")
    guard_sync = outside(probe, "sync_run", "follow_final")

    # Slot utilisation.
    done = [t for t in trials if t.start is not None and t.end is not None]
    first_launch = min(t.launched for t in trials)
    last_end = max(t.end for t in done) if done else first_launch
    window = last_end - first_launch
    slots = args.slots
    busy = sum(t.end - t.start for t in done)
    util = busy / (slots * window) if window > 0 else float("nan")
    held = sum(t.end - t.launched for t in done) / (slots * window) if window > 0 else 0.0
    startup = [t.start - t.launched for t in done]
    detect = [t.told - t.end for t in done if t.told is not None]
    launches = sorted(t.launched for t in trials)
    refill = []
    for t in done:
        later = [x for x in launches if t.told is not None and x >= t.told]
        if later:
            refill.append(later[0] - t.told)
    # The tail: after the last launch nothing is left to start; slots whose trial ends before
    # the last one are idle until then.
    tail = sum(last_end - t.end for t in done if launches[-1] <= t.end < last_end)
    usable = slots * window - tail
    util_no_tail = busy / usable if usable > 0 else float("nan")
    job_s = [t.end - t.start for t in done]
    states: dict[str, int] = defaultdict(int)
    for t in trials:
        states[t.state] += 1

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    own_med, own_p90 = percentile(own.wall, 50), percentile(own.wall, 90)
    parts = {
        "compose (`RecipeBase.compose`, once)": compose,
        "Optuna `ask`": ask,
        "Optuna `tell`": tell,
        "Optuna user attributes": attrs,
        "`suggest`": suggest,
        "estimate (FLOP counts)": estimate,
        "`calibrate_from_run`": calibrate,
        "`launch_run`": launch_run,
        "ledger `sync_run`": sync,
    }
    biggest = sorted(
        ((label, percentile(t.cpu, 50)) for label, t in parts.items()), key=lambda x: -x[1]
    )[:5]
    # Controller CPU per loop pass outside the per-trial work (the thread's CPU over the run).
    poll_cpu = max(run_cpu - sum(total.cpu), 0.0)
    per_pass_cpu = poll_cpu / max(passes, 1)
    poll_cpu_per_trial = poll_cpu / max(n, 1)
    lost = sum(mean(xs) for xs in (startup, detect, refill) if xs)  # no refill: 2 trials
    if cluster.executor == "slurm":
        startup_why = "scheduling, srun and one Python"
        detect_why = (
            f", plus the final `sync_run` waiting for sacct's end record: "
            f"{percentile(sync.wall, 50):.2f} s median, the loop blocked meanwhile"
        )
    else:
        startup_why = "two Pythons in a row: submitit's job controller, then the task"
        detect_why = ""
    cpu_med, cpu_p90 = percentile(own.cpu, 50), percentile(own.cpu, 90)
    lines = [
        f"### Sweep controller overhead and slot utilisation ({started:%Y-%m-%d})",
        "",
        f"Machine: {machine}.",
        "",
        f"Command: `{command}`; submitit {submitit.__version__}"
        + (f", {slurm_version()}" if cluster.executor == "slurm" else "")
        + ".",
        "",
        f"Sweep: {n} nano trials ({args.steps} masked + {max(args.steps // 2, 1)} finetune steps "
        "at batch 8, then the final FID of 4 samples at 2 sampler steps), a grid over the mask "
        f"ratios {list(MASK_RATIOS)} × EMA decay, {slots} slots, poll_s {args.poll}, budget "
        + (f"${args.budget}" if args.budget else "none")
        + f"; trial states {dict(states)}; stop: {summary.stop_reason}. Study storage: "
        + ("Optuna journal file (the default)" if args.storage == "journal" else "SQLite file")
        + ". Times in ms; CPU is the controller thread's (`time.thread_time`).",
        "",
        "Set-up, once per sweep before the first launch (`_warm_up`: the base config, and the "
        "cost estimate of each grid point, whose FLOP counts import torch): "
        + (f"{_ms(warm.wall[0])} ms wall, {_ms(warm.cpu[0])} ms CPU." if warm.wall else "–"),
        "",
        "#### Controller time per trial: ask → suggest → compose → estimate → launch → tell",
        "",
        *TABLE_HEAD,
        row("**total**", total),
        row("**total without submitit's `executor.submit`**", own),
        row("Optuna `ask`", ask),
        row("`suggest`", suggest),
        row("`_launch`", launch),
        row("  compose the run config (`RecipeBase.compose`)", compose),
        row("  estimate the cost (`estimate_run`)", estimate),
        row("    of which FLOP counts of uncalibrated ratios", flops),
        row("  budget check (ledger sync of running trials + spend)", spent),
        row("  `launch_run` (run folder, config.yaml, launch.json, submit)", launch_run),
        row("    submitit `executor.submit`", submit),
        row("  Optuna user attributes (4 writes)", attrs),
        row("final `_follow`", final),
        row("  `run_status`", status),
        row("  ledger `sync_run`", sync),
        row("  `calibrate_from_run`", calibrate),
        row("  Optuna `tell`", tell),
        "",
        "#### Controller time per poll, while trials run (the wait between passes excluded)",
        "",
        *TABLE_HEAD,
        row("`_follow` of one running trial", poll_follow),
        row("`run_status` (every call)", poll_status),
        row("budget guard: sync of the running trials + spend", guard_spent),
        row("  `sync_run` of one running trial", guard_sync),
        row("budget guard: `check`", calls(probe, "guard")),
        row("Optuna `get_trials` (when a slot is free)", calls(probe, "get_trials")),
        "",
        f"Loop passes: {passes}; controller time per pass outside the per-trial work above: "
        f"{per_pass * 1000:.1f} ms on average (wall); waiting {sleep:.1f} s of the "
        f"{run_wall:.1f} s the sweep took; {woken} of the {passes - 1} waits ended early by a "
        f"job's notification. Controller thread CPU over the whole sweep: {run_cpu:.2f} s, "
        f"{run_cpu / max(n, 1) * 1000:.0f} ms per trial with the polling. Disk flushes from Python "
        f"(atomic writes, the journal; SQLite's are in C and not counted): {len(fsyncs.wall)} "
        f"fsync calls, {_ms(percentile(fsyncs.wall, 50) if fsyncs.wall else 0.0)} ms median "
        f"each, {_ms(fsync_per_trial)} ms per trial.",
        "",
        "#### Slot utilisation",
        "",
        "| measure | value |",
        "|---|---|",
        f"| job running time per trial (start row → end row), median | "
        f"{percentile(job_s, 50):.2f} s |",
        f"| window: first launch → last job end | {window:.2f} s |",
        f"| **utilisation**: Σ job running / (slots × window) | **{util:.1%}** |",
        f"| the same, the tail left out | {util_no_tail:.1%} |",
        f"| slots held by a job process: Σ (launch → end row) / (slots × window) | {held:.1%} |",
        f"| lost per trial: job start-up (launch → start row), median / mean | "
        f"{percentile(startup, 50):.2f} / {mean(startup):.2f} s |",
        f"| lost per trial: detection (end row → tell), median / mean | "
        f"{percentile(detect, 50):.2f} / {mean(detect):.2f} s |",
        f"| lost per trial: refill (tell → next launch), median / mean | "
        f"{percentile(refill, 50):.2f} / {mean(refill):.2f} s |",
        f"| tail: slot-seconds idle after the last launch | {tail:.2f} s |",
        "",
        "#### Against the targets",
        "",
        f"- Controller overhead per trial ≤ 50 ms, the job excluded, as the controller's own "
        f"work (its CPU time): {cpu_med * 1000:.1f} ms median, {cpu_p90 * 1000:.1f} ms p90 "
        f"without submitit's submit: **{'met' if cpu_p90 <= 0.050 else 'NOT met'}**. As wall "
        f"time: {own_med * 1000:.1f} ms median, {own_p90 * 1000:.1f} ms p90 "
        f"({percentile(total.wall, 50) * 1000:.1f} ms median with submitit's submit): "
        f"**{'met' if own_p90 <= 0.050 else 'NOT met'}**; the wall time above the CPU time is "
        f"disk flushes (about {_ms(fsync_per_trial)} ms per trial seen from Python, plus "
        "SQLite's ledger commits) and waiting for a core: the two training jobs keep both of "
        "this machine's cores busy.",
        "  The largest parts, by median controller CPU per trial: "
        + ", ".join(f"{label} {_ms(value)} ms" for label, value in biggest)
        + f". Polling adds {per_pass_cpu * 1000:.1f} ms of controller CPU per loop pass "
        f"(every {args.poll} s plus the pass itself), {poll_cpu_per_trial * 1000:.0f} ms per "
        "trial over this sweep.",
        f"- Slot utilisation ≥ 95%: **{util:.1%}, {'met' if util >= 0.95 else 'NOT met'}**. "
        f"A trial's job ran {mean(job_s):.1f} s on average and its slot lost {lost:.1f} s around "
        f"it: job start-up {mean(startup):.1f} s ({startup_why}; the start row is written "
        f"before torch is imported), detection {mean(detect):.2f} s (the job's notification "
        f"wakes the loop, else up to one `poll_s`; then the loop pass{detect_why}; passes are "
        f"sequential, so a slow launch in the same pass delays it too), refill "
        f"{mean(refill):.2f} s (ask → compose → estimate → launch). With "
        f"these losses, 95% needs jobs of at least {19 * lost:.0f} s (J / (J + "
        f"{lost:.1f} s) ≥ 0.95).",
        "",
        "Every trial (seconds from the first launch):",
        "",
        "| trial | run | launched | start row | end row | told | job s | state |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def rel(x: float | None) -> str:
        return "–" if x is None else f"{x - first_launch:.2f}"

    for t in trials:
        job = "–" if t.start is None or t.end is None else f"{t.end - t.start:.2f}"
        lines.append(
            f"| {t.number} | {t.run} | {rel(t.launched)} | {rel(t.start)} | {rel(t.end)} "
            f"| {rel(t.told)} | {job} | {t.state} |"
        )
    return lines + [""]


if __name__ == "__main__":
    main()
