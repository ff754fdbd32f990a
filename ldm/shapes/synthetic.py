"""An offline, compositional captioned dataset of solid shapes.

Every image holds one solid shape on a plain background, described by three attributes drawn from
small fixed vocabularies: its shape (``SHAPES``), its colour (``COLORS``) and its position
(``POSITIONS``). Captions are built from a closed word list (``CAPTION_WORDS``), so a word-level
tokenizer covers them exactly, and :mod:`ldm.shapes.detector` reads the three attributes back from pixels,
which turns "does the model follow the prompt" into a number.

The dataset is written as a Hugging Face ``datasets`` "imagefolder"::

    out_dir/
        train/000000.png ... train/metadata.jsonl   # file_name, text, shape, color, position, caption_is_correct
        heldout_prompts.jsonl                       # prompt, shape, color, position
        generator_config.json                       # the settings, to reuse data that is current

With ``conditioning="edges"`` (``--conditioning edges``), for ControlNet training and evaluation, it also writes::

        train/conditioning/000000.png ...           # the shape's outline; metadata gains conditioning_image_file_name
        heldout/conditioning/000.png ...            # per held-out prompt: a fresh outline (heldout_prompts.jsonl's
        heldout/mask/000.png ...                    #   conditioning_image) and its filled mask (its mask)

``datasets``' imagefolder turns the ``conditioning_image_file_name`` key into an image column ``conditioning_image``.

Command line::

    python -m ldm.shapes.synthetic --out_dir data/shapes --num_images 10000 --resolution 32 --seed 0

Captions can be made noisy on purpose (``caption_noise``), as web alt-text is: a chosen fraction of training
captions misname one attribute of their image. The ``shape``/``color``/``position`` columns always describe
what is drawn, so the detector's accuracy is measured against the truth; the held-out prompts stay clean.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Cyan instead of orange: orange sits within ~70 RGB units of yellow and ~110 of red, which a blurry
# generated image can cross; the six colours below are at least ~145 apart from each other and
# ~230 from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 50, 220),
    "yellow": (235, 210, 30),
    "purple": (170, 30, 180),
    "cyan": (30, 200, 210),
}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Shape centre for each position as a fraction of the image side, (x, y) with y pointing down.
# 0.22 off-centre is as far out as the largest jittered shape (side 0.374, place jitter 0.03) can go while
# leaving the one-pixel border of a 16 px image untouched; the detector reads the background there.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}

# The words that put a position into a caption: "on the left", "at the top", "in the center".
_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

SHAPE_SIZE = 0.34  # side of the shape's bounding box as a fraction of the image side
SIZE_JITTER = 0.10  # relative: the side is drawn uniformly from SHAPE_SIZE * (1 +- SIZE_JITTER)
PLACE_JITTER = 0.03  # absolute, as a fraction of the image side, per axis
MIN_RESOLUTION = 16
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: antialiased edges without a resampling kernel's ringing

# Bumped whenever rendering or sampling changes, so that data cached under an old version is regenerated.
GENERATOR_VERSION = 1

# What a ControlNet is conditioned on, written beside every image: nothing, or the drawn shape's outline.
Conditioning = Literal["none", "edges"]
CONDITIONINGS: tuple[str, ...] = ("none", "edges")


def caption(shape: str, color: str, position: str) -> str:
    """The caption for one attribute combination.

    Args:
        shape: One of ``SHAPES``.
        color: One of the keys of ``COLORS``.
        position: One of ``POSITIONS``.

    Returns:
        For example ``"a red circle on the left"``, ``"a green triangle at the top"`` or
        ``"a purple square in the center"``.

    Raises:
        ValueError: If an attribute is not in its vocabulary.
    """
    _check_attributes(shape, color, position)
    return f"a {color} {shape} {_POSITION_PHRASES[position]}"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every ``(shape, color, position)`` combination, in a fixed order (shape-major, then colour, then position)."""
    return list(itertools.product(SHAPES, COLORS, POSITIONS))


def _caption_words() -> list[str]:
    """Every word of every caption, in order of first appearance."""
    words: dict[str, None] = {}
    for combo in all_combinations():
        words.update(dict.fromkeys(caption(*combo).split()))
    return list(words)


def _check_attributes(shape: str, color: str, position: str) -> None:
    """Raise a ValueError naming the first attribute that is not in its vocabulary."""
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")
    if color not in COLORS:
        raise ValueError(f"Unknown color {color!r}; expected one of {list(COLORS)}.")
    if position not in POSITIONS:
        raise ValueError(f"Unknown position {position!r}; expected one of {list(POSITIONS)}.")


# All words that can appear in any caption; a word-level tokenizer is built from this list.
CAPTION_WORDS: list[str] = _caption_words()


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def render(shape: str, color: str, position: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """Draw one solid shape on the plain ``BACKGROUND``.

    The shape's bounding box is a square of side ``SHAPE_SIZE`` (+-``SIZE_JITTER``) times the image side,
    centred on ``POSITION_CENTERS[position]`` moved by up to ``PLACE_JITTER`` of the side on each axis.
    Circles and squares fill that box; triangles point up with their base on its bottom edge. Shapes are
    axis-aligned and drawn at 4x the resolution, then box-downsampled for antialiased edges.

    Args:
        shape: One of ``SHAPES``.
        color: One of the keys of ``COLORS``.
        position: One of ``POSITIONS``.
        resolution: Side of the square image in pixels, at least ``MIN_RESOLUTION`` (16).
        rng: Source of the size and place jitter; the same generator state gives the same image.

    Returns:
        An RGB image of ``resolution x resolution`` pixels.

    Raises:
        ValueError: If an attribute is unknown or ``resolution`` is not an int >= 16.
        TypeError: If ``rng`` is not a ``numpy.random.Generator``.
    """
    return _render_supersampled(shape, color, position, resolution, rng).reduce(_SUPERSAMPLE)


def render_with_mask(
    shape: str, color: str, position: str, resolution: int, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """:func:`render`'s image and the shape's filled mask, both from the one drawing.

    The mask is read off the supersampled canvas the image is reduced from, not redrawn: a pixel is in the shape
    when the fill covers more than half of its 4x4 subpixels, the half-coverage contour that
    :func:`ldm.shapes.detector.object_mask` segments at. So the mask has exactly the image's geometry and
    antialiasing decisions.

    Args:
        shape, color, position, resolution, rng: As for :func:`render`; the same generator state gives the same
            image as :func:`render`.

    Returns:
        ``(image, mask)``: the RGB image, byte-identical to :func:`render`'s, and an ``(H, W)`` boolean mask.

    Raises:
        ValueError, TypeError: As for :func:`render`.
    """
    canvas = _render_supersampled(shape, color, position, resolution, rng)
    # No palette colour equals the background, so "not background" is exactly the subpixels the fill landed on.
    drawn = (np.asarray(canvas) != BACKGROUND).any(axis=-1)  # (4H, 4W)
    coverage = drawn.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))  # (H, W)
    return canvas.reduce(_SUPERSAMPLE), coverage > 0.5


def outline(mask: np.ndarray) -> np.ndarray:
    """The edge of a filled mask: its pixels with a 4-neighbour outside it, a closed line 1 px wide.

    This is the inner boundary, so the outline lies on the shape and a fill of it gives the mask back; at 64 px it
    is what an edge detector (Canny) finds on the shape's half-coverage contour.
    """
    padded = np.pad(mask, 1)  # beyond the image counts as outside the shape
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def white_on_black(mask: np.ndarray, mode: Literal["RGB", "L"] = "RGB") -> Image.Image:
    """A boolean mask as an image: white (255) where True, black elsewhere."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").convert(mode)


def _render_supersampled(
    shape: str, color: str, position: str, resolution: int, rng: np.random.Generator
) -> Image.Image:
    """render()'s drawing at _SUPERSAMPLE times the resolution, before the box downsampling."""
    _check_attributes(shape, color, position)
    _check_resolution(resolution)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}."
        )

    canvas = resolution * _SUPERSAMPLE
    side = SHAPE_SIZE * rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER) * canvas
    center_x, center_y = POSITION_CENTERS[position]
    cx = (center_x + rng.uniform(-PLACE_JITTER, PLACE_JITTER)) * canvas
    cy = (center_y + rng.uniform(-PLACE_JITTER, PLACE_JITTER)) * canvas
    r = side / 2
    x0, y0, x1, y1 = (round(v) for v in (cx - r, cy - r, cx + r, cy + r))

    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    # PIL's box corners are inclusive, hence the -1 on the far edges.
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    # The caller's reduce() averages each 4x4 block: exact area coverage, deterministic across platforms.
    return image


def _check_resolution(resolution: int) -> None:
    """Raise a ValueError unless ``resolution`` is an int of at least MIN_RESOLUTION."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ValueError(
            f"resolution must be an int >= {MIN_RESOLUTION} (e.g. 32 or 64), got {resolution!r}; "
            "smaller images cannot keep the five positions apart."
        )


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def _config(
    num_images: int,
    resolution: int,
    seed: int,
    num_heldout: int,
    exclude_heldout_from_train: bool,
    caption_noise: float,
    colors: tuple[str, ...] | None = None,
    conditioning: Conditioning = "none",
) -> dict:
    """The settings that determine a dataset's bytes, as stored in generator_config.json.

    `colors` is recorded only when it restricts the palette and `conditioning` only when it is not "none", so
    datasets without them keep their old config.
    """
    config = {
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "resolution": resolution,
        "seed": seed,
        "num_heldout": num_heldout,
        "exclude_heldout_from_train": exclude_heldout_from_train,
        "caption_noise": caption_noise,
    }
    if colors is not None and tuple(colors) != tuple(COLORS):
        config["colors"] = list(colors)
    if conditioning != "none":
        config["conditioning"] = conditioning
    return config


def palette_combinations(colors: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    """`all_combinations()` restricted to `colors` (all colours when None), in the same order."""
    if colors is None:
        return all_combinations()
    unknown = [color for color in colors if color not in COLORS]
    if unknown or not colors or len(set(colors)) != len(colors):
        raise ValueError(
            f"colors={list(colors)} must be distinct names from {list(COLORS)}; unknown: {unknown or 'none'}."
        )
    return [combo for combo in all_combinations() if combo[1] in colors]


def _check_dataset_args(config: dict) -> None:
    """Raise a ValueError naming the first bad setting in a `_config` dict of generate_dataset's arguments."""
    num_images, num_heldout, caption_noise = (
        config["num_images"],
        config["num_heldout"],
        config["caption_noise"],
    )
    num_combos = len(palette_combinations(config.get("colors")))
    for name, value, low in (
        ("num_images", num_images, 1),
        ("seed", config["seed"], 0),
        ("num_heldout", num_heldout, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    _check_resolution(config["resolution"])
    if num_heldout > num_combos:
        raise ValueError(
            f"num_heldout={num_heldout} exceeds the {num_combos} distinct (shape, color, position) combinations."
        )
    if config["exclude_heldout_from_train"] and num_heldout == num_combos:
        raise ValueError(
            f"num_heldout={num_heldout} with exclude_heldout_from_train leaves no combination to train on; "
            f"hold out fewer than {num_combos}."
        )
    if (
        isinstance(caption_noise, bool)
        or not isinstance(caption_noise, (int, float))
        or not 0 <= caption_noise < 1
    ):
        raise ValueError(
            f"caption_noise must be a fraction in [0, 1) (e.g. 0.3 for 30% wrong captions), got {caption_noise!r}."
        )
    conditioning = config.get("conditioning", "none")
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {list(CONDITIONINGS)}, got {conditioning!r}.")


def misnamed_combination(
    combo: tuple[str, str, str], rng: np.random.Generator, forbidden: set[tuple[str, str, str]] = frozenset()
) -> tuple[str, str, str]:
    """``combo`` with exactly one attribute replaced by another value of its vocabulary.

    The attribute (shape, colour or position) and its new value are drawn uniformly from ``rng``, among the
    replacements that do not land in ``forbidden`` (the held-out combinations, which must never be captioned in
    training). If every replacement is forbidden, ``combo`` is returned unchanged.
    """
    vocabularies = (SHAPES, tuple(COLORS), POSITIONS)
    candidates, weights = [], []
    for index, vocabulary in enumerate(vocabularies):
        for value in vocabulary:
            replaced = combo[:index] + (value,) + combo[index + 1 :]
            if value != combo[index] and replaced not in forbidden:
                candidates.append(replaced)
                # 1/(k-1) per value: with nothing forbidden, each attribute is misnamed a third of the time,
                # whatever its vocabulary size.
                weights.append(1.0 / (len(vocabulary) - 1))
    if not candidates:
        return combo
    return candidates[rng.choice(len(candidates), p=np.array(weights) / sum(weights))]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one compact JSON object per line, with a fixed key order, so that equal rows give equal bytes."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def dataset_is_current(
    out_dir: str | Path,
    num_images: int,
    resolution: int = 32,
    seed: int = 0,
    num_heldout: int = 30,
    exclude_heldout_from_train: bool = False,
    caption_noise: float = 0.0,
    colors: tuple[str, ...] | None = None,
    conditioning: Conditioning = "none",
) -> bool:
    """Whether ``out_dir`` already holds a complete dataset generated with exactly these settings.

    Args:
        out_dir: A directory that :func:`generate_dataset` may have written.
        num_images, resolution, seed, num_heldout, exclude_heldout_from_train, caption_noise, colors,
            conditioning: As for :func:`generate_dataset`.

    Returns:
        True if ``generator_config.json`` (written last, so only by a run that finished) matches these
        settings and the current ``GENERATOR_VERSION``, and ``train/metadata.jsonl`` exists.
    """
    out_dir = Path(out_dir)
    config_path = out_dir / "generator_config.json"
    if not config_path.is_file() or not (out_dir / "train" / "metadata.jsonl").is_file():
        return False
    wanted = _config(
        num_images,
        resolution,
        seed,
        num_heldout,
        exclude_heldout_from_train,
        caption_noise,
        colors,
        conditioning,
    )
    return json.loads(config_path.read_text(encoding="utf-8")) == wanted


def generate_dataset(
    out_dir: str | Path,
    num_images: int,
    resolution: int = 32,
    seed: int = 0,
    num_heldout: int = 30,
    exclude_heldout_from_train: bool = False,
    caption_noise: float = 0.0,
    colors: tuple[str, ...] | None = None,
    conditioning: Conditioning = "none",
) -> dict:
    """Write the captioned shapes dataset as a Hugging Face ``datasets`` imagefolder.

    Held-out combinations are the first ``num_heldout`` of a seeded permutation of
    :func:`all_combinations`. Training images cycle through the training combinations (all of them, or
    all but the held-out ones), reshuffled by the seed on every cycle, so each combination appears
    ``num_images / num_combinations`` times, give or take one. Image ``i`` is rendered from its own
    generator seeded with ``(seed, i)``. The same arguments give byte-identical files.

    Args:
        out_dir: Directory to write into; created if missing. A ``train/`` folder left by an earlier run of
            this function (recognised by its ``generator_config.json``) is replaced.
        num_images: Number of training images, at least 1.
        resolution: Side of the square images in pixels, at least 16 (32 and 64 are the intended sizes).
        seed: Non-negative seed for the combination order, the held-out set and the jitter.
        num_heldout: Number of distinct combinations written to ``heldout_prompts.jsonl`` (0 to 90).
        exclude_heldout_from_train: If True, the held-out combinations never appear in ``train/``, which makes
            them a test of compositional generalisation.
        caption_noise: Fraction in [0, 1) of training captions that misname one attribute (chosen uniformly,
            never producing a held-out combination when those are excluded). Image ``i``'s caption is noisy when
            a uniform draw from a generator seeded with ``(seed, 4, i)`` falls below it (and some one-attribute
            change of it is not held out), so the images and the clean captions do not depend on this setting.
            The row's ``caption_is_correct`` says which captions are wrong.
        colors: Draw only shapes of these colours (all of ``COLORS`` when None); held-out prompts come from the
            same palette. Misnamed captions may still name any colour.
        conditioning: ``"edges"`` also writes, for a ControlNet, the outline of every training image's shape
            (:func:`outline` of :func:`render_with_mask`'s mask: the edge of exactly the pixels drawn, so a
            misnamed caption never changes it), white on black, to ``train/conditioning/<file_name>``, named by the
            row's ``conditioning_image_file_name``. Each held-out prompt gets a fresh draw of its combination (new
            size and place, from a generator seeded with ``(seed, 5, j)``, a stream no training image uses): its
            outline at ``heldout/conditioning/<j>.png`` and its filled mask (white on black, mode L) at
            ``heldout/mask/<j>.png``, named by the row's ``conditioning_image`` and ``mask`` keys, relative to
            ``out_dir``. One outline per prompt: an evaluation reuses it for every seed. The draw is never a
            training file, but the jittered geometry has only a few hundred (32 px) to a few thousand (64 px)
            outcomes per shape and position, so it may match, pixel for pixel, some training outline of the same
            shape and position (drawn in another colour). ``"none"`` (default) writes none of these, and every
            other file is the same either way.

    Returns:
        A summary: ``out_dir``, ``train_dir``, ``metadata_path``, ``heldout_path``, ``config_path``,
        ``num_images``, ``resolution``, ``num_train_combinations``, ``num_heldout``, ``num_noisy_captions`` and
        ``conditioning``.

    Raises:
        ValueError: On an argument out of range, or if ``out_dir/train`` or ``out_dir/heldout`` holds files that
            this function did not write (delete them or choose another ``out_dir``).
    """
    config = _config(
        num_images,
        resolution,
        seed,
        num_heldout,
        exclude_heldout_from_train,
        caption_noise,
        colors,
        conditioning,
    )
    _check_dataset_args(config)
    out_dir = Path(out_dir)
    train_dir = out_dir / "train"
    heldout_dir = out_dir / "heldout"
    config_path = out_dir / "generator_config.json"
    for folder in (train_dir, heldout_dir):
        if folder.exists() and any(folder.iterdir()):
            if not config_path.is_file():
                raise ValueError(
                    f"{folder} already holds files and there is no {config_path.name} to show this generator "
                    "wrote them; delete the folder or choose another out_dir."
                )
            # Ours, but possibly with more images than this run writes: stale PNGs would join the imagefolder.
            shutil.rmtree(folder)
    # Removed before writing anything, so an interrupted run is never taken for a finished one.
    config_path.unlink(missing_ok=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    if conditioning == "edges":
        (train_dir / "conditioning").mkdir()

    combos = palette_combinations(colors)
    # Separate streams for the held-out set, the training order and each image, so that changing
    # num_images neither changes the held-out set nor re-renders the images the runs share.
    heldout_order = np.random.default_rng((seed, 1)).permutation(len(combos))
    heldout = [combos[i] for i in heldout_order[:num_heldout]]
    heldout_set = set(heldout)
    train_combos = [c for c in combos if not (exclude_heldout_from_train and c in heldout_set)]
    forbidden = heldout_set if exclude_heldout_from_train else set()

    order_rng = np.random.default_rng((seed, 2))
    rows = []
    num_cycles = -(-num_images // len(train_combos))
    sequence = [train_combos[j] for _ in range(num_cycles) for j in order_rng.permutation(len(train_combos))]
    for i in tqdm(range(num_images), desc="Rendering shapes", disable=num_images < 1000):
        shape, color, position = sequence[i]
        file_name = f"{i:06d}.png"
        image, mask = render_with_mask(
            shape, color, position, resolution, np.random.default_rng((seed, 3, i))
        )
        image.save(train_dir / file_name)
        files = {"file_name": file_name}
        if conditioning == "edges":
            # Drawn from the pixels of the true shape; caption noise below renames, it never redraws.
            files["conditioning_image_file_name"] = f"conditioning/{file_name}"
            white_on_black(outline(mask)).save(train_dir / files["conditioning_image_file_name"])
        noise_rng = np.random.default_rng((seed, 4, i))
        named = (shape, color, position)
        if noise_rng.random() < caption_noise:
            named = misnamed_combination(named, noise_rng, forbidden)
        rows.append(
            {
                **files,
                "text": caption(*named),
                "shape": shape,
                "color": color,
                "position": position,
                "caption_is_correct": named == (shape, color, position),
            }
        )
    metadata_path = train_dir / "metadata.jsonl"
    _write_jsonl(metadata_path, rows)

    heldout_rows = [{"prompt": caption(*c), "shape": c[0], "color": c[1], "position": c[2]} for c in heldout]
    if conditioning == "edges":
        for row, files in zip(
            heldout_rows, _write_heldout_conditioning(out_dir, heldout, resolution, seed), strict=True
        ):
            row.update(files)
    heldout_path = out_dir / "heldout_prompts.jsonl"
    _write_jsonl(heldout_path, heldout_rows)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "out_dir": str(out_dir),
        "train_dir": str(train_dir),
        "metadata_path": str(metadata_path),
        "heldout_path": str(heldout_path),
        "config_path": str(config_path),
        "num_images": num_images,
        "resolution": resolution,
        "num_train_combinations": len(train_combos),
        "num_heldout": num_heldout,
        "num_noisy_captions": sum(not row["caption_is_correct"] for row in rows),
        "conditioning": conditioning,
    }


def _write_heldout_conditioning(
    out_dir: Path, heldout: list[tuple[str, str, str]], resolution: int, seed: int
) -> list[dict[str, str]]:
    """A fresh outline and filled mask per held-out combination; their paths relative to out_dir, in order."""
    for folder in ("conditioning", "mask"):
        (out_dir / "heldout" / folder).mkdir(parents=True)
    paths = []
    for j, combo in enumerate(heldout):
        # Stream (seed, 5, j): a new size and place, from a generator no training image is drawn from.
        _, mask = render_with_mask(*combo, resolution, np.random.default_rng((seed, 5, j)))
        files = {
            "conditioning_image": f"heldout/conditioning/{j:03d}.png",
            "mask": f"heldout/mask/{j:03d}.png",
        }
        white_on_black(outline(mask)).save(out_dir / files["conditioning_image"])
        white_on_black(mask, "L").save(out_dir / files["mask"])
        paths.append(files)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Generate the dataset from the command line, or reuse it if ``out_dir`` already has these settings."""
    parser = argparse.ArgumentParser(description="Generate the captioned shapes dataset (an imagefolder).")
    parser.add_argument("--out_dir", required=True, help="directory for train/, heldout_prompts.jsonl, ...")
    parser.add_argument("--num_images", type=int, required=True, help="number of training images")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (>= 16)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed")
    parser.add_argument("--num_heldout", type=int, default=30, help="number of held-out combinations")
    parser.add_argument(
        "--exclude_heldout_from_train",
        action="store_true",
        help="keep the held-out combinations out of train/ (compositional generalisation test)",
    )
    parser.add_argument(
        "--caption_noise",
        type=float,
        default=0.0,
        help="fraction of training captions that misname one attribute, as noisy web captions do (default 0)",
    )
    parser.add_argument(
        "--colors",
        nargs="+",
        default=None,
        help=f"draw only these colours (default all: {' '.join(COLORS)}), e.g. to hold a colour out of training",
    )
    parser.add_argument(
        "--conditioning",
        choices=CONDITIONINGS,
        default="none",
        help="'edges': also write each shape's outline for a ControlNet (train/conditioning/), and a fresh outline "
        "and filled mask per held-out prompt (heldout/); default none",
    )
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    settings["colors"] = None if args.colors is None else tuple(args.colors)
    if dataset_is_current(args.out_dir, **settings):
        print(f"Reusing the dataset in {args.out_dir}: it was generated with the same settings.")
        return
    summary = generate_dataset(args.out_dir, **settings)
    print(
        f"Wrote {summary['num_images']} images of {summary['resolution']} px "
        f"({summary['num_train_combinations']} combinations) to {summary['train_dir']} "
        f"and {summary['num_heldout']} held-out prompts to {summary['heldout_path']}"
        + (f"; {summary['num_noisy_captions']} captions misname an attribute." if args.caption_noise else ".")
        + (" Outlines in train/conditioning/ and heldout/." if args.conditioning == "edges" else "")
    )


if __name__ == "__main__":
    main()
