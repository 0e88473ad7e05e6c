"""`budget-lab`: the command line. A thin layer: parse, call the component, print.

Each command group lives beside the component it drives and registers itself here through a
`register(subparsers)` function; this file only wires them together and turns user mistakes
(`UserError`, invalid model configs) into a clear message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP's default busy-waiting makes torch ~10x slower on small shared-core VMs (measured on a
# 2-vCPU cloud VM: 7.7 vs 73 images/s for the nano training step); sleep instead of spinning.
# Must be set before torch is imported; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from budget_lab.errors import UserError

# Command groups, in the order of the data flow: config → data → train → eval → launch → ledger
# → sweep → report. Each module exposes `register(subparsers)`.
_COMMAND_MODULES = [
    "budget_lab.cli.model",
    "budget_lab.cli.data",
    "budget_lab.cli.train",
    "budget_lab.cli.clusters",
    "budget_lab.cli.launch",
    "budget_lab.cli.cost",
    "budget_lab.cli.sweep",
    "budget_lab.cli.report",
]

_EPILOG = """\
The main job (scripts/demo.sh): a sweep of mask ratios on this machine, judged on FID and $
  budget-lab sweep mask_ratio                              Pareto front of FID vs $, report

Launch, follow, pay:
  budget-lab clusters list                                 where runs can go, at what price
  budget-lab launch --cluster slurm-local --recipe nano    a preemption-safe submitit job
  budget-lab launch --cluster aws-p5 --recipe microdit-xl --dry-run   plan + cost estimate
  budget-lab status / logs RUN / cancel RUN                what runs where
  budget-lab cost report --by phase                        useful and wasted $, GPU-hours
  budget-lab report --sweep mask_ratio --out report/       HTML + PNG, offline

The offline pipeline, step by step:
  budget-lab data synth --out data/synth                   built-in captioned shapes
  budget-lab data prepare --images data/synth --out data/synth-latents --vae pixel --text-encoder minilm
  budget-lab train --recipe nano                           masked pretrain -> unmasked finetune
  budget-lab eval runs/nano                                real Inception FID + sample grid
  budget-lab model info MicroDiT-XL/2 --mask-ratio 0.75    parameters, FLOPs per image, layers

Each command has its own --help with examples, e.g. `budget-lab sweep --help`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="budget-lab",
        description=(
            "Pretrain MicroDiT text-to-image diffusion models on a micro budget, "
            "and know exactly what every run cost."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("budget-lab")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`sweep mask_ratio --trials 2 seed=3`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"budget-lab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("budget-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # An invalid model config is a user mistake too; model/ stays free of budget_lab imports,
        # and importing it (torch) only when needed keeps commands that do not touch it fast.
        if type(err).__name__ == "ModelConfigError":
            print(f"budget-lab: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
