"""Read the shape, colour and position of a solid shape back from pixels.

A deterministic, pure-numpy detector for the images of :mod:`ldm.shapes.synthetic`, meant to score images that a
text-to-image model generated from the same captions. It tolerates what such images look like: soft
edges, mild noise, slightly off-palette colours and small stray blobs.

How it reads an image:

1. The background colour is the median of the image's border pixels.
2. The foreground is every pixel whose RGB distance from the background exceeds half the shape's contrast
   (the half-coverage contour of a soft edge), so its outline sits on the shape's true edge.
3. The dominant shape is the largest 4-connected foreground component; smaller blobs are ignored.
4. Colour: the palette colour nearest to the median RGB of the component's interior, measured along the
   ray from the background through each palette colour, so that paler or deeper shades still match.
5. Position: from the centre of the component's bounding box relative to the image centre.
6. Shape: from blur-tolerant moments of the shape's coverage: a vertical skew marks the apex-up triangle,
   and a higher kurtosis along the diagonals than along the axes marks a square rather than a circle.

Steps 1-3 are also :func:`object_mask`, which :func:`mask_iou` compares with a wanted filled mask (the held-out
masks of ``--conditioning edges`` data), to score how closely a ControlNet sample follows its outline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image

from ldm.shapes.synthetic import BACKGROUND, COLORS

# A pixel counts as foreground at first sight if it is this far (RGB units, 0-255) from the background;
# well above mild noise (sigma 10 per channel rarely reaches 40), well below any palette colour (>= 230).
_ROUGH_THRESHOLD = 60.0
# The dominant component must cover at least this fraction of the image; the smallest shape the
# generator draws covers ~5 % at any resolution, so smaller ones are specks, not shapes.
_MIN_AREA_FRACTION = 0.005
_MIN_AREA_PIXELS = 4
# Bounding-box centre offsets below this fraction of the image side read as "center". Rendered
# positions sit 0.22 +- 0.03 off-centre and centred shapes within 0.03, so 0.125 splits the gap.
_CENTER_RADIUS = 0.125

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # (6, 3)


def _to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) float64 array in 0-255 from a PIL image or a uint8 / float-in-[0, 1] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image)}.")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image array must have shape (H, W, 3), got {image.shape}.")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        low, high = float(np.min(image)), float(np.max(image))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float image values must lie in [0, 1], got [{low:.3f}, {high:.3f}]; "
                "map a [-1, 1] model output with (x + 1) / 2 and clip it first."
            )
        return image.astype(np.float64) * 255.0
    raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {image.dtype}.")


def _background_color(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the one-pixel border, where the generator never draws."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (2H + 2W - 4, 3)
    return np.median(border, axis=0)


def _component_labels(mask: np.ndarray) -> np.ndarray:
    """Label 4-connected components: equal ints within a component, ``mask.size`` outside the mask."""
    h, w = mask.shape
    # Every pixel starts with its own flat index as label; labels then take the minimum over their
    # neighbours until nothing changes. Background holds a label larger than any index so it never spreads.
    sentinel = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, sentinel)
        # A label is the index of a pixel in the same component, whose own label is no larger:
        # following it (pointer jumping) spreads minima far faster than one pixel per sweep.
        flat = np.append(new.ravel(), sentinel)
        new = np.where(mask, flat[new], sentinel)
        if np.array_equal(new, labels):
            return labels
        labels = new


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask, as a boolean mask (all False if empty)."""
    if not mask.any():
        return mask
    labels = _component_labels(mask)
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean mask by ``steps`` pixels in the four axis directions."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _skew_and_kurtosis(weights: np.ndarray, coords: np.ndarray) -> tuple[float, float]:
    """Skewness and kurtosis of ``coords`` under the (unnormalised) ``weights``; (0, 0) if they do not vary."""
    total = weights.sum()
    centered = coords - (weights * coords).sum() / total
    var = (weights * centered**2).sum() / total
    if var <= 1e-12:
        # A one-pixel-thin line along this axis: no spread to measure, and no shape of ours looks like it.
        return 0.0, 0.0
    skew = (weights * centered**3).sum() / total / var**1.5
    kurtosis = (weights * centered**4).sum() / total / var**2
    return float(skew), float(kurtosis)


def _classify_shape(weights: np.ndarray) -> str:
    """Square, circle or triangle from the third and fourth moments of the shape's coverage.

    ``weights`` is proportional to the coverage (alpha) of each pixel. Normalised moments do not depend on
    its scale, and Gaussian blur leaves third and fourth cumulants unchanged and only adds to the variance,
    so soft edges shrink these features towards zero but never flip their sign:

    - The apex-up triangle's vertical profile grows linearly towards its base: skewness -0.57 (y points
      down); circle and square are symmetric (0).
    - A square projects onto an axis as a box (kurtosis 1.8) and onto a diagonal as a tent (2.4); a circle
      projects to the same semicircle (2.0) in every direction. So kurtosis along the diagonals minus
      kurtosis along the axes is +0.6 for a square and 0 for a circle.

    On generator images blurred by 1.5 px with noise sigma 15, triangles stay below -0.24 skewness and
    squares above +0.24 kurtosis difference, others within +-0.06; the thresholds sit at +-0.15.
    """
    y, x = np.indices(weights.shape, dtype=np.float64)  # (H, W) each
    skew_y, kurtosis_y = _skew_and_kurtosis(weights, y)
    if skew_y < -0.15:
        return "triangle"
    _, kurtosis_x = _skew_and_kurtosis(weights, x)
    _, kurtosis_d1 = _skew_and_kurtosis(weights, (x + y) / np.sqrt(2))
    _, kurtosis_d2 = _skew_and_kurtosis(weights, (x - y) / np.sqrt(2))
    diagonal_minus_axis = (kurtosis_d1 + kurtosis_d2) / 2 - (kurtosis_x + kurtosis_y) / 2
    return "square" if diagonal_minus_axis > 0.15 else "circle"


def _nearest_color(rgb: np.ndarray, background: np.ndarray) -> str:
    """The palette colour whose ray from the background passes closest to ``rgb``.

    A pixel that blends colour c with the background b at coverage a lies at b + a (c - b): on the ray from
    b through c. Measuring the distance to that ray rather than to c itself reads washed-out, blurred or
    deeper shades of a colour as that colour, which a generated image often shows.
    """
    directions = _PALETTE - background  # (6, 3)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    offset = rgb - background  # (3,)
    along = np.maximum(directions @ offset, 0.0)  # (6,) the ray starts at the background
    residual = np.linalg.norm(offset - along[:, None] * directions, axis=1)  # (6,)
    return _PALETTE_NAMES[int(np.argmin(residual))]


def _classify_position(component: np.ndarray) -> str:
    """Left, right, top, bottom or center from the bounding-box centre's offset from the image centre."""
    h, w = component.shape
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    # Bounding-box centre, not pixel centroid: a triangle's centroid sits a sixth of its height below
    # the centre of its box, which is what the generator places.
    dx = (cols[0] + cols[-1] + 1) / 2 / w - 0.5
    dy = (rows[0] + rows[-1] + 1) / 2 / h - 0.5
    if max(abs(dx), abs(dy)) < _CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


class _Segmentation(NamedTuple):
    """Steps 1-3 of the module docstring, and what the later steps reuse."""

    component: np.ndarray  # (H, W) bool, the dominant shape's pixels
    distance: np.ndarray  # (H, W) RGB distance from the background
    background: np.ndarray  # (3,)
    contrast: float  # the distance of the shape's solid interior
    rough: np.ndarray  # (H, W) bool, every pixel clearly off the background


def _segment(rgb: np.ndarray) -> _Segmentation | None:
    """The dominant shape's 4-connected half-contrast component, or None when there is no shape big enough."""
    h, w, _ = rgb.shape
    if h < 3 or w < 3:
        return None
    background = _background_color(rgb)  # (3,)
    distance = np.linalg.norm(rgb - background, axis=-1)  # (H, W)
    rough = distance > _ROUGH_THRESHOLD
    if not rough.any():
        return None
    # Half the contrast of the shape's solid interior: the 50 %-coverage contour of a soft edge.
    contrast = float(np.percentile(distance[rough], 90))
    component = _largest_component(distance > max(0.5 * contrast, _ROUGH_THRESHOLD))
    if component.sum() < max(_MIN_AREA_PIXELS, _MIN_AREA_FRACTION * h * w):
        return None
    return _Segmentation(component, distance, background, contrast, rough)


def _interior_median(rgb: np.ndarray, found: _Segmentation) -> np.ndarray:
    """The median RGB of the shape's interior: edge pixels blend with the background and would pull it there."""
    interior = found.component & (found.distance >= 0.75 * found.contrast)
    pixels = rgb[interior] if interior.sum() >= _MIN_AREA_PIXELS else rgb[found.component]  # (N, 3)
    return np.median(pixels, axis=0)


def drawn_color(image: Image.Image | np.ndarray) -> np.ndarray | None:
    """The RGB (0-255) that :func:`detect` reads the dominant shape's colour from, or None when there is no shape.

    Args:
        image: As for :func:`detect`.

    Returns:
        A float64 array of 3 values: the median colour of the shape's interior.

    Raises:
        TypeError, ValueError: As for :func:`detect`.
    """
    rgb = _to_rgb_array(image)
    found = _segment(rgb)
    return None if found is None else _interior_median(rgb, found)


def color_boundary(inside: str, outside: str, background: tuple[int, int, int] = BACKGROUND) -> float:
    """How far (0-1) along the straight line from palette colour ``inside`` to ``outside`` the reading flips.

    A colour drawn between the two reads as ``inside`` up to this fraction of the way; 0.5 would be a fair split.

    Raises:
        ValueError: If either name is not a palette colour, or the two are equal.
    """
    if inside not in COLORS or outside not in COLORS or inside == outside:
        raise ValueError(
            f"inside and outside must be two different colours of {_PALETTE_NAMES}, got {inside!r}, {outside!r}."
        )
    start, end, bg = (np.array(c, dtype=np.float64) for c in (COLORS[inside], COLORS[outside], background))
    low, high = (
        0.0,
        1.0,
    )  # the reading at low is `inside`, at high `outside` (the palette colours read as themselves)
    for _ in range(40):
        middle = (low + high) / 2
        if _nearest_color(start + middle * (end - start), bg) == inside:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def detect(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Read the shape, colour and position of the dominant solid shape in an image.

    Args:
        image: A PIL image (any mode; converted to RGB), or an ``(H, W, 3)`` numpy array of dtype uint8
            or of floats in ``[0, 1]``.

    Returns:
        ``{"shape": ..., "color": ..., "position": ...}`` with values from ``SHAPES``, the keys of
        ``COLORS`` and ``POSITIONS``; every value is None if no shape is found (e.g. a blank image).

    Raises:
        TypeError: If ``image`` is neither a PIL image nor a numpy array.
        ValueError: If the array has the wrong shape or dtype, or floats outside ``[0, 1]``.
    """
    rgb = _to_rgb_array(image)  # (H, W, 3) in 0-255
    found = _segment(rgb)
    if found is None:
        return {"shape": None, "color": None, "position": None}
    component, distance, background, contrast, rough = found
    h, w, _ = rgb.shape
    color = _nearest_color(_interior_median(rgb, found), background)

    # Coverage weights for the shape: distance above the background's noise level, kept to a margin around
    # the component so that soft edges count in full, minus any other blob that reaches into that margin.
    noise_floor = float(np.median(distance[~rough])) if (~rough).any() else 0.0
    margin = max(3, round(0.05 * min(h, w)))
    rough_labels = _component_labels(rough)
    strays = rough & (rough_labels != rough_labels[component][0])  # the component lies in one rough blob
    region = _dilate(component, margin) & ~strays
    weights = np.where(region, np.maximum(distance - noise_floor, 0.0), 0.0)  # (H, W)
    return {"shape": _classify_shape(weights), "color": color, "position": _classify_position(component)}


def object_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """The pixels of the dominant solid shape, as :func:`detect` segments them.

    Args:
        image: As for :func:`detect`.

    Returns:
        An ``(H, W)`` boolean mask: the largest 4-connected component of pixels more than half the shape's contrast
        away from the background (its half-coverage contour); all False when no shape is found.

    Raises:
        TypeError, ValueError: As for :func:`detect`.
    """
    rgb = _to_rgb_array(image)  # (H, W, 3) in 0-255
    found = _segment(rgb)
    return np.zeros(rgb.shape[:2], dtype=bool) if found is None else found.component


def _to_mask_array(mask: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W) bool array from a white-on-black mask image (any mode) or a 2-D bool / 0-255 array."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) > 127
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(
            f"mask must be a PIL image or a 2-D numpy array (white / True = the shape), got "
            f"{type(mask).__name__} of shape {getattr(mask, 'shape', None)}."
        )
    return mask > 127 if mask.dtype == np.uint8 else mask.astype(bool)


def mask_iou(image: Image.Image | np.ndarray, mask: Image.Image | np.ndarray) -> float:
    """Intersection over union of the shape :func:`object_mask` finds in ``image`` and a wanted filled mask.

    Args:
        image: As for :func:`detect`: a generated image.
        mask: The wanted shape, white (or True) on black, the size of ``image``: a PIL image (any mode; pixels
            above 127 in its grey version count), or an ``(H, W)`` bool array or uint8 array (above 127 counts).

    Returns:
        ``|found & wanted| / |found | wanted|`` in [0, 1]; 0 when no shape is found.

    Raises:
        ValueError: If the mask is empty, not 2-D, or not the image's size (resize neither: a resampled mask
            would move the edge being scored), or as for :func:`detect`.
    """
    wanted = _to_mask_array(mask)
    found = object_mask(image)
    if wanted.shape != found.shape:
        raise ValueError(
            f"The mask is {wanted.shape[1]}x{wanted.shape[0]} px but the image is {found.shape[1]}x{found.shape[0]};"
            " generate at the mask's size (the dataset's resolution)."
        )
    if not wanted.any():
        raise ValueError("The mask is empty (no white pixel); IoU against no shape is undefined.")
    return float((found & wanted).sum() / (found | wanted).sum())


def detector_accuracy(
    records: Iterable[tuple[Image.Image | np.ndarray, Mapping[str, str]]],
) -> dict[str, float | int]:
    """Score :func:`detect` against known attributes.

    Args:
        records: ``(image, labels)`` pairs, where ``labels`` maps ``"shape"``, ``"color"`` and ``"position"``
            to the attributes the image should show (e.g. a row of ``metadata.jsonl``).

    Returns:
        The fraction of images read correctly for each attribute (``"shape"``, ``"color"``, ``"position"``),
        for all three at once (``"all"``), and the number of images (``"num_images"``).

    Raises:
        ValueError: If ``records`` is empty.
    """
    keys = ("shape", "color", "position")
    hits = {key: 0 for key in (*keys, "all")}
    n = 0
    for image, labels in records:
        found = detect(image)
        right = [found[key] == labels[key] for key in keys]
        for key, ok in zip(keys, right, strict=True):
            hits[key] += ok
        hits["all"] += all(right)
        n += 1
    if n == 0:
        raise ValueError("records is empty; pass at least one (image, labels) pair.")
    return {**{key: count / n for key, count in hits.items()}, "num_images": n}
