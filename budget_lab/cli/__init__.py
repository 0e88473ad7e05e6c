"""`budget-lab`: the command line. A thin layer: parse, call the component, print.

Each command group lives beside the component it drives: a module with a `COMMANDS` table (name ->
one-line help) and a `register(subparsers)` function. This file only wires them together and turns
user mistakes (`UserError`, invalid model configs) into a clear message and a non-zero exit, never
a traceback. Only the chosen command's module registers its parsers (and imports what they need);
the others are listed from their tables, so `budget-lab --help` starts without torch or databases.
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
# → sweep → report. Each module exposes `COMMANDS` and `register(subparsers)`; its top-level
# imports stay light (the standard library, budget_lab.errors): commands import what they use.
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `argv`, only the command it names is built in full (the
    others are listed by name and help)."""
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="budget-lab",
        description=(
            "Pretrain MicroDiT text-to-image diffusion models on a micro budget, "
            "and know exactly what every run cost."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        if argv is None or chosen in module.COMMANDS:
            module.register(sub)
        else:
            for command, text in module.COMMANDS.items():
                sub.add_parser(command, help=text, add_help=False)
    return parser


class _Version(argparse.Action):
    """--version: reads the installed package's metadata only when asked (~50 ms)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("budget-lab")
        except PackageNotFoundError:
            text = "unknown"
        print(f"{parser.prog} {text}")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`sweep mask_ratio --trials 2 seed=3`, `~model.dim`).
    if extra:
        if hasattr(args, "overrides") and all(
            ("=" in e and not e.startswith("-")) or e.startswith("~") for e in extra
        ):
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
