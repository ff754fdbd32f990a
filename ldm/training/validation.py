"""Validation during training: the held-out loss and a grid of the validation prompts, on the main process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger

from ldm.images import image_grid
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.training.checkpoint import PipelineExport
from ldm.training.config import TrainConfig
from ldm.training.distributed import full_model
from ldm.training.loss import validation_loss

logger = get_logger(__name__)


def validation_grid(
    pipe: LatentPipeline,
    config: TrainConfig,
    seed: int,
    sizes=None,
    controls=None,
    step_counts: tuple[int, ...] | None = None,
    guidance_scale: float | None = None,
):
    """A grid of the validation prompts (the pipeline's scheduler, guidance, fixed seed): one row per (width, height)
    in `sizes` (default: the square `resolution`) and step count in `step_counts` (default:
    `validation_inference_steps`), one image per prompt; at `guidance_scale` (default `validation_guidance_scale`).

    With `controls` (a ControlNet's control images, one per prompt) each prompt's control is sampled with it and
    shown beside its sample: one row per prompt and size, control | sample.
    """
    images, sizes = [], sizes or [(config.resolution, config.resolution)]
    rows = [(size, steps) for size in sizes for steps in step_counts or [config.validation_inference_steps]]
    guidance_scale = config.validation_guidance_scale if guidance_scale is None else guidance_scale
    for (width, height), steps in rows:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(config.validation_prompts))]
        samples = pipe(
            config.validation_prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            # With zero terminal SNR, guidance over-exposes unless rescaled (Lin et al. 2023, sec. 3.4, phi = 0.7).
            guidance_rescale=0.7 if config.rescale_betas_zero_snr else 0.0,
            generator=generators,
            height=height,
            width=width,
            **({} if controls is None else {"image": controls}),
        ).images
        if controls is None:
            images += samples
        else:
            for control, sample in zip(controls, samples, strict=True):
                images += [control.convert("RGB").resize(sample.size), sample]
    if controls is not None:
        return image_grid(images, cols=2)
    return image_grid(images, cols=len(config.validation_prompts) if len(rows) > 1 else None)


def validation_sizes(resolution: int, buckets: list | None) -> list[tuple[int, int]]:
    """The (width, height)s validation samples at: the square, and with aspect-ratio buckets also the fullest
    landscape and portrait buckets of the data."""
    sizes = [(resolution, resolution)]
    counts = Counter(bucket for bucket in buckets or [] if bucket is not None)
    for wide in (True, False):
        shaped = [bucket for bucket in counts if (bucket[0] > bucket[1]) == wide and bucket[0] != bucket[1]]
        if shaped:
            sizes.append(max(shaped, key=lambda bucket: (counts[bucket], bucket)))
    return sizes


def log_validation(
    accelerator, pipe, config: TrainConfig, seed: int, step: int, sizes=None, controls=None, **rows
) -> Path | None:
    """Save and log the validation grid (main process only; `rows`: `validation_grid`'s step_counts and
    guidance_scale); returns its path."""
    if not config.validation_prompts:
        return None
    grid = validation_grid(pipe, config, seed, sizes, controls, **rows)
    return save_grid(accelerator, grid, config, step, " | ".join(config.validation_prompts))


def save_grid(accelerator, grid, config: TrainConfig, step: int, caption: str = "") -> Path:
    """Save a validation grid as output_dir/validation/step-NNNNNN.png and log it to the run's trackers."""
    path = Path(config.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption=caption)}, step=step)
    return path


def validate(
    accelerator,
    model,
    export: PipelineExport,
    encoder,
    heldout_batch,
    noise_scheduler,
    config: TrainConfig,
    step,
    sizes=None,
    controls=None,
    **rows,
):
    """Validation loss and sample grid (at `sizes`, see `validation_sizes`) of the current weights (EMA when on),
    on the main process. `export` turns the trained model into a pipeline (`PipelineExport`, or a ControlNet's
    export, whose pipeline then samples the `controls`). Without a `heldout_batch` (a distillation's student has no
    denoising loss to compare) only the grid; `rows` are `validation_grid`'s step_counts and guidance_scale.

    A collective call (under FSDP the trained model is gathered first); returns ({"val_loss": ...}, grid path) on the main
    process and ({}, None) elsewhere.
    """
    trained = full_model(accelerator, model)
    if not accelerator.is_main_process:
        return {}, None
    logs, grid_path = {}, None
    # A failing validation is logged, never fatal: it must not cost the run (its checkpoint is already saved).
    try:
        pipe = export.pipeline(trained)
        # The pipeline's UNet is a plain fp32 module while the frozen encoders may run in half precision:
        # autocast reconciles them as it does in training.
        with accelerator.autocast():
            if heldout_batch is not None and len(heldout_batch["indices"]):
                logs["val_loss"] = validation_loss(
                    pipe.unet,
                    encoder,
                    heldout_batch,
                    noise_scheduler,
                    config.seed,
                    pipe.components.get("controlnet"),
                )
            grid_path = log_validation(accelerator, pipe, config, config.seed, step, sizes, controls, **rows)
    except Exception as err:
        logger.warning(f"Validation at step {step} failed ({type(err).__name__}: {err}); training goes on.")
    return logs, grid_path
