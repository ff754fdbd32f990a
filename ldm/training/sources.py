"""Where images and captions come from: a Hub dataset, an imagefolder, or webdataset shards, map-style or streamed.

The local files are checked before any model loads (:func:`check_data_files`); the loaded dataset keeps only the
image and caption columns, images undecoded (``datasets.Image(decode=False)``), so that :mod:`ldm.training.data`
decodes them itself and a corrupt file becomes a skipped sample instead of a crash.
"""

import json
import logging
from pathlib import Path

import datasets
from datasets.distributed import split_dataset_by_node

from ldm.training.config import TrainConfig

logger = logging.getLogger(__name__)


def load_image_caption_dataset(
    config: TrainConfig, conditioning_column: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load the ``train`` split of the configured image-caption dataset, images left undecoded.

    Sources: ``config.dataset_name`` (a Hub dataset, with ``dataset_config_name``), or
    ``config.train_data_dir`` holding either ``*.tar`` webdataset shards or an imagefolder (images
    plus ``metadata.jsonl`` with ``file_name`` and a caption column). ``config.streaming`` gives an
    ``IterableDataset``.

    Webdataset columns are named by file extension (``000.png``, ``000.txt`` give ``png``, ``txt``);
    when ``image_column`` / ``caption_column`` are not among them, the single image-typed column and
    ``txt`` are renamed to those names, so the defaults ``image`` / ``text`` work.

    Only the image and caption columns are kept, and the conditioning image column when given (a ControlNet's
    control; an imagefolder names it by a ``<column>_file_name`` key in metadata.jsonl). Image columns are cast to
    ``datasets.Image(decode=False)``: rows hold ``{"bytes", "path"}`` for :func:`open_image`.
    ``max_train_samples`` keeps the first that many rows (before any shuffling, so always the same ones).

    Args:
        config: the run's config; reads the data-source fields, ``streaming``, ``max_train_samples``,
            ``image_column`` and ``caption_column``.
        conditioning_column: the conditioning image column to keep, or None.

    Returns:
        A ``datasets.Dataset``, or a ``datasets.IterableDataset`` when streaming.

    Raises:
        ValueError: if ``train_data_dir`` is not a folder, or the image, caption or conditioning column is missing.
    """
    dataset = _load_source(config)
    dataset = _use_webdataset_names(dataset, config.image_column, config.caption_column)
    columns = {"image_column": config.image_column, "caption_column": config.caption_column}
    if conditioning_column is not None:
        columns["conditioning_image_column"] = conditioning_column
    _check_columns(_column_names(dataset), columns)
    # An upscaler's conditioning column is its image column: each column once.
    dataset = dataset.select_columns(list(dict.fromkeys(columns.values())))
    if dataset.features is not None:  # a stream without declared features is not decoded anyway
        for column in dict.fromkeys((config.image_column, conditioning_column)):
            if column is not None:
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
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


def _check_columns(columns: list[str], wanted: dict[str, str]) -> None:
    """Fail with the columns found when a wanted column ({flag: name}) is missing."""
    for flag, name in wanted.items():
        if name not in columns:
            raise ValueError(
                f"The dataset has no {flag.removesuffix('_column').replace('_', ' ')} column {name!r} (set by "
                f"--{flag}); columns found: {columns}. Pass --{flag} with one of them."
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


def check_data_files(config: TrainConfig) -> None:
    """The local data source exists and its metadata.jsonl files parse, checked before any model loads.

    Each metadata line must be a JSON object with ``file_name``; an error names the file and the line.
    """
    if config.train_data_dir is None:
        return
    data_dir = Path(config.train_data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"train_data_dir {str(data_dir)!r} is not a folder.")
    if any(data_dir.glob("*.tar")):
        return
    metadata = sorted(data_dir.rglob("metadata.jsonl"))
    if not metadata and (any(data_dir.rglob("metadata.csv")) or any(data_dir.rglob("metadata.parquet"))):
        return  # datasets' imagefolder reads those too; its own errors name the file
    if not metadata:
        raise ValueError(
            f"train_data_dir {str(data_dir)!r} has neither *.tar shards nor a metadata.jsonl (one JSON object per "
            f"line with file_name and {config.caption_column!r}); add one."
        )
    for path in metadata:
        lines = [
            (n, line)
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip()
        ]
        if not lines:
            raise ValueError(
                f"{path} is empty; it needs one JSON object per image (file_name and a caption)."
            )
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({error.msg}): {line[:80]!r}"
                ) from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise ValueError(
                    f"{path}, line {number}: expected a JSON object with file_name; got {line[:80]!r}"
                )
