"""`budget-lab eval RUN`: real Inception FID of a run's EMA weights against its validation split.

The reference is the validation split as the model sees it (decoded latents: the images
themselves for pixel data, VAE reconstructions otherwise), its statistics cached beside the data.
Generated images use the validation captions in order, so two runs on the same data are compared
on the same prompts, the same number of samples and the same sampler settings.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from budget_lab.config import edm_config, model_config, run_config_from_dict
from budget_lab.data.loader import load_manifest
from budget_lab.errors import DataError, UserError
from budget_lab.eval.fid import FIDEvaluator
from budget_lab.eval.grid import save_grid
from budget_lab.eval.sampling import generate_images, image_decoder, real_images, val_batches
from budget_lab.io import atomic_write_json, yaml_load
from budget_lab.train.checkpoint import CheckpointStore
from model.microdit import MicroDiT

__all__ = ["evaluate_run", "load_run_model", "score_model"]


def load_run_model(run_dir: str | os.PathLike[str], untrained: bool = False, ema: bool = True):
    """(RunConfig, MicroDiT) of a run: its latest checkpoint's EMA weights, or the initial weights
    (same seed) with `untrained`."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(
            f"{run_dir} is not a run folder (no config.yaml); pass the folder `budget-lab train` wrote"
        )
    cfg = run_config_from_dict(yaml_load(cfg_path.read_text()))
    torch.manual_seed(cfg.seed)
    net = MicroDiT(model_config(cfg))
    if untrained:
        return cfg, net, None
    # Weights only (a planted pickle is refused, CheckpointError), and as a reader: a torn latest
    # is skipped with a warning but left in place for the run's own trainer to deal with.
    loaded = CheckpointStore(run_dir / "checkpoints").load_latest(quarantine=False)
    if loaded is None:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first (or use --untrained)")
    ckpt, path = loaded
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else None
    if state is not None:  # AveragedModel keys: module.<name>, plus n_averaged
        net.load_state_dict(
            {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
        )
    else:
        net.load_state_dict(ckpt["model"])
    return cfg, net, path


def score_model(
    net,
    cfg,
    num_samples: int | None = None,
    sampler_steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Real Inception FID of a model (a MicroDiT, e.g. a run's EMA weights in memory) against the
    run's validation split. Returns {"fid", "images", "texts", "num_samples", "num_reference",
    "sampler_steps", "cfg_scale", "resolution", "seconds"}; the reference statistics are cached
    beside the data."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir = Path(cfg.data.path)
    if not (data_dir / "manifest.json").is_file():
        raise DataError(
            f"the run's data folder {data_dir} is gone (no manifest.json); evaluate from the "
            "directory the run was trained from, or re-prepare the data there"
        )
    manifest = load_manifest(data_dir)
    res = cfg.phases[-1].resolution
    info = manifest.resolution(res)
    n_val = info.splits["val"].count if "val" in info.splits else info.splits["train"].count
    n = num_samples or cfg.eval.fid_samples
    batch = min(cfg.eval.batch_size, n, n_val)
    # The reference: as many validation images as samples, in whole batches (no repeats).
    n_ref = min(n, n_val // batch * batch)
    edm = replace(
        edm_config(cfg),
        num_steps=sampler_steps or cfg.eval.sampler_steps,
        cfg_scale=cfg.eval.cfg_scale if cfg_scale is None else cfg_scale,
    )
    t0 = time.time()
    evaluator = FIDEvaluator(device=dev, batch_size=100, progress=progress)
    cache = data_dir / f"fid-ref-{info.resolution}-{n_ref}.npz"
    key = f"{manifest.root.resolve()}:{info.resolution}:val:{n_ref}"
    cached = None
    if cache.is_file():
        try:
            cached = evaluator.reference_stats(None, cache_path=cache, key=key)
        except (UserError, ValueError, KeyError):
            cached = None
    if cached is None:
        evaluator.reference_stats(
            real_images(data_dir, n_ref, resolution=res), cache_path=cache, key=key
        )
    batch = min(cfg.eval.batch_size, n_val)
    images, texts = generate_images(
        net,
        edm,
        val_batches(data_dir, batch, res),
        n,
        image_decoder(data_dir, dev),
        seed=seed,
        device=dev,
        progress=progress,
    )
    return {
        "fid": evaluator.fid(images),
        "images": images,
        "texts": texts,
        "num_samples": n,
        "num_reference": n_ref,
        "sampler_steps": edm.num_steps,
        "cfg_scale": edm.cfg_scale,
        "resolution": info.resolution,
        "seconds": time.time() - t0,
    }


def evaluate_run(
    run_dir: str | os.PathLike[str],
    num_samples: int | None = None,
    sampler_steps: int | None = None,
    cfg_scale: float | None = None,
    untrained: bool = False,
    seed: int = 0,
    ema: bool = True,
    clip_model: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FID, a sample grid and (with a CLIP model configured) the CLIP score of a run; writes
    eval.json (or eval-untrained.json) in the run folder."""
    run_dir = Path(run_dir)
    cfg, net, ckpt_path = load_run_model(run_dir, untrained=untrained, ema=ema)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = net.to(dev)
    scored = score_model(net, cfg, num_samples, sampler_steps, cfg_scale, seed, dev, progress)
    fid, images, texts = scored["fid"], scored["images"], scored["texts"]
    clip_model = clip_model or cfg.eval.clip_model
    clip_score = None
    if clip_model:
        from budget_lab.eval.clip_score import CLIPScorer

        clip_score = CLIPScorer(clip_model, device=dev).score(images, texts)
    tag = "untrained" if untrained else ("trained" if ema else "trained-raw")
    grid = save_grid(images[:16], run_dir / "samples" / f"eval-{tag}.png", captions=texts[:16])
    result = {
        "fid": fid,
        "clip_score": clip_score,
        "clip_model": clip_model,
        "weights": "initial (untrained)"
        if untrained
        else f"{'EMA' if ema else 'raw weights'} of {ckpt_path.name}",
        **{k: scored[k] for k in ("num_samples", "num_reference", "sampler_steps", "cfg_scale")},
        "seed": seed,
        "resolution": scored["resolution"],
        "grid": str(grid),
        "seconds": scored["seconds"],
    }
    out = run_dir / {"untrained": "eval-untrained.json", "trained": "eval.json"}.get(
        tag, f"eval-{tag}.json"
    )
    atomic_write_json(out, result)
    return result
