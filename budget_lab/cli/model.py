"""`budget-lab model ...`: inspect MicroDiT presets (parameters, FLOPs per image, layer table)."""

from __future__ import annotations

import argparse
import json

from model.config import PRESETS  # torch-free: the preset names, for --help

_INFO_EPILOG = """\
examples:
  budget-lab model info MicroDiT-XL/2                    # the paper's 1.16B model at 256 px
  budget-lab model info MicroDiT-XL/2 --res 512 --mask-ratio 0.75
  budget-lab model info nano --set num_experts=0 --set layerwise_scaling=false
  budget-lab model info MicroDiT-Tiny/2 --json
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "model": "inspect MicroDiT presets",
}


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("model", help=COMMANDS["model"], description=__doc__)
    group_sub = group.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = group_sub.add_parser(
        "info",
        help="parameters (total / active per token), FLOPs per training image, layer table",
        description=(
            "Print a preset's parameter count (total and active per token), its FLOPs per "
            "training image at a resolution and mask ratio (counted with torch's flop counter on "
            "the meta device: nothing is allocated), and a table of its blocks."
        ),
        epilog=_INFO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument(
        "preset", choices=list(PRESETS), metavar="PRESET", help=f"one of: {', '.join(PRESETS)}"
    )
    info.add_argument(
        "--res",
        type=int,
        default=None,
        help="image resolution in pixels (default: the preset's; latents are res / --vae-factor)",
    )
    info.add_argument(
        "--vae-factor",
        type=int,
        default=None,
        help="pixels per latent cell (default: 8 for VAE latents, 1 for 3-channel pixel presets)",
    )
    info.add_argument(
        "--mask-ratio", type=float, default=0.75, help="fraction of tokens dropped (default 0.75)"
    )
    info.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a model field, e.g. --set num_experts=0 (repeatable)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=_info)


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE strings -> dict, values parsed as YAML scalars/lists (true, 0.5, [0.5, 1.0])."""
    import yaml

    from budget_lab.errors import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not FIELD=VALUE (e.g. num_experts=0)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from budget_lab.errors import ConfigError
    from model.config import get_preset
    from model.summary import count_flops, count_params, layer_table

    cfg = get_preset(args.preset, **parse_overrides(args.set))
    factor = args.vae_factor or (1 if cfg.in_channels == 3 else 8)
    res = args.res or cfg.input_size * factor
    if res % factor:
        raise ConfigError(f"--res {res} is not a multiple of --vae-factor {factor}")
    latent = res // factor
    if latent % cfg.patch_size:
        raise ConfigError(
            f"--res {res} gives a {latent}x{latent} latent grid, which patch_size={cfg.patch_size} "
            f"does not divide; use a resolution that is a multiple of {factor * cfg.patch_size}"
        )
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ConfigError(f"--mask-ratio {args.mask_ratio} is invalid: expected a value in [0, 1)")

    params = count_params(cfg)
    flops = count_flops(cfg, latent, args.mask_ratio)
    flops0 = count_flops(cfg, latent, 0.0) if args.mask_ratio else flops
    rows = layer_table(cfg)
    if args.json:
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "config": cfg.to_dict(),
                    "resolution": res,
                    "latent_size": latent,
                    "mask_ratio": args.mask_ratio,
                    "params": vars(params),
                    "flops": vars(flops),
                    "flops_unmasked": vars(flops0),
                    "layers": [vars(r) for r in rows],
                },
                indent=2,
            )
        )
        return 0

    console = Console(width=max(Console().width, 110))
    console.print(
        f"[bold]{args.preset}[/bold]  {res} px -> {latent}x{latent}x{cfg.in_channels} latents, "
        f"patch {cfg.patch_size}: {flops.tokens} tokens, {flops.kept_tokens} kept at r={args.mask_ratio}"
    )
    summary = Table(show_header=False, box=None)
    summary.add_row("parameters, total", f"{params.total:,}")
    summary.add_row("parameters, active per token", f"{params.active_per_token:,}")
    summary.add_row("  of which mixture-of-experts", f"{params.moe:,} (total)")
    summary.add_row(
        f"training FLOPs / image, r={args.mask_ratio}",
        f"{flops.training / 1e9:,.1f} GFLOP  ({flops.training / max(flops0.training, 1):.2f}x of unmasked)",
    )
    summary.add_row("training FLOPs / image, r=0", f"{flops0.training / 1e9:,.1f} GFLOP")
    summary.add_row(
        "  backbone / mixer (forward)",
        f"{flops.backbone / 1e9:,.2f} / {flops.mixer / 1e9:,.2f} GFLOP",
    )
    console.print(summary)

    table = Table(title="blocks")
    for col in ("part", "#", "width", "attn width", "heads", "ffn", "ffn hidden", "params"):
        table.add_column(col, justify="right" if col not in ("part", "ffn") else "left")
    for r in rows:
        table.add_row(
            r.part,
            str(r.index),
            str(r.width),
            str(r.attn_width),
            str(r.heads),
            r.ffn,
            str(r.ffn_hidden),
            f"{r.params:,}",
        )
    console.print(table)
    return 0
