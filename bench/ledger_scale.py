"""`budget-lab cost report` over a large ledger: is the GROUP BY fast enough?

Fills a fresh SQLite ledger (WAL) with N synthetic segments (default 100,000: 2,000 runs of 50
segments, 20 sweeps, 3 clusters, 2 phases, 90 days), then times, best of --repeat:

- `Ledger.report(by)` + `format_report` (table), for every grouping and for one sweep: the work
  `budget-lab cost report` does once its process is up (target: <= 1 s);
- `Ledger.spent()` / `spent(sweep=...)`: what a sweep controller asks at every check;
- the whole command, `budget-lab cost report --workspace W`, as a fresh process (informational:
  Python start-up and imports included).

    python bench/ledger_scale.py                      # prints a Markdown snippet
    python bench/ledger_scale.py --out bench/results/ledger_scale.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from budget_lab.ledger.report import format_report
from budget_lab.ledger.store import REPORT_GROUPS, Ledger, Segment
from budget_lab.workspace import Workspace

T0 = 1_790_000_000.0


def synthetic_segments(n: int, seed: int = 0) -> list[Segment]:
    rng = random.Random(seed)
    runs = max(n // 50, 1)
    clusters = [
        ("aws-p5", 8, "aws spot history"),
        ("onprem-a100", 8, "fixed"),
        ("local", 1, "fixed"),
    ]
    out = []
    for i in range(n):
        run = i % runs
        cluster, gpus, source = clusters[run % 3]
        start = T0 + rng.uniform(0, 90 * 86400)
        seconds = rng.uniform(60, 7200)
        rate = rng.uniform(0.1, 12.0)
        cost = gpus * seconds / 3600 * rate
        preempted = rng.random() < 0.1
        out.append(
            Segment(
                key=f"{cluster}/{run}/{i}",
                job_id=str(100_000 + i),
                cluster=cluster,
                start=start,
                end=start + seconds,
                gpus=gpus,
                gpu_seconds=gpus * seconds,
                cost_usd=cost,
                usd_per_gpu_hour=rate,
                price_source=source,
                price_estimate=rng.random() < 0.02,
                wasted_usd=cost * rng.uniform(0, 0.3) if preempted else 0.0,
                waste_reason="preempted" if preempted else None,
                state="PREEMPTED" if preempted else "COMPLETED",
                run=f"sweep{run % 20:02d}-{run:04d}",
                phase=rng.choice(["pretrain", "finetune"]),
                sweep=f"sweep{run % 20:02d}",
                trial=run,
            )
        )
    return out


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the Markdown snippet here")
    args = parser.parse_args()

    machine = (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    ).replace("  ", " ")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine += f", load average {load:.1f} at start (a shared machine: other work slows it)"
    command = f"python bench/ledger_scale.py --segments {args.segments} --repeat {args.repeat}"
    lines = [
        f"### Ledger at scale: `cost report` over {args.segments:,} segments ({date.today()})",
        "",
        f"Machine: {machine}. Command: `{command}`. Best of {args.repeat}; the target is <= 1 s.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        ledger = Ledger.for_workspace(ws)
        segments = synthetic_segments(args.segments)
        t0 = time.perf_counter()
        ledger.insert_many(segments)
        fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        counts = ledger.upsert_segments(segments[:5000])  # a re-sync of 5,000 known rows
        resync = time.perf_counter() - t0
        assert counts.unchanged == 5000
        size_mb = ws.ledger_path.stat().st_size / 1e6
        lines += [
            f"Filling: {fill:.2f} s for {args.segments:,} rows ({size_mb:.1f} MB); re-syncing "
            f"5,000 unchanged rows with `upsert_segments`: {resync:.2f} s.",
            "",
            "| query | groups | seconds |",
            "|---|---|---|",
        ]
        worst = 0.0
        for by in REPORT_GROUPS:

            def report(by=by):
                return format_report(ledger.report(by), by=by)

            seconds = best_of(args.repeat, report)
            worst = max(worst, seconds)
            lines.append(
                f"| `cost report --by {by}` | {len(ledger.report(by)):,} | {seconds:.3f} |"
            )
        seconds = best_of(
            args.repeat, lambda: format_report(ledger.report("trial", sweep="sweep07"), by="trial")
        )
        worst = max(worst, seconds)
        lines.append(f"| `cost report --sweep sweep07 --by trial` | 100 | {seconds:.3f} |")
        for label, fn in [
            ("`Ledger.spent()`", lambda: ledger.spent()),
            ("`Ledger.spent(sweep=...)`", lambda: ledger.spent(sweep="sweep07")),
            ("`Ledger.spent(since=...)` (a month)", lambda: ledger.spent(since=T0 + 60 * 86400)),
        ]:
            lines.append(f"| {label} | 1 | {best_of(args.repeat, fn):.3f} |")
        ledger.close()

        cli = [sys.executable, "-m", "budget_lab", "cost", "report", "--workspace", str(ws.root)]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        t0 = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True, env=env)
        whole = time.perf_counter() - t0
        lines += [
            "",
            f"Slowest report: {worst:.3f} s ({'meets' if worst <= 1.0 else 'MISSES'} the 1 s "
            f"target). The whole command as a fresh process (`budget-lab cost report`, start-up "
            f"and imports included): {whole:.2f} s.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
