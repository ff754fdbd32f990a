"""Aspect-ratio buckets in a training run: the bucket shapes from the models' configs, and every image's bucket.

The bucket math and the sampler are in :mod:`ldm.training.buckets`; this is what `train/train_ldm.py` calls to
wire them into a run, before any model weights load.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.encoding import vae_scale_factor
from ldm.presets import get_preset
from ldm.training.buckets import BucketSpec, assign_buckets, bucket_spec
from ldm.training.config import TrainConfig

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
