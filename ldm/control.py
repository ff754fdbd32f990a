"""Control images for ControlNets, made from ordinary pictures.

`canny_edges` turns a photo into the edge map that Canny-conditioned ControlNets (lllyasviel/sd-controlnet-canny)
take: white edges on black, 3 channels, like the shape outlines of `ldm.shapes.synthetic`'s "edges" conditioning.
It runs OpenCV's `cv2.Canny`, an optional dependency: `pip install "ldm[canny]"`.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import PIL.Image

# Hysteresis thresholds on the gradient magnitude: the ControlNet paper's Canny annotator and diffusers' examples.
CANNY_LOW, CANNY_HIGH = 100, 200


def import_cv2() -> ModuleType:
    """OpenCV's `cv2`, or an ImportError that says how to install it."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError(
            'Canny edge maps need OpenCV; install it with `pip install "ldm[canny]"` (opencv-python-headless).'
        ) from err
    return cv2


def canny_edges(image: PIL.Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> PIL.Image.Image:
    """The Canny edge map of `image` (Canny 1986), as a Canny ControlNet takes it.

    Args:
        image: Any PIL image (converted to RGB first; OpenCV takes the strongest gradient over the channels).
        low, high: Hysteresis thresholds: gradients above `high` start an edge, those above `low` continue one.

    Returns:
        An RGB image of `image`'s size: 255 on edge pixels in all three channels, 0 elsewhere.

    Raises:
        ImportError: OpenCV is not installed (`pip install "ldm[canny]"`).
    """
    cv2 = import_cv2()
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8, 0 or 255
    return PIL.Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
