"""Train a latent diffusion UNet on frozen-VAE latents and frozen CLIP text, with Accelerate.

    accelerate launch train/train_ldm.py --config configs/tiny.yaml [--key value ...]

Setup -> load the frozen VAE and text encoder, build or load the UNet -> data -> accelerator.prepare ->
loop (latents, noise, timesteps, add_noise, loss, backward, step, EMA) -> log / validate / checkpoint -> save.

Every random draw of a step (crop, flip, caption choice, caption dropout, VAE sample, noise, timesteps) is a pure
function of the seed and the sample/step index, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ldm import checkpoint as ckpt
from ldm.config import TrainConfig, load_config, save_config
from ldm.data import (
    StreamingTrainDataset,
    TrainDataset,
    build_train_and_heldout,
    collate_fn,
    make_dataloader,
)
from ldm.hub import model_card_text, push_folder
from ldm.images import image_grid
from ldm.latent_cache import CachedBatchEncoder, LiveBatchEncoder, build_cache
from ldm.loss import diffusion_loss, sample_noise_and_timesteps
from ldm.pipeline import LatentPipeline
from ldm.presets import build_unet, sd_scheduler

logger = get_logger(__name__)
NUM_VALIDATION_LOSS_SAMPLES = 8


# ----------------------------------------------------------------------------- setup helpers


def step_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (seed, step, rank, ...), independent of global RNG state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def use_gloo_without_cuda() -> None:
    """Processes started by `accelerate launch --multi_gpu` on a machine without CUDA train together on the CPU.

    Accelerate otherwise gives each of them a world of its own (DistributedType.NO), so they would silently
    train separate models; with ACCELERATE_USE_CPU set they form one gloo process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"


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


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """The dtype the frozen models run in: half precision under fp16/bf16 mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


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
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    # Frozen: no gradients, eval mode (no dropout), and half precision where mixed precision allows it, since
    # they only run forward passes and their weights are never updated.
    for model in (vae, text_encoder):
        model.requires_grad_(False).eval().to(device, dtype=dtype)
    return tokenizer, text_encoder, vae, noise_scheduler


def load_unet(config: TrainConfig, text_encoder: CLIPTextModel, vae: AutoencoderKL) -> UNet2DConditionModel:
    """The UNet to train: a preset built from scratch, or the one in the pretrained pipeline."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if config.unet_preset:
        unet = build_unet(
            config.unet_preset,
            cross_attention_dim=text_encoder.config.hidden_size,
            sample_size=config.resolution // vae_scale,
        )
    else:
        unet = UNet2DConditionModel.from_pretrained(
            config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
        )
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(
            f"The UNet's cross_attention_dim={unet.config.cross_attention_dim} does not match the text encoder's "
            f"hidden_size={text_encoder.config.hidden_size}; use a matching text encoder or unet_preset."
        )
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"The UNet takes {unet.config.in_channels} channels but the VAE makes {vae.config.latent_channels}."
        )
    return unet


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


# ----------------------------------------------------------------------------- the training step


def training_loss(
    unet,
    batch_encoder,
    batch: dict,
    noise_scheduler: DDPMScheduler,
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One micro-batch: x_0 and text embeddings -> x_t = sqrt(ab) x_0 + sqrt(1-ab) eps -> UNet -> MSE."""
    latents, text_embeds = batch_encoder(batch, generator)  # (B, C, h, w), (B, 77, D)
    noise, timesteps = sample_noise_and_timesteps(
        latents, noise_scheduler.config.num_train_timesteps, generator, config.noise_offset
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    # DeepSpeed holds the UNet in half precision without autocast, so inputs must match its weights; under
    # accelerate's autocast the weights are fp32 and autocast picks the compute dtype.
    dtype = next(unet.parameters()).dtype
    model_pred = unet(
        noisy.to(dtype), timesteps, encoder_hidden_states=text_embeds.to(dtype), return_dict=False
    )[0]
    return diffusion_loss(model_pred, latents, noise, timesteps, noise_scheduler, config.snr_gamma)


@torch.no_grad()
def validation_loss(unet, batch_encoder, heldout: TrainDataset, noise_scheduler, seed: int) -> float:
    """Loss on the fixed held-out batch with fixed noise and evenly spaced timesteps: comparable across steps."""
    batch = collate_fn([heldout[i] for i in range(len(heldout))])
    generator = step_generator(seed, 2**31 - 1)
    latents, text_embeds = batch_encoder(batch, generator, drop_captions=False)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    T = noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, T - 1, len(latents)).long().to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    dtype = next(unet.parameters()).dtype
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text_embeds.to(dtype), return_dict=False)[0]
    return diffusion_loss(pred, latents, noise, timesteps, noise_scheduler).item()


# ----------------------------------------------------------------------------- pipelines, validation, saving


def full_unet(accelerator, unet) -> UNet2DConditionModel | None:
    """The trained UNet as one plain module on the main process (a collective call: run it on every process).

    Under FSDP the parameters are sharded, so they are gathered first; elsewhere this is just the unwrapped model.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(unet)
        if not accelerator.is_main_process:
            return None
        module = UNet2DConditionModel.from_config(accelerator.unwrap_model(unet).config)
        module.load_state_dict(state)
        return module.to(accelerator.device)
    return accelerator.unwrap_model(unet)


def make_pipeline(
    trained_unet: UNet2DConditionModel, ema_unet, vae, text_encoder, tokenizer, noise_scheduler
) -> LatentPipeline:
    """A LatentPipeline on the trained weights (EMA weights when EMA is on), with DDIM sampling."""
    unet = trained_unet
    if ema_unet is not None:
        unet = UNet2DConditionModel.from_config(trained_unet.config).to(trained_unet.device)
        ema_unet.copy_to(unet.parameters())
    pipe = LatentPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: LatentPipeline, path: Path) -> None:
    """Save a pipeline folder with its frozen parts in fp32, as stock diffusers expects to load them."""
    half = [(m, m.dtype) for m in (pipe.vae, pipe.text_encoder) if m.dtype != torch.float32]
    for module, _ in half:
        module.to(torch.float32)
    pipe.save_pretrained(path)
    for module, dtype in half:
        module.to(dtype)


def validation_grid(pipe: LatentPipeline, config: TrainConfig, seed: int):
    """A grid of the validation prompts (DDIM, guidance, fixed seed), one image per prompt."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(config.validation_prompts))]
    images = pipe(
        config.validation_prompts,
        num_inference_steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        generator=generators,
        height=config.resolution,
        width=config.resolution,
    ).images
    return image_grid(images)


def log_validation(accelerator, pipe, config: TrainConfig, seed: int, step: int) -> Path | None:
    """Save and log the validation grid (main process only); returns its path."""
    if not config.validation_prompts:
        return None
    grid = validation_grid(pipe, config, seed)
    path = Path(config.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": wandb.Image(grid, caption=" | ".join(config.validation_prompts))}, step=step
            )
    return path


def check_replicas_in_sync(accelerator, unet) -> None:
    """Every process must end with the same UNet weights; a mismatch means data-parallel training went wrong."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return  # each process holds a different shard by design
    params = accelerator.unwrap_model(unet).parameters()
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1).to(accelerator.device)
    sums = accelerator.gather(checksum).tolist()
    if len(set(sums)) != 1:
        raise RuntimeError(f"UNet weights differ across processes (parameter sums {sums}).")
    logger.info(
        f"UNet weights identical on all {accelerator.num_processes} processes (checksum {sums[0]:.10e})."
    )


class CheckpointUploader:
    """Pushes each checkpoint's pipeline weights to the Hub in a background thread; never the optimizer state."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.futures: dict[str, object] = {}

    def submit(self, pipeline_dir: Path, name: str) -> None:
        self.futures[name] = push_folder(
            pipeline_dir, self.repo_id, path_in_repo=name, commit_message=f"Upload {name}", run_as_future=True
        )

    def wait(self, name: str | None = None) -> None:
        """Wait for one upload (before its folder is pruned) or all; failures are logged, never fatal."""
        for key in [name] if name else list(self.futures):
            future = self.futures.pop(key, None)
            if future is None:
                continue
            try:
                future.result()
            except Exception as err:  # a failed upload must not cost the user the run
                logger.warning(f"Hub upload of {key} failed: {err}", main_process_only=True)


def next_position(
    global_step: int, epoch: int, batches_into_epoch: int, dataloader, accelerator
) -> dict[str, int]:
    """Where a run resumed from here starts: this epoch after the batches done, or the next epoch if it is over."""
    epoch_over = not isinstance(dataloader.dataset, torch.utils.data.IterableDataset) and (
        batches_into_epoch >= len(dataloader)
    )
    if epoch_over:
        epoch, batches_into_epoch = epoch + 1, 0
    return {
        "global_step": global_step,
        "epoch": epoch,
        "global_batches_into_epoch": batches_into_epoch * accelerator.num_processes,
    }


def save_checkpoint(
    accelerator,
    config: TrainConfig,
    position: dict[str, int],
    unet,
    make_pipe,
    uploader: CheckpointUploader | None,
) -> None:
    """accelerate state + the pipeline + the config in `checkpoint-N`, written atomically, then pruned."""
    step = position["global_step"]
    save_all = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    partial = ckpt.partial_path(config.output_dir, step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    partial = partial or Path(config.output_dir) / f"checkpoint-{step}{ckpt.PARTIAL_SUFFIX}"
    if save_all or accelerator.is_main_process:
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's part of the state is on disk before the folder is renamed
    trained = full_unet(accelerator, unet)
    if accelerator.is_main_process:
        save_pipeline(make_pipe(trained), partial / "pipeline")
        trained.save_pretrained(partial / "unet")
        save_config(config, partial / "config.yaml")
        ckpt.write_position(partial, **position)
        final = ckpt.finalize(partial)
        logger.info(f"Saved {final}")
        if uploader is not None:
            uploader.submit(final / "pipeline", final.name)
        if uploader is not None:  # do not delete files an upload is still reading
            for old in ckpt.stale_checkpoints(config.output_dir, config.checkpoints_total_limit):
                uploader.wait(old.name)
        ckpt.prune(config.output_dir, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def save_final(accelerator, config: TrainConfig, pipe: LatentPipeline, grid_path: Path | None) -> None:
    """The final pipeline folder with config and model card; pushed to the Hub when asked."""
    out = Path(config.output_dir)
    save_pipeline(pipe, out)
    save_config(config, out / "config.yaml")
    grid_name = None
    if grid_path is not None:
        grid_name = "samples.png"
        shutil.copy(grid_path, out / grid_name)
    hyperparameters = {
        k: getattr(config, k)
        for k in (
            "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "max_train_steps", "caption_dropout", "mixed_precision", "use_ema", "snr_gamma", "prediction_type",
        )
    }  # fmt: skip
    hyperparameters["num_processes"] = accelerator.num_processes
    card = model_card_text(
        repo_id=config.hub_model_id or out.name,
        base_model=None if config.unet_preset else config.pretrained_model_name_or_path,
        base_description=config.unet_preset
        and f"UNet trained from scratch (preset {config.unet_preset!r}) on the VAE and text encoder of "
        f"{config.pretrained_model_name_or_path}",
        dataset=config.dataset_name or config.train_data_dir,
        hyperparameters=hyperparameters,
        grid_image=grid_name,
        validation_prompts=config.validation_prompts,
    )
    (out / "README.md").write_text(card)
    if config.push_to_hub:
        push_folder(
            out,
            config.hub_model_id,
            commit_message="End of training",
            ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.partial/*"],
        )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(argv)
    except ValueError as err:
        raise SystemExit(f"train_ldm.py: {err}") from None
    output_dir = Path(config.output_dir)
    check_trackers(config.report_to)
    use_gloo_without_cuda()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed or 0),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    # The data, noise and caption-dropout draws all derive from this seed; recording it makes the run resumable.
    config.seed = seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Models: frozen VAE and text encoder, trainable UNet (and its EMA shadow).
    dtype = weight_dtype_for(accelerator)
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(config, accelerator.device, dtype)
    unet = load_unet(config, text_encoder, vae)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        if accelerator.device.type != "cuda":
            raise RuntimeError(
                "enable_xformers_memory_efficient_attention needs a CUDA device; drop the flag on CPU."
            )
        unet.enable_xformers_memory_efficient_attention()
    ema_unet = None
    if config.use_ema and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "use_ema is not supported with FSDP (the EMA copy would be unsharded); use DDP or ZeRO-2."
        )
    if config.use_ema:
        ema_unet = EMAModel(
            unet.parameters(),
            decay=config.ema_decay,
            model_cls=UNet2DConditionModel,
            model_config=unet.config,
        )
        ema_unet.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_unet)

    # Data: images and captions, or their cached latents and embeddings (encoded once, reused across runs).
    train_dataset, heldout = build_train_and_heldout(
        config, seed, NUM_VALIDATION_LOSS_SAMPLES, accelerator.process_index, accelerator.num_processes
    )
    streaming = isinstance(train_dataset, StreamingTrainDataset)
    live_encoder = LiveBatchEncoder(vae, text_encoder, tokenizer, config, seed)
    batch_encoder, collate, skipped_images = live_encoder, collate_fn, 0  # unreadable samples met, per use
    if config.cache_latents and not streaming:
        cache = build_cache(accelerator, train_dataset, vae, text_encoder, tokenizer, config)
        if cache is not None:
            train_dataset, batch_encoder = cache.index_dataset(), CachedBatchEncoder(cache, vae, config, seed)
            collate = train_dataset.collate_fn
    # Shuffled per epoch by accelerate's seedable sampler (seed + epoch), set up in accelerator.prepare below.
    train_dataloader = make_dataloader(train_dataset, config, seed, collate)

    # Optimisation.
    optimizer = make_optimizer(config, unet.parameters(), accelerator.num_processes)
    if streaming and config.max_train_steps is None:
        raise ValueError("With streaming=true the dataset has no length; set max_train_steps.")
    if not streaming:
        batches_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        if config.max_train_steps is None:
            config.max_train_steps = config.num_train_epochs * steps_per_epoch
        config.num_train_epochs = math.ceil(config.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    if streaming:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
    if accelerator.is_main_process:
        tracker_config = {k: str(v) if isinstance(v, list) else v for k, v in vars(config).items()}
        accelerator.init_trackers(config.tracker_project_name, config=tracker_config)

    def make_pipe(trained_unet: UNet2DConditionModel) -> LatentPipeline:
        return make_pipeline(trained_unet, ema_unet, vae, text_encoder, tokenizer, noise_scheduler)

    uploader = CheckpointUploader(config.hub_model_id) if config.hub_push_checkpoints else None

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    position = {"global_step": 0, "epoch": 0, "global_batches_into_epoch": 0, "micro_step": 0}
    resume_path = ckpt.resolve_resume_path(config.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        position = ckpt.read_position(resume_path)
        logger.info(f"Resumed from {resume_path}: {position}")
    elif config.resume_from_checkpoint:
        logger.info(f"No checkpoint in {output_dir} yet; starting a new run.")
    global_step, first_epoch = position["global_step"], position["epoch"]
    # Batches are dealt to processes in turn, so this process's share of the global count is what it skips.
    skip_batches = position["global_batches_into_epoch"] // accelerator.num_processes
    # Micro-batches done so far (each one's noise seed): not global_step * accumulation, since accelerate
    # forces an optimizer step at the end of each epoch.
    micro_step = position.get("micro_step", global_step * config.gradient_accumulation_steps)

    # The loop.
    progress = tqdm(
        range(config.max_train_steps),
        initial=global_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    grid_path, window_losses = None, []
    train_seconds, train_samples = 0.0, 0  # throughput of the steps alone (no validation, no saving)
    for epoch in range(first_epoch, config.num_train_epochs if not streaming else sys.maxsize):
        if global_step >= config.max_train_steps:
            break  # resumed from the last checkpoint of a finished run: nothing left to train
        train_dataset.set_epoch(epoch)
        if not streaming:
            train_dataloader.set_epoch(epoch)
        loader, batches_into_epoch = train_dataloader, 0
        if epoch == first_epoch and skip_batches:
            batches_into_epoch = skip_batches
            if streaming:
                train_dataset.set_resume_position(skip_batches, config.train_batch_size)
            else:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        elif streaming:
            train_dataset.set_resume_position(0, config.train_batch_size)
        batch_encoder.set_epoch(epoch)
        fetch_start = (
            time.perf_counter()
        )  # step time includes loading the batch (decoding, in the uncached path)
        for batch in loader:
            batches_into_epoch += 1
            skipped_images += batch["num_skipped"]
            with accelerator.accumulate(unet):
                generator = step_generator(seed, micro_step, accelerator.process_index)
                if len(batch["indices"]) == 0:
                    # Every image of this micro-batch was unreadable: a zero loss keeps all ranks in step.
                    loss = sum(p.sum() for p in unet.parameters()) * 0.0
                else:
                    loss = training_loss(unet, batch_encoder, batch, noise_scheduler, config, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()  # once per optimizer step, whatever the process count
                optimizer.zero_grad()
            micro_step += 1
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            train_seconds += time.perf_counter() - fetch_start
            train_samples += len(batch["indices"]) * accelerator.num_processes
            if not math.isfinite(mean_loss):
                last = ckpt.complete_checkpoints(output_dir)
                raise FloatingPointError(
                    f"The loss became {mean_loss} at step {global_step + 1} (epoch {epoch}); training stopped. "
                    f"The last good checkpoint is {last[-1] if last else 'none (no checkpoint was saved yet)'}. "
                    "Lower learning_rate, use bf16 instead of fp16, or check the data."
                )
            window_losses.append(mean_loss)
            if not accelerator.sync_gradients:
                fetch_start = time.perf_counter()
                continue

            # One optimizer step done.
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            global_step += 1
            progress.update(1)
            # The logged loss is the mean over the accumulated micro-batches.
            mean_loss, window_losses = sum(window_losses) / len(window_losses), []
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
            if skipped_images:  # this process's count; the total over processes is logged at the end
                logs["skipped_images"] = skipped_images
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", skipped=skipped_images)
            if global_step % config.validation_steps == 0 or global_step == config.max_train_steps:
                trained = full_unet(accelerator, unet)
                if accelerator.is_main_process:
                    pipe = make_pipe(trained)
                    # The pipeline's UNet is a plain fp32 module while the frozen encoders may run in half
                    # precision: autocast reconciles them as it does in training.
                    with accelerator.autocast():
                        logs["val_loss"] = validation_loss(
                            pipe.unet, live_encoder, heldout, noise_scheduler, seed
                        )
                        grid_path = log_validation(accelerator, pipe, config, seed, global_step) or grid_path
            accelerator.log(logs, step=global_step)
            if global_step % config.checkpointing_steps == 0:
                position = next_position(
                    global_step, epoch, batches_into_epoch, train_dataloader, accelerator
                )
                position["micro_step"] = micro_step
                save_checkpoint(accelerator, config, position, unet, make_pipe, uploader)
            if global_step >= config.max_train_steps:
                break
            fetch_start = time.perf_counter()  # validation and checkpoints are not training throughput
        if global_step >= config.max_train_steps:
            break
    progress.close()
    if train_seconds:
        logger.info(
            f"Throughput: {train_samples} samples in {train_seconds:.1f} s of training steps = "
            f"{train_samples / train_seconds:.1f} samples/s",
            main_process_only=True,
        )

    # Save the final pipeline (EMA weights when EMA is on).
    check_replicas_in_sync(accelerator, unet)
    total_skipped = int(accelerator.reduce(torch.tensor(skipped_images, device=accelerator.device), "sum"))
    if total_skipped:
        logger.warning(
            f"Skipped {total_skipped} unreadable samples in total (each use counted).", main_process_only=True
        )
    trained = full_unet(accelerator, unet)
    if accelerator.is_main_process:
        if uploader is not None:
            uploader.wait()
        save_final(accelerator, config, make_pipe(trained), grid_path)
    # Every rank waits here with the GIL released, which gives gloo's worker threads time to drop the last
    # collective's tensors before DDP's reducer and the process group are torn down: a worker still holding them
    # at exit needs the GIL that the teardown holds, and the process hangs (seen once on CPU in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
