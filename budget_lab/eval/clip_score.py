"""CLIP score: how well generated images match their captions, under a configured CLIP model.

For each (image, caption) pair the score is ``100 * max(cos(E_image, E_caption), 0)`` with the
model's projected embeddings (Hessel et al., 2021, with w = 100); `CLIPScorer.score` averages it
over the pairs. Higher is better; values lie in [0, 100]. Scores are only comparable under the
same CLIP checkpoint.

Why not torchmetrics' ``CLIPScore`` (checked with torchmetrics 1.9 / transformers 5):
* a string ``model_name_or_path`` must be one of a fixed list of hub ids; a local directory is
  rejected (it is only reachable through a loader callable);
* its feature code calls ``.norm()`` on what ``CLIPModel.get_image_features`` returns, which in
  transformers 5 is a ``BaseModelOutputWithPooling``, so ``update`` raises AttributeError;
* it clamps the *mean* (``max(mean(100 cos), 0)``) instead of each pair as defined above.
So the model is run here directly through transformers: ``CLIPModel`` and ``CLIPProcessor``
loaded with ``from_pretrained`` from a hub id or a local directory, the same path real users take.

Images go through the checkpoint's own image processor as 8-bit PIL images (what a saved sample
is), so resizing and normalisation follow the checkpoint's configuration.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from budget_lab.data.encoders import resolve_device
from budget_lab.errors import ConfigError, DataError, UserError

__all__ = ["CLIPScorer"]


def _embedding(output: Any) -> Tensor:
    """The projected embedding from ``get_*_features`` (a tensor before transformers 5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, Tensor):
        raise TypeError(f"unexpected CLIP feature output of type {type(output).__name__}")
    return pooled


def _looks_like_path(name: str) -> bool:
    """True for things that cannot be a hub id ("owner/name"): absolute, relative or ~ paths."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


class CLIPScorer:
    """Scores (image, caption) pairs with a CLIP model from the hub or a local directory.

    Args:
        model_name_or_path: a hub id (e.g. ``openai/clip-vit-base-patch32``; it must be in the
            local Hugging Face cache when offline) or a directory written by ``save_pretrained``
            holding both the model and its processor (tokenizer + image processor).
        device: where the model runs.
        batch_size: pairs per forward pass.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 64,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"CLIP batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        source = os.fspath(model_name_or_path)
        if not source:
            raise ConfigError(
                "CLIP model_name_or_path is empty; give a hub id or a local directory"
            )
        local = Path(source).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ConfigError(
                    f"CLIP model_name_or_path {source!r} is a file; give the directory written by "
                    f"save_pretrained() (config.json, weights, tokenizer and processor files)"
                )
            source = str(local)
        elif _looks_like_path(source):
            raise UserError(
                f"CLIP model directory {source!r} does not exist; give a directory written by "
                f"save_pretrained() or a hub id such as 'openai/clip-vit-base-patch32'"
            )

        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(source)
            processor = CLIPProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load CLIP model and processor from {source!r}: {exc}. Give a local "
                f"directory saved with CLIPModel/CLIPProcessor.save_pretrained(), or a hub id "
                f"that is in the Hugging Face cache (download it once with network access)"
            ) from exc
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.model_name_or_path = source
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DataError(
                f"CLIP score images must be a (N, 3, H, W) tensor in [0, 1], got {shape}"
            )

    @classmethod
    def _pil_images(cls, images: Tensor) -> list[Image.Image]:
        cls._check_images(images)
        x = images.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise DataError("CLIP score images contain NaN or infinite values")
        pixels = x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(p), "RGB") for p in pixels]

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings (N, D), float32 on the CPU, for images (N, 3, H, W) in [0, 1]."""
        pil = self._pil_images(images)
        out: list[Tensor] = []
        for start in range(0, len(pil), self.batch_size):
            batch = self.processor(images=pil[start : start + self.batch_size], return_tensors="pt")
            pixel_values = batch["pixel_values"].to(self.device, dtype=self.model.dtype)
            emb = _embedding(self.model.get_image_features(pixel_values=pixel_values))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> Tensor:
        """Unit-norm caption embeddings (N, D), float32 on the CPU (long captions are truncated)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise DataError("CLIP score captions must be a sequence of strings, one per image")
        texts = list(captions)
        out: list[Tensor] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.processor(
                text=texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            emb = _embedding(
                self.model.get_text_features(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                )
            )
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    def scores(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-pair CLIP scores ``100 * max(cos, 0)``, shape (N,), float32."""
        self._check_images(images)
        n = images.shape[0]
        if isinstance(captions, str) or len(captions) != n:
            got = "a single string" if isinstance(captions, str) else f"{len(captions)} captions"
            raise DataError(f"CLIP score needs one caption per image ({n} images), got {got}")
        if n == 0:
            raise DataError("CLIP score got no images (N = 0)")
        cos = (self.embed_images(images) * self.embed_texts(captions)).sum(dim=-1)
        return 100.0 * cos.clamp(min=0.0)

    def score(self, images: Tensor, captions: Sequence[str]) -> float:
        """Mean CLIP score over the (image, caption) pairs, in [0, 100]."""
        return float(self.scores(images, captions).mean())

    __call__ = score
