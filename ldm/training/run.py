"""What every diffusion trainer in `train/` does around the loop: start-up checks, the Accelerator, claiming the
output folder, the data and its fingerprint, the frozen VAE and text encoder, EMA, the optimizer, the loader (cached
or live) and the end of the run.

`train_ldm.py`, `train_controlnet.py` and the trainers after them call these in the same order, each adding only
what it trains; the step loop itself is `ldm.training.loop.train_loop`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.checks import check_local_or_hub
from ldm.hub import check_hub_access
from ldm.presets import sd_scheduler
from ldm.training.buckets import BucketBatchSampler
from ldm.training.checkpoint import (
    CheckpointUploader,
    CheckpointWriteError,
    resolve_resume_path,
)
from ldm.training.config import TrainConfig
from ldm.training.data import (
    TrainDataset,
    TrainLoader,
    build_train_and_heldout,
    collate_fn,
    default_num_workers,
)
from ldm.training.distributed import check_replicas_in_sync, full_model, setup_logging, total_over_processes
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.guards import check_same_run, claim_output_dir, lock_output_dir, run_fingerprint
from ldm.training.integrity import check_state_files
from ldm.training.latent_cache import CachedIndexDataset, ConditionedIndexDataset, build_cache
from ldm.training.loop import LoopResult
from ldm.training.lora import trainable_parameters
from ldm.training.sources import check_data_files

logger = get_logger(__name__)
NUM_VALIDATION_LOSS_SAMPLES = 8


# ----------------------------------------------------------------------------- start-up, before any model loads


@contextmanager
def stopping_in_one_line(prog: str) -> Iterator[None]:
    """A run that stops for a reason the user acts on (the loss became NaN, a checkpoint could not be written) exits
    with that reason as one line, not a traceback."""
    try:
        yield
    except (FloatingPointError, CheckpointWriteError) as err:
        raise SystemExit(f"{prog}: {err}") from None


def check_trackers(report_to: str) -> None:
    """Refuse a requested tracker that is not installed (accelerate would silently log nothing)."""
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(
        report_to, []
    )
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"--report_to {report_to} needs {', '.join(missing)}, which is not installed; "
            'pip install "ldm[tracking]", or pass --report_to none.'
        )


def check_run_sources(config: TrainConfig) -> None:
    """What every trainer checks before any model loads: trackers, the data files, the base model's location."""
    check_trackers(config.report_to)
    check_data_files(config)
    check_local_or_hub(config.pretrained_model_name_or_path, "pretrained_model_name_or_path")
    if config.pretrained_vae_model_name_or_path:
        check_local_or_hub(config.pretrained_vae_model_name_or_path, "pretrained_vae_model_name_or_path")


def resolve_seed_and_workers(config: TrainConfig) -> int:
    """Record the run's seed (0 when none was given) and its data-loader workers as resolved, then seed every RNG;
    returns the seed. Every draw of a step derives from the seed and a stream's sample indices from the worker count,
    so the config a checkpoint saves must hold both for a resumed run to repeat them."""
    config.seed = seed = config.seed if config.seed is not None else 0
    if config.dataloader_num_workers is None:
        config.dataloader_num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    set_seed(seed)
    return seed


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator of the run (seedable data order, LR schedule stepped per optimizer step) and its logging.

    Raises:
        ValueError: fp16 without CUDA (it would silently train in fp32).
    """
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
        raise ValueError(
            "mixed precision fp16 needs a CUDA GPU, and there is none here (it would silently train "
            "in fp32). Use --mixed_precision bf16, which runs on the CPU, or --mixed_precision no."
        )
    config.mixed_precision = (
        accelerator.mixed_precision
    )  # what trains, whether the flag or accelerate chose it
    setup_logging(accelerator)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        logger.warning(
            "--mixed_precision bf16 without a CUDA GPU: on CPUs it trains slower than fp32, not faster (0.08x of fp32 "
            "on an AVX2 CPU, 0.12x-0.37x for a `small` UNet step even with AMX-BF16; the bf16 row of "
            "benchmarks/train_throughput.py measures yours). Use --mixed_precision no unless you measured otherwise.",
            main_process_only=True,
        )
    return accelerator


def claim_run(accelerator: Accelerator, config: TrainConfig) -> Path | None:
    """Lock the output folder for this run, check that a Hub push can happen, and find the checkpoint to resume."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_output_dir(output_dir)
        if config.push_to_hub:
            check_hub_access(config.hub_model_id)
    accelerator.wait_for_everyone()
    path = resolve_resume_path(config.resume_from_checkpoint, output_dir)
    if path is not None:
        check_state_files(path, accelerator.process_index)
    if path is None and config.resume_from_checkpoint:
        logger.info(f"No checkpoint in {output_dir} yet; starting a new run.")
    return path


def load_data(
    accelerator: Accelerator,
    config: TrainConfig,
    resume_path: Path | None,
    conditioning_column: str | None = None,
):
    """(training dataset, fixed held-out batch, data content hash, run fingerprint), before any model loads.

    The content hash (images and captions) keys the latent cache; the fingerprint also covers the conditioning
    images when there are any. A resume of another run is refused here, and so is a new run over another run's
    checkpoints: only once the data has loaded, so that a run that cannot start never costs them
    (--overwrite_output_dir removes them).
    """
    train_dataset, heldout = build_train_and_heldout(
        config, config.seed, NUM_VALIDATION_LOSS_SAMPLES, accelerator.process_index, accelerator.num_processes,
        conditioning_column,
    )  # fmt: skip
    hashes = [None, None]
    if isinstance(train_dataset, TrainDataset):  # a full read of the data: once, on the main process
        if accelerator.is_main_process:
            hashes = [train_dataset.content_hash, train_dataset.conditioning_hash]
        hashes = broadcast_object_list(hashes)
    data_hash, conditioning_hash = hashes
    fingerprint = run_fingerprint(
        config, data_hash if conditioning_hash is None else f"{data_hash}+{conditioning_hash}"
    )
    if resume_path is not None:
        check_same_run(resume_path, fingerprint)
    if accelerator.is_main_process:
        claim_output_dir(config)
    accelerator.wait_for_everyone()
    heldout_batch = collate_fn([heldout[i] for i in range(len(heldout))])
    return train_dataset, heldout_batch, data_hash, fingerprint


# ----------------------------------------------------------------------------- models


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


def prepare_trained_model(
    model: torch.nn.Module, config: TrainConfig, accelerator: Accelerator, frozen: tuple = ()
) -> EMAModel | None:
    """Put the model that trains in training mode with the asked memory options (xformers also on the `frozen`
    modules that run inside its loss); returns its EMA shadow when EMA is on."""
    if config.lora_rank is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("LoRA training is not supported with FSDP here; use DDP (the adapter is small).")
    model.train()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        if accelerator.device.type != "cuda":
            raise RuntimeError(
                "enable_xformers_memory_efficient_attention needs a CUDA device; drop the flag on CPU."
            )
        for module in (model, *frozen):
            module.enable_xformers_memory_efficient_attention()
    if not config.use_ema:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "use_ema is not supported with FSDP (the EMA copy would be unsharded); use DDP or ZeRO-2."
        )
    ema = EMAModel(  # over what trains: every weight, or a LoRA run's adapter
        trainable_parameters(model), decay=config.ema_decay, model_cls=type(model), model_config=model.config
    )
    # Saved with each checkpoint as safetensors (checkpoint.save_ema), not registered with accelerate, which
    # would pickle it and unpickle it on resume.
    ema.to(accelerator.device)
    return ema


# ----------------------------------------------------------------------------- optimisation and data


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


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' LR schedule by name, stepped once per optimizer step."""
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )


def make_loader(accelerator, train_dataset, live_encoder: LiveBatchEncoder, config: TrainConfig, data_hash):
    """(loader, batch encoder): from the latent cache when it applies, else live through the frozen encoders; with
    aspect-ratio buckets, every batch from one bucket.

    A cached batch is a list of indices, plus the conditioning images when the data has them (a ControlNet's
    control is not VAE-encoded, so it is decoded per batch, with the sample's own crop and flip).
    """
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
    encoder = CachedBatchEncoder(cache, vae, config, config.seed)
    if train_dataset.conditioning_column is not None:
        dataset = ConditionedIndexDataset(cache.valid, train_dataset)
        return TrainLoader(dataset, ConditionedIndexDataset.collate_fn, config, config.seed, sampler), encoder
    # Indices alone: workers would only cost their start-up.
    cached_config = dataclasses.replace(config, dataloader_num_workers=0)
    loader = TrainLoader(
        cache.index_dataset(), CachedIndexDataset.collate_fn, cached_config, config.seed, sampler
    )
    return loader, encoder


def prepare_tracking(accelerator: Accelerator, config: TrainConfig) -> CheckpointUploader | None:
    """Start the trackers (main process) and, with --hub_push_checkpoints, the background uploader."""
    if accelerator.is_main_process:
        tracker_config = {k: str(v) if isinstance(v, list) else v for k, v in vars(config).items()}
        accelerator.init_trackers(config.tracker_project_name, config=tracker_config)
    return CheckpointUploader(config.hub_model_id) if config.hub_push_checkpoints else None


# ----------------------------------------------------------------------------- the end of a run


def finish_run(
    accelerator: Accelerator,
    model,
    result: LoopResult,
    uploader: CheckpointUploader | None,
    save: Callable[[torch.nn.Module, dict], None],
    latent_cache: bool,
) -> None:
    """Check the replicas agree, report skipped samples and throughput, and `save(trained model, stats)` on the
    main process (a collective call)."""
    check_replicas_in_sync(accelerator, model)
    total_skipped = total_over_processes(accelerator, result.skipped_images)
    if total_skipped:
        logger.warning(
            f"Skipped {total_skipped} unreadable samples in total (each use counted).", main_process_only=True
        )
    trained = full_model(accelerator, model)
    if not accelerator.is_main_process:
        return
    if uploader is not None:
        uploader.wait()
    stats = {**result.stats(), "latent_cache": latent_cache}
    if stats["train_seconds"]:
        stats["samples_per_second"] = stats["train_samples"] / stats["train_seconds"]
        logger.info(
            f"Throughput: {stats['train_samples']} samples in {stats['train_seconds']:.1f} s of training steps = "
            f"{stats['samples_per_second']:.1f} samples/s"
        )
    save(trained, stats)
