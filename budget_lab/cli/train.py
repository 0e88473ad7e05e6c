"""`budget-lab train` and `budget-lab eval`: train a recipe in a run folder, score it with FID."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_TRAIN_EPILOG = """\
Overrides use Hydra's grammar, applied over the recipe YAML (YAML < CLI): key=value sets a key,
~key deletes one the recipe sets (back to the preset's value / the default), e.g.
  phases.0.steps=200  phases.1.lr=3e-4  model.num_experts=0  model.attn_ratio=[0.25,1.0]  seed=1
Recipes: recipes/<name>.yaml, or $BUDGET_LAB_CONFIG_DIR/recipes/ (else workspace/configs/recipes/)
first; a recipe extends others with a defaults list, e.g. `defaults: [nano, _self_]`.

examples:
  budget-lab train                                      # recipe nano on data/synth-latents
  budget-lab train --recipe nano phases.0.steps=100 --run-dir runs/quick
  budget-lab train --recipe path/to/my-recipe.yaml --dry-run

Re-running the same command resumes from the run folder's latest checkpoint (exactly).
Signals: SIGUSR1 saves a checkpoint now; SIGTERM / Ctrl-C saves one and stops.
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "train": "train a recipe (phases: masked pretrain -> unmasked finetune) in a run folder",
    "eval": "FID (real InceptionV3) and a sample grid for a run",
}


def register(sub: argparse._SubParsersAction) -> None:
    from budget_lab.config_files import list_configs  # no Hydra: `budget-lab --help` stays fast

    train = sub.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train MicroDiT through the phases of a recipe, on this machine (CPU or GPUs "
        "via accelerate; `accelerate launch -m budget_lab train ...` for several GPUs).",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--recipe",
        default="nano",
        help=f"recipe name ({', '.join(list_configs('recipes'))}) or YAML path (default nano)",
    )
    train.add_argument("--run-dir", default=None, help="run folder (default runs/<recipe name>)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help=COMMANDS["eval"],
        description="Sample the run's EMA weights with the EDM Heun sampler for the validation "
        "captions and compute FID against the validation images (reference statistics cached "
        "beside the data). Writes eval.json and samples/eval-*.png into the run folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  budget-lab eval runs/nano\n  budget-lab eval runs/nano --untrained   "
        "# the same model before training, for comparison\n",
    )
    ev.add_argument("run", help="run folder")
    ev.add_argument(
        "--samples", type=int, default=None, help="generated images (default: eval.fid_samples)"
    )
    ev.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: eval.sampler_steps)"
    )
    ev.add_argument(
        "--cfg-scale", type=float, default=None, help="guidance scale (default: eval.cfg_scale)"
    )
    ev.add_argument("--untrained", action="store_true", help="score the initial weights instead")
    ev.add_argument(
        "--clip-model",
        default=None,
        help="CLIP hub id or local folder: also report the CLIP score (default: eval.clip_model)",
    )
    ev.add_argument("--raw", action="store_true", help="score the raw weights instead of their EMA")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    ev.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    import yaml

    from budget_lab.config import compose_run, run_config_to_dict
    from budget_lab.train.trainer import Trainer

    cfg = compose_run(args.recipe, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    if args.dry_run:
        print(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False), end="")
        print(f"# run folder: {run_dir}")
        return 0
    result = Trainer(cfg, run_dir, progress=not args.no_progress).run()
    print(
        f"{result['status']}: {result['global_step']} steps, {result['images_seen']} images, "
        f"{result['train_seconds']:.0f} s of training; run folder {run_dir}"
    )
    return 0 if result["status"] == "completed" else 3


def _eval(args: argparse.Namespace) -> int:
    from budget_lab.eval.evaluate import evaluate_run

    result = evaluate_run(
        args.run,
        num_samples=args.samples,
        sampler_steps=args.steps,
        cfg_scale=args.cfg_scale,
        untrained=args.untrained,
        seed=args.seed,
        device=args.device,
        ema=not args.raw,
        clip_model=args.clip_model,
    )
    print(json.dumps(result, indent=2))
    return 0
