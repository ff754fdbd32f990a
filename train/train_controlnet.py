"""Train a ControlNet for a latent diffusion model: the UNet, VAE and text encoder frozen, with Accelerate.

    accelerate launch train/train_controlnet.py --config configs/controlnet_demo.yaml [--key value ...]

Setup -> load the frozen VAE, text encoder and UNet, copy the UNet's encoder into a ControlNet (zero convolutions)
-> data (images, captions, control images) -> accelerator.prepare -> the shared step loop (latents, noise,
timesteps, add_noise, ControlNet residuals into the frozen UNet, loss, backward, step, EMA) -> log / validate /
checkpoint -> save the ControlNet.

The flag names are those of diffusers' `examples/controlnet/train_controlnet.py` where the feature is shared
(`--controlnet_model_name_or_path`, `--conditioning_image_column`, `--proportion_empty_prompts`,
`--validation_image`, ...); every guarantee of `train_ldm.py` holds (start-up checks, run lock and fingerprint,
verified checkpoints without pickle, exact resume, latent cache, EMA, several processes, Hub push).
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from diffusers import ControlNetModel, UNet2DConditionModel

from ldm.checks import check_components_fit, check_local_or_hub
from ldm.training.bucketing import bucket_data, bucket_spec_for
from ldm.training.checkpoint import push_output_folder, resume, save_checkpoint, write_run_files
from ldm.training.config import load_config
from ldm.training.controlnet import (
    ControlNetExport,
    ControlNetTrainConfig,
    build_controlnet,
    check_controlnet_source,
    controlnet_model_card,
    load_validation_controls,
)
from ldm.training.distributed import finish, use_gloo_without_cuda, weight_dtype_for
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.loop import train_loop
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

PROG = "train_controlnet.py"


# ----------------------------------------------------------------------------- setup helpers


def check_startup(config: ControlNetTrainConfig) -> list | None:
    """What can be checked before any model loads; returns the validation control images."""
    check_run_sources(config)
    if config.controlnet_model_name_or_path:
        check_local_or_hub(config.controlnet_model_name_or_path, "controlnet_model_name_or_path")
        check_controlnet_source(config)
    return load_validation_controls(config)


def check_distributed(accelerator: Accelerator) -> None:
    """DeepSpeed would hold the ControlNet in half precision beside the fp32 frozen UNet, outside autocast."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "ControlNet training runs under DDP (or one process) here, not DeepSpeed: launch with "
            "configs/accelerate/multi_gpu_ddp.yaml (the ControlNet is a third of the UNet's size)."
        )


def load_frozen_unet(config: ControlNetTrainConfig, text_encoder, vae, accelerator) -> UNet2DConditionModel:
    """The base model's UNet, frozen: the ControlNet's residuals steer it, its own weights never change.

    It stays in fp32 like the ControlNet, and its forward runs under the run's autocast as the prepared
    ControlNet's does (accelerate autocasts only what it prepares): under mixed precision its convolutions compute
    in half precision all the same, while half-precision weights would meet fp32 norm inputs, which torch refuses
    on the CPU. Gradients flow through it to the residuals.
    """
    unet = UNet2DConditionModel.from_pretrained(
        config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
    )
    check_components_fit(unet, text_encoder, vae, source=config.pretrained_model_name_or_path)
    unet.requires_grad_(False).to(accelerator.device)
    unet.forward = accelerator.autocast()(unet.forward)
    return unet


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv, ControlNetTrainConfig)
        controls = check_startup(config)
        spec = bucket_spec_for(config)
        use_gloo_without_cuda()
        accelerator = make_accelerator(config)
        check_distributed(accelerator)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    # The data, noise and caption-dropout draws all derive from this seed; recording it makes the run resumable.
    seed = resolve_seed_and_workers(config)
    # Data first (images, captions and control images), checked before any model loads.
    try:
        resume_path = claim_run(accelerator, config)
        train_dataset, heldout_batch, data_hash, fingerprint = load_data(
            accelerator, config, resume_path, config.conditioning_image_column
        )
        train_dataset, buckets = bucket_data(accelerator, train_dataset, spec, config)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"{PROG}: {err}") from None

    # Models: frozen VAE, text encoder and UNet; the ControlNet to train (and its EMA shadow).
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(
        config, accelerator.device, weight_dtype_for(accelerator)
    )
    unet = load_frozen_unet(config, text_encoder, vae, accelerator)
    try:
        controlnet = build_controlnet(config, unet, vae.config)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    ema = prepare_trained_model(controlnet, config, accelerator, frozen=(unet,))
    export = ControlNetExport(vae, text_encoder, tokenizer, noise_scheduler, unet, ema)

    # Batches: target latents from the latent cache (or live); control images decoded with each sample's crop.
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    loader, encoder = make_loader(accelerator, train_dataset, live_encoder, config, data_hash)

    # Optimisation: AdamW over the ControlNet alone, and the LR schedule.
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, controlnet.parameters(), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    controlnet, optimizer, lr_scheduler = loader.prepare(accelerator, controlnet, optimizer, lr_scheduler)
    uploader = prepare_tracking(accelerator, config)

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema)

    # The loop: the shared step loop, handed the ControlNet's loss, its checkpoint and its validation.
    def controlnet_loss(batch: dict, epoch: int, generator: torch.Generator) -> torch.Tensor:
        encoder.set_epoch(epoch)
        return training_loss(unet, encoder, batch, noise_scheduler, config, generator, controlnet)

    def checkpoint(position) -> None:
        save_checkpoint(accelerator, config, position, controlnet, export, uploader, fingerprint)

    def validation(step: int):
        return validate(
            accelerator, controlnet, export, live_encoder, heldout_batch, noise_scheduler, config, step,
            validation_sizes(config.resolution, buckets), controls,
        )  # fmt: skip

    with stopping_in_one_line(PROG):
        result = train_loop(
            accelerator, config, loader, controlnet, optimizer, lr_scheduler, start, controlnet_loss, checkpoint,
            validation, ema,
        )  # fmt: skip

    # Save the ControlNet (EMA weights when EMA is on) as a ControlNetModel folder, as diffusers' script does.
    def save(trained: ControlNetModel, stats: dict) -> None:
        export.controlnet(trained).save_pretrained(config.output_dir)
        repo_id = config.hub_model_id or Path(config.output_dir).name
        write_run_files(
            config, result.grid_path, stats, lambda grid: controlnet_model_card(config, repo_id, grid)
        )
        push_output_folder(config)

    finish_run(accelerator, controlnet, result, uploader, save, isinstance(encoder, CachedBatchEncoder))
    finish(accelerator)


if __name__ == "__main__":
    main()
