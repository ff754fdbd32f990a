"""Distil a latent diffusion model into a latent consistency model (LCM) or an LCM-LoRA, with Accelerate.

    accelerate launch train/train_lcm.py --config configs/lcm_demo.yaml [--key value ...]

Setup -> load the frozen VAE, text encoder and teacher UNet, build the student (a copy with a guidance-scale
embedding, or a LoRA on the teacher) and its target network -> data (the teacher's own: x_0 latents and captions,
from its latent cache) -> accelerate.prepare -> the shared step loop (solver index n, eps, w -> z_{t_{n+k}} -> the
student's consistency function; the guided teacher's DDIM step to t_n -> the target's; loss, backward, step, target
EMA) -> log / validate at 1, 2, 4 and 8 steps / checkpoint -> save the pipeline or the LoRA.

The flag names are those of diffusers' `train_lcm_distill_sd_wds.py` and `train_lcm_distill_lora_sd_wds.py`
(`--pretrained_teacher_model`, `--num_ddim_timesteps`, `--w_min`, `--w_max`, `--loss_type`, `--huber_c`,
`--ema_decay`, `--unet_time_cond_proj_dim`, `--timestep_scaling_factor`, `--lora_rank`); every guarantee of
`train_ldm.py` holds (start-up checks, run lock and fingerprint, verified checkpoints without pickle, exact resume,
latent cache, several processes, Hub push).
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm.checks import check_components_fit
from ldm.encoding import encode_text
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
from ldm.training.lcm import (
    VALIDATION_STEPS,
    DDIMSolver,
    Distillation,
    LCMExport,
    LCMTrainConfig,
    build_student,
    frozen_copy,
    lcm_model_card,
    target_network,
)
from ldm.training.loop import train_loop
from ldm.training.lora import add_lora, check_lora_rank, save_lora, trainable_parameters
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
from ldm.training.validation import validate

PROG = "train_lcm.py"


# ----------------------------------------------------------------------------- setup helpers


def check_startup(config: LCMTrainConfig) -> None:
    """What can be checked before any model loads: trackers, the data files, the teacher's location, the rank."""
    check_run_sources(config)
    if config.lora_rank is not None:
        check_lora_rank(config)


def load_teacher(config: LCMTrainConfig, text_encoder, vae, accelerator) -> UNet2DConditionModel:
    """The teacher's UNet, checked against the text encoder and VAE (a LoRA run trains an adapter on it)."""
    teacher = UNet2DConditionModel.from_pretrained(
        config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
    )
    check_components_fit(teacher, text_encoder, vae, source=config.pretrained_model_name_or_path)
    return teacher


def autocast_frozen(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Freeze a module that only runs forward passes inside the loss (the full run's teacher and target), on the
    run's device and under its autocast, which accelerate gives only to what it prepares."""
    module.requires_grad_(False).eval().to(accelerator.device)
    module.forward = accelerator.autocast()(module.forward)
    return module


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv, LCMTrainConfig)
        check_startup(config)
        spec = bucket_spec_for(config)
        use_gloo_without_cuda()
        accelerator = make_accelerator(config)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    # The data, noise, solver-index and guidance draws all derive from this seed; recording it makes the run resumable.
    seed = resolve_seed_and_workers(config)
    # Data first (the teacher's images and captions), checked before any model loads.
    try:
        resume_path = claim_run(accelerator, config)
        train_dataset, heldout_batch, data_hash, fingerprint = load_data(accelerator, config, resume_path)
        train_dataset, buckets = bucket_data(accelerator, train_dataset, spec, config)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"{PROG}: {err}") from None

    # Models: frozen VAE, text encoder and teacher; the student (a copy with a w embedding, or a LoRA on the
    # teacher itself) and, in full mode, its target network (the student's EMA).
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(
        config, accelerator.device, weight_dtype_for(accelerator)
    )
    teacher = load_teacher(config, text_encoder, vae, accelerator)
    if config.lora_rank is None:
        student = build_student(teacher, config)
        target = autocast_frozen(frozen_copy(student), accelerator)
        autocast_frozen(teacher, accelerator)
        ema = target_network(student, config, accelerator.device)
    else:
        add_lora(teacher, config)
        student, target, ema = teacher, None, None
    prepare_trained_model(student, config, accelerator)
    export = LCMExport(vae, text_encoder, tokenizer, noise_scheduler, config, ema)
    uncond_embeds = encode_text(tokenizer, text_encoder, [""]).to(accelerator.device)  # (1, L, D)

    # Batches: x_0 latents and caption embeddings from the latent cache (or live).
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    loader, encoder = make_loader(accelerator, train_dataset, live_encoder, config, data_hash)

    # Optimisation: AdamW over the student (or the adapter), and the LR schedule.
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, trainable_parameters(student), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    prepared, optimizer, lr_scheduler = loader.prepare(accelerator, student, optimizer, lr_scheduler)
    uploader = prepare_tracking(accelerator, config)

    # Resume: optimizer, LR schedule, target network, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema)

    # The loop: the shared step loop, handed the distillation loss, its checkpoint and its validation.
    distillation = Distillation(
        prepared, teacher, target, ema, DDIMSolver.for_schedule(noise_scheduler.alphas_cumprod, config.num_ddim_timesteps),
        noise_scheduler, uncond_embeds, config,
    )  # fmt: skip

    def lcm_loss(batch: dict, epoch: int, generator: torch.Generator) -> torch.Tensor:
        encoder.set_epoch(epoch)
        if len(batch["indices"]) == 0:  # every image unreadable: a zero loss that keeps processes in step
            return sum(p.sum() for p in trainable_parameters(prepared)) * 0.0
        latents, text_embeds = encoder(batch, generator)  # (B, C, h, w), (B, L, D)
        return distillation.loss(latents, text_embeds, generator)

    def checkpoint(position) -> None:
        save_checkpoint(accelerator, config, position, prepared, export, uploader, fingerprint)

    def validation(step: int):
        # An LCM-LoRA has no guidance embedding: it samples at guidance 1 (its guidance is distilled in).
        guidance = 1.0 if config.lora_rank is not None else config.validation_guidance_scale
        return validate(
            accelerator, prepared, export, live_encoder, None, noise_scheduler, config, step,
            step_counts=VALIDATION_STEPS, guidance_scale=guidance,
        )  # fmt: skip

    with stopping_in_one_line(PROG):
        result = train_loop(
            accelerator, config, loader, prepared, optimizer, lr_scheduler, start, lcm_loss, checkpoint,
            validation, ema,
        )  # fmt: skip

    # Save the distilled pipeline (the target network's weights, LCM scheduler) or the LCM-LoRA's two files.
    def save(trained: UNet2DConditionModel, stats: dict) -> None:
        out = Path(config.output_dir)
        if config.lora_rank is None:
            save_pipeline(export.pipeline(trained), out)
        else:
            save_lora(trained, config, out)
        repo_id = config.hub_model_id or out.resolve().name
        write_run_files(config, result.grid_path, stats, lambda grid: lcm_model_card(config, repo_id, grid))
        push_output_folder(config)

    finish_run(accelerator, prepared, result, uploader, save, isinstance(encoder, CachedBatchEncoder))
    finish(accelerator)


if __name__ == "__main__":
    main()
