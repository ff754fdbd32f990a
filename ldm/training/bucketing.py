"""Aspect-ratio buckets in a training run: the bucket shapes from the models' configs, every image's bucket, and
bucketed batches from a stream.

The bucket math and the sampler are in :mod:`ldm.training.buckets`; this is what `train/train_ldm.py` calls to
wire them into a run (the shapes before any model weights load).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.encoding import vae_scale_factor
from ldm.presets import get_preset
from ldm.training.buckets import BucketSpec, assign_buckets, bucket_spec, is_too_small, nearest_bucket
from ldm.training.config import TrainConfig
from ldm.training.data import StreamingTrainDataset, collate_fn, make_sample
from ldm.training.transforms import DECODE_ERRORS, upright_size

logger = get_logger(__name__)


def bucket_spec_for(config: TrainConfig) -> BucketSpec | None:
    """The run's aspect-ratio bucket shapes, from the VAE's and UNet's configs (no weights load); None without
    --aspect_buckets."""
    if not config.aspect_buckets:
        return None
    base, vae_source = config.pretrained_model_name_or_path, config.pretrained_vae_model_name_or_path
    vae_config = AutoencoderKL.load_config(
        vae_source or base, subfolder=None if vae_source else "vae", revision=config.revision
    )
    if config.unet_preset:
        unet_config = get_preset(config.unet_preset)["unet"]
    else:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", revision=config.revision)
    return bucket_spec(
        config.resolution, vae_scale_factor(vae_config), len(unet_config["block_out_channels"]),
        config.bucket_min_side, config.bucket_max_side, config.bucket_step,
    )  # fmt: skip


def bucket_data(accelerator: Accelerator, dataset, spec: BucketSpec | None, config: TrainConfig):
    """(dataset, buckets for validation): a map-style dataset with every image's bucket set (`assign_to_buckets`),
    or a stream wrapped in `BucketedStream` (its histogram is unknown until read: validation takes the buckets
    nearest 2:1 and 1:2); the dataset unchanged and None without buckets."""
    if spec is None:
        return dataset, None
    if isinstance(dataset, StreamingTrainDataset):
        stream = BucketedStream(dataset, spec, config.bucket_small_images, config.train_batch_size)
        shapes = ", ".join(f"{w}x{h}" for w, h in stream.buckets)
        logger.info(
            f"Bucketing the stream as it is read, into {len(stream.buckets)} buckets: {shapes}.",
            main_process_only=True,
        )
        return stream, [nearest_bucket(ratio, stream.buckets) for ratio in ((2, 1), (1, 2))]
    return dataset, assign_to_buckets(accelerator, dataset, spec, config)


def assign_to_buckets(accelerator: Accelerator, dataset, spec: BucketSpec | None, config: TrainConfig):
    """Every image's bucket (sizes read from the image headers on the main process), logged as a histogram; None
    without buckets."""
    if spec is None:
        return None
    sizes = broadcast_object_list([dataset.image_sizes() if accelerator.is_main_process else None])[0]
    assignment = assign_buckets(sizes, spec, config.bucket_small_images)
    logger.info(f"Aspect-ratio buckets:\n{assignment.format_histogram()}", main_process_only=True)
    dataset.set_buckets(list(assignment.bucket_of))
    return dataset.buckets


class BucketedStream(StreamingTrainDataset):
    """A stream batched by aspect-ratio bucket: it yields whole batches, each of one bucket, the same on every process.

    Every process reads the whole stream (unsharded: the cost of agreeing on shapes) and sorts each row, by its image
    header, into its bucket's buffer; when a buffer holds a global batch (``batch_size`` x the world size) it is
    emitted, and each process decodes only its slice. So at every step all processes train on one bucket shape, and
    each row is trained on by exactly one process. A row's index is its position in the stream,
    ``count * num_workers + worker_id``, which keys its random draws as for any sample. Rows left in partial buffers
    when the stream ends wait for the next epoch's pass. Unreadable rows (and, with ``skip``, too small ones) are
    counted by the process whose slice they would have been in, in the next batch's ``num_skipped``.

    Resuming skips the batches already trained on by reading headers only, like
    :meth:`StreamingTrainDataset.set_resume_position`. Use a DataLoader with ``batch_size=None``.
    """

    yields_batches = True

    def __init__(self, stream: StreamingTrainDataset, spec: BucketSpec, small_images: str, batch_size: int):
        super().__init__(
            stream.dataset, stream.transform, *stream.columns, stream.process_index, stream.num_processes,
            stream.conditioning_column,
        )  # fmt: skip
        self.buckets = spec.buckets()
        self.small_images = small_images
        self.batch_size = batch_size

    def set_resume_position(self, skip_batches: int, batch_size: int) -> None:
        self.skip_batches = skip_batches

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        own_skip = self.skip_batches // num_workers + (worker_id < self.skip_batches % num_workers)
        global_size = self.batch_size * self.num_processes
        buffers: dict = {}
        emitted = skipped = 0
        image_column = self.columns[0]
        for count, row in enumerate(self.dataset):
            index = count * num_workers + worker_id
            bucket = self._bucket(row[image_column])
            if bucket is None:
                skipped += index % self.num_processes == self.process_index
                continue
            rows = buffers.setdefault(bucket, [])
            rows.append((index, row))
            if len(rows) < global_size:
                continue
            mine = rows[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
            buffers[bucket] = []
            emitted += 1
            if emitted <= own_skip:
                continue  # trained on before the resume: never decoded
            samples = [
                make_sample(
                    r,
                    i,
                    self.epoch,
                    self.transform,
                    self.columns,
                    self._warned,
                    bucket,
                    self.conditioning_column,
                )
                for i, r in mine
            ]
            batch = collate_fn(samples)
            batch["num_skipped"] += skipped
            skipped = 0
            yield batch

    def _bucket(self, record):
        """The row's bucket from its image header; None when unreadable or (with `skip`) too small."""
        try:
            size = upright_size(record)
        except DECODE_ERRORS:
            return None
        bucket = nearest_bucket(size, self.buckets)
        if self.small_images == "skip" and is_too_small(size, [bucket]):
            return None
        return bucket
