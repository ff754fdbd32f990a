"""Train (or fine-tune) an AutoencoderKL with Accelerate and measure its latent scaling factor.

    accelerate launch train/train_vae.py --train_data_dir data/shapes --vae_preset small --resolution 64 \
        --output_dir out/vae

Setup -> build or load the VAE (and the PatchGAN discriminator) -> data, the last --num_heldout images held out
-> accelerator.prepare -> loop (encode, sample z ~ q(z|x), decode, L1/L2 + kl_weight * KL (+ hinge GAN after
--disc_start_step), backward, clip, step) -> evaluate on the held-out images -> save.

The output folder is a diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors) whose
config.scaling_factor is 1 / std of the held-out latents, the role 0.18215 plays for Stable Diffusion, plus
vae_metrics.json. A re-run whose settings match the vae_metrics.json there reuses the VAE instead of training.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.presets import PRESETS
from ldm.seeding import keyed_generator
from ldm.training.config import TrainConfig, load_config, require
from ldm.training.data import TrainDataset, collate_fn
from ldm.training.distributed import check_epoch_read, finish, setup_logging, total_over_processes
from ldm.training.sources import load_image_caption_dataset
from ldm.training.transforms import ImageCaptionTransform, random_windows
from ldm.training.vae import (
    AutoencoderWithPosterior,
    PatchDiscriminator,
    VaeTrainConfig,
    autoencoder_loss,
    check_vae_resolution,
    evaluate_vae,
    hinge_discriminator_loss,
    psnr_db,
)

logger = get_logger(__name__)
METRICS_FILE = "vae_metrics.json"
# Flags that do not change the trained weights, so a re-run that differs only in them still reuses the VAE.
NOT_SETTINGS = ("output_dir", "report_to")


# ----------------------------------------------------------------------------- setup helpers


def run_settings(config: VaeTrainConfig, accelerator: Accelerator) -> dict:
    """Everything that determines the trained weights, as JSON values: what a reusable run must match."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_SETTINGS}
    settings["mixed_precision"] = accelerator.mixed_precision
    settings["num_processes"] = accelerator.num_processes
    # The preset's shape too, so that editing PRESETS retrains instead of reusing a VAE of the old shape.
    settings["vae_config"] = PRESETS[config.vae_preset]["vae"] if config.vae_preset else None
    return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from the file


def finished_run(output_dir: Path, settings: dict) -> dict | None:
    """The metrics of a finished run in output_dir with exactly these settings, else None."""
    metrics_path = output_dir / METRICS_FILE
    weights = output_dir / "diffusion_pytorch_model.safetensors"
    if not (metrics_path.is_file() and weights.is_file() and (output_dir / "config.json").is_file()):
        return None
    metrics = json.loads(metrics_path.read_text())
    return metrics if metrics.get("settings") == settings else None


def load_vae(config: VaeTrainConfig) -> AutoencoderKL:
    """A new VAE of the preset's shape (sample_size = resolution), or the pretrained one to fine-tune."""
    if config.vae_preset:
        return AutoencoderKL(**dict(PRESETS[config.vae_preset]["vae"], sample_size=config.resolution))
    vae = AutoencoderKL.from_pretrained(config.pretrained_vae)
    check_vae_resolution(config.resolution, vae.config, config.pretrained_vae)
    return vae


def build_datasets(config: VaeTrainConfig) -> tuple[TrainDataset, TrainDataset]:
    """Training images, and the last --num_heldout images held out (centre crop, never flipped)."""
    source = TrainConfig(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        train_data_dir=config.train_data_dir,
        image_column=config.image_column,
        caption_column=config.caption_column,
        cache_dir=config.cache_dir,
    )
    hf_dataset = load_image_caption_dataset(source)
    n, k = len(hf_dataset), config.num_heldout
    require(n > k, f"The dataset has {n} images; --num_heldout {k} leaves none to train on. Lower it.")
    columns = (config.image_column, config.caption_column)
    train_transform = ImageCaptionTransform(
        config.resolution, center_crop=True, random_flip=config.random_flip, seed=config.seed
    )
    heldout_transform = ImageCaptionTransform(
        config.resolution, center_crop=True, random_flip=False, seed=config.seed
    )
    train = TrainDataset(hf_dataset.select(range(n - k)), train_transform, *columns)
    heldout = TrainDataset(hf_dataset.select(range(n - k, n)), heldout_transform, *columns)
    return train, heldout


def pixels_or_placeholder(batch: dict, resolution: int) -> tuple[torch.Tensor, float]:
    """The batch's images and 1.0, or one blank image and 0.0 when every image of it was unreadable.

    The placeholder keeps every process running the same forward and backward passes (DDP needs that);
    its losses are multiplied by 0.0, so it adds no gradient.
    """
    x = batch["pixel_values"]  # (B, 3, H, W)
    if len(x):
        return x, 1.0
    return torch.zeros(1, 3, resolution, resolution), 0.0


def reuse_finished(accelerator: Accelerator, output_dir: Path, settings: dict) -> bool:
    """Whether output_dir already holds a VAE trained with these settings (said on the main process)."""
    finished = finished_run(output_dir, settings)
    if finished is not None and accelerator.is_main_process:
        print(
            f"Reusing the VAE in {output_dir}: it was trained with the same settings "
            f"(PSNR {finished['psnr_db']:.2f} dB, scaling_factor {finished['scaling_factor']:.5f})."
        )
    return finished is not None


def clear_output_dir(output_dir: Path) -> None:
    """Create output_dir and drop an older run's metrics, so a run stopped half-way is never taken for finished."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / METRICS_FILE).is_file():
        logger.info(f"{output_dir} holds a VAE trained with other settings; training a new one over it.")
    (output_dir / METRICS_FILE).unlink(missing_ok=True)


def check_finite(loss: float, step: int) -> None:
    """Stop the run on a NaN/inf loss, naming the step."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"The loss became {loss} at step {step}; training stopped. "
            "Lower --learning_rate, use bf16 instead of fp16, or check the data."
        )


def evaluate_and_save(
    accelerator, vae: AutoencoderKL, heldout, config: VaeTrainConfig, settings: dict, run: dict
):
    """Measure PSNR and the latent scaling factor on the held-out images, then save the VAE and its metrics."""
    heldout_batch = collate_fn([heldout[i] for i in range(len(heldout))])
    require(
        len(heldout_batch["pixel_values"]) > 0,
        f"None of the {len(heldout)} held-out images could be decoded; nothing to evaluate on.",
    )
    vae = vae.float()
    generator = keyed_generator(config.seed, 2**31, device=vae.device)
    metrics = evaluate_vae(vae, heldout_batch["pixel_values"], generator)
    # register_to_config, not attribute assignment: only the config is written by save_pretrained.
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    output_dir = Path(config.output_dir)
    vae.save_pretrained(output_dir)
    metrics.update(
        steps=run["steps"],
        seconds=run["seconds"],
        num_heldout=len(heldout_batch["pixel_values"]),
        skipped_images=run["skipped_images"] + heldout_batch["num_skipped"],
        settings=settings,
    )
    accelerator.log({"heldout_psnr_db": metrics["psnr_db"]}, step=run["steps"])
    # Written last: its presence marks a finished run that a re-run may reuse.
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"VAE: PSNR {metrics['psnr_db']:.2f} dB on {metrics['num_heldout']} held-out images, "
        f"scaling_factor {metrics['scaling_factor']:.5f} (latent std {metrics['latent_std']:.4f}), "
        f"{run['steps']} steps in {run['seconds']:.0f} s -> {output_dir}"
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(argv, VaeTrainConfig)
    except ValueError as err:
        raise SystemExit(f"train_vae.py: {err}") from None
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    setup_logging(accelerator)
    settings = run_settings(config, accelerator)
    if reuse_finished(accelerator, output_dir, settings):
        return
    set_seed(config.seed)
    if accelerator.is_main_process:
        clear_output_dir(output_dir)

    # Models: the VAE to train and, with --use_discriminator, the PatchGAN that judges its reconstructions.
    vae = load_vae(config)
    vae.train()
    model = AutoencoderWithPosterior(vae)
    disc = PatchDiscriminator() if config.use_discriminator else None

    # Data: the last --num_heldout images never train; they measure PSNR and the scaling factor at the end.
    train_dataset, heldout = build_datasets(config)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=config.dataloader_num_workers,
    )

    # Optimisation: AdamW for each network; the LR schedule is stepped once per process by accelerate.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if disc is not None:
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=config.learning_rate, weight_decay=0.0)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    # The adaptive GAN weight compares gradients at the decoder's output convolution.
    last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
    if accelerator.is_main_process:
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()
        }
        accelerator.init_trackers("vae", config=tracker_config)

    # The loop.
    progress = tqdm(
        range(config.max_train_steps), desc="train vae", disable=not accelerator.is_local_main_process
    )
    global_step, skipped_images, start = 0, 0, time.perf_counter()
    for epoch in itertools.count():
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        kept, skipped = 0, 0
        for batch in train_dataloader:
            skipped_images += batch["num_skipped"]
            kept, skipped = kept + len(batch["pixel_values"]), skipped + batch["num_skipped"]
            x, has_data = pixels_or_placeholder(batch, config.resolution)
            x = x.to(accelerator.device)
            generator = keyed_generator(
                config.seed, global_step, accelerator.process_index, device=accelerator.device
            )
            if config.crop_resolution is not None:  # the windows' places: a CPU draw, the same on any device
                windows = keyed_generator(config.seed, global_step, accelerator.process_index, 1)
                (x,) = random_windows(windows, config.crop_resolution, x)
            gan_on = disc is not None and global_step >= config.disc_start_step

            # The autoencoder (generator) step.
            loss, x_rec, logs = autoencoder_loss(model, disc, x, config, generator, gan_on, last_layer)
            accelerator.backward(loss * has_data)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

            # The discriminator step: real images against the (detached) reconstructions, in one forward.
            if gan_on:
                disc_optimizer.zero_grad()  # drop what the generator loss left in the discriminator
                logits_real, logits_fake = disc(torch.cat([x, x_rec.detach()])).chunk(2)
                d_loss = hinge_discriminator_loss(logits_real, logits_fake)
                accelerator.backward(d_loss * has_data)
                accelerator.clip_grad_norm_(disc.parameters(), config.max_grad_norm)
                disc_optimizer.step()
                disc_optimizer.zero_grad()
                logs["d_loss"] = d_loss.detach()

            global_step += 1
            progress.update(1)
            logs.update(loss=loss.detach(), psnr=psnr_db(x_rec.detach(), x).mean())
            logs = {k: v.item() for k, v in accelerator.reduce(logs, reduction="mean").items()}
            check_finite(logs["loss"], global_step)
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.1f}")
            accelerator.log(logs, step=global_step)
            if global_step >= config.max_train_steps:
                break
        else:  # the epoch ran to its end
            check_epoch_read(accelerator, kept, skipped, epoch)
        if global_step >= config.max_train_steps:
            break
    progress.close()
    seconds = time.perf_counter() - start
    total_skipped = total_over_processes(accelerator, skipped_images)
    if total_skipped:
        logger.warning(
            f"Skipped {total_skipped} unreadable training images in total.", main_process_only=True
        )

    # Evaluate on the held-out images and save, on the main process.
    if accelerator.is_main_process:
        run = {"steps": global_step, "seconds": round(seconds, 1), "skipped_images": total_skipped}
        evaluate_and_save(accelerator, accelerator.unwrap_model(model).vae, heldout, config, settings, run)
    finish(accelerator)


if __name__ == "__main__":
    main()
