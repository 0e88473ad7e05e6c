"""Generate images from a trained MicroDiT: captions of the validation split -> EDM sampler ->
decoder of the data's image encoder (pixels or a VAE) -> float images in [0, 1]."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from budget_lab.config import RunConfig
from budget_lab.data.encoders import ImageEncoder, load_image_encoder
from budget_lab.data.loader import ShardLoader, load_manifest
from model.edm import EDMConfig, EDMPrecond, edm_sampler
from model.microdit import MicroDiT

__all__ = ["val_batches", "generate_images", "real_images", "sample_grid_for_run", "image_decoder"]


def image_decoder(
    data_dir: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> ImageEncoder:
    """The encoder the data was prepared with, to turn latents back into images."""
    return load_image_encoder(load_manifest(data_dir).image_encoder.name, device)


def val_batches(
    data_dir: str | os.PathLike[str], batch_size: int, resolution: int | None = None
) -> Iterator[dict]:
    """Validation batches in manifest order, epoch after epoch (the same order every time)."""
    manifest = load_manifest(data_dir)
    split = "val" if "val" in manifest.resolution(resolution).splits else "train"
    loader = ShardLoader(
        data_dir, split=split, resolution=resolution, batch_size=batch_size, shuffle=False
    )
    return iter(loader)


@torch.no_grad()
def generate_images(
    net: MicroDiT,
    edm_cfg: EDMConfig,
    batches: Iterator[dict],
    num_images: int,
    decoder: ImageEncoder,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, list[str]]:
    """Sample `num_images` images for the captions of `batches`; returns ((N, 3, H, W), captions).

    The noise comes from a generator seeded with `seed`, so the same weights give the same images.
    """
    was_training = net.training
    net.eval()
    precond = EDMPrecond(net, edm_cfg.sigma_data)
    gen = torch.Generator(device=device).manual_seed(seed)
    images, texts = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc="sampling", unit="img")
    done = 0
    while done < num_images:
        batch = next(batches)
        n = min(batch["latents"].shape[0], num_images - done)
        captions = batch["captions"][:n].to(device)
        mask = batch["caption_mask"][:n].to(device)
        shape = tuple(batch["latents"].shape[1:])
        latents = edm_sampler(precond, captions, mask, shape=shape, cfg=edm_cfg, generator=gen)
        images.append(decoder.decode(latents.cpu()).clamp(0, 1))
        texts.extend(batch["text"][:n])
        done += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    net.train(was_training)
    return torch.cat(images), texts


def real_images(
    data_dir: str | os.PathLike[str],
    num_images: int,
    batch_size: int = 100,
    resolution: int | None = None,
) -> Tensor:
    """The first `num_images` validation images (decoded latents) in [0, 1]: the FID reference."""
    decoder = image_decoder(data_dir)
    batches = val_batches(data_dir, min(batch_size, num_images), resolution)
    out, done = [], 0
    while done < num_images:
        latents = next(batches)["latents"]
        latents = latents[: num_images - done]
        out.append(decoder.decode(latents).clamp(0, 1))
        done += latents.shape[0]
    return torch.cat(out)


def sample_grid_for_run(
    net: MicroDiT,
    cfg: RunConfig,
    edm_cfg: EDMConfig,
    path: Path,
    device: torch.device | str = "cpu",
) -> Path:
    """A grid of `cfg.eval.grid_size` samples for the first validation captions, with captions."""
    from dataclasses import replace

    from budget_lab.eval.grid import save_grid

    n = cfg.eval.grid_size
    sampler_cfg = replace(edm_cfg, num_steps=cfg.eval.sampler_steps, cfg_scale=cfg.eval.cfg_scale)
    images, texts = generate_images(
        net,
        sampler_cfg,
        val_batches(cfg.data.path, n),
        n,
        image_decoder(cfg.data.path),
        seed=cfg.seed,
        device=device,
    )
    return save_grid(images, path, captions=texts)
