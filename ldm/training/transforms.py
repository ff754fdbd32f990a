"""The per-sample transform and every random draw of training, each a pure function of its key.

Every random choice made for a sample (crop offset, horizontal flip, which caption of several, caption
dropout) is a pure function of ``(seed, epoch, index)``, drawn from its own
``numpy.random.default_rng([seed, epoch, index, ...])``; each training step's draws (VAE sample, noise,
timesteps) come from `ldm.seeding.keyed_generator(seed, micro_step, rank)`. Nothing reads the global RNGs, so the number
of dataloader workers, the process count and resuming from a checkpoint cannot change what a sample
looks like: a resumed run sees exactly the data an uninterrupted run would.
"""

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.images import convert_mode
from ldm.training.buckets import cover_size, crop_box
from ldm.training.config import TrainConfig

# Bicubic, as in the original latent-diffusion data pipeline: sharper than bilinear when downscaling.
RESAMPLE = Image.Resampling.BICUBIC

# What PIL raises for a zero-byte, truncated or garbled file (SyntaxError: "broken PNG file";
# ValueError: a record with neither bytes nor path).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# The stream tag of caption dropout. default_rng([s, e, i]) and default_rng([s, e, i, 0]) are the
# same stream (SeedSequence zero-pads its entropy), so the tag must not be 0.
_DROPOUT_STREAM = 1


def open_image(value: dict | Image.Image | str | os.PathLike) -> Image.Image:
    """Decode an image fully into RGB.

    EXIF orientation is applied, as ``datasets.Image`` decoding does, so a photo stored sideways is
    trained upright.

    Args:
        value: what ``datasets.Image(decode=False)`` holds (``{"bytes": ..., "path": ...}``, bytes
            preferred), a PIL image, or a file path.

    Returns:
        A loaded RGB ``PIL.Image``.

    Raises:
        OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError: the file cannot be decoded
            (PIL's ``UnidentifiedImageError`` and "image file is truncated" are ``OSError``s).
        ValueError: a record with neither bytes nor path.
        TypeError: ``value`` is none of the accepted kinds.
    """
    if isinstance(value, Image.Image):
        return _upright_rgb(value)
    with Image.open(_file(value)) as image:
        return _upright_rgb(image)


def _file(value: dict | str | os.PathLike) -> io.BytesIO | str | os.PathLike:
    """What `Image.open` reads for a `datasets.Image(decode=False)` record (bytes preferred) or a path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("path") is not None:
            return value["path"]
        raise ValueError("Image record has neither bytes nor path.")
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"Cannot open an image from a {type(value).__name__}.")
    return value


def upright_size(value: dict | Image.Image | str | os.PathLike) -> tuple[int, int]:
    """The (width, height) :func:`open_image` would return, read from the header alone (no pixels decoded).

    EXIF orientations 5-8 turn the image by 90 degrees, so its stored width and height swap.

    Raises:
        The errors of :func:`open_image` for a file whose header cannot be read.
    """
    if isinstance(value, Image.Image):
        return _upright_rgb(value).size
    with Image.open(_file(value)) as image:
        width, height = image.size
        turned = image.getexif().get(Image.ExifTags.Base.Orientation) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation if any, then convert (and so fully decode) to RGB."""
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return convert_mode(image, "RGB")


def resized_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling so that the shorter side equals ``resolution``."""
    width, height = image_size
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's transform randomness: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class SampleDraws:
    """The random choices of one sample: flip, which caption, and two uniforms that place a random crop."""

    flip: bool
    caption_index: int
    crop_top_u: float
    crop_left_u: float

    def crop_offsets(
        self, image_size: tuple[int, int], resolution: int, center_crop: bool
    ) -> tuple[int, int]:
        """(top, left) of the training window in the image resized by :func:`resized_size`."""
        width, height = resized_size(image_size, resolution)
        slack_y, slack_x = height - resolution, width - resolution
        if center_crop:
            return slack_y // 2, slack_x // 2
        return int(self.crop_top_u * (slack_y + 1)), int(self.crop_left_u * (slack_x + 1))


def draw_sample(seed: int, epoch: int, index: int, num_captions: int, random_flip: bool) -> SampleDraws:
    """Every random choice for one sample, drawn from ``sample_rng(seed, epoch, index)``.

    Four uniforms are always drawn in a fixed order (flip, caption, crop top, crop left), so the flip and the
    caption depend neither on the image nor on the resolution: the live transform and the cached batch encoder
    make the same choices from ``(seed, epoch, index)`` alone.

    Raises:
        ValueError: if ``num_captions`` < 1.
    """
    if num_captions < 1:
        raise ValueError(f"Sample {index} has no caption.")
    flip_u, caption_u, top_u, left_u = sample_rng(seed, epoch, index).random(4)
    return SampleDraws(
        flip=bool(random_flip and flip_u < 0.5),
        caption_index=min(int(caption_u * num_captions), num_captions - 1),
        crop_top_u=float(top_u),
        crop_left_u=float(left_u),
    )


def draw_sample_randomness(
    seed: int,
    epoch: int,
    index: int,
    num_captions: int,
    resolution: int,
    image_size: tuple[int, int],
    *,
    center_crop: bool,
    random_flip: bool,
) -> dict[str, Any]:
    """Every random choice of the transform for one sample, without touching the image.

    Args:
        seed: the run's data seed (>= 0).
        epoch: the epoch the sample is drawn in.
        index: the sample's row index in the dataset (or its stream counter).
        num_captions: how many captions the sample has (1 for a plain string).
        resolution: side of the square training crop.
        image_size: (width, height) of the original, unresized image.
        center_crop: crop the centre instead of a random window.
        random_flip: allow the horizontal flip (otherwise ``flip`` is always False).

    Returns:
        ``{"flip": bool, "crop_top": int, "crop_left": int, "caption_index": int}``; crop offsets are in
        the image resized by :func:`resized_size`.

    Raises:
        ValueError: if ``num_captions`` < 1.
    """
    draws = draw_sample(seed, epoch, index, num_captions, random_flip)
    crop_top, crop_left = draws.crop_offsets(image_size, resolution, center_crop)
    return {
        "flip": draws.flip,
        "crop_top": crop_top,
        "crop_left": crop_left,
        "caption_index": draws.caption_index,
    }


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageCaptionTransform:
    """Resize, crop, flip and normalise an image, and pick one caption; deterministic per sample.

    The shorter side is resized to ``resolution`` (bicubic, see ``RESAMPLE``), then a
    ``resolution`` x ``resolution`` window is cut (centre or random), then optionally flipped
    horizontally. The choices come from :func:`draw_sample_randomness`.

    Args:
        resolution: side of the square output.
        center_crop: crop the centre instead of a random window.
        random_flip: flip horizontally with probability 1/2.
        seed: the run's data seed (>= 0).
    """

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    @classmethod
    def from_config(cls, config: TrainConfig, seed: int) -> "ImageCaptionTransform":
        """The transform a run's config asks for."""
        return cls(config.resolution, config.center_crop, config.random_flip, seed)

    def __call__(
        self,
        image: Image.Image,
        caption: str | list[str],
        epoch: int,
        index: int,
        bucket: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, str]:
        """Transform one sample.

        Args:
            image: the decoded RGB image.
            caption: one caption, or several of which one is chosen.
            epoch: the current epoch.
            index: the sample's index.
            bucket: the (width, height) of the sample's aspect-ratio bucket (`ldm.training.buckets`); None for the
                square ``resolution`` crop.

        Returns:
            ``(pixel_values, caption)``: a float tensor (3, H, W) in [-1, 1] (the bucket's shape, or the square)
            and a str.

        Raises:
            ValueError: the caption is neither a string nor a non-empty list of strings.
        """
        captions = caption_list(caption, index)
        draws = draw_sample(self.seed, epoch, index, len(captions), self.random_flip)
        return self.window(image, draws, bucket), captions[draws.caption_index]

    def window(self, image: Image.Image, draws: SampleDraws, bucket: tuple[int, int] | None) -> torch.Tensor:
        """The sample's training window of `image` (its bucket's or the square), flipped as drawn: (3, h, w)."""
        if bucket is not None:
            return self.bucket_crop(
                image, bucket, draws.crop_top_u, draws.crop_left_u, draws.flip, self.center_crop
            )
        top, left = draws.crop_offsets(image.size, self.resolution, self.center_crop)
        return self.crop(image, top, left, draws.flip)

    def conditioning_pixels(
        self, image: Image.Image, epoch: int, index: int, bucket: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """A conditioning image (a ControlNet's control, the size of its target) cut and flipped exactly as the
        sample's image is: (3, h, w) in [0, 1], the range diffusers' ControlNets take their control in.

        The flip and the crop uniforms do not depend on the number of captions (see `draw_sample`), so they are
        the target's whatever caption is chosen.
        """
        draws = draw_sample(self.seed, epoch, index, 1, self.random_flip)
        return (self.window(image, draws, bucket) + 1) / 2

    @staticmethod
    def bucket_crop(
        image: Image.Image, bucket: tuple[int, int], top_u: float, left_u: float, flip: bool, center: bool
    ) -> torch.Tensor:
        """Resize to just cover ``bucket``, cut it (centre, or placed by the uniforms), flip if asked: (3, h, w)."""
        size = cover_size(image.size, bucket)
        if image.size != size:
            image = image.resize(size, resample=RESAMPLE)
        image = image.crop(crop_box(size, bucket, top_u, left_u, center))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image)

    def crop(self, image: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        """Resize the shorter side to ``resolution``, cut the window at (top, left), flip if asked: (3, R, R)."""
        size = resized_size(image.size, self.resolution)
        if image.size != size:
            image = image.resize(size, resample=RESAMPLE)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image)

    def center_crop_pixels(self, image: Image.Image, bucket: tuple[int, int] | None = None) -> torch.Tensor:
        """The centre window (of the square, or of ``bucket``), unflipped: what the latent cache encodes (it flips
        the tensor for the twin)."""
        if bucket is not None:
            return self.bucket_crop(image, bucket, 0.0, 0.0, flip=False, center=True)
        width, height = resized_size(image.size, self.resolution)
        return self.crop(image, (height - self.resolution) // 2, (width - self.resolution) // 2, flip=False)


def caption_list(caption: Any, index: int) -> list[str]:
    """A caption as a list of candidates; anything but str or a non-empty list of str is an error."""
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(
            f"Sample {index}: a caption must be a string or a non-empty list of strings; got {caption!r}."
        )
    return captions


def caption_dropout_mask(seed: int, epoch: int, indices: torch.Tensor | list[int], p: float) -> torch.Tensor:
    """Which captions to replace by the empty prompt ``""`` (for classifier-free guidance).

    Each sample's coin comes from ``default_rng([seed, epoch, index, 1])``: a stream separate from the
    transform's, and drawn afresh every epoch.

    Args:
        seed: the run's data seed (>= 0).
        epoch: the current epoch.
        indices: the batch's sample indices, shape (B,).
        p: the dropout probability.

    Returns:
        A bool tensor (B,), True where the caption is dropped.
    """
    indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    coins = [np.random.default_rng([seed, epoch, int(i), _DROPOUT_STREAM]).random() for i in indices]
    return torch.tensor(coins, dtype=torch.float64).lt(p)  # (B,)


def random_windows(generator: torch.Generator, side: int, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One random square window per sample, cut at the same place from every batch (B, C, h_k, w_k): `side` is in
    the first batch's units, and a batch k times its size gets a window k times larger (latents and their pixels).
    The positions come from `generator`; a `side` not smaller than the first batch keeps whole images."""
    height, width = batches[0].shape[-2:]
    if side >= min(height, width):
        return batches
    count = len(batches[0])
    tops = torch.randint(0, height - side + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, width - side + 1, (count,), generator=generator).tolist()
    windows = []
    for batch in batches:
        k = batch.shape[-1] // width
        cut = [
            x[:, t * k : (t + side) * k, s * k : (s + side) * k]
            for x, t, s in zip(batch, tops, lefts, strict=True)
        ]
        windows.append(torch.stack(cut))
    return tuple(windows)
