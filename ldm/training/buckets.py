"""Aspect-ratio bucketing: the bucket list, which bucket an image goes to, its crop, and the batch sampler.

Instead of one square crop, each image is trained at the bucket (a ``width x height`` of about
``resolution**2`` pixels) nearest its aspect ratio: it is resized to just cover the bucket and cropped
minimally. Every batch comes from one bucket, so its images share one shape and stack without padding.

Everything here is a pure function of its arguments: the crop offsets come from the same uniforms as the
square crop (:class:`ldm.training.transforms.SampleDraws`), and :class:`BucketBatchSampler` shuffles from
``numpy.random.default_rng`` keyed by ``(seed, epoch, ...)``, so worker count and resuming mid-epoch cannot
change what is trained on.

Sizes are ``(width, height)`` in pixels throughout, as PIL writes them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import numpy as np
import torch

Size = tuple[int, int]  # (width, height)

# How far a bucket's area may exceed resolution**2: a bucket's compute and activation memory grow with its
# area, so this bounds a step's peak cost at 1/16 above the square's. Without it, a width whose two nearest
# heights straddle the target would have to take the lower one even when the upper one is much closer.
AREA_TOLERANCE = Fraction(1, 16)

SmallImagePolicy = Literal["upscale", "skip"]
SMALL_IMAGE_POLICIES: tuple[str, ...] = get_args(SmallImagePolicy)

# Stream tags of the sampler's generators. The per-sample transform draws from default_rng([seed, epoch,
# index]) and caption dropout from [seed, epoch, index, 1] (transforms.py); SeedSequence zero-pads its entropy,
# so a 3-entry key [seed, epoch, k] would replay sample k's stream. A fourth entry >= 2 keeps them apart.
_BUCKET_SHUFFLE_STREAM = 2
_BATCH_ORDER_STREAM = 3


def default_bucket_step(vae_scale_factor: int) -> int:
    """The default ``--bucket_step``: ``vae_scale_factor * 8`` pixels, so every latent side is a multiple of 8.

    A multiple of 8 latent pixels passes through the UNet's down-samplings (up to three halvings) and back to the
    same shape.

    Raises:
        ValueError: ``vae_scale_factor`` is not a positive integer.
    """
    _check_positive_int("vae_scale_factor", vae_scale_factor)
    return vae_scale_factor * 8


def bucket_spec(
    resolution: int,
    vae_scale_factor: int,
    unet_levels: int = 1,
    min_side: int | None = None,
    max_side: int | None = None,
    step: int | None = None,
) -> BucketSpec:
    """The run's :class:`BucketSpec` from its flags, with the defaults filled in and the step checked.

    Args:
        resolution: ``--resolution``.
        vae_scale_factor: pixels per latent along a side (8 for Stable Diffusion's VAE).
        unet_levels: the UNet's number of resolution levels (len(block_out_channels)): a latent side must halve
            ``unet_levels - 1`` times and come back to the same size.
        min_side: ``--bucket_min_side``; None: ``resolution / 2`` rounded down to the step (at least one step).
        max_side: ``--bucket_max_side``; None: ``resolution * 2`` rounded down to the step.
        step: ``--bucket_step``; None: :func:`default_bucket_step`.

    Raises:
        ValueError: the step does not divide into whole latents the UNet can halve, or the spec is invalid.
    """
    step = default_bucket_step(vae_scale_factor) if step is None else step
    multiple = vae_scale_factor * 2 ** (unet_levels - 1)
    if step % multiple:
        raise ValueError(
            f"--bucket_step ({step}) must be a multiple of {multiple} pixels (the VAE's factor {vae_scale_factor} "
            f"x 2**{unet_levels - 1} for the UNet's down-samplings); use {max(multiple, step // multiple * multiple)}"
            f" or leave it unset for {default_bucket_step(vae_scale_factor)}."
        )
    min_side = max(step, resolution // 2 // step * step) if min_side is None else min_side
    max_side = max(step, resolution * 2 // step * step) if max_side is None else max_side
    return BucketSpec(resolution, min_side, max_side, step)


# ----------------------------------------------------------------------------------------------------
# The bucket list
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSpec:
    """The bucket shapes a run trains at (``--resolution``, ``--bucket_min_side``, ``--bucket_max_side``,
    ``--bucket_step``).

    Args:
        resolution: the side of the square of the target area ``resolution**2``.
        min_side: the shortest bucket side, a multiple of ``step``, at most ``resolution``.
        max_side: the longest bucket side, a multiple of ``step``, at least ``resolution``.
        step: every bucket side is a multiple of it (see :func:`default_bucket_step`).

    Raises:
        ValueError: a value is not a positive integer, a side is not a multiple of ``step``, or
            ``resolution`` lies outside ``[min_side, max_side]``.
    """

    resolution: int
    min_side: int
    max_side: int
    step: int

    def __post_init__(self):
        for name in ("resolution", "min_side", "max_side", "step"):
            _check_positive_int(f"bucket {name}", getattr(self, name))
        for flag, side in (("--bucket_min_side", self.min_side), ("--bucket_max_side", self.max_side)):
            if side % self.step:
                lower, upper = side // self.step * self.step, (side // self.step + 1) * self.step
                raise ValueError(
                    f"{flag} ({side}) must be a multiple of --bucket_step ({self.step}); "
                    f"use {lower or upper} or {upper}, or a step that divides it."
                )
        if not self.min_side <= self.resolution <= self.max_side:
            raise ValueError(
                f"--resolution ({self.resolution}) must lie within [--bucket_min_side, --bucket_max_side] = "
                f"[{self.min_side}, {self.max_side}], or no bucket can hold the square; widen the bounds."
            )

    def buckets(self) -> list[Size]:
        """The bucket shapes, from the tallest (smallest width/height) to the widest.

        The rule: every side is a multiple of ``step`` in ``[min_side, max_side]``. For each width, the bucket
        takes the height whose area ``width * height`` is nearest ``resolution**2`` among those whose area
        exceeds it by at most ``AREA_TOLERANCE`` (1/16); an exact tie goes to the smaller area. A width with no
        such height has no bucket. Each chosen shape is also added transposed, so the list is symmetric
        under swapping width and height. The square ``(resolution, resolution)`` is included whenever
        ``resolution`` is a multiple of ``step`` (its area is exact). Areas lie within one ``step`` row of the
        target: ``resolution**2 - step * max(w, h) < w * h <= resolution**2 * 17/16``, except where
        ``max_side`` clamps an elongated bucket (when ``min_side * max_side < resolution**2``).
        """
        target = self.resolution**2
        sides = range(self.min_side, self.max_side + 1, self.step)
        chosen: set[Size] = set()
        for width in sides:
            heights = [h for h in sides if width * h <= target * (1 + AREA_TOLERANCE)]
            if heights:
                height = min(heights, key=lambda h: (abs(width * h - target), h))
                chosen.update({(width, height), (height, width)})
        return sorted(chosen, key=lambda b: (Fraction(*b), b[0]))


# ----------------------------------------------------------------------------------------------------
# One image: its bucket, resize and crop
# ----------------------------------------------------------------------------------------------------


def nearest_bucket(image_size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket nearest the image in log aspect ratio: the one that loses the least area to cropping.

    Distances are compared exactly (as integer ratios). Ties go to the squarer bucket, then to the narrower
    one, so the choice never depends on the order of ``buckets``.

    Args:
        image_size: the image's (width, height).
        buckets: the candidate (width, height) shapes, e.g. ``BucketSpec.buckets()``.

    Returns:
        The chosen (width, height).

    Raises:
        ValueError: ``buckets`` is empty, or a size is not two positive integers.
    """
    image_size = _check_size(image_size, "image size")
    if not buckets:
        raise ValueError("No buckets to choose from; build them with BucketSpec(...).buckets().")
    return min(buckets, key=lambda b: (_aspect_distance(image_size, b), _aspect_distance(b, (1, 1)), b[0]))


def cover_size(image_size: Size, bucket: Size) -> Size:
    """The (width, height) to resize the image to: the smallest scale at which it covers the bucket.

    The aspect ratio is kept (each side rounded to the nearest pixel) and both sides are at least the
    bucket's, one of them equal to it. For a square bucket this is exactly
    :func:`ldm.training.transforms.resized_size` (the same float arithmetic).
    """
    (width, height), (bucket_w, bucket_h) = (
        _check_size(image_size, "image size"),
        _check_size(bucket, "bucket"),
    )
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def crop_box(
    resized_size: Size, bucket: Size, top_u: float, left_u: float, center: bool
) -> tuple[int, int, int, int]:
    """The bucket-sized window to cut from the resized image, as PIL's ``(left, top, right, bottom)``.

    The offsets follow :meth:`ldm.training.transforms.SampleDraws.crop_offsets`: ``slack // 2`` when
    ``center``, else ``int(u * (slack + 1))`` (``u = 1`` is clamped to the far edge), where ``slack`` is how many
    pixels the resized image exceeds the bucket by along that axis.

    Args:
        resized_size: the image's (width, height) after :func:`cover_size`.
        bucket: the bucket's (width, height).
        top_u: uniform in [0, 1] placing the window vertically (``SampleDraws.crop_top_u``).
        left_u: uniform in [0, 1] placing the window horizontally (``SampleDraws.crop_left_u``).
        center: cut the centre instead.

    Raises:
        ValueError: the resized image does not cover the bucket, or a ``u`` lies outside [0, 1].
    """
    (width, height), (bucket_w, bucket_h) = (
        _check_size(resized_size, "resized size"),
        _check_size(bucket, "bucket"),
    )
    if width < bucket_w or height < bucket_h:
        raise ValueError(
            f"A {width}x{height} image cannot hold a {bucket_w}x{bucket_h} crop; resize it with cover_size first."
        )
    slack_x, slack_y = width - bucket_w, height - bucket_h
    if center:
        top, left = slack_y // 2, slack_x // 2
    else:
        top, left = _offset(top_u, slack_y, "top_u"), _offset(left_u, slack_x, "left_u")
    return left, top, left + bucket_w, top + bucket_h


def cropped_fraction(image_size: Size, bucket: Size) -> float:
    """The fraction of the image's area that the crop to ``bucket`` cuts away (after :func:`cover_size`)."""
    resized_w, resized_h = cover_size(image_size, bucket)
    return 1.0 - bucket[0] * bucket[1] / (resized_w * resized_h)


def is_too_small(image_size: Size, buckets: Sequence[Size]) -> bool:
    """Whether the image must be upscaled to cover its nearest bucket (a side shorter than the bucket's)."""
    bucket_w, bucket_h = nearest_bucket(image_size, buckets)
    return image_size[0] < bucket_w or image_size[1] < bucket_h


def _offset(u: float, slack: int, name: str) -> int:
    """``int(u * (slack + 1))`` clamped to ``slack``: where a random window starts along one axis."""
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"{name} must be a uniform draw in [0, 1]; got {u!r}.")
    return min(int(u * (slack + 1)), slack)


def _aspect_distance(a: Size, b: Size) -> Fraction:
    """exp(|log(a_w / a_h) - log(b_w / b_h)|) as an exact fraction >= 1: monotone in the log-aspect distance."""
    x, y = a[0] * b[1], a[1] * b[0]
    return Fraction(max(x, y), min(x, y))


def _check_size(size, what: str) -> Size:
    """``size`` as a (width, height) tuple of positive ints, or a ValueError naming it."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"The {what} must be (width, height), two positive integers; got {size!r}.")
    return int(size[0]), int(size[1])


def _check_positive_int(name: str, value) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive int (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


# ----------------------------------------------------------------------------------------------------
# The dataset: every image's bucket
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketAssignment:
    """Every dataset index's bucket, and how many images were small, skipped or unreadable.

    Attributes:
        buckets: the run's bucket list (``BucketSpec.buckets()``).
        bucket_of: per dataset index, its (width, height) bucket, or None when it is not trained on
            (skipped as too small, or its size could not be read).
        num_upscaled: images kept although they must be upscaled to cover their bucket.
        num_skipped: images left out because they are too small (policy ``"skip"``).
        num_unreadable: images whose size was given as None.
    """

    buckets: tuple[Size, ...]
    bucket_of: tuple[Size | None, ...]
    num_upscaled: int
    num_skipped: int
    num_unreadable: int

    def histogram(self) -> dict[Size, int]:
        """Bucket -> number of images in it, for the non-empty buckets, from the tallest to the widest."""
        counts = dict.fromkeys(self.buckets, 0)
        for bucket in self.bucket_of:
            if bucket is not None:
                counts[bucket] += 1
        return {bucket: n for bucket, n in counts.items() if n}

    def format_histogram(self) -> str:
        """One line per non-empty bucket (shape, aspect ratio, images, share), then one line of totals: for the log."""
        histogram = self.histogram()
        total = sum(histogram.values())
        lines = [
            f"bucket {w:>5}x{h:<5} aspect {w / h:5.2f}: {n:>7} images ({100 * n / total:5.1f}%)"
            for (w, h), n in histogram.items()
        ]
        lines.append(
            f"{total} images in {len(histogram)} of {len(self.buckets)} buckets; smaller than their bucket: "
            f"{self.num_upscaled} upscaled, {self.num_skipped} skipped; {self.num_unreadable} unreadable."
        )
        return "\n".join(lines)


def assign_buckets(
    image_sizes: Sequence[Size | None], spec: BucketSpec, small_images: SmallImagePolicy = "upscale"
) -> BucketAssignment:
    """Put every image into the bucket nearest its aspect ratio (:func:`nearest_bucket`).

    Args:
        image_sizes: per dataset index, the image's (width, height), or None if it cannot be read.
        spec: the bucket shapes.
        small_images: what to do with an image that :func:`is_too_small` for its bucket: ``"upscale"`` it
            (train on it, counted in ``num_upscaled``) or ``"skip"`` it (bucket None, counted in ``num_skipped``).

    Returns:
        The :class:`BucketAssignment`.

    Raises:
        ValueError: ``small_images`` is not one of ``SMALL_IMAGE_POLICIES``, or a size is not two positive ints.
    """
    if small_images not in SMALL_IMAGE_POLICIES:
        raise ValueError(
            f"--bucket_small_images must be one of {SMALL_IMAGE_POLICIES}; got {small_images!r}."
        )
    buckets = spec.buckets()
    bucket_of: list[Size | None] = []
    upscaled = skipped = unreadable = 0
    for index, size in enumerate(image_sizes):
        if size is None:
            unreadable += 1
            bucket_of.append(None)
            continue
        bucket = nearest_bucket(_check_size(size, f"size of image {index}"), buckets)
        small = is_too_small(size, [bucket])
        if small and small_images == "skip":
            skipped += 1
            bucket_of.append(None)
            continue
        upscaled += small
        bucket_of.append(bucket)
    return BucketAssignment(tuple(buckets), tuple(bucket_of), upscaled, skipped, unreadable)


# ----------------------------------------------------------------------------------------------------
# The batch sampler
# ----------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket; every process steps the same bucket at each step.

    Each epoch (a pure function of ``(seed, epoch)``):

    1. each bucket's indices are shuffled by ``default_rng([seed, epoch, ordinal, 2])``, ``ordinal`` being the
       bucket's position among the sorted keys present;
    2. each bucket is cut into *global* batches of ``batch_size * num_processes`` indices. The last, partial one
       is filled by wrapping around to the start of that bucket's shuffled list, so no image is dropped and every
       process gets a full batch: those fill-ins (fewer than one global batch per bucket, and possibly several
       laps when a bucket holds fewer images than a global batch) are the only indices seen twice in an epoch.
       With ``drop_last`` the partial global batch is dropped instead (its images wait for another epoch's
       shuffle);
    3. the global batches of all buckets are put in the order of ``default_rng([seed, epoch, 0, 3])``;
    4. process ``p`` takes the slice ``[p * batch_size, (p + 1) * batch_size)`` of each global batch.

    So at every step all processes hold disjoint slices of one global batch, of one bucket shape. The sampler runs
    in the main process of each DataLoader, so dataloader workers cannot change the order. Pass it as a
    DataLoader's ``batch_sampler`` and do not hand that DataLoader to ``accelerator.prepare``, which would shard
    the batches a second time.

    Args:
        bucket_of: per dataset index, its bucket key (e.g. the (width, height) of
            ``BucketAssignment.bucket_of``; keys must sort) or None to leave the index out.
        batch_size: per-process batch size.
        seed: the run's data seed (>= 0).
        num_processes: the world size.
        process_index: this process's rank.
        drop_last: drop each bucket's partial global batch instead of filling it by wrap-around.
        skip_batches: see :meth:`set_skip`.

    Raises:
        ValueError: a bad argument, or no bucket yields a single global batch.
    """

    def __init__(
        self,
        bucket_of: Sequence[Hashable | None],
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        drop_last: bool = False,
        skip_batches: int = 0,
    ):
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_processes", num_processes)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"The data seed must be a non-negative integer; got {seed!r}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must lie in [0, {num_processes}); got {process_index!r}.")
        keys = sorted({key for key in bucket_of if key is not None})
        ordinal = {key: i for i, key in enumerate(keys)}
        self.members: list[list[int]] = [[] for _ in keys]  # dataset indices per bucket, ascending
        for index, key in enumerate(bucket_of):
            if key is not None:
                self.members[ordinal[key]].append(index)
        self.keys = keys
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_processes, self.process_index = num_processes, process_index
        self.global_batch_size = batch_size * num_processes
        self.epoch, self.skip_batches = 0, 0
        if not keys:
            raise ValueError("No dataset index has a bucket (every image was skipped or unreadable).")
        if len(self) == 0:
            raise ValueError(
                f"No bucket holds a global batch of {self.global_batch_size} images (batch size {batch_size} x "
                f"{num_processes} processes; bucket sizes {[len(m) for m in self.members]}); "
                "lower the batch size or turn off drop_last."
            )
        self.set_skip(skip_batches)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows."""
        self.epoch = epoch

    def set_skip(self, batches: int) -> None:
        """Start every following iteration after its first ``batches`` batches (those this process already trained
        on; 0 = from the start). It stays set until changed, like ``StreamingTrainDataset.set_resume_position``.

        Raises:
            ValueError: ``batches`` is not in ``[0, len(self)]``.
        """
        if isinstance(batches, bool) or not isinstance(batches, int) or not 0 <= batches <= len(self):
            raise ValueError(f"skip_batches must be an integer in [0, {len(self)}]; got {batches!r}.")
        self.skip_batches = batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of ``epoch`` in training order (all processes' indices; no skip applied)."""
        batches = []
        for ordinal, members in enumerate(self.members):
            rng = np.random.default_rng([self.seed, epoch, ordinal, _BUCKET_SHUFFLE_STREAM])
            shuffled = rng.permutation(members)
            count = self._num_global_batches(len(members))
            # np.resize repeats the array cyclically: the wrap-around fill of the last global batch.
            filled = np.resize(shuffled, count * self.global_batch_size).reshape(
                count, self.global_batch_size
            )
            batches.extend(filled.tolist())
        order = np.random.default_rng([self.seed, epoch, 0, _BATCH_ORDER_STREAM]).permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        """This process's batches of the current epoch, after the first ``skip_batches``."""
        start = self.process_index * self.batch_size
        for batch in self.global_batches(self.epoch)[self.skip_batches :]:
            yield batch[start : start + self.batch_size]

    def __len__(self) -> int:
        """Batches per process in a whole epoch (the same on every process; ``skip_batches`` does not change it)."""
        return sum(self._num_global_batches(len(members)) for members in self.members)

    def _num_global_batches(self, size: int) -> int:
        """How many global batches a bucket of ``size`` indices yields."""
        return size // self.global_batch_size if self.drop_last else math.ceil(size / self.global_batch_size)
