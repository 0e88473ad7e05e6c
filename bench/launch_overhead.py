"""Launch overhead: from `launch_run` to the job running, and the controller's cost per launch.

For N launches of a tiny run (nano, 2 + 1 steps at batch 8, on a 160-image prepared set), one at
a time (each waits for the previous run to end, so no launch queues behind another), this times:

- `launch_run` itself: wall time, and the controller's CPU time (this process, user + system;
  on Slurm also the `sbatch` child it waits for, reported apart);
- on Slurm, launch → the job's start in sacct (whole seconds: Slurm's own clock);
- launch → the job's Python is running submitit's job entry point (the first line of the task's
  submitit log, "Starting with JobEnvironment": Python, numpy and submitit imported);
- launch → the job's "start" row in the run's segments.jsonl (`TrainJob.__call__`: written
  after it has imported the config and trainer modules, i.e. torch);
- launch → the trainer is ready (result.json `started_at`: model built, data opened, about to
  take its first step);
- launch → the first metrics row (the first optimizer step is done).

The times come from the rows' own timestamps (the job and this process share the machine's
clock), so the polling interval does not add to them. The bench process has imported
`budget_lab.launch` (and submitit) before the first launch, as a controller has: every launch is
measured warm.

    python bench/launch_overhead.py                                  # slurm-local and local
    python bench/launch_overhead.py --cluster local --n 10
    python bench/launch_overhead.py --out bench/results/launch_overhead.md

The local Slurm must be up for `slurm-local` (`bash scripts/slurm/start-slurm.sh`, as root).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the job inherits it: see BENCHMARKS.md

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from budget_lab.config import compose_run  # noqa: E402
from budget_lab.io import read_jsonl  # noqa: E402
from budget_lab.launch import Placement, launch_run, run_status  # noqa: E402
from budget_lab.launch.cluster import load_cluster  # noqa: E402
from budget_lab.launch.status import log_paths  # noqa: E402
from budget_lab.rundir import RunDir  # noqa: E402
from budget_lab.workspace import Workspace  # noqa: E402

FINAL = ("completed", "failed", "cut", "cancelled", "interrupted")

#: The tiny run: start-up dominates, training is a few steps.
TINY_OVERRIDES = (
    "phases.0.steps=2",
    "phases.0.warmup_steps=1",
    "phases.0.batch_size=8",
    "phases.1.steps=1",
    "phases.1.batch_size=8",
    "checkpoint.every=1000",
    "log_every=1",
    "eval.grid_size=0",
)


# ------------------------------------------------------------------------------------------------
# Small helpers shared with bench/sweep_overhead.py.
# ------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def machine_line() -> str:
    """CPU model, cores, memory and load: what the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.1f} GiB RAM"
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{model}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min) at the start"
    )


def prepare_tiny_data(root: Path) -> Path:
    """160 synthetic 32 px images (144 train, 16 val) as pixel latents + MiniLM tokens (16)."""
    from budget_lab.data.builtin import ensure_builtin_data

    return ensure_builtin_data(root / "latents", n=160, max_tokens=16, progress=False)


def slurm_up() -> str | None:
    """None when the Slurm clients reach a controller; else why not."""
    try:
        out = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if out.returncode == 0 else (out.stderr.strip() or f"sinfo exit {out.returncode}")


def slurm_version() -> str:
    try:
        return subprocess.run(["sinfo", "-V"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def sacct_start(job_id: str) -> float | None:
    """The job's first start time in Slurm's accounting (epoch seconds, whole seconds)."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "Start"],
        capture_output=True,
        text=True,
    )
    for line in out.stdout.splitlines():
        text = line.strip()
        if text and text not in ("Unknown", "None"):
            return datetime.fromisoformat(text).timestamp()
    return None


# ------------------------------------------------------------------------------------------------
# One launch.
# ------------------------------------------------------------------------------------------------


@dataclass
class LaunchTiming:
    """What one launch cost, in seconds (None: not observed before the timeout)."""

    run: str
    job_id: str
    launch_wall_s: float
    launch_cpu_s: float  # this process, user + system, during launch_run
    children_cpu_s: float | None  # sbatch (Slurm only), user + system
    to_python_s: float | None = None  # submitit's log: the job's entry point running
    to_job_start_s: float | None = None
    to_trainer_ready_s: float | None = None
    to_first_metrics_s: float | None = None
    to_sched_start_s: float | None = None  # Slurm's accounting (whole seconds)
    state: str = "?"


#: What a job imports before its segments.jsonl start row (see `python_floor`).
FLOOR_IMPORTS = (
    "submitit.core.submission, budget_lab.launch.job, budget_lab.config, budget_lab.train.trainer"
)


def submitit_log_start(record) -> float | None:
    """When the job's task logged "Starting with JobEnvironment" (epoch seconds, ms resolution;
    the logging module writes local time)."""
    stdout, stderr = log_paths(record)
    for path in (stderr, stdout):
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "Starting with JobEnvironment" in line and "(" in line:
                stamp = line.split("(", 1)[1].split(")", 1)[0]
                try:
                    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    return None
    return None


def python_floor(repeat: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of a bare fresh Python importing what a job imports before its
    start row (`FLOOR_IMPORTS`: submitit's job entry point, the job module, then the config and
    trainer modules, hence torch), on this machine, now."""
    code = f"import {FLOOR_IMPORTS}"
    walls, cpus = [], []
    for _ in range(repeat):
        kids0 = _cpu_now()[1]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_now()[1] - kids0)
    return percentile(walls, 50), percentile(cpus, 50)


def _cpu_now() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def time_one_launch(cfg, cluster, workspace: Workspace, name: str, placement, timeout_s: float):
    """Launch `cfg` once and follow it to its end; the timings of its start-up."""
    cpu0, kids0 = _cpu_now()
    t_launch = time.time()
    p0 = time.perf_counter()
    record = launch_run(cfg, cluster, workspace, name, placement)
    wall = time.perf_counter() - p0
    cpu1, kids1 = _cpu_now()
    timing = LaunchTiming(
        run=name,
        job_id=record.job_ids[0],
        launch_wall_s=wall,
        launch_cpu_s=cpu1 - cpu0,
        # Only sbatch is waited for during a Slurm launch; the local executor's earlier job
        # processes are reaped at unrelated times and would add their whole CPU here.
        children_cpu_s=kids1 - kids0 if cluster.executor == "slurm" else None,
    )
    run_dir = Path(record.run_dir)
    files = RunDir(run_dir)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = run_status(run_dir, scheduler=False)  # files only: do not load the scheduler
        if timing.to_job_start_s is None:
            starts = [r for r in read_jsonl(files.segments) if r["event"] == "start"]
            if starts:
                timing.to_job_start_s = starts[0]["time"] - t_launch
        if timing.to_trainer_ready_s is None and st.result and st.result.get("started_at"):
            timing.to_trainer_ready_s = st.result["started_at"] - t_launch
        if timing.to_first_metrics_s is None:
            rows = read_jsonl(files.metrics)
            if rows:
                timing.to_first_metrics_s = rows[0]["time"] - t_launch
        if timing.to_first_metrics_s is not None:
            st = run_status(run_dir)  # the scheduler's word on whether the job is over
            if st.state in FINAL:
                timing.state = st.state
                break
        time.sleep(0.25)
    else:
        timing.state = f"timeout ({run_status(run_dir).state})"
    started = submitit_log_start(record)
    if started is not None:
        timing.to_python_s = started - t_launch
    if cluster.executor == "slurm":
        start = None
        for _ in range(20):  # accounting rows lag a little
            start = sacct_start(timing.job_id)
            if start is not None:
                break
            time.sleep(0.5)
        if start is not None:
            timing.to_sched_start_s = start - t_launch
    return timing


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------

METRICS = [
    ("launch_wall_s", "`launch_run` wall time (controller)"),
    ("launch_cpu_s", "`launch_run` CPU time, controller process"),
    ("children_cpu_s", "`launch_run` CPU time, `sbatch` child"),
    ("to_sched_start_s", "launch → job started (Slurm accounting, whole seconds)"),
    ("to_python_s", "launch → job's Python in submitit's entry point (its log)"),
    ("to_job_start_s", "launch → `TrainJob` running, torch imported (segments.jsonl `start`)"),
    ("to_trainer_ready_s", "launch → trainer ready (model built, data opened)"),
    ("to_first_metrics_s", "launch → first metrics row (first step done)"),
]


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def summary_table(cluster_name: str, timings: list[LaunchTiming]) -> list[str]:
    lines = [
        f"#### `{cluster_name}` ({len(timings)} launches)",
        "",
        "| measure | median | p90 | min | max |",
        "|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        values = [getattr(t, key) for t in timings if getattr(t, key) is not None]
        if not values:
            continue
        lines.append(
            f"| {label} | {_fmt_ms(percentile(values, 50))} | {_fmt_ms(percentile(values, 90))} "
            f"| {_fmt_ms(min(values))} | {_fmt_ms(max(values))} |"
        )
    lines += [
        "",
        "Where the time goes (median of each launch's own differences): " + stages(timings),
    ]
    queued = [t for t in timings if (t.to_sched_start_s or 0.0) > QUEUED_S]
    if queued:
        lines += [
            "",
            f"{len(queued)} of {len(timings)} launches waited more than {QUEUED_S:.0f} s for Slurm "
            "to start them (other jobs held the node: the cluster is shared): "
            + ", ".join(f"{t.run} {t.to_sched_start_s:.1f} s" for t in queued)
            + ". The p90 and max above include that queueing.",
        ]
    bad = [f"{t.run}: {t.state}" for t in timings if t.state != "completed"]
    if bad:
        lines += ["", f"Runs that did not complete: {', '.join(bad)}."]
    return lines


#: A launch whose Slurm start comes later than this waited in the queue behind other jobs.
QUEUED_S = 2.0


def stages(timings: list[LaunchTiming]) -> str:
    """The start-up split into its steps, each the median over launches of its own length."""
    steps = [
        ("`launch_run`", None, "launch_wall_s"),
        ("scheduling", None, "to_sched_start_s"),
        ("to Python in submitit's entry point", "to_sched_start_s", "to_python_s"),
        ("imports (torch) and unpickling to the start row", "to_python_s", "to_job_start_s"),
        ("model, EMA, data and accelerate set-up", "to_job_start_s", "to_trainer_ready_s"),
        ("the first step (first forward/backward)", "to_trainer_ready_s", "to_first_metrics_s"),
    ]
    parts = []
    for label, since, until in steps:
        values = []
        for t in timings:
            end = getattr(t, until)
            begin = 0.0 if since is None else getattr(t, since)
            if since == "to_sched_start_s" and begin is None:
                begin = 0.0  # no scheduler: from the launch
            if end is not None and begin is not None:
                values.append(max(end - max(begin, 0.0), 0.0))
        if values and not (
            until == "to_sched_start_s" and all(t.to_sched_start_s is None for t in timings)
        ):
            parts.append(f"{label} {_fmt_ms(percentile(values, 50))}")
    return "; ".join(parts) + "."


def raw_table(timings: list[LaunchTiming]) -> list[str]:
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| run | job | launch wall | launch CPU | sbatch CPU | sched start | job Python "
        "| job start row | trainer ready | 1st metrics | state |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t.run} | {t.job_id} | {cell(t.launch_wall_s)} | {cell(t.launch_cpu_s)} "
            f"| {cell(t.children_cpu_s)} | {cell(t.to_sched_start_s)} | {cell(t.to_python_s)} "
            f"| {cell(t.to_job_start_s)} "
            f"| {cell(t.to_trainer_ready_s)} | {cell(t.to_first_metrics_s)} | {t.state} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cluster",
        action="append",
        default=None,
        help="a cluster name or YAML (repeatable; default: slurm-local, then local)",
    )
    parser.add_argument("--n", type=int, default=5, help="launches per cluster (default 5)")
    parser.add_argument("--data", default=None, help="prepared data (default: made here, ~20 s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run at most")
    parser.add_argument("--out", default=None, help="also write the Markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()
    clusters = args.cluster or ["slurm-local", "local"]

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = datetime.now().astimezone()
    machine = machine_line()
    print(f"machine: {machine}\ncommand: {command}\ndate: {started:%Y-%m-%d %H:%M %Z}", flush=True)

    floor_wall, floor_cpu = python_floor()

    tmp = Path(tempfile.mkdtemp(prefix="launch-overhead-"))
    results: dict[str, list[LaunchTiming]] = {}
    try:
        data = Path(args.data) if args.data else prepare_tiny_data(tmp / "data")
        workspace = Workspace(tmp / "ws").ensure()
        cfg = compose_run("nano", [f"data.path={Path(data).resolve()}", *TINY_OVERRIDES])
        for name in clusters:
            cluster = load_cluster(name)
            if cluster.executor == "slurm":
                why = slurm_up()
                if why is not None:
                    print(f"skipping {name}: Slurm not reachable ({why})", file=sys.stderr)
                    continue
            # On Slurm, ask for no (fake) GPU: a CPU job that actually trains.
            placement = Placement(gpus_per_node=0)
            timings = []
            for i in range(args.n):
                timing = time_one_launch(
                    cfg, cluster, workspace, f"{cluster.name}-{i:02d}", placement, args.timeout
                )
                timings.append(timing)
                print(
                    f"{cluster.name} #{i}: launch {timing.launch_wall_s * 1000:.0f} ms wall, "
                    f"{timing.launch_cpu_s * 1000:.0f} ms CPU; job start "
                    f"{timing.to_job_start_s}, first metrics {timing.to_first_metrics_s} "
                    f"({timing.state})",
                    flush=True,
                )
            results[cluster.name] = timings
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    import submitit as _submitit

    end_load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"### Launch overhead: `launch_run` → job running ({started:%Y-%m-%d})",
        "",
        f"Machine: {machine}.",
        "",
        f"Command: `{command}`; submitit {_submitit.__version__}, {slurm_version()}. "
        f"Run: nano, `{' '.join(TINY_OVERRIDES)}` on 160 prepared 32 px images; one launch at a "
        "time (each after the previous run ended), CPU-only placement.",
        "",
        "The floor of launch → start row: a bare fresh Python importing what the job imports "
        f"before it writes that row (`import {FLOOR_IMPORTS}`) took {floor_wall:.2f} s wall "
        f"({floor_cpu:.2f} s CPU) on this machine at the start. The local executor starts two "
        "Pythons in a row (submitit's job controller, then the task); Slurm one, through "
        "slurmd/slurmstepd and srun. Load average at the end: "
        f"{end_load[0]:.2f} / {end_load[1]:.2f} / {end_load[2]:.2f}. Slurm's accounting keeps "
        "whole seconds (truncated), so its start can read up to 1 s before the launch.",
        "",
    ]
    for name, timings in results.items():
        lines += summary_table(name, timings) + [""]
    if results:
        lines += ["Every launch (seconds):", ""]
        for name, timings in results.items():
            lines += [f"`{name}`:", ""] + raw_table(timings) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
