"""Save a batch of images as one PNG grid, optionally captioned (PIL only, no torchvision).

Layout: ``nrow`` images per row (torchvision's convention), ``ceil(N / nrow)`` rows, a
``padding``-pixel white border around and between cells. Each cell is the image enlarged by an
integer nearest-neighbour factor (``upscale``; by default the smallest factor that makes the
longer side at least 128 px, so 32 px samples become 128 px), and, when captions are given, a
caption band under it, as tall as the longest wrapped caption (at most ``max_caption_lines``).

The grid is
    width  = ncol * W * upscale + (ncol + 1) * padding,  ncol = min(nrow, N)
    height = nrows * (H * upscale + caption_band) + (nrows + 1) * padding
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from budget_lab.errors import ConfigError, DataError
from budget_lab.io import atomic_write

__all__ = ["auto_upscale", "grid_size", "save_grid"]

_MIN_VIEWABLE = 128  # px: default upscale makes the longer image side at least this large
_CAPTION_MARGIN = 2  # px above and below the caption text


def auto_upscale(height: int, width: int) -> int:
    """Smallest integer factor that brings ``max(height, width)`` to at least 128 px (>= 1)."""
    return max(1, math.ceil(_MIN_VIEWABLE / max(height, width, 1)))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag|y")
    return int(math.ceil(bottom - min(top, 0))) + 1


def _wrap(
    text: str,
    width: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    max_lines: int,
) -> list[str]:
    """Greedy word wrap to ``width`` px (long words are split), truncated with '...'."""

    def fits(s: str) -> bool:
        return font.getlength(s) <= width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while word and not fits(word):
            cut = 1  # longest prefix that fits, at least one character
            while cut < len(word) and fits(word[: cut + 1]):
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def grid_size(
    num_images: int,
    height: int,
    width: int,
    nrow: int,
    upscale: int,
    padding: int,
    caption_band: int = 0,
) -> tuple[int, int]:
    """(width, height) in pixels of the grid `save_grid` draws (see the module docstring)."""
    ncol = min(nrow, num_images)
    nrows = math.ceil(num_images / nrow)
    total_w = ncol * width * upscale + (ncol + 1) * padding
    total_h = nrows * (height * upscale + caption_band) + (nrows + 1) * padding
    return total_w, total_h


def _to_uint8(images: Tensor) -> np.ndarray:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(
            f"save_grid images must be a (N, 3, H, W) or (N, 1, H, W) tensor in [0, 1], got {shape}"
        )
    if images.shape[0] == 0:
        raise DataError("save_grid got no images (N = 0)")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise DataError("save_grid images contain NaN or infinite values")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    pixels = x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"save_grid {name} must be a positive integer, got {value!r}")
    return value


def save_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    captions: Sequence[str] | None = None,
    upscale: int | None = None,
    *,
    padding: int = 2,
    max_caption_lines: int = 3,
) -> Path:
    """Write ``images`` (N, 3, H, W) in [0, 1] as a PNG grid at ``path`` and return the path.

    Args:
        images: float images; values outside [0, 1] are clamped. (N, 1, H, W) is drawn in gray.
        path: output file, must end in ``.png``; parent folders are created. The write is
            atomic (temporary file in the same folder, then rename).
        nrow: images per row; default ``ceil(sqrt(N))``.
        captions: one string per image, drawn under its cell with PIL's default font.
        upscale: integer nearest-neighbour enlargement; default `auto_upscale` (32 px -> 4x).
        padding: white pixels around and between cells.
        max_caption_lines: longer captions are cut with '...'.
    """
    pixels = _to_uint8(images)
    n, h, w = pixels.shape[0], pixels.shape[1], pixels.shape[2]
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"save_grid writes PNG files; path {str(target)!r} must end in .png")
    nrow = _positive_int("nrow", nrow) if nrow is not None else math.ceil(math.sqrt(n))
    scale = _positive_int("upscale", upscale) if upscale is not None else auto_upscale(h, w)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"save_grid padding must be an integer >= 0, got {padding!r}")
    _positive_int("max_caption_lines", max_caption_lines)
    cell_w, cell_h = w * scale, h * scale

    font = _font()
    wrapped: list[list[str]] = []
    band = 0
    if captions is not None:
        if isinstance(captions, str) or len(captions) != n:
            got = "a single string" if isinstance(captions, str) else f"{len(captions)} captions"
            raise ConfigError(f"save_grid needs one caption per image ({n}), got {got}")
        wrapped = [_wrap(str(c), cell_w, font, max_caption_lines) for c in captions]
        lines = max((len(ls) for ls in wrapped), default=0)
        band = max(1, lines) * _line_height(font) + 2 * _CAPTION_MARGIN

    size = grid_size(n, h, w, nrow, scale, padding, band)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    line_h = _line_height(font)
    for i in range(n):
        row, col = divmod(i, nrow)
        x0 = padding + col * (cell_w + padding)
        y0 = padding + row * (cell_h + band + padding)
        cell = Image.fromarray(pixels[i], "RGB")
        if scale != 1:
            cell = cell.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        canvas.paste(cell, (x0, y0))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            ty = y0 + cell_h + _CAPTION_MARGIN + j * line_h
            draw.text((x0, ty), line, fill=(0, 0, 0), font=font)

    atomic_write(target, lambda fh: canvas.save(fh, format="PNG"))
    return target
