"""Image helpers shared by training previews, the client SDK and the demo: float -> uint8, grids, atomic PNGs.

numpy + Pillow only (no torch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import atomic_file


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) floats in value_range -> (N, H, W, C) uint8."""
    lo, hi = value_range
    x = (np.asarray(images, dtype=np.float64) - lo) / (hi - lo)
    x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', nrow*W', C) uint8 image, row-major, nrow images per row."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 (H, W, C) or (H, W) array as PNG atomically (temp file in the same folder, then rename)."""
    from PIL import Image

    path = Path(path)
    arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    with atomic_file(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def labelled_grid(images: np.ndarray, nrow: int, row_labels: Sequence[str] | None = None,
                  scale: int = 2, label_width: int = 90) -> np.ndarray:
    """A grid with a text label left of each row (Pillow's default font), upscaled for legibility.

    images: (N, H, W, C) uint8, N = rows * nrow. Returns (H', W', 3) uint8.
    """
    from PIL import Image, ImageDraw

    grid = make_grid(images, nrow)
    if grid.shape[2] == 1:
        grid = np.repeat(grid, 3, axis=2)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if not row_labels:
        return np.asarray(img)
    canvas = Image.new("RGB", (img.width + label_width, img.height), (255, 255, 255))
    canvas.paste(img, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    h = images.shape[1]
    for r, text in enumerate(row_labels):
        y = (2 + r * (h + 2) + h // 2) * scale - 6
        draw.text((4, y), str(text), fill=(0, 0, 0))
    return np.asarray(canvas)
