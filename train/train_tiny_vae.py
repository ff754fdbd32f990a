"""Distil a pipeline's VAE into a tiny autoencoder (diffusers' `AutoencoderTiny`, TAESD's structure), with Accelerate.

    accelerate launch train/train_tiny_vae.py --config configs/tiny_vae_demo.yaml [--key value ...]

Setup -> load the frozen VAE, build the tiny autoencoder -> data (images alone; captions are read and unused) ->
accelerator.prepare -> the shared step loop (the VAE's posterior mean and a sample, its decoding of the sample; the
tiny encoder regresses the scaled mean, the tiny decoder the VAE's image; backward, step, EMA) -> log / validate
(PSNRs, image | VAE | tiny grid) / checkpoint -> save the tiny autoencoder.

The output folder is an `AutoencoderTiny` (config.json + diffusion_pytorch_model.safetensors, as TAESD's) that
reads and writes the pipeline's scaled latents: `pipe.vae = AutoencoderTiny.from_pretrained(output_dir)` samples
with it. Every guarantee of `train_ldm.py` holds but the latent cache (the encoder learns from pixels): start-up
checks, run lock and fingerprint, verified checkpoints without pickle, exact resume, EMA, several processes, Hub push.
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm.training.checkpoint import push_output_folder, resume, save_checkpoint, write_run_files
from ldm.training.config import load_config
from ldm.training.data import TrainLoader, collate_fn
from ldm.training.distributed import finish, use_gloo_without_cuda, weight_dtype_for
from ldm.training.loop import train_loop
from ldm.training.run import (
    check_run_sources,
    claim_run,
    finish_run,
    load_data,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    prepare_tracking,
    prepare_trained_model,
    resolve_seed_and_workers,
    stopping_in_one_line,
)
from ldm.training.tiny_vae import (
    TinyVaeExport,
    TinyVaeStudent,
    TinyVaeTrainConfig,
    build_tiny_vae,
    check_levels,
    plain_tiny_vae,
    tiny_vae_loss,
    tiny_vae_model_card,
    validate_tiny_vae,
)

PROG = "train_tiny_vae.py"


def vae_source(config: TinyVaeTrainConfig) -> tuple[str, str | None]:
    """(folder or Hub id, subfolder) of the VAE to distil."""
    if config.pretrained_vae_model_name_or_path:
        return config.pretrained_vae_model_name_or_path, None
    return config.pretrained_model_name_or_path, "vae"


def check_startup(config: TinyVaeTrainConfig) -> None:
    """What can be checked before any model loads: trackers, the data files, the pipeline's location, and that the
    tiny autoencoder has the VAE's levels (from the VAE's config, not its weights)."""
    check_run_sources(config)
    path, subfolder = vae_source(config)
    check_levels(config, AutoencoderKL.load_config(path, subfolder=subfolder, revision=config.revision))


def main(argv: list[str] | None = None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck process is waiting for (used by the tests).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        config = load_config(argv, TinyVaeTrainConfig)
        check_startup(config)
        use_gloo_without_cuda()
        accelerator = make_accelerator(config)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    # The data order and every posterior sample derive from this seed; recording it makes the run resumable.
    seed = resolve_seed_and_workers(config)
    try:
        resume_path = claim_run(accelerator, config)
        train_dataset, heldout_batch, _, fingerprint = load_data(accelerator, config, resume_path)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"{PROG}: {err}") from None

    # Models: the frozen VAE (the teacher) and the tiny autoencoder that trains.
    path, subfolder = vae_source(config)
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, revision=config.revision)
    vae.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype_for(accelerator))
    tiny = build_tiny_vae(config, vae)
    ema = prepare_trained_model(tiny, config, accelerator)
    export = TinyVaeExport(ema)

    # Batches of pixels, every one through the VAE (no latent cache: the encoder's input is the image).
    loader = TrainLoader(train_dataset, collate_fn, config, seed)
    config.max_train_steps, config.num_train_epochs = loader.schedule(config, accelerator.num_processes)
    optimizer = make_optimizer(config, tiny.parameters(), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    tiny, optimizer, lr_scheduler = loader.prepare(accelerator, tiny, optimizer, lr_scheduler)
    uploader = prepare_tracking(accelerator, config)

    # Resume: optimizer, LR schedule, EMA, RNG states and the position in the data.
    start = resume(accelerator, resume_path, ema)

    def loss(batch: dict, epoch: int, generator: torch.Generator) -> torch.Tensor:
        pixels = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            return tiny_vae_loss(tiny, vae, pixels, config, generator)

    def checkpoint(position) -> None:
        save_checkpoint(accelerator, config, position, tiny, export, uploader, fingerprint)

    def validation(step: int):
        return validate_tiny_vae(accelerator, tiny, vae, ema, heldout_batch, config, step)

    with stopping_in_one_line(PROG):
        result = train_loop(
            accelerator,
            config,
            loader,
            tiny,
            optimizer,
            lr_scheduler,
            start,
            loss,
            checkpoint,
            validation,
            ema,
        )

    # Save the tiny autoencoder (EMA weights when EMA is on), its model card and run files.
    def save(trained: TinyVaeStudent, stats: dict) -> None:
        plain_tiny_vae(trained, ema).save_pretrained(config.output_dir)
        repo_id = config.hub_model_id or Path(config.output_dir).name
        write_run_files(
            config, result.grid_path, stats, lambda grid: tiny_vae_model_card(config, repo_id, grid)
        )
        push_output_folder(config)

    finish_run(accelerator, tiny, result, uploader, save, False)
    finish(accelerator)


if __name__ == "__main__":
    main()
