"""Training data: torch datasets over the image-caption sources, batching, and the epoch loader.

The sources (Hub datasets, imagefolders, webdataset shards; map-style or streamed) are loaded by
:mod:`ldm.training.sources`. Images are decoded here rather than by ``datasets`` (the image column is cast to
``datasets.Image(decode=False)``), so a corrupt file becomes a skipped sample instead of a crash:
:class:`TrainDataset` returns ``None`` for it and :func:`collate_fn` counts it in ``num_skipped``. The transform
and its random draws are in :mod:`ldm.training.transforms`.
"""

import functools
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate.data_loader import DataLoaderShard
from PIL import Image

from ldm.training.config import TrainConfig
from ldm.training.sources import load_image_caption_dataset, shard_for_process
from ldm.training.transforms import (
    DECODE_ERRORS,
    ImageCaptionTransform,
    caption_list,
    open_image,
    upright_size,
)

logger = logging.getLogger(__name__)

Sample = dict[str, Any]

# ----------------------------------------------------------------------------------------------------
# Torch datasets and batching
# ----------------------------------------------------------------------------------------------------


def make_sample(
    row: dict,
    index: int,
    epoch: int,
    transform: ImageCaptionTransform,
    columns: tuple[str, str],
    warned: set,
    bucket: tuple[int, int] | None = None,
    conditioning_column: str | None = None,
) -> Sample | None:
    """Decode and transform one row; ``None`` (with one warning per index) if its image, caption or conditioning
    image is unusable.

    Map-style datasets drop rows with bad captions at start-up (`build_train_and_heldout`); a stream meets them
    only as it reads, so here they are skipped and counted like unreadable images. A conditioning image (a
    ControlNet's control) must be readable and the size of its target image.
    """
    image_column, caption_column = columns
    record = row[image_column]
    try:
        caption_list(row[caption_column], index)
        image = open_image(record)
        control = (
            None if conditioning_column is None else open_conditioning(row[conditioning_column], image.size)
        )
    except DECODE_ERRORS as error:
        if index not in warned:
            warned.add(index)
            where = record.get("path") if isinstance(record, dict) else record
            logger.warning("Skipping sample %d (%s): %s", index, where, error)
        return None
    pixel_values, caption = transform(image, row[caption_column], epoch, index, bucket)
    sample = {"pixel_values": pixel_values, "caption": caption, "index": index}
    if control is not None:
        sample["conditioning_pixel_values"] = transform.conditioning_pixels(control, epoch, index, bucket)
    return sample


def open_conditioning(record, target_size: tuple[int, int]) -> Image.Image:
    """A row's conditioning image, decoded; raises ValueError (a skipped sample) when it is missing or its size
    differs from its target image's, which would misalign the control with what it controls."""
    if record is None:
        raise ValueError("the row has no conditioning image")
    try:
        control = open_image(record)
    except DECODE_ERRORS as error:
        raise ValueError(f"its conditioning image cannot be read ({error})") from None
    if control.size != target_size:
        raise ValueError(
            f"its conditioning image is {control.size[0]}x{control.size[1]} but its image is "
            f"{target_size[0]}x{target_size[1]}; a control must be the size of its target"
        )
    return control


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
        conditioning_column: name of the conditioning image column (a ControlNet's control), or None; its samples
            then also hold ``"conditioning_pixel_values"`` (3, H, W) in [0, 1].
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: ImageCaptionTransform,
        image_column: str,
        caption_column: str,
        conditioning_column: str | None = None,
    ):
        self.dataset = dataset
        self.transform = transform
        self.columns = (image_column, caption_column)
        self.conditioning_column = conditioning_column
        self.epoch = 0
        self._warned: set[int] = set()
        # Per index, its aspect-ratio bucket (width, height) once `set_buckets` is called; None: square crops.
        self.buckets: list[tuple[int, int] | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose randomness the next samples use."""
        self.epoch = epoch

    def set_buckets(self, buckets: list[tuple[int, int] | None]) -> None:
        """Crop every sample to its aspect-ratio bucket (see `ldm.training.buckets.assign_buckets`)."""
        if len(buckets) != len(self):
            raise ValueError(f"{len(buckets)} buckets for a dataset of {len(self)} rows.")
        self.buckets = list(buckets)

    def bucket(self, index: int) -> tuple[int, int] | None:
        """Sample ``index``'s bucket, or None when training on square crops."""
        return None if self.buckets is None else self.buckets[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        """Sample ``index``, or ``None`` if its image cannot be decoded."""
        row = self.dataset[index]
        return make_sample(
            row, index, self.epoch, self.transform, self.columns, self._warned, self.bucket(index),
            self.conditioning_column,
        )  # fmt: skip

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """Every row's upright (width, height) from the image headers; None where the header cannot be read."""
        return [self.image_size(index) for index in range(len(self))]

    def image_size(self, index: int) -> tuple[int, int] | None:
        """Row ``index``'s upright (width, height) from its image header (no pixels decoded); None if unreadable."""
        try:
            return upright_size(self.dataset[index][self.columns[0]])
        except DECODE_ERRORS:
            return None

    @functools.cached_property
    def content_hash(self) -> str:
        """A hash of every row's image bytes and captions: what the data is, whatever its files' names or mtimes.

        It keys the latent cache, so the conditioning images are not in it (`conditioning_hash` is)."""
        digest = hashlib.blake2b(digest_size=16)
        image_column, caption_column = self.columns
        for row in self.dataset:
            _hash_record(digest, row[image_column])
            digest.update(json.dumps(row[caption_column]).encode())
        return digest.hexdigest()

    @functools.cached_property
    def conditioning_hash(self) -> str | None:
        """A hash of every row's conditioning image bytes (None without a conditioning column, or when it is the
        image column, as an upscaler's is: `content_hash` covers it)."""
        if self.conditioning_column in (None, self.columns[0]):
            return None
        digest = hashlib.blake2b(digest_size=16)
        for row in self.dataset.select_columns(
            [self.conditioning_column]
        ):  # row by row: never the whole column
            _hash_record(digest, row[self.conditioning_column])
        return digest.hexdigest()

    def captions(self) -> list[list[str]]:
        """Every row's candidate captions, checked (a bad one raises ValueError naming its row)."""
        return [caption_list(c, i) for i, c in enumerate(self.dataset[self.columns[1]])]

    def open(self, index: int) -> Image.Image:
        """Row ``index``'s decoded image; raises one of ``DECODE_ERRORS`` if it cannot be read."""
        return open_image(self.dataset[index][self.columns[0]])

    def center_pixels(self, index: int) -> torch.Tensor:
        """Row ``index``'s centre crop (of its bucket, or the square), unflipped: what the latent cache encodes."""
        return self.transform.center_crop_pixels(self.open(index), self.bucket(index))

    def conditioning(self, index: int) -> torch.Tensor | None:
        """Row ``index``'s conditioning pixels in this epoch (its own crop and flip), without decoding its image;
        None (with one warning) when unusable."""
        row = self.dataset[index]
        try:
            control = open_conditioning(row[self.conditioning_column], upright_size(row[self.columns[0]]))
        except DECODE_ERRORS as error:
            if index not in self._warned:
                self._warned.add(index)
                logger.warning("Skipping sample %d: %s", index, error)
            return None
        return self.transform.conditioning_pixels(control, self.epoch, index, self.bucket(index))


def _hash_record(digest, record) -> None:
    """Feed an image record's bytes (read from its path when it holds none) into `digest`."""
    data = record.get("bytes") if isinstance(record, dict) else None
    if data is None:
        path = record.get("path") if isinstance(record, dict) else record
        try:
            data = Path(path).read_bytes()
        except (OSError, TypeError):
            data = b"<unreadable>"
    digest.update(len(data).to_bytes(8, "little") + data)


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
        conditioning_column: name of the conditioning image column, or None (see :class:`TrainDataset`).
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: ImageCaptionTransform,
        image_column: str,
        caption_column: str,
        process_index: int = 0,
        num_processes: int = 1,
        conditioning_column: str | None = None,
    ):
        self.dataset = dataset
        self.transform = transform
        self.columns = (image_column, caption_column)
        self.conditioning_column = conditioning_column
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
            yield make_sample(
                row,
                index,
                self.epoch,
                self.transform,
                self.columns,
                self._warned,
                None,
                self.conditioning_column,
            )


def collate_fn(batch: list[Sample | None]) -> dict[str, Any]:
    """Stack the decodable samples of a batch and count the rest.

    Args:
        batch: samples from :class:`TrainDataset` / :class:`StreamingTrainDataset`; ``None`` marks an
            undecodable image.

    Returns:
        ``{"pixel_values": (B, 3, H, W), "captions": list[str], "indices": LongTensor (B,),
        "num_skipped": int}``, plus ``"conditioning_pixel_values"`` (B, 3, H, W) when the samples have them. If
        every sample was bad, B = 0 and pixel_values has shape (0, 3, 0, 0).
    """
    kept = [sample for sample in batch if sample is not None]
    collated = {
        "pixel_values": stack_pixels(kept, "pixel_values"),  # (B, 3, H, W)
        "captions": [sample["caption"] for sample in kept],
        "indices": torch.tensor([sample["index"] for sample in kept], dtype=torch.long),
        "num_skipped": len(batch) - len(kept),
    }
    if kept and "conditioning_pixel_values" in kept[0]:
        collated["conditioning_pixel_values"] = stack_pixels(kept, "conditioning_pixel_values")
    return collated


def stack_pixels(samples: list[Sample], key: str) -> torch.Tensor:
    """The samples' `key` tensors stacked (B, 3, H, W); (0, 3, 0, 0) for no sample."""
    return torch.stack([sample[key] for sample in samples]) if samples else torch.empty(0, 3, 0, 0)


def build_train_dataset(
    config: TrainConfig, seed: int, process_index: int = 0, num_processes: int = 1
) -> TrainDataset | StreamingTrainDataset:
    """Load the configured data and wrap it for training (no held-out part); see `build_train_and_heldout`."""
    return build_train_and_heldout(config, seed, 0, process_index, num_processes)[0]


def build_train_and_heldout(
    config: TrainConfig,
    seed: int,
    num_heldout: int,
    process_index: int = 0,
    num_processes: int = 1,
    conditioning_column: str | None = None,
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
        conditioning_column: the conditioning image column (a ControlNet's control), or None.

    Returns:
        (train, heldout): a `TrainDataset` (map-style: let accelerate shard its dataloader) or, when
        ``config.streaming``, a `StreamingTrainDataset` already holding this process's shard; and a
        `TrainDataset` of the held-out samples, or None.
    """
    dataset = load_image_caption_dataset(config, conditioning_column)
    transform = ImageCaptionTransform.from_config(config, seed)
    columns = (config.image_column, config.caption_column)
    heldout = None
    if isinstance(dataset, datasets.IterableDataset):
        if num_heldout:
            heldout = datasets.Dataset.from_list(list(dataset.take(num_heldout)))
            for column in dict.fromkeys((config.image_column, conditioning_column)):
                if column is not None:
                    heldout = heldout.cast_column(column, datasets.Image(decode=False))
            dataset = dataset.skip(num_heldout)
        # Bucketed streams are read whole by every process, which then agree on each batch's shape (BucketedStream).
        shard = dataset if config.aspect_buckets else shard_for_process(dataset, process_index, num_processes)
        train = StreamingTrainDataset(
            shard, transform, *columns, process_index, num_processes, conditioning_column
        )
    else:
        dataset = _drop_bad_captions(dataset, config.caption_column)
        n = len(dataset)
        if n <= num_heldout:
            raise ValueError(
                f"The dataset has {n} samples, but {num_heldout} are held out for the validation loss; "
                f"give at least {num_heldout + 1}."
            )
        if num_heldout:
            heldout = dataset.select(range(n - num_heldout, n))
            dataset = dataset.select(range(n - num_heldout))
        train = TrainDataset(dataset, transform, *columns, conditioning_column)
    if heldout is not None:
        fixed = ImageCaptionTransform(config.resolution, center_crop=True, random_flip=False, seed=seed)
        heldout = TrainDataset(heldout, fixed, *columns, conditioning_column)
    return train, heldout


def _drop_bad_captions(dataset: datasets.Dataset, caption_column: str) -> datasets.Dataset:
    """The rows whose caption is a string or a non-empty list of strings; the others are counted and logged.

    Empty captions ("" or only spaces) are kept, as unconditional examples like caption dropout's, but counted and
    reported; a dataset whose every caption is empty is refused (it would train an unconditional model without a
    word, usually because caption_column names the wrong column).
    """
    bad, empty = [], 0
    for index, caption in enumerate(dataset[caption_column]):
        try:
            empty += not any(text.strip() for text in caption_list(caption, index))
        except ValueError as error:
            bad.append((index, error))
    if len(bad) == len(dataset):
        raise ValueError(
            f"No row of the dataset has a usable caption in column {caption_column!r}: {bad[0][1]}"
        )
    if empty == len(dataset) - len(bad):
        raise ValueError(
            f"Every caption in column {caption_column!r} is empty ({empty} rows), so the model would learn no text; "
            f"check --caption_column (the dataset's columns: {dataset.column_names})."
        )
    if empty:
        logger.warning(
            "%d of %d rows have an empty caption in column %r; they train as unconditional examples.",
            empty, len(dataset), caption_column,
        )  # fmt: skip
    if not bad:
        return dataset
    logger.warning(
        "Skipping %d of %d rows without a usable caption (first: %s)", len(bad), len(dataset), bad[0][1]
    )
    drop = {index for index, _ in bad}
    return dataset.select([i for i in range(len(dataset)) if i not in drop])


def default_num_workers(local_processes: int = 1) -> int:
    """`--dataloader_num_workers` when unset: one less than a process's share of the usable CPU cores (the process
    itself steps the model), at most 4; 0 when a process has one core or less."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // max(1, local_processes) - 1))


def workers_for(config: TrainConfig) -> int:
    """The config's dataloader worker count, `default_num_workers()` when unset."""
    return default_num_workers() if config.dataloader_num_workers is None else config.dataloader_num_workers


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
    whole_batches = getattr(dataset, "yields_batches", False)  # a bucketed stream batches its own samples
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None if whole_batches else config.train_batch_size,
        shuffle=not streaming,
        generator=None if streaming else torch.Generator().manual_seed(epoch_seed),
        num_workers=workers_for(config),
        collate_fn=None if whole_batches else collate,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU without a staging copy
    )


class TrainLoader:
    """The training batches, epoch by epoch, for map-style, bucketed and streamed datasets alike; resumable
    mid-epoch.

    The one place that tells them apart. A map-style dataset's DataLoader is sharded over processes and
    reshuffled per epoch (``seed + epoch``) by accelerate. A stream is already this process's shard
    (:func:`build_train_and_heldout`) and is read in order, and a bucketed dataset's
    :class:`~ldm.training.buckets.BucketBatchSampler` already gives each process its slice of every global batch:
    accelerate must not shard those a second time, so they are wrapped in accelerate's ``DataLoaderShard`` (batches
    on the device, the end of an epoch seen by gradient accumulation) instead of going through ``prepare``.

    Args:
        dataset: a :class:`TrainDataset`, a latent cache's index dataset, or a :class:`StreamingTrainDataset`.
        collate: batches the samples (:func:`collate_fn`, or the cache's own).
        config: reads ``train_batch_size`` and ``dataloader_num_workers``.
        seed: the run's data seed.
        batch_sampler: a ``BucketBatchSampler`` over ``dataset`` for aspect-ratio buckets; None otherwise.
    """

    def __init__(
        self,
        dataset,
        collate: Callable[[list], dict[str, Any]],
        config: TrainConfig,
        seed: int,
        batch_sampler=None,
    ):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.batch_size = config.train_batch_size
        self.num_workers, self.collate = workers_for(config), collate
        self.dataloader = None if batch_sampler else make_dataloader(dataset, config, seed, collate)
        self.accelerator = None

    def schedule(self, config: TrainConfig, num_processes: int) -> tuple[int, int]:
        """(max_train_steps, num_train_epochs) for this data: a stream runs until max_train_steps.

        Call before `prepare` (the length is the unsharded one).
        """
        if self.streaming:
            return config.max_train_steps, config.num_train_epochs
        if self.batch_sampler is not None:
            batches_per_epoch = len(self.batch_sampler)  # already this process's share
        else:
            batches_per_epoch = math.ceil(len(self.dataloader) / num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        max_train_steps = config.max_train_steps
        if max_train_steps is None:
            max_train_steps = config.num_train_epochs * steps_per_epoch
        return max_train_steps, math.ceil(max_train_steps / steps_per_epoch)

    def prepare(self, accelerator, *objects):
        """``accelerator.prepare(*objects)``, with the map-style DataLoader in the same call (DeepSpeed needs it
        there to size its micro-batch); returns the prepared objects."""
        self.accelerator = accelerator
        if self.batch_sampler is not None:
            self.dataloader = DataLoaderShard(
                self.dataset,
                device=accelerator.device,
                batch_sampler=self.batch_sampler,
                num_workers=self.num_workers,
                collate_fn=self.collate,
                pin_memory=torch.cuda.is_available(),
            )
        if self.streaming or self.batch_sampler is not None:
            return accelerator.prepare(*objects)
        *prepared, self.dataloader = accelerator.prepare(*objects, self.dataloader)
        return prepared

    def epochs(self, first_epoch: int, num_train_epochs: int) -> Iterable[int]:
        """The epochs to run from `first_epoch` on (a stream has no end of its own)."""
        return itertools.count(first_epoch) if self.streaming else range(first_epoch, num_train_epochs)

    def batches(self, epoch: int, skip_batches: int = 0) -> Iterable[dict[str, Any]]:
        """This process's batches of `epoch`, after the first `skip_batches` of them (already trained on)."""
        self.dataset.set_epoch(epoch)
        if self.streaming:
            self.dataset.set_resume_position(skip_batches, self.batch_size)
            return self.dataloader
        self.dataloader.set_epoch(epoch)  # a bucketed run's sampler takes the epoch from here
        if self.batch_sampler is not None:
            self.batch_sampler.set_skip(skip_batches)  # skipped batches are never loaded
            return self.dataloader
        if skip_batches:
            return self.accelerator.skip_first_batches(self.dataloader, skip_batches)
        return self.dataloader

    def epoch_over(self, batches_done: int) -> bool:
        """Whether this process has had every batch of the epoch (never for a stream)."""
        if self.streaming:
            return False
        return batches_done >= len(self.dataloader if self.batch_sampler is None else self.batch_sampler)
