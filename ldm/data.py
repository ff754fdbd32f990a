"""Training data: image-caption datasets, the deterministic image transform, batching.

Every random choice made for a sample (crop offset, horizontal flip, which caption of several, caption
dropout) is a pure function of ``(seed, epoch, index)``, drawn from its own
``numpy.random.default_rng([seed, epoch, index, ...])``. Nothing reads the global RNGs, so the number
of dataloader workers, the process count and resuming from a checkpoint cannot change what a sample
looks like: a resumed run sees exactly the data an uninterrupted run would.

Images are decoded here rather than by ``datasets`` (the image column is cast to
``datasets.Image(decode=False)``), so a corrupt file becomes a skipped sample instead of a crash:
:class:`TrainDataset` returns ``None`` for it and :func:`collate_fn` counts it in ``num_skipped``.
"""

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps

from ldm.config import TrainConfig

logger = logging.getLogger(__name__)

# Bicubic, as in the original latent-diffusion data pipeline: sharper than bilinear when downscaling.
RESAMPLE = Image.Resampling.BICUBIC

# What PIL raises for a zero-byte, truncated or garbled file (SyntaxError: "broken PNG file";
# ValueError: a record with neither bytes nor path).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# The stream tag of caption dropout. default_rng([s, e, i]) and default_rng([s, e, i, 0]) are the
# same stream (SeedSequence zero-pads its entropy), so the tag must not be 0.
_DROPOUT_STREAM = 1

Sample = dict[str, Any]

# ----------------------------------------------------------------------------------------------------
# Loading the dataset
# ----------------------------------------------------------------------------------------------------


def load_image_caption_dataset(config: TrainConfig) -> datasets.Dataset | datasets.IterableDataset:
    """Load the ``train`` split of the configured image-caption dataset, images left undecoded.

    Sources: ``config.dataset_name`` (a Hub dataset, with ``dataset_config_name``), or
    ``config.train_data_dir`` holding either ``*.tar`` webdataset shards or an imagefolder (images
    plus ``metadata.jsonl`` with ``file_name`` and a caption column). ``config.streaming`` gives an
    ``IterableDataset``.

    Webdataset columns are named by file extension (``000.png``, ``000.txt`` give ``png``, ``txt``);
    when ``image_column`` / ``caption_column`` are not among them, the single image-typed column and
    ``txt`` are renamed to those names, so the defaults ``image`` / ``text`` work.

    Only the image and caption columns are kept. The image column is cast to
    ``datasets.Image(decode=False)``: rows hold ``{"bytes", "path"}`` for :func:`open_image`.
    ``max_train_samples`` keeps the first that many rows (before any shuffling, so always the same ones).

    Args:
        config: the run's config; reads the data-source fields, ``streaming``, ``max_train_samples``,
            ``image_column`` and ``caption_column``.

    Returns:
        A ``datasets.Dataset``, or a ``datasets.IterableDataset`` when streaming.

    Raises:
        ValueError: if ``train_data_dir`` is not a folder, or the image or caption column is missing.
    """
    dataset = _load_source(config)
    dataset = _use_webdataset_names(dataset, config.image_column, config.caption_column)
    _check_columns(_column_names(dataset), config.image_column, config.caption_column)
    dataset = dataset.select_columns([config.image_column, config.caption_column])
    if dataset.features is not None:  # a stream without declared features is not decoded anyway
        dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
    if config.max_train_samples is not None:
        dataset = _truncate(dataset, config.max_train_samples)
    return dataset


def _load_source(config: TrainConfig) -> datasets.Dataset | datasets.IterableDataset:
    """Call ``datasets.load_dataset`` for a Hub name, a folder of tar shards, or an imagefolder."""
    # config.cache_dir is the latent cache's; datasets keeps its own (HF_DATASETS_CACHE).
    common = {"split": "train", "streaming": config.streaming}
    if config.dataset_name is not None:
        return datasets.load_dataset(config.dataset_name, config.dataset_config_name, **common)
    data_dir = Path(config.train_data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"train_data_dir {str(data_dir)!r} is not a folder.")
    shards = sorted(str(path) for path in data_dir.glob("*.tar"))
    if shards:
        return datasets.load_dataset("webdataset", data_files={"train": shards}, **common)
    return datasets.load_dataset("imagefolder", data_dir=str(data_dir), **common)


def _use_webdataset_names(dataset, image_column: str, caption_column: str):
    """Rename a webdataset's extension-named image column and ``txt`` to the configured names."""
    columns = _column_names(dataset)
    if "__key__" not in columns or dataset.features is None:
        return dataset
    renames = {}
    image_columns = [
        name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)
    ]
    if image_column not in columns and len(image_columns) == 1:
        renames[image_columns[0]] = image_column
    if caption_column not in columns and "txt" in columns:
        renames["txt"] = caption_column
    if renames:
        logger.info("Renaming webdataset columns %s", renames)
        dataset = dataset.rename_columns(renames)
    return dataset


def _column_names(dataset) -> list[str]:
    """The dataset's columns; a stream without declared features is asked for its first example."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def _check_columns(columns: list[str], image_column: str, caption_column: str) -> None:
    """Fail with the columns found when the image or caption column is missing."""
    for flag, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in columns:
            raise ValueError(
                f"The dataset has no {flag.split('_')[0]} column {name!r} (set by --{flag}); "
                f"columns found: {columns}. Pass --{flag} with one of them."
            )


def _truncate(dataset, num_samples: int):
    """Keep the first ``num_samples`` rows."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(num_samples)
    return dataset.select(range(min(num_samples, len(dataset))))


def shard_for_process(
    dataset: datasets.Dataset | datasets.IterableDataset, process_index: int, num_processes: int
) -> datasets.Dataset | datasets.IterableDataset:
    """This process's disjoint part of ``dataset``, via ``datasets.distributed.split_dataset_by_node``.

    For a stream, whole shards go to each process when the shard count divides ``num_processes``,
    otherwise every process reads all shards and keeps one example in ``num_processes``.

    Args:
        dataset: the full dataset, identical on every process.
        process_index: this process's rank (``accelerator.process_index``).
        num_processes: the world size (``accelerator.num_processes``).

    Returns:
        The part of ``dataset`` this process trains on.
    """
    return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)


# ----------------------------------------------------------------------------------------------------
# Decoding and the per-sample transform
# ----------------------------------------------------------------------------------------------------


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
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = io.BytesIO(value["bytes"])
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise ValueError("Image record has neither bytes nor path.")
    elif not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"Cannot open an image from a {type(value).__name__}.")
    with Image.open(value) as image:
        return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation if any, then convert (and so fully decode) to RGB."""
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def resized_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling so that the shorter side equals ``resolution``."""
    width, height = image_size
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's transform randomness: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, index])


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

    Four uniforms are always drawn from ``sample_rng(seed, epoch, index)`` in a fixed order (flip,
    caption, crop top, crop left), so ``flip`` and ``caption_index`` depend neither on the image size
    nor on the resolution: the latent cache can recover them from ``(seed, epoch, index)`` alone.

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
    if num_captions < 1:
        raise ValueError(f"Sample {index} has no caption.")
    flip_u, caption_u, top_u, left_u = sample_rng(seed, epoch, index).random(4)
    width, height = resized_size(image_size, resolution)
    slack_y, slack_x = height - resolution, width - resolution
    if center_crop:
        crop_top, crop_left = slack_y // 2, slack_x // 2
    else:
        crop_top, crop_left = int(top_u * (slack_y + 1)), int(left_u * (slack_x + 1))
    return {
        "flip": bool(random_flip and flip_u < 0.5),
        "crop_top": crop_top,
        "crop_left": crop_left,
        "caption_index": min(int(caption_u * num_captions), num_captions - 1),
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
        self, image: Image.Image, caption: str | list[str], epoch: int, index: int
    ) -> tuple[torch.Tensor, str]:
        """Transform one sample.

        Args:
            image: the decoded RGB image.
            caption: one caption, or several of which one is chosen.
            epoch: the current epoch.
            index: the sample's index.

        Returns:
            ``(pixel_values, caption)``: a float tensor (3, resolution, resolution) in [-1, 1] and a str.

        Raises:
            ValueError: the caption is neither a string nor a non-empty list of strings.
        """
        captions = _caption_list(caption, index)
        draws = draw_sample_randomness(
            self.seed,
            epoch,
            index,
            len(captions),
            self.resolution,
            image.size,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
        )
        size = resized_size(image.size, self.resolution)
        if image.size != size:
            image = image.resize(size, resample=RESAMPLE)
        top, left = draws["crop_top"], draws["crop_left"]
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if draws["flip"]:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image), captions[draws["caption_index"]]


def _caption_list(caption: Any, index: int) -> list[str]:
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


# ----------------------------------------------------------------------------------------------------
# Torch datasets and batching
# ----------------------------------------------------------------------------------------------------


def _make_sample(
    row: dict, index: int, epoch: int, transform: ImageCaptionTransform, columns: tuple[str, str], warned: set
) -> Sample | None:
    """Decode and transform one row; ``None`` (with one warning per index) if its image is unreadable."""
    image_column, caption_column = columns
    try:
        image = open_image(row[image_column])
    except _DECODE_ERRORS as error:
        if index not in warned:
            warned.add(index)
            record = row[image_column]
            where = record.get("path") if isinstance(record, dict) else record
            logger.warning("Skipping sample %d (%s): cannot decode image: %s", index, where, error)
        return None
    pixel_values, caption = transform(image, row[caption_column], epoch, index)
    return {"pixel_values": pixel_values, "caption": caption, "index": index}


class TrainDataset(torch.utils.data.Dataset):
    """A map-style HF dataset as training samples ``{"pixel_values", "caption", "index"}``.

    Call :meth:`set_epoch` before iterating each epoch (accelerate's prepared dataloader does not
    always forward ``set_epoch`` to the dataset). Workers get a copy of the dataset when an iterator
    starts, so do not use ``persistent_workers``.

    Args:
        dataset: rows with an undecoded image column, as from :func:`load_image_caption_dataset`.
        transform: the per-sample transform.
        image_column: name of the image column.
        caption_column: name of the caption column.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: ImageCaptionTransform,
        image_column: str,
        caption_column: str,
    ):
        self.dataset = dataset
        self.transform = transform
        self.columns = (image_column, caption_column)
        self.epoch = 0
        self._warned: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose randomness the next samples use."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index``, or ``None`` if its image cannot be decoded."""
        return _make_sample(
            self.dataset[index], index, self.epoch, self.transform, self.columns, self._warned
        )


class StreamingTrainDataset(torch.utils.data.IterableDataset):
    """A streamed HF dataset as training samples; the streaming counterpart of :class:`TrainDataset`.

    A sample's index is its running position in this process's stream, made unique across dataloader
    workers and processes: ``(count * num_workers + worker_id) * num_processes + process_index``
    (``datasets`` hands each worker whole shards). Shard the stream with :func:`shard_for_process`
    before wrapping it, and do not pass the dataloader through ``accelerator.prepare``, which would
    shard it a second time.

    Args:
        dataset: this process's stream, as from :func:`shard_for_process`.
        transform: the per-sample transform.
        image_column: name of the image column.
        caption_column: name of the caption column.
        process_index: this process's rank.
        num_processes: the world size.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: ImageCaptionTransform,
        image_column: str,
        caption_column: str,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.dataset = dataset
        self.transform = transform
        self.columns = (image_column, caption_column)
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.skip_batches, self.batch_size = 0, 1
        self._warned: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; ``datasets`` also reorders the shards per epoch."""
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def set_resume_position(self, skip_batches: int, batch_size: int) -> None:
        """Start the next pass after ``skip_batches`` batches this process already trained on (0 = from the start).

        Skipped rows are read but not decoded, and keep their indices, so the samples after them get the same
        randomness as in an uninterrupted run. The DataLoader takes batches from its workers in turn, so each
        worker skips its share.
        """
        self.skip_batches, self.batch_size = skip_batches, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        own_batches = self.skip_batches // num_workers + (worker_id < self.skip_batches % num_workers)
        for count, row in enumerate(self.dataset):
            if count < own_batches * self.batch_size:
                continue
            index = (count * num_workers + worker_id) * self.num_processes + self.process_index
            yield _make_sample(row, index, self.epoch, self.transform, self.columns, self._warned)


def collate_fn(batch: list[Sample | None]) -> dict[str, Any]:
    """Stack the decodable samples of a batch and count the rest.

    Args:
        batch: samples from :class:`TrainDataset` / :class:`StreamingTrainDataset`; ``None`` marks an
            undecodable image.

    Returns:
        ``{"pixel_values": (B, 3, H, W), "captions": list[str], "indices": LongTensor (B,),
        "num_skipped": int}``. If every sample was bad, B = 0 and pixel_values has shape (0, 3, 0, 0).
    """
    kept = [sample for sample in batch if sample is not None]
    if kept:
        pixel_values = torch.stack([sample["pixel_values"] for sample in kept])  # (B, 3, H, W)
    else:
        pixel_values = torch.empty(0, 3, 0, 0)
    return {
        "pixel_values": pixel_values,
        "captions": [sample["caption"] for sample in kept],
        "indices": torch.tensor([sample["index"] for sample in kept], dtype=torch.long),
        "num_skipped": len(batch) - len(kept),
    }


def build_train_dataset(
    config: TrainConfig, seed: int, process_index: int = 0, num_processes: int = 1
) -> TrainDataset | StreamingTrainDataset:
    """Load the configured data and wrap it for training (no held-out part); see `build_train_and_heldout`."""
    return build_train_and_heldout(config, seed, 0, process_index, num_processes)[0]


def build_train_and_heldout(
    config: TrainConfig, seed: int, num_heldout: int, process_index: int = 0, num_processes: int = 1
) -> tuple[TrainDataset | StreamingTrainDataset, TrainDataset | None]:
    """Load the configured data, hold out `num_heldout` samples, and wrap both parts.

    The held-out samples (the last rows of a map-style dataset, the first of a stream) never reach training;
    they get the centre crop and no flip, so a loss measured on them is comparable from step to step.

    Args:
        config: the run's config.
        seed: the run's data seed (>= 0).
        num_heldout: how many samples to hold out (0 for none).
        process_index: this process's rank; only used when streaming.
        num_processes: the world size; only used when streaming.

    Returns:
        (train, heldout): a `TrainDataset` (map-style: let accelerate shard its dataloader) or, when
        ``config.streaming``, a `StreamingTrainDataset` already holding this process's shard; and a
        `TrainDataset` of the held-out samples, or None.
    """
    dataset = load_image_caption_dataset(config)
    transform = ImageCaptionTransform.from_config(config, seed)
    columns = (config.image_column, config.caption_column)
    heldout = None
    if isinstance(dataset, datasets.IterableDataset):
        if num_heldout:
            rows = datasets.Dataset.from_list(list(dataset.take(num_heldout)))
            heldout = rows.cast_column(config.image_column, datasets.Image(decode=False))
            dataset = dataset.skip(num_heldout)
        shard = shard_for_process(dataset, process_index, num_processes)
        train = StreamingTrainDataset(shard, transform, *columns, process_index, num_processes)
    else:
        n = len(dataset)
        if n <= num_heldout:
            raise ValueError(
                f"The dataset has {n} samples, but {num_heldout} are held out for the validation loss; "
                f"give at least {num_heldout + 1}."
            )
        if num_heldout:
            heldout = dataset.select(range(n - num_heldout, n))
            dataset = dataset.select(range(n - num_heldout))
        train = TrainDataset(dataset, transform, *columns)
    if heldout is not None:
        fixed = ImageCaptionTransform(config.resolution, center_crop=True, random_flip=False, seed=seed)
        heldout = TrainDataset(heldout, fixed, *columns)
    return train, heldout


def make_dataloader(
    dataset: TrainDataset | StreamingTrainDataset,
    config: TrainConfig,
    epoch_seed: int,
    collate: Callable[[list], dict[str, Any]] = collate_fn,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with :func:`collate_fn`.

    A map-style dataset is shuffled by a ``torch.Generator`` seeded with ``epoch_seed``: a fresh
    loader's first pass is a pure function of ``epoch_seed``, but later passes continue the
    generator. For an order that depends only on the epoch, build one loader per epoch with
    ``epoch_seed = seed + epoch``, or hand this loader to ``accelerator.prepare`` with
    ``DataLoaderConfiguration(use_seedable_sampler=True)``, which reseeds with ``seed + epoch`` at each
    ``set_epoch``. A stream is read in order (no shuffle).

    Args:
        dataset: a :class:`TrainDataset` or :class:`StreamingTrainDataset`.
        config: reads ``train_batch_size`` and ``dataloader_num_workers``.
        epoch_seed: seed of the shuffle order.
        collate: batches the samples (the latent cache's index dataset brings its own).

    Returns:
        The DataLoader.
    """
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=not streaming,
        generator=None if streaming else torch.Generator().manual_seed(epoch_seed),
        num_workers=config.dataloader_num_workers,
        collate_fn=collate,
    )
