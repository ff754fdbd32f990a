"""Train a x4 latent upscaler (Stable Diffusion's x4 upscaler structure) on high-resolution images, with Accelerate.

    accelerate launch train/train_upscaler.py --config configs/upscale_demo.yaml [--key value ...]

Setup -> load the frozen VAE (4x) and text encoder, build or load the upscaler UNet -> data (each image also read
as its own conditioning image) -> accelerator.prepare -> the shared step loop (latents, a random window, the image
downsampled 4x and noised at a random level, noise, timesteps, add_noise, loss, backward, step, EMA) -> log /
validate (low-res | bicubic | upscaled | target) / checkpoint -> save the upscaler pipeline.

Every guarantee of `train_ldm.py` holds (start-up checks, run lock and fingerprint, verified checkpoints without
pickle, exact resume, latent cache, EMA, several processes, Hub push). Every random draw of a step is a function of
the seed and the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm.checks import check_components_fit, check_upscale_fits
from ldm.encoding import vae_scale_factor
from ldm.pipelines.upscale import UPSCALER_SCALING_FACTOR
from ldm.presets import get_preset, upscaler_schedulers, upscaler_unet_config
from ldm.training.bucketing import bucket_data, bucket_spec_for
from ldm.training.checkpoint import (
    push_output_folder,
    resume,
    save_checkpoint,
    save_pipeline,
    write_run_files,
)
from ldm.training.config import load_config
from ldm.training.distributed import finish, use_gloo_without_cuda, weight_dtype_for
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.loop import train_loop
from ldm.training.run import (
    check_run_sources,
    claim_run,
    finish_run,
    load_data,
    load_frozen_models,
    make_accelerator,
    make_loader,
    make_lr_scheduler,
    make_optimizer,
    prepare_tracking,
    prepare_trained_model,
    resolve_seed_and_workers,
    stopping_in_one_line,
)
from ldm.training.upscaler import (
    UpscalerExport,
    UpscalerTrainConfig,
    check_crop_fits,
    rescale_vae_latents,
    upscaler_loss,
    upscaler_model_card,
    validate_upscaler,
)

PROG = "train_upscaler.py"


# ----------------------------------------------------------------------------- setup helpers


def check_startup(config: UpscalerTrainConfig) -> None:
    """What can be checked before any model loads: the data and base locations, and that a training window fits
    the VAE's factor and the UNet's downsampling (read from their configs, not their weights)."""
    check_run_sources(config)
    base = config.pretrained_model_name_or_path
    vae_config = (
        AutoencoderKL.load_config(config.pretrained_vae_model_name_or_path)
        if config.pretrained_vae_model_name_or_path
        else AutoencoderKL.load_config(base, subfolder="vae", revision=config.revision)
    )
    unet_config = (
        get_preset(config.unet_preset)["unet"]
        if config.unet_preset
        else UNet2DConditionModel.load_config(base, subfolder="unet", revision=config.revision)
    )
    check_crop_fits(config, len(unet_config["block_out_channels"]), vae_scale_factor(vae_config))


def load_unet(config: UpscalerTrainConfig, text_encoder: CLIPTextModel, vae) -> UNet2DConditionModel:
    """The upscaler UNet to train: a preset's shape built for upscaling (latents + image in, the noise level as
    class label), or the one in the pretrained upscaler pipeline."""
    if config.unet_preset:
        return UNet2DConditionModel(
            **upscaler_unet_config(
                config.unet_preset,
                text_encoder.config.hidden_size,
                vae.config.latent_channels,
                sample_size=config.resolution // vae_scale_factor(vae.config),
            )
        )
    return UNet2DConditionModel.from_pretrained(
        config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
    )


def load_low_res_scheduler(config: UpscalerTrainConfig) -> DDPMScheduler:
    """The pretrained upscaler's low-res schedule when it has one, else Stable Diffusion's upscaler's."""
    try:
        return DDPMScheduler.from_pretrained(
            config.pretrained_model_name_or_path, subfolder="low_res_scheduler", revision=config.revision
        )
    except OSError:
        return upscaler_schedulers()[0]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv, UpscalerTrainConfig)
        check_startup(config)
        spec = bucket_spec_for(config)
        use_gloo_without_cuda()
        accelerator = make_accelerator(config)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    # The data, window, noise and caption-dropout draws all derive from this seed; recording it makes the run
    # resumable.
    seed = resolve_seed_and_workers(config)
    # Data first (each image read twice: as the target, and as the source of its low-resolution input), checked
    # before any model loads.
    try:
        resume_path = claim_run(accelerator, config)
        train_dataset, heldout_batch, data_hash, fingerprint = load_data(
            accelerator, config, resume_path, config.image_column
        )
        train_dataset, buckets = bucket_data(accelerator, train_dataset, spec, config)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"{PROG}: {err}") from None

    # Models: frozen VAE (its latents scaled as diffusers' upscaler expects) and text encoder; the UNet to train.
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(
        config, accelerator.device, weight_dtype_for(accelerator)
    )
    low_res_scheduler = load_low_res_scheduler(config)
    try:
        vae = rescale_vae_latents(vae, UPSCALER_SCALING_FACTOR)
        unet = load_unet(config, text_encoder, vae)
        check_components_fit(unet, text_encoder, vae, config.pretrained_model_name_or_path, (3,))
        check_upscale_fits(unet, vae, config.max_noise_level)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    ema_unet = prepare_trained_model(unet, config, accelerator)
    export = UpscalerExport(
        vae,
        text_encoder,
        tokenizer,
        noise_scheduler,
        ema_unet,
        False,
        low_res_scheduler,
        config.max_noise_level,
    )

    # Batches: target latents from the latent cache (or live); the images decoded with each sample's crop.
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    loader, encoder = make_loader(accelerator, train_dataset, live_encoder, config, data_hash)

    # Optimisation: AdamW and the LR schedule; accelerate wraps them with the UNet and the data.
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, unet.parameters(), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    unet, optimizer, lr_scheduler = loader.prepare(accelerator, unet, optimizer, lr_scheduler)
    uploader = prepare_tracking(accelerator, config)

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema_unet)

    # The loop: the shared step loop, handed the upscaler's loss, its checkpoint and its validation.
    def loss(batch: dict, epoch: int, generator: torch.Generator) -> torch.Tensor:
        encoder.set_epoch(epoch)
        return upscaler_loss(unet, encoder, batch, noise_scheduler, low_res_scheduler, config, generator)

    def checkpoint(position) -> None:
        save_checkpoint(accelerator, config, position, unet, export, uploader, fingerprint)

    def validation(step: int):
        return validate_upscaler(accelerator, unet, export, live_encoder, heldout_batch, config, step)

    with stopping_in_one_line(PROG):
        result = train_loop(
            accelerator, config, loader, unet, optimizer, lr_scheduler, start, loss, checkpoint, validation,
            ema_unet,
        )  # fmt: skip

    # Save the upscaler pipeline (EMA weights when EMA is on), its model card and run files.
    def save(trained: UNet2DConditionModel, stats: dict) -> None:
        save_pipeline(export.pipeline(trained), Path(config.output_dir))
        repo_id = config.hub_model_id or Path(config.output_dir).name
        write_run_files(
            config, result.grid_path, stats, lambda grid: upscaler_model_card(config, repo_id, grid)
        )
        push_output_folder(config)

    finish_run(accelerator, unet, result, uploader, save, isinstance(encoder, CachedBatchEncoder))
    finish(accelerator)


if __name__ == "__main__":
    main()
