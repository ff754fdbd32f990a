"""Small image helpers shared by sampling, validation, evaluation and training data."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

# 16-bit greyscale: PNG's I;16 (and I, as Pillow widens some 16-bit files). PIL's own convert clips these at 255
# instead of scaling, turning almost every pixel white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def convert_mode(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """`image` in `mode` ("RGB" or "L"): alpha dropped, palette, CMYK and greyscale converted, 16-bit greyscale scaled
    to 8 bits (65535 -> 255) rather than clipped. The image itself when it already has that mode."""
    if image.mode == mode:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.round(np.asarray(image, dtype=np.float64) / 257.0)
        image = PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return image.convert(mode)


def image_grid(images: list[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Tile images into one grid, row-major; `cols` defaults to ceil(sqrt(n)).

    Each cell is as large as the largest image (images of several aspect ratios sit at their cells' top left).
    """
    if not images:
        raise ValueError("image_grid needs at least one image.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = max(image.width for image in images), max(image.height for image in images)
    grid = PIL.Image.new("RGB", (cols * w, rows * h), color="white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid
