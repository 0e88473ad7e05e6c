"""End-to-end trainer throughput vs the bare model step, in one process.

The trainer's images/s (data loading from shards, caption dropout, EMA, LR schedule, metrics,
checkpoints) is compared with `bench/model_step.py`'s bare step (EDM loss, backward, AdamW on a
fixed in-memory batch) for the same preset, batch and mask ratio. Target: >= 0.9x, so that
bookkeeping and data loading do not eat the budget.

    python bench/train_throughput.py                      # nano, synth data, CPU
    python bench/train_throughput.py --preset micro --batch 32 --steps 60

Needs prepared data (`--data`, default: made here from the built-in synthetic set).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see BENCHMARKS.md

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import time_steps  # noqa: E402

from budget_lab.config import compose_run, model_config  # noqa: E402
from budget_lab.data.builtin import ensure_builtin_data  # noqa: E402
from budget_lab.io import read_jsonl  # noqa: E402
from budget_lab.rundir import RunDir  # noqa: E402
from budget_lab.train import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument(
        "--steps", type=int, default=60, help="trainer steps (the first 10 are warm-up)"
    )
    parser.add_argument(
        "--data", default=None, help="prepared data folder (default: synth, made here)"
    )
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bl-bench-"))
    data = Path(args.data) if args.data else work / "latents"
    if not args.data:
        ensure_builtin_data(data, n=1200, max_tokens=24, progress=False)

    cfg = compose_run(
        "nano",
        [
            f"model.preset={args.preset}",
            f"data.path={data}",
            f"data.num_workers={args.workers}",
            f"phases=[{{name: bench, steps: {args.steps}, mask_ratio: {args.mask_ratio}, "
            f"batch_size: {args.batch}, lr: 1e-3}}]",
            "checkpoint.every=1000000",
            "eval.grid_size=0",
            "log_every=10",
        ],
    )
    t0 = time.perf_counter()
    Trainer(cfg, work / "run", progress=False).run()
    wall = time.perf_counter() - t0
    rows = read_jsonl(RunDir(work / "run").metrics)
    steady = rows[1:]  # drop the first window (warm-up)
    trainer_ips = sum(r["images_per_s"] for r in steady) / len(steady)
    wall_ips = args.steps * args.batch / wall

    mcfg = model_config(cfg)
    bare_s = time_steps(
        mcfg, args.mask_ratio, args.batch, 10, 3, torch.device("cpu"), torch.float32, False
    )
    bare_ips = args.batch / bare_s
    print(
        f"# train_throughput: {args.preset}, batch {args.batch}, r={args.mask_ratio}, "
        f"{args.workers} loader workers, torch {torch.__version__}, {torch.get_num_threads()} threads, {date.today()}"
    )
    print("| measure | images/s | vs bare step |")
    print("|---|---|---|")
    print(f"| bare model step (fixed batch in memory) | {bare_ips:.1f} | 1.00x |")
    print(
        f"| trainer, steady state (data, EMA, schedule, metrics) | {trainer_ips:.1f} | {trainer_ips / bare_ips:.2f}x |"
    )
    print(
        f"| trainer, wall clock incl. start-up and final checkpoint | {wall_ips:.1f} | {wall_ips / bare_ips:.2f}x |"
    )


if __name__ == "__main__":
    main()
