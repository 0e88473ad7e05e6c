"""Training-step throughput of MicroDiT: images/s, FLOPs per image and (on a GPU) MFU.

For each preset and mask ratio, times full training steps (EDM loss, backward, AdamW) on one
device: fp32 on CPU, bf16 autocast (+ optional torch.compile) on a GPU. Every row of a preset is
measured in the same process, so the step-time ratio against r = 0 is the figure to read.

    python bench/model_step.py                                   # CPU: nano, micro
    python bench/model_step.py --presets MicroDiT-XL/2 --batch 64 --compile   # on an H100
    python bench/model_step.py --routes 0.5 0.75                 # add token-routing rows

Prints a Markdown table (paste into BENCHMARKS.md) and writes JSON with --json PATH.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see BENCHMARKS.md

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from datetime import date  # noqa: E402

import torch  # noqa: E402

from budget_lab.ledger.calibration import time_training_step  # noqa: E402
from model.config import PRESETS, RouteConfig, get_preset  # noqa: E402
from model.summary import count_flops  # noqa: E402

# Dense bf16 peak of the GPUs we meet (FLOP/s), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def time_steps(cfg, mask_ratio, batch, steps, warmup, device, dtype, compile_model, seed=0):
    """Seconds per training step (median of `steps` timed steps after `warmup`): the one step
    timer the cost calibration uses too (`budget_lab.ledger.calibration.time_training_step`)."""
    return time_training_step(
        None,
        mask_ratio=mask_ratio,
        batch=batch,
        steps=steps,
        warmup=warmup,
        device=str(device),
        seed=seed,
        model_cfg=cfg,
        dtype=dtype,
        compile_model=compile_model,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.5, 0.75])
    parser.add_argument(
        "--routes", nargs="*", type=float, default=[], help="routing ratios to add rows for (r = 0)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default: 32 CPU, 64 GPU)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    presets = args.presets or (list(PRESETS) if gpu else ["nano", "micro"])
    batch = args.batch or (64 if gpu else 32)
    peak = peak_flops(device)
    machine = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# model_step: {machine}, {str(dtype).removeprefix('torch.')}, batch {batch}, "
        f"compile={args.compile}, torch {torch.__version__}, {date.today()}"
    )
    print(
        "| preset | mask r | route ρ | GFLOP/img (train) | images/s | step time vs r=0 | achieved TFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in presets:
        base = get_preset(name)
        variants = [(r, 0.0) for r in args.ratios]
        variants += [(0.0, rho) for rho in args.routes]
        t_ref = None
        for r, rho in variants:
            cfg = base
            if rho:
                # The TREAD setting: route from the second block to the one before last.
                cfg = base.replace(routes=(RouteConfig(start=1, end=base.depth - 1, ratio=rho),))
            flops = count_flops(cfg, mask_ratio=r).training
            t = time_steps(cfg, r, batch, args.steps, args.warmup, device, dtype, args.compile)
            t_ref = t if (r == 0.0 and not rho and t_ref is None) else t_ref
            ips = batch / t
            achieved = flops * ips
            row = {
                "preset": name, "mask_ratio": r, "route_ratio": rho, "batch": batch,
                "gflop_per_image": flops / 1e9, "images_per_s": ips, "step_s": t,
                "ratio_vs_unmasked": t / t_ref if t_ref else None,
                "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
                "device": machine, "dtype": str(dtype), "compile": args.compile,
            }  # fmt: skip
            rows.append(row)
            ratio = f"{row['ratio_vs_unmasked']:.2f}x" if t_ref else "-"
            mfu = f"{row['mfu']:.1%}" if peak else "n/a (CPU)"
            print(
                f"| {name} | {r} | {rho} | {flops / 1e9:.2f} | {ips:.1f} | {ratio} | {achieved / 1e12:.3f} | {mfu} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
