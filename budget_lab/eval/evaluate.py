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

import numpy as np
import torch
from torch import Tensor

from budget_lab.config import edm_config, model_config, run_config_from_dict
from budget_lab.data.loader import load_manifest
from budget_lab.errors import DataError, UserError
from budget_lab.eval.alignment import AlignmentScorer, alignment_score, parse_caption
from budget_lab.eval.fid import FIDEvaluator, ReferenceStats
from budget_lab.eval.grid import save_grid
from budget_lab.eval.sampling import generate_images, image_decoder, real_images, val_batches
from budget_lab.eval.stats import (
    Measurement,
    fid_measurement,
    kid_measurement,
    paired_fid_difference,
)
from budget_lab.io import atomic_write, atomic_write_json
from budget_lab.rundir import RunDir, is_prepared_data, read_config, read_eval
from budget_lab.train.checkpoint import CheckpointStore
from model.microdit import MicroDiT

__all__ = [
    "evaluate_run",
    "load_run_model",
    "paired_differences",
    "prepare_references",
    "score_model",
]


def load_run_model(run_dir: str | os.PathLike[str], untrained: bool = False, ema: bool = True):
    """(RunConfig, MicroDiT) of a run: its latest checkpoint's EMA weights, or the initial weights
    (same seed) with `untrained`."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    if saved is None:
        raise UserError(
            f"{run_dir} is not a run folder (no run config); pass the folder `budget-lab train` wrote"
        )
    cfg = run_config_from_dict(saved)
    torch.manual_seed(cfg.seed)
    net = MicroDiT(model_config(cfg))
    if untrained:
        return cfg, net, None
    # Weights only (a planted pickle is refused, CheckpointError), and as a reader: a torn latest
    # is skipped with a warning but left in place for the run's own trainer to deal with.
    loaded = CheckpointStore(RunDir(run_dir).checkpoints).load_latest(quarantine=False)
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


def _reference_files(data_dir: Path, res: int, split: str, n_ref: int) -> tuple[Path, Path]:
    """(statistics .npz, features .npy) of a cached reference, beside the data."""
    stem = f"fid-ref-{res}-{split}-{n_ref}"
    return data_dir / f"{stem}.npz", data_dir / f"{stem}-features.npy"


def _reference(
    evaluator: FIDEvaluator, data_dir: Path, n_ref: int, res: int, split: str
) -> tuple[ReferenceStats, Tensor]:
    """Reference statistics and features of the first `n_ref` images of the split, cached beside
    the data per resolution, count and feature extractor (fid-ref-*.npz + *-features.npy)."""
    manifest = load_manifest(data_dir)
    stats_path, feats_path = _reference_files(data_dir, res, split, n_ref)
    key = f"{manifest.root.resolve()}:{res}:{split}:{n_ref}"
    if stats_path.is_file() and feats_path.is_file():
        try:
            stats = evaluator.reference_stats(None, cache_path=stats_path, key=key)
            feats = torch.from_numpy(np.load(feats_path, allow_pickle=False))
            if feats.shape == (n_ref, stats.mu.shape[0]):
                return stats, feats
        except (UserError, DataError, ValueError, OSError):
            pass  # recomputed below
    feats = evaluator.features(real_images(data_dir, n_ref, resolution=res))
    mu = feats.mean(0).numpy()
    sigma = np.cov(feats.numpy(), rowvar=False)
    stats = ReferenceStats(mu, sigma, n_ref, key, evaluator.fingerprint)
    evaluator.load_reference(stats)
    stats.save(stats_path)
    atomic_write(feats_path, lambda fh: np.save(fh, feats.numpy().astype(np.float32)))
    return stats, feats


def _reference_plan(cfg):
    """(data folder, resolution, its manifest entry, split, reference count) of a run's scores:
    the validation split (train without one), all of it unless eval.reference_samples."""
    data_dir = Path(cfg.data.path)
    res = cfg.phases[-1].resolution
    info = load_manifest(data_dir).resolution(res)
    split = "val" if "val" in info.splits else "train"
    count = info.splits[split].count
    return data_dir, res, info, split, min(cfg.eval.reference_samples or count, count)


def prepare_references(cfg, device: torch.device | str | None = None) -> dict[str, Any]:
    """Compute once what every score of runs on this data shares, so that no trial pays for it:
    the FID/KID reference statistics and features of the validation split, and (built-in data)
    the alignment reader. Returns {"num_reference", "alignment", "seconds"}."""
    t0 = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir, res, info, split, n_ref = _reference_plan(cfg)
    _reference(FIDEvaluator(device=dev, batch_size=100), data_dir, n_ref, info.resolution, split)
    alignment = False
    if cfg.eval.alignment != "off":
        texts = next(val_batches(data_dir, 8, res))["text"]
        try:
            for text in texts:
                parse_caption(text)
            AlignmentScorer(data_dir)
            alignment = True
        except DataError:
            if cfg.eval.alignment == "on":
                raise
    return {"num_reference": n_ref, "alignment": alignment, "seconds": time.time() - t0}


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
    """Real Inception FID (with its interval), KID and, on the built-in data, text alignment of
    a model (a MicroDiT, e.g. a run's EMA weights in memory) against the run's validation split.

    The reference is the whole validation split (or `eval.reference_samples` images), its
    statistics and features cached beside the data. Returns {"fid", "fid_ci95", "fid_se",
    "fid_method", "confidence", "kid", "kid_std", "kid_subset_size", "alignment" (None off the
    built-in data), "alignment_ci95", "alignment_se", "alignment_attributes", "images", "texts",
    "num_samples", "num_reference", "sampler_steps", "cfg_scale", "resolution", "seconds"}."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir = Path(cfg.data.path)
    if not is_prepared_data(data_dir):
        raise DataError(
            f"the run's data folder {data_dir} is gone (no manifest.json); evaluate from the "
            "directory the run was trained from, or re-prepare the data there"
        )
    data_dir, res, info, split, n_ref = _reference_plan(cfg)
    n_val = info.splits[split].count
    n = num_samples or cfg.eval.fid_samples
    edm = replace(
        edm_config(cfg),
        num_steps=sampler_steps or cfg.eval.sampler_steps,
        cfg_scale=cfg.eval.cfg_scale if cfg_scale is None else cfg_scale,
    )
    t0 = time.time()
    evaluator = FIDEvaluator(device=dev, batch_size=100, progress=progress)
    ref, ref_feats = _reference(evaluator, data_dir, n_ref, info.resolution, split)
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
    feats = evaluator.features(images)
    fid = fid_measurement(
        feats,
        ref.mu,
        ref.sigma,
        method=cfg.eval.interval,
        resamples=cfg.eval.resamples,
        confidence=cfg.eval.confidence,
        seed=seed,
    )
    kid = kid_measurement(feats, ref_feats, subsets=cfg.eval.kid_subsets, seed=seed)
    align = _alignment(images, texts, cfg, data_dir, seed)
    return {
        "fid": fid.value,
        "fid_ci95": [fid.lo, fid.hi],
        "fid_se": fid.se,
        "fid_method": fid.method,
        "confidence": fid.confidence,
        "kid": kid["kid"],
        "kid_std": kid["kid_std"],
        "kid_subset_size": kid["subset_size"],
        **align,
        "images": images,
        "texts": texts,
        "features": feats,
        "num_samples": n,
        "num_reference": n_ref,
        "sampler_steps": edm.num_steps,
        "cfg_scale": edm.cfg_scale,
        "resolution": info.resolution,
        "seconds": time.time() - t0,
    }


def _alignment(images: Tensor, texts: list[str], cfg, data_dir: Path, seed: int) -> dict[str, Any]:
    """The built-in data's text-alignment score with its interval ({"alignment": None, ...} when
    off, or with eval.alignment=auto when the captions are not of the built-in grammar)."""
    off = {
        "alignment": None,
        "alignment_ci95": None,
        "alignment_se": None,
        "alignment_attributes": None,
    }
    mode = cfg.eval.alignment
    if mode == "off":
        return off
    if mode == "auto":
        try:
            for text in texts:
                parse_caption(text)
        except DataError:
            return off
    scored = alignment_score(images, texts, cache_dir=data_dir, seed=seed)
    return {
        "alignment": scored["value"],
        "alignment_ci95": scored["ci95"],
        "alignment_se": scored["stderr"],
        "alignment_attributes": scored["per_attribute"],
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
    files = RunDir(run_dir)
    grid = save_grid(images[:16], files.eval_grid(tag), captions=texts[:16])
    result = {
        "fid": fid,
        **{
            k: scored[k]
            for k in (
                "fid_ci95",
                "fid_se",
                "fid_method",
                "confidence",
                "kid",
                "kid_std",
                "kid_subset_size",
                "alignment",
                "alignment_ci95",
                "alignment_se",
                "alignment_attributes",
            )
        },
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
    if tag == "trained":  # the features a paired comparison with another trial needs
        # float32 (N, 2048): row i sampled for validation caption i with the seed's noise
        feats = scored["features"].numpy().astype(np.float32)
        atomic_write(files.eval_features, lambda fh: np.save(fh, feats))
        result["features"] = files.eval_features.name
    atomic_write_json(files.eval(tag), result)
    return result


#: What two evaluations must share for their samples to pair row by row.
_PAIRED_KEYS = ("num_samples", "seed", "sampler_steps", "cfg_scale", "num_reference", "resolution")


def paired_differences(
    run_dirs: dict[str, str | os.PathLike[str]],
) -> dict[tuple[str, str], Measurement]:
    """{(a, b): FID_a - FID_b with its paired interval} for every pair of runs (keyed by any
    label, e.g. a sweep configuration) whose final evaluations sampled the same captions with the
    same noise on the same data (`stats.paired_fid_difference`); pairs that do not qualify, or
    whose features are missing, are left out (their comparison stays unpaired)."""
    evals: dict[str, tuple[dict[str, Any], Any, np.ndarray]] = {}
    for label, folder in run_dirs.items():
        files = RunDir(folder)
        try:
            info, saved = read_eval(files), read_config(files)
            if info is None or saved is None:
                continue
            cfg = run_config_from_dict(saved)
            feats = np.load(files.eval_features, allow_pickle=False)
        except (OSError, ValueError, KeyError, UserError):
            continue
        if feats.shape[0] != info.get("num_samples"):
            continue
        evals[label] = (info, cfg, feats)
    out: dict[tuple[str, str], Measurement] = {}
    labels = list(evals)
    refs: dict[Path, ReferenceStats] = {}
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            (ia, ca, fa), (ib, cb, fb) = evals[a], evals[b]
            same = all(ia.get(k) == ib.get(k) for k in _PAIRED_KEYS)
            if not same or Path(ca.data.path).resolve() != Path(cb.data.path).resolve():
                continue
            data_dir, res, info, split, n_ref = _reference_plan(ca)
            stats = _reference_files(data_dir, info.resolution, split, n_ref)[0]
            if stats not in refs:
                try:  # the evaluations cached it; Inception is loaded only if it is gone
                    refs[stats] = ReferenceStats.load(stats)
                except (OSError, ValueError, KeyError, UserError, DataError):
                    evaluator = FIDEvaluator(device="cpu", batch_size=100, progress=False)
                    refs[stats] = _reference(evaluator, data_dir, n_ref, info.resolution, split)[0]
            ref = refs[stats]
            out[(a, b)] = paired_fid_difference(
                fa,
                fb,
                ref.mu,
                ref.sigma,
                resamples=ca.eval.resamples,
                confidence=ca.eval.confidence,
                seed=ia.get("seed", 0),
            )
    return out
