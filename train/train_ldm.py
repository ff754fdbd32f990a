"""Train a latent diffusion UNet on frozen-VAE latents and frozen CLIP text, with Accelerate.

    accelerate launch train/train_ldm.py --config configs/tiny.yaml [--key value ...]

Setup -> load the frozen VAE and text encoder, build or load the UNet -> data -> accelerator.prepare ->
loop (latents, noise, timesteps, add_noise, loss, backward, step, EMA) -> log / validate / checkpoint -> save.

Every random draw of a step (crop, flip, caption choice, caption dropout, VAE sample, noise, timesteps) is a pure
function of the seed and the sample/step index, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import math
import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.checks import check_components_fit, check_local_or_hub
from ldm.encoding import vae_scale_factor
from ldm.presets import build_unet, get_preset, sd_scheduler
from ldm.seeding import keyed_generator
from ldm.single_file import check_sources
from ldm.training.bucketing import bucket_data, bucket_spec_for
from ldm.training.buckets import BucketBatchSampler
from ldm.training.checkpoint import (
    CheckpointUploader,
    PipelineExport,
    TrainingPosition,
    complete_checkpoints,
    resolve_resume_path,
    resume,
    save_checkpoint,
    save_final,
)
from ldm.training.config import TrainConfig, load_config
from ldm.training.data import (
    TrainDataset,
    TrainLoader,
    build_train_and_heldout,
    collate_fn,
    default_num_workers,
)
from ldm.training.distributed import (
    check_replicas_in_sync,
    finish,
    full_unet,
    setup_logging,
    total_over_processes,
    use_gloo_without_cuda,
    weight_dtype_for,
)
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.guards import check_same_run, claim_output_dir, lock_output_dir, run_fingerprint
from ldm.training.latent_cache import CachedIndexDataset, build_cache
from ldm.training.lora import add_lora, trainable_parameters
from ldm.training.loss import training_loss
from ldm.training.sources import check_data_files
from ldm.training.validation import validate, validation_sizes

logger = get_logger(__name__)
NUM_VALIDATION_LOSS_SAMPLES = 8


# ----------------------------------------------------------------------------- setup helpers


def check_trackers(report_to: str) -> None:
    """Fail at start-up when a requested tracker is not installed (accelerate would silently log nothing)."""
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(
        report_to, []
    )
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"train_ldm.py: --report_to {report_to} needs {', '.join(missing)}, which is not installed; "
            'pip install "ldm[tracking]", or pass --report_to none.'
        )


def check_startup(config: TrainConfig) -> None:
    """What can be checked before any model loads: trackers, the data files, the base model's location."""
    check_trackers(config.report_to)
    check_data_files(config)
    check_local_or_hub(config.pretrained_model_name_or_path, "pretrained_model_name_or_path")
    if config.pretrained_vae_model_name_or_path:
        check_local_or_hub(config.pretrained_vae_model_name_or_path, "pretrained_vae_model_name_or_path")
    # The single-file layout fits SD 1.x's structure only: know it before training (a Hub base: at the final save).
    if config.export_single_file:
        base = Path(config.pretrained_model_name_or_path)
        check_sources(
            config.unet_preset and get_preset(config.unet_preset)["unet"],
            base / "unet",
            config.pretrained_vae_model_name_or_path or base / "vae",
        )


def claim_run(accelerator: Accelerator, config: TrainConfig) -> Path | None:
    """Lock the output folder for this run and find the checkpoint to resume, if any."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_output_dir(output_dir)
    accelerator.wait_for_everyone()
    path = resolve_resume_path(config.resume_from_checkpoint, output_dir)
    if path is None and config.resume_from_checkpoint:
        logger.info(f"No checkpoint in {output_dir} yet; starting a new run.")
    return path


def load_data(accelerator: Accelerator, config: TrainConfig, resume_path: Path | None):
    """(training dataset, fixed held-out batch, data content hash, run fingerprint), before any model loads.

    A resume of another run is refused here, and so is a new run over another run's checkpoints: only once the data
    has loaded, so that a run that cannot start never costs them (--overwrite_output_dir removes them).
    """
    train_dataset, heldout = build_train_and_heldout(
        config, config.seed, NUM_VALIDATION_LOSS_SAMPLES, accelerator.process_index, accelerator.num_processes
    )
    data_hash = None
    if isinstance(train_dataset, TrainDataset):  # a full read of the data: once, on the main process
        data_hash = train_dataset.content_hash if accelerator.is_main_process else None
        data_hash = broadcast_object_list([data_hash])[0]
    fingerprint = run_fingerprint(config, data_hash)
    if resume_path is not None:
        check_same_run(resume_path, fingerprint)
    if accelerator.is_main_process:
        claim_output_dir(config)
    accelerator.wait_for_everyone()
    heldout_batch = collate_fn([heldout[i] for i in range(len(heldout))])
    return train_dataset, heldout_batch, data_hash, fingerprint


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator of the run (seedable data order, LR schedule stepped per optimizer step) and its logging."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed or 0),
        # None: `accelerate launch --dynamo_backend` decides, as for any accelerate script.
        dynamo_backend="inductor" if config.torch_compile else None,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SystemExit(
            "train_ldm.py: mixed precision fp16 needs a CUDA GPU, and there is none here (it would silently train "
            "in fp32). Use --mixed_precision bf16, which runs on the CPU, or --mixed_precision no."
        )
    config.mixed_precision = (
        accelerator.mixed_precision
    )  # what trains, whether the flag or accelerate chose it
    setup_logging(accelerator)
    return accelerator


def load_frozen_models(config: TrainConfig, device: torch.device, dtype: torch.dtype):
    """Tokenizer, text encoder, VAE and noise scheduler; the VAE and text encoder are frozen in `dtype`."""
    base = config.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=config.revision)
    if tokenizer.model_max_length > 10_000:
        raise ValueError(
            f"The tokenizer in {base}/tokenizer has no model_max_length (got {tokenizer.model_max_length}); "
            "set it (77 for CLIP) in tokenizer_config.json, or prompts are never truncated consistently."
        )
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=config.revision)
    vae_source = config.pretrained_vae_model_name_or_path
    vae = (
        AutoencoderKL.from_pretrained(vae_source)
        if vae_source
        else AutoencoderKL.from_pretrained(base, subfolder="vae", revision=config.revision)
    )
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=config.revision)
    except OSError:
        logger.info(f"No scheduler in {base}; using Stable Diffusion's training schedule.")
        noise_scheduler = DDPMScheduler.from_config(sd_scheduler().config)
    noise_scheduler = training_schedule(noise_scheduler, config)
    # Frozen: no gradients, eval mode (no dropout), and half precision where mixed precision allows it, since
    # they only run forward passes and their weights are never updated.
    for model in (vae, text_encoder):
        model.requires_grad_(False).eval().to(device, dtype=dtype)
    return tokenizer, text_encoder, vae, noise_scheduler


def training_schedule(noise_scheduler: DDPMScheduler, config: TrainConfig) -> DDPMScheduler:
    """The base schedule with the run's prediction type and, if asked, zero terminal SNR.

    Zero terminal SNR (Lin et al. 2023, sec. 3.1) rescales the betas so that alpha_bar_T = 0: training then sees
    pure noise at t = T, as sampling starts from; "trailing" spacing makes sampling start at t = T (sec. 3.3). The
    pipeline's DDIM scheduler is built from this config, so it samples with the same schedule.
    """
    overrides = {}
    if config.prediction_type is not None:
        overrides["prediction_type"] = config.prediction_type
    if config.rescale_betas_zero_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDPMScheduler.from_config(noise_scheduler.config, **overrides) if overrides else noise_scheduler


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


def prepare_unet(
    unet: UNet2DConditionModel, config: TrainConfig, accelerator: Accelerator
) -> EMAModel | None:
    """Put the UNet in training mode with the asked memory options; returns its EMA shadow when EMA is on."""
    unet.train()
    if config.lora_rank is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("LoRA training is not supported with FSDP here; use DDP (the adapter is small).")
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        if accelerator.device.type != "cuda":
            raise RuntimeError(
                "enable_xformers_memory_efficient_attention needs a CUDA device; drop the flag on CPU."
            )
        unet.enable_xformers_memory_efficient_attention()
    if not config.use_ema:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "use_ema is not supported with FSDP (the EMA copy would be unsharded); use DDP or ZeRO-2."
        )
    ema_unet = EMAModel(  # over what trains: every weight, or a LoRA run's adapter
        trainable_parameters(unet),
        decay=config.ema_decay,
        model_cls=UNet2DConditionModel,
        model_config=unet.config,
    )
    # Saved with each checkpoint as safetensors (checkpoint.save_ema), not registered with accelerate, which
    # would pickle it and unpickle it on resume.
    ema_unet.to(accelerator.device)
    return ema_unet


def make_optimizer(config: TrainConfig, params, num_processes: int) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for."""
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA only)."
            ) from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def make_loader(accelerator, train_dataset, live_encoder: LiveBatchEncoder, config: TrainConfig, data_hash):
    """(loader, batch encoder): from the latent cache when it applies, else live through the frozen encoders; with
    aspect-ratio buckets, every batch from one bucket."""
    vae, text_encoder, tokenizer = live_encoder.vae, live_encoder.text_encoder, live_encoder.tokenizer
    cache = build_cache(accelerator, train_dataset, vae, text_encoder, tokenizer, config, data_hash)
    sampler = None
    if isinstance(train_dataset, TrainDataset) and train_dataset.buckets is not None:
        sampler = BucketBatchSampler(
            train_dataset.buckets, config.train_batch_size, config.seed, accelerator.num_processes,
            accelerator.process_index,
        )  # fmt: skip
    if cache is None:
        return TrainLoader(train_dataset, collate_fn, config, config.seed, sampler), live_encoder
    # A cached batch is a list of indices: workers would only cost their start-up.
    cached_config = dataclasses.replace(config, dataloader_num_workers=0)
    loader = TrainLoader(
        cache.index_dataset(), CachedIndexDataset.collate_fn, cached_config, config.seed, sampler
    )
    return loader, CachedBatchEncoder(cache, vae, config, config.seed)


# ----------------------------------------------------------------------------- validation and saving


def check_finite(loss: float, step: int, epoch: int, output_dir: Path) -> None:
    """Stop the run on a NaN/inf loss, naming the step and the last good checkpoint."""
    if math.isfinite(loss):
        return
    last = complete_checkpoints(output_dir)
    raise FloatingPointError(
        f"The loss became {loss} at step {step} (epoch {epoch}); training stopped. "
        f"The last good checkpoint is {last[-1] if last else 'none (no checkpoint was saved yet)'}. "
        "Lower learning_rate, use bf16 instead of fp16, or check the data."
    )


def save_run(
    accelerator, config, unet, export, uploader, grid_path, skipped_images: int, stats: dict
) -> None:
    """Check the replicas agree, report skipped samples and throughput, and save the final folder (collective)."""
    check_replicas_in_sync(accelerator, unet)
    total_skipped = total_over_processes(accelerator, skipped_images)
    if total_skipped:
        logger.warning(
            f"Skipped {total_skipped} unreadable samples in total (each use counted).", main_process_only=True
        )
    trained = full_unet(accelerator, unet)
    if not accelerator.is_main_process:
        return
    if uploader is not None:
        uploader.wait()
    if stats["train_seconds"]:
        stats["samples_per_second"] = stats["train_samples"] / stats["train_seconds"]
        logger.info(
            f"Throughput: {stats['train_samples']} samples in {stats['train_seconds']:.1f} s of training steps = "
            f"{stats['samples_per_second']:.1f} samples/s"
        )
    save_final(accelerator, config, export.pipeline(trained), grid_path, stats)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv)
        check_startup(config)
        spec = bucket_spec_for(config)
        use_gloo_without_cuda()
    except ValueError as err:
        raise SystemExit(f"train_ldm.py: {err}") from None
    accelerator = make_accelerator(config)
    # The data, noise and caption-dropout draws all derive from this seed; recording it makes the run resumable.
    config.seed = seed = config.seed if config.seed is not None else 0
    if config.dataloader_num_workers is None:  # recorded as resolved, like the seed
        config.dataloader_num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    set_seed(seed)
    output_dir = Path(config.output_dir)
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
    ema_unet = prepare_unet(unet, config, accelerator)
    export = PipelineExport(
        vae, text_encoder, tokenizer, noise_scheduler, ema_unet, lora=config.lora_rank is not None
    )

    # Batches: from the latent cache (encoded once, reused across runs) or live through the frozen encoders.
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    loader, encoder = make_loader(accelerator, train_dataset, live_encoder, config, data_hash)

    # Optimisation: AdamW and the LR schedule; accelerate wraps them with the UNet and the data.
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, trainable_parameters(unet), accelerator.num_processes)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    unet, optimizer, lr_scheduler = loader.prepare(accelerator, unet, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        tracker_config = {k: str(v) if isinstance(v, list) else v for k, v in vars(config).items()}
        accelerator.init_trackers(config.tracker_project_name, config=tracker_config)
    uploader = CheckpointUploader(config.hub_model_id) if config.hub_push_checkpoints else None

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema_unet)
    global_step, micro_step = start.global_step, start.micro_step

    # The loop.
    show = accelerator.is_local_main_process
    progress = tqdm(range(config.max_train_steps), initial=global_step, desc="train", disable=not show)
    grid_path, window_losses, skipped_images = None, [], 0  # unreadable samples met, per use
    train_seconds, train_samples = 0.0, 0  # throughput of the steps alone (no validation, no saving)
    for epoch in loader.epochs(start.epoch, config.num_train_epochs):
        if global_step >= config.max_train_steps:
            break  # resumed from the last checkpoint of a finished run: nothing left to train
        batches_done = start.skip_batches(accelerator.num_processes) if epoch == start.epoch else 0
        encoder.set_epoch(epoch)
        clock = time.perf_counter()  # step time includes loading the batch (decoding, in the uncached path)
        for batch in loader.batches(epoch, skip_batches=batches_done):
            batches_done += 1
            skipped_images += batch["num_skipped"]
            with accelerator.accumulate(unet):
                generator = keyed_generator(seed, micro_step, accelerator.process_index)
                loss = training_loss(unet, encoder, batch, noise_scheduler, config, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()  # once per optimizer step, whatever the process count
                optimizer.zero_grad()
            micro_step += 1
            window_losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            train_seconds += time.perf_counter() - clock
            train_samples += len(batch["indices"]) * accelerator.num_processes
            check_finite(window_losses[-1], global_step + 1, epoch, output_dir)

            if accelerator.sync_gradients:  # one optimizer step done
                if ema_unet is not None:
                    ema_unet.step(trainable_parameters(unet))
                global_step += 1
                progress.update(1)
                # The logged loss is the mean over the accumulated micro-batches.
                logs = {"loss": sum(window_losses) / len(window_losses), "lr": lr_scheduler.get_last_lr()[0]}
                logs["epoch"], window_losses = epoch, []
                if skipped_images:  # this process's count; the total over processes is logged at the end
                    logs["skipped_images"] = skipped_images
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", skipped=skipped_images
                )
                if global_step % config.checkpointing_steps == 0:  # before validation, which may fail
                    position = TrainingPosition.after(
                        global_step, epoch, batches_done, loader.epoch_over(batches_done), micro_step,
                        accelerator.num_processes,
                    )  # fmt: skip
                    save_checkpoint(accelerator, config, position, unet, export, uploader, fingerprint)
                if global_step % config.validation_steps == 0 or global_step == config.max_train_steps:
                    val_logs, grid = validate(
                        accelerator, unet, export, live_encoder, heldout_batch, noise_scheduler, config, global_step,
                        validation_sizes(config.resolution, buckets),
                    )  # fmt: skip
                    logs, grid_path = {**logs, **val_logs}, grid or grid_path
                accelerator.log(logs, step=global_step)
            if global_step >= config.max_train_steps:
                break
            clock = time.perf_counter()  # validation and checkpoints are not training throughput
    progress.close()

    # Save the final pipeline (EMA weights when EMA is on).
    stats = {"global_step": global_step, "train_samples": train_samples, "train_seconds": train_seconds}
    stats["latent_cache"] = isinstance(encoder, CachedBatchEncoder)
    save_run(accelerator, config, unet, export, uploader, grid_path, skipped_images, stats)
    finish(accelerator)


if __name__ == "__main__":
    main()
