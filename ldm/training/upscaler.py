"""Training a x4 latent upscaler (SR3 in latent space, as Stable Diffusion's x4 upscaler): its options, its loss, its
validation grid and what its checkpoints and output folder hold.

Notation (SR3, Saharia et al. 2021; noise conditioning augmentation, Ho et al. 2021):
    x, x_0       a high-resolution image and its latents (B, C, H/f, W/f), f the VAE factor (4)
    y = D(x)     x downsampled f times with an antialiasing filter: (B, 3, H/f, W/f), the latents' size
    y_s          y noised to level s ~ U{0, ..., max_noise_level} by the low-res DDPM schedule, drawn per sample
    loss         || eps - eps_theta([x_t, y_s], t, text, class_label=s) ||^2     (t, eps as in `ldm.training.loss`)

The low-resolution input is made on the fly from the sample's own pixels (the data's image column read a second
time as its conditioning image, with the sample's crop and flip), so the latent cache holds only x_0 as for any
model. Training windows are random `crop_resolution` squares cut from x_0 and x alike (a step on whole images costs
(resolution / crop_resolution)^2 times more): the UNet is convolutional, and whole images at sampling time give each
window the context it had in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate.logging import get_logger
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from ldm.images import image_grid
from ldm.pipelines.upscale import UPSCALER_SCALING_FACTOR, LatentUpscalePipeline, downsample
from ldm.seeding import keyed_generator
from ldm.training.checkpoint import EXPORT_FOLDER, PipelineExport, save_pipeline
from ldm.training.config import PredictionType, TrainConfig, require
from ldm.training.distributed import full_model
from ldm.training.loss import diffusion_loss, sample_noise_and_timesteps
from ldm.training.transforms import random_windows
from ldm.training.validation import save_grid

logger = get_logger(__name__)

# The held-out images the validation grid upscales (its rows: low-res | bicubic | upscaled | target).
GRID_IMAGES = 4


@dataclass
class UpscalerTrainConfig(TrainConfig):
    """`train/train_upscaler.py`'s options: `TrainConfig`'s (data, cache, buckets, optimiser, EMA, checkpoints, Hub),
    with what an upscaler adds. `resolution` is the high-resolution side; the input is `resolution / f`.

    `pretrained_model_name_or_path` holds the VAE (a 4x factor for a x4 upscaler), the text encoder and tokenizer,
    and the UNet when fine-tuning an upscaler; `--unet_preset` builds a new UNet of that preset's shape instead.
    """

    # Levels of the low-res noise augmentation drawn in training (uniformly from 0 to this), and the highest a
    # sampler may ask for (the pipeline's max_noise_level; 350 in Stable Diffusion's upscaler).
    max_noise_level: int = 350
    # The side of the random square windows training cuts from each image (high-resolution pixels); None trains on
    # whole images.
    crop_resolution: int | None = None
    # The noise level the validation grid samples at (the pipeline's default).
    validation_noise_level: int = 20
    # v-prediction, as Stable Diffusion's x4 upscaler: with eps targets the demo's upscaler gave colours shifted
    # towards its training prior (cyan -> green; 24.3 dB), with v targets they follow the input (30.0 dB; README).
    prediction_type: PredictionType | None = "v_prediction"
    center_crop: bool = True
    tracker_project_name: str = "ldm-upscaler"
    output_dir: str = "ldm-upscaler"

    def validate(self) -> None:
        """`TrainConfig.validate`, then what an upscaler adds.

        Raises:
            ValueError: naming the first field or rule that is violated and how to fix it.
        """
        super().validate()
        for name, why in (
            ("lora_rank", "the whole upscaler UNet trains"),
            ("validation_prompts", "the grid upscales held-out images with their own captions"),
        ):
            require(getattr(self, name) is None, f"{name} is not an upscaler option: {why}; drop --{name}.")
        require(
            not self.export_single_file,
            "export_single_file writes a text-to-image checkpoint; an upscaler saves a pipeline folder. Drop "
            "--export_single_file.",
        )
        require(
            self.max_noise_level >= 0,
            f"max_noise_level must be >= 0 (350 in Stable Diffusion's upscaler); got {self.max_noise_level}.",
        )
        require(
            0 <= self.validation_noise_level <= self.max_noise_level,
            f"validation_noise_level={self.validation_noise_level} must be in [0, max_noise_level="
            f"{self.max_noise_level}].",
        )
        if self.crop_resolution is not None:
            require(
                0 < self.crop_resolution <= self.resolution and self.crop_resolution % 8 == 0,
                f"crop_resolution={self.crop_resolution} must be a multiple of 8 in (0, resolution={self.resolution}]"
                f" (e.g. {max(8, self.resolution // 4 // 8 * 8)}), or none to train on whole images.",
            )


def check_crop_fits(config: UpscalerTrainConfig, unet_levels: int, vae_factor: int) -> None:
    """A training window, in latents, must be divisible by the UNet's downsampling (2^(levels - 1))."""
    if config.crop_resolution is None:
        return
    step = vae_factor * 2 ** (unet_levels - 1)
    require(
        config.crop_resolution % step == 0,
        f"crop_resolution={config.crop_resolution} is not a multiple of {step} (the VAE's factor {vae_factor} times "
        f"the UNet's downsampling); try {max(step, config.crop_resolution // step * step)}.",
    )


def rescale_vae_latents(vae, scaling_factor: float = UPSCALER_SCALING_FACTOR):
    """Give `vae` the latent `scaling_factor` diffusers' upscaler imposes, without changing what it computes.

    With s the VAE's own factor and k = s / scaling_factor, the encoder's posterior mean and standard deviation are
    multiplied by k (its quant_conv's mean rows, and log k added twice to its log variance) and the decoder divides
    its input by k (post_quant_conv): the latents z' = k z scale to z' * scaling_factor = z * s, the same x_0 as
    before, and decode to the same images. Returns `vae`, changed in place.

    Raises:
        ValueError: the VAE has no quant convolutions or uses a latent shift (nothing to fold k into).
    """
    k = vae.config.scaling_factor / scaling_factor
    if k == 1.0:
        return vae
    require(
        vae.config.use_quant_conv and vae.config.use_post_quant_conv and vae.config.shift_factor is None,
        "The VAE cannot take diffusers' upscaler scaling factor: it has no quant convolutions, or shifts its latents.",
    )
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:channels] *= k
        vae.quant_conv.bias[:channels] *= k
        vae.quant_conv.bias[channels:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def upscaler_denoising_loss(
    unet,
    latents: torch.Tensor,
    low_res: torch.Tensor,
    text_embeds: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    levels: torch.Tensor,
    scheduler: DDPMScheduler,
    low_res_scheduler: DDPMScheduler,
    generator: torch.Generator,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """x_t from x_0; y_s from y (its noise from `generator`); UNet([x_t, y_s], t, text, s) -> `diffusion_loss`."""
    low_noise = torch.randn(low_res.shape, generator=generator).to(low_res)
    noised_low = low_res_scheduler.add_noise(low_res, low_noise, levels)  # (B, 3, h, w)
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
    dtype = next(unet.parameters()).dtype
    model_input = torch.cat([noisy, noised_low], dim=1).to(dtype)
    pred = unet(
        model_input,
        timesteps,
        encoder_hidden_states=text_embeds.to(dtype),
        class_labels=levels,
        return_dict=False,
    )[0]
    return diffusion_loss(pred, latents, noise, timesteps, scheduler, snr_gamma)


def upscaler_loss(
    unet,
    batch_encoder,
    batch: dict,
    scheduler: DDPMScheduler,
    low_res_scheduler: DDPMScheduler,
    config: UpscalerTrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One micro-batch's loss, every draw (VAE sample, window, eps, t, noise level, low-res noise) from the step's
    `generator`. The batch's "conditioning_pixel_values" are its images again, in [0, 1], cut as its latents were.

    A micro-batch whose every image was unreadable gives a zero loss that still touches every parameter, so all
    processes run the same backward pass and stay in step.
    """
    if len(batch["indices"]) == 0:
        return sum(p.sum() for p in unet.parameters()) * 0.0
    latents, text_embeds = batch_encoder(batch, generator)  # (B, C, h, w), (B, 77, D)
    pixels = batch["conditioning_pixel_values"].to(latents.device, latents.dtype) * 2 - 1  # (B, 3, H, W)
    factor = pixels.shape[-1] // latents.shape[-1]
    if config.crop_resolution is not None:
        latents, pixels = random_windows(generator, config.crop_resolution // factor, latents, pixels)
    noise, timesteps = sample_noise_and_timesteps(
        latents,
        scheduler.config.num_train_timesteps,
        generator,
        config.noise_offset,
        config.timestep_sampling,
    )
    levels = torch.randint(0, config.max_noise_level + 1, (len(latents),), generator=generator).to(
        latents.device
    )
    return upscaler_denoising_loss(
        unet, latents, downsample(pixels, factor), text_embeds, noise, timesteps, levels, scheduler,
        low_res_scheduler, generator, config.snr_gamma,
    )  # fmt: skip


@torch.no_grad()
def upscaler_validation_loss(
    unet, batch_encoder, batch: dict, scheduler, low_res_scheduler, config: UpscalerTrainConfig
) -> float:
    """Loss on the fixed held-out batch, whole images, with fixed eps, evenly spaced t and noise levels: comparable
    across steps."""
    generator = keyed_generator(config.seed, 2**31 - 1)
    latents, text_embeds = batch_encoder(batch, generator, drop_captions=False)
    pixels = batch["conditioning_pixel_values"].to(latents) * 2 - 1
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = (
        torch.linspace(0, scheduler.config.num_train_timesteps - 1, len(latents)).long().to(latents.device)
    )
    levels = torch.linspace(0, config.max_noise_level, len(latents)).long().to(latents.device)
    factor = pixels.shape[-1] // latents.shape[-1]
    return upscaler_denoising_loss(
        unet, latents, downsample(pixels, factor), text_embeds, noise, timesteps, levels, scheduler,
        low_res_scheduler, generator,
    ).item()  # fmt: skip


def to_pil(pixels: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(np.ascontiguousarray(one)) for one in array]


def upscale_grid(pipe: LatentUpscalePipeline, batch: dict, config: UpscalerTrainConfig) -> PIL.Image.Image:
    """Up to `GRID_IMAGES` held-out images, one row each: low-res (pixels enlarged) | bicubic | upscaled | target."""
    targets = batch["conditioning_pixel_values"][:GRID_IMAGES] * 2 - 1  # (n, 3, H, W)
    low = to_pil(downsample(targets, pipe.vae_scale_factor))
    upscaled = pipe(
        list(batch["captions"][: len(low)]),
        image=low,
        num_inference_steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        noise_level=config.validation_noise_level,
        generator=[torch.Generator().manual_seed(config.seed + i) for i in range(len(low))],
    ).images
    cells = []
    for small, big, target in zip(low, upscaled, to_pil(targets), strict=True):
        size = target.size
        resample = PIL.Image.Resampling
        cells += [small.resize(size, resample.NEAREST), small.resize(size, resample.BICUBIC), big, target]
    return image_grid(cells, cols=4)


@dataclass
class UpscalerExport(PipelineExport):
    """`PipelineExport` (frozen parts, EMA shadow) with the low-res schedule, to make a `LatentUpscalePipeline`."""

    low_res_scheduler: DDPMScheduler | None = None
    max_noise_level: int = 350

    def pipeline(self, trained_unet: UNet2DConditionModel) -> LatentUpscalePipeline:
        """A LatentUpscalePipeline on the trained weights (EMA weights when EMA is on), with DDIM sampling."""
        unet = super().pipeline(trained_unet).unet
        pipe = LatentUpscalePipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            low_res_scheduler=self.low_res_scheduler,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            max_noise_level=self.max_noise_level,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, trained_unet: UNet2DConditionModel, config: TrainConfig, folder: Path) -> str:
        """Write the upscaler pipeline (EMA weights when EMA is on) into `folder`; returns its subfolder."""
        save_pipeline(self.pipeline(trained_unet), folder / EXPORT_FOLDER[False])
        return EXPORT_FOLDER[False]


def validate_upscaler(
    accelerator, model, export: UpscalerExport, encoder, heldout_batch, config: UpscalerTrainConfig, step: int
):
    """Validation loss on the held-out batch and the grid of its first images upscaled (EMA weights when on), on
    the main process. A collective call; returns ({"val_loss": ...}, grid path) on the main process, ({}, None)
    elsewhere. A failing validation is logged, never fatal: its checkpoint is already saved."""
    trained = full_model(accelerator, model)
    if not accelerator.is_main_process:
        return {}, None
    logs, grid_path = {}, None
    try:
        pipe = export.pipeline(trained)
        with accelerator.autocast():
            if len(heldout_batch["indices"]):
                logs["val_loss"] = upscaler_validation_loss(
                    pipe.unet,
                    encoder,
                    heldout_batch,
                    export.noise_scheduler,
                    export.low_res_scheduler,
                    config,
                )
                grid_path = save_grid(accelerator, upscale_grid(pipe, heldout_batch, config), config, step)
    except Exception as err:
        logger.warning(f"Validation at step {step} failed ({type(err).__name__}: {err}); training goes on.")
    return logs, grid_path


def upscaler_model_card(config: UpscalerTrainConfig, repo_id: str, grid_name: str | None) -> str:
    """README.md of an upscaler folder: what it does, how it was trained and how to run it after a base model."""
    settings = {
        k: getattr(config, k)
        for k in (
            "pretrained_model_name_or_path", "unet_preset", "resolution", "crop_resolution", "max_noise_level",
            "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "caption_dropout", "use_ema",
            "seed",
        )
    }  # fmt: skip
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: image-to-image",
        "tags: [ldm, super-resolution, upscaler]",
        "---",
        f"# {repo_id}",
        "",
        f"A x4 latent upscaler trained with ldm's `train/train_upscaler.py` on {config.resolution} px images: it "
        f"takes a {config.resolution // 4} px image and a prompt and returns the image 4x larger.",
        "",
        "```python",
        "from ldm import LatentUpscalePipeline",
        f'pipe = LatentUpscalePipeline.from_pretrained("{repo_id}")',
        'image = pipe("a red circle on the left", image=low_res, noise_level=20).images[0]',
        "```",
        "",
        "It loads in stock diffusers too, as `StableDiffusionUpscalePipeline`. Cascade after a base model with "
        '`ldm-generate --model BASE --upscaler THIS "prompt"`.',
        "",
        "## Training settings",
        "",
        *[f"- {k}: {v}" for k, v in settings.items()],
    ]
    if grid_name:
        lines += [
            "",
            "## Validation (low-res | bicubic | upscaled | target)",
            "",
            f"![validation]({grid_name})",
        ]
    return "\n".join(lines) + "\n"
