"""Small image helpers shared by sampling, validation and evaluation."""

from __future__ import annotations

import math

import PIL.Image


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
