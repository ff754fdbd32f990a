"""Train a latent diffusion UNet on frozen-VAE latents and frozen CLIP text, with Accelerate.

    accelerate launch train/train_ldm.py --config configs/tiny.yaml [--key value ...]

Setup -> load the frozen VAE and text encoder, build or load the UNet -> data -> accelerator.prepare ->
loop (latents, noise, timesteps, add_noise, loss, backward, step, EMA) -> log / validate / checkpoint -> save.
The step loop is the one every trainer shares (`ldm.training.loop.train_loop`); this script hands it the UNet,
its loss and what a checkpoint and the final folder hold.

Every random draw of a step (crop, flip, caption choice, caption dropout, VAE sample, noise, timesteps) is a pure
function of the seed and the sample/step index, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm.checks import check_components_fit
from ldm.encoding import vae_scale_factor
from ldm.presets import build_unet, get_preset
from ldm.single_file import check_sources
from ldm.training.bucketing import bucket_data, bucket_spec_for
from ldm.training.checkpoint import PipelineExport, resume, save_checkpoint, save_final
from ldm.training.config import TrainConfig, load_config
from ldm.training.distributed import finish, use_gloo_without_cuda, weight_dtype_for
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.loop import train_loop
from ldm.training.lora import add_lora, check_lora_rank, trainable_parameters
from ldm.training.loss import training_loss
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
from ldm.training.validation import validate, validation_sizes

# ----------------------------------------------------------------------------- setup helpers


def check_startup(config: TrainConfig) -> None:
    """What can be checked before any model loads: trackers, the data files, the base model's location."""
    check_run_sources(config)
    if config.lora_rank is not None:
        check_lora_rank(config)
    # The single-file layout fits SD 1.x's structure only: know it before training (a Hub base: at the final save).
    if config.export_single_file:
        base = Path(config.pretrained_model_name_or_path)
        check_sources(
            config.unet_preset and get_preset(config.unet_preset)["unet"],
            base / "unet",
            config.pretrained_vae_model_name_or_path or base / "vae",
        )


def load_unet(config: TrainConfig, text_encoder: CLIPTextModel, vae: AutoencoderKL) -> UNet2DConditionModel:
    """The UNet to train: a preset built from scratch, or the one in the pretrained pipeline (frozen, with a LoRA
    adapter to train, in a LoRA run)."""
    if config.unet_preset:
        unet = build_unet(
            config.unet_preset,
            cross_attention_dim=text_encoder.config.hidden_size,
            sample_size=config.resolution // vae_scale_factor(vae.config),
        )
    else:
        unet = UNet2DConditionModel.from_pretrained(
            config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
        )
    check_components_fit(unet, text_encoder, vae, source=config.pretrained_model_name_or_path)
    if config.lora_rank is not None:
        add_lora(unet, config)
    return unet


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv)
        check_startup(config)
        spec = bucket_spec_for(config)
        use_gloo_without_cuda()
        accelerator = make_accelerator(config)
    except ValueError as err:
        raise SystemExit(f"train_ldm.py: {err}") from None
    # The data, noise and caption-dropout draws all derive from this seed; recording it makes the run resumable.
    seed = resolve_seed_and_workers(config)
    # Data first, so that every caption and the data's contents are checked before any model loads.
    try:
        resume_path = claim_run(accelerator, config)
        train_dataset, heldout_batch, data_hash, fingerprint = load_data(accelerator, config, resume_path)
        train_dataset, buckets = bucket_data(accelerator, train_dataset, spec, config)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"train_ldm.py: {err}") from None

    # Models: frozen VAE and text encoder, the UNet to train (and its EMA shadow).
    dtype = weight_dtype_for(accelerator)
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(config, accelerator.device, dtype)
    unet = load_unet(config, text_encoder, vae)
    ema_unet = prepare_trained_model(unet, config, accelerator)
    export = PipelineExport(
        vae, text_encoder, tokenizer, noise_scheduler, ema_unet, lora=config.lora_rank is not None
    )

    # Batches: from the latent cache (encoded once, reused across runs) or live through the frozen encoders.
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    loader, encoder = make_loader(accelerator, train_dataset, live_encoder, config, data_hash)

    # Optimisation: AdamW and the LR schedule; accelerate wraps them with the UNet and the data.
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, trainable_parameters(unet), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    unet, optimizer, lr_scheduler = loader.prepare(accelerator, unet, optimizer, lr_scheduler)
    uploader = prepare_tracking(accelerator, config)

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema_unet)

    # The loop: the shared step loop, handed the UNet's loss, its checkpoint and its validation.
    def unet_loss(batch: dict, epoch: int, generator: torch.Generator) -> torch.Tensor:
        encoder.set_epoch(epoch)
        return training_loss(unet, encoder, batch, noise_scheduler, config, generator)

    def checkpoint(position) -> None:
        save_checkpoint(accelerator, config, position, unet, export, uploader, fingerprint)

    def validation(step: int):
        return validate(
            accelerator, unet, export, live_encoder, heldout_batch, noise_scheduler, config, step,
            validation_sizes(config.resolution, buckets),
        )  # fmt: skip

    with stopping_in_one_line("train_ldm.py"):
        result = train_loop(
            accelerator, config, loader, unet, optimizer, lr_scheduler, start, unet_loss, checkpoint, validation,
            ema_unet,
        )  # fmt: skip

    # Save the final pipeline (EMA weights when EMA is on).
    def save(trained: UNet2DConditionModel, stats: dict) -> None:
        save_final(accelerator, config, export.pipeline(trained), result.grid_path, stats)

    finish_run(accelerator, unet, result, uploader, save, isinstance(encoder, CachedBatchEncoder))
    finish(accelerator)


if __name__ == "__main__":
    main()
