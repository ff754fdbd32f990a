"""Training data: image-caption sources, torch datasets, batching, and the epoch loader.

Sources are Hub datasets, imagefolders (images + ``metadata.jsonl``) and webdataset ``*.tar`` shards, map-style or
streamed. Images are decoded here rather than by ``datasets`` (the image column is cast to
``datasets.Image(decode=False)``), so a corrupt file becomes a skipped sample instead of a crash:
:class:`TrainDataset` returns ``None`` for it and :func:`collate_fn` counts it in ``num_skipped``. The transform
and its random draws are in :mod:`ldm.training.transforms`.
"""

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from ldm.training.config import TrainConfig
from ldm.training.transforms import DECODE_ERRORS, ImageCaptionTransform, caption_list, open_image

logger = logging.getLogger(__name__)

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
# Torch datasets and batching
# ----------------------------------------------------------------------------------------------------


def _make_sample(
    row: dict, index: int, epoch: int, transform: ImageCaptionTransform, columns: tuple[str, str], warned: set
) -> Sample | None:
    """Decode and transform one row; ``None`` (with one warning per index) if its image is unreadable."""
    image_column, caption_column = columns
    try:
        image = open_image(row[image_column])
    except DECODE_ERRORS as error:
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

    @property
    def rows(self) -> datasets.Dataset:
        """The underlying rows (undecoded images and captions)."""
        return self.dataset

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

    def captions(self) -> list[list[str]]:
        """Every row's candidate captions, checked (a bad one raises ValueError naming its row)."""
        return [caption_list(c, i) for i, c in enumerate(self.dataset[self.columns[1]])]

    def open(self, index: int) -> Image.Image:
        """Row ``index``'s decoded image; raises one of ``DECODE_ERRORS`` if it cannot be read."""
        return open_image(self.dataset[index][self.columns[0]])

    def center_pixels(self, index: int) -> torch.Tensor:
        """Row ``index``'s centre crop, unflipped (3, R, R): what the latent cache encodes."""
        return self.transform.center_crop_pixels(self.open(index))


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


class TrainLoader:
    """The training batches, epoch by epoch, for map-style and streamed datasets alike; resumable mid-epoch.

    The one place that tells the two apart. A map-style dataset's DataLoader is sharded over processes and
    reshuffled per epoch (``seed + epoch``) by accelerate; a stream is already this process's shard
    (:func:`build_train_and_heldout`) and is read in order, so accelerate must not see it.

    Args:
        dataset: a :class:`TrainDataset`, a latent cache's index dataset, or a :class:`StreamingTrainDataset`.
        collate: batches the samples (:func:`collate_fn`, or the cache's own).
        config: reads ``train_batch_size`` and ``dataloader_num_workers``.
        seed: the run's data seed.
    """

    def __init__(self, dataset, collate: Callable[[list], dict[str, Any]], config: TrainConfig, seed: int):
        self.dataset = dataset
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.batch_size = config.train_batch_size
        self.dataloader = make_dataloader(dataset, config, seed, collate)
        self.accelerator = None

    def schedule(self, config: TrainConfig, num_processes: int) -> tuple[int, int]:
        """(max_train_steps, num_train_epochs) for this data: a stream runs until max_train_steps.

        Call before `prepare` (the length is the unsharded one).
        """
        if self.streaming:
            return config.max_train_steps, config.num_train_epochs
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
        if self.streaming:
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
        self.dataloader.set_epoch(epoch)
        if skip_batches:
            return self.accelerator.skip_first_batches(self.dataloader, skip_batches)
        return self.dataloader

    def epoch_over(self, batches_done: int) -> bool:
        """Whether this process has had every batch of the epoch (never for a stream)."""
        return not self.streaming and batches_done >= len(self.dataloader)
