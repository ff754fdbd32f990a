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

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.config import TrainConfig
from ldm.data import ImageCaptionTransform, TrainDataset, collate_fn, load_image_caption_dataset
from ldm.presets import PRESETS
from ldm.vae_training import (
    AutoencoderWithPosterior,
    PatchDiscriminator,
    adaptive_disc_weight,
    downsampling_factor,
    evaluate_vae,
    hinge_discriminator_loss,
    hinge_generator_loss,
    kl_loss,
    psnr_db,
    reconstruction_loss,
)

logger = get_logger(__name__)
METRICS_FILE = "vae_metrics.json"
# Flags that do not change the trained weights, so a re-run that differs only in them still reuses the VAE.
NOT_SETTINGS = ("output_dir", "report_to")
DISC_DEFAULTS = {"disc_weight": 0.5, "disc_weight_mode": "adaptive", "disc_start_step": 1000}


# ----------------------------------------------------------------------------- flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value or combination raises ValueError before anything is loaded."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--train_data_dir", help="an imagefolder or a folder of webdataset .tar shards")
    data.add_argument("--dataset_name", help="a Hub dataset (its train split)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default="text", help="unused, but the data loader checks it exists")
    data.add_argument("--cache_dir", help="where datasets caches downloads")
    data.add_argument("--resolution", type=int, default=64, help="side of the square centre crop")
    data.add_argument(
        "--random_flip", action="store_true", help="flip training images horizontally at random"
    )
    data.add_argument("--num_heldout", type=int, default=64, help="last N images: PSNR and scaling factor")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = p.add_argument_group("model (exactly one of)")
    model.add_argument("--vae_preset", help=f"build a new VAE from PRESETS[name]['vae']: {sorted(PRESETS)}")
    model.add_argument("--pretrained_vae", help="fine-tune this AutoencoderKL folder or Hub id")
    loss = p.add_argument_group("loss")
    loss.add_argument(
        "--recon_loss",
        choices=("l1", "l2"),
        default="l2",
        help="l2 reached 34 dB where l1 reached 24 dB on 32 px shapes with a 4x VAE (same 700 steps)",
    )
    loss.add_argument("--kl_weight", type=float, default=1e-6)
    loss.add_argument("--use_discriminator", action="store_true", help="add a PatchGAN hinge loss")
    loss.add_argument("--disc_weight", type=float, help=f"default {DISC_DEFAULTS['disc_weight']}")
    loss.add_argument("--disc_weight_mode", choices=("adaptive", "fixed"), help="default adaptive")
    loss.add_argument("--disc_start_step", type=int, help=f"default {DISC_DEFAULTS['disc_start_step']}")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=16)
    optim.add_argument("--max_train_steps", type=int, default=700)
    optim.add_argument("--learning_rate", type=float, default=1e-3)
    optim.add_argument(
        "--lr_scheduler", choices=("constant", "constant_with_warmup", "cosine", "linear"), default="cosine"
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=50)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="default: accelerate's")
    optim.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="ldm-vae")
    out.add_argument("--report_to", choices=("none", "tensorboard"), default="none")
    args = p.parse_args(argv)
    check_args(args)
    return args


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


def check_args(args: argparse.Namespace) -> None:
    """Fail on a bad flag or combination, naming it and the fix; fill in the discriminator defaults."""
    require(
        (args.vae_preset is None) != (args.pretrained_vae is None),
        "Give exactly one of --vae_preset (train a new VAE) or --pretrained_vae (fine-tune one); got "
        f"vae_preset={args.vae_preset!r}, pretrained_vae={args.pretrained_vae!r}.",
    )
    require(
        args.vae_preset is None or args.vae_preset in PRESETS,
        f"--vae_preset {args.vae_preset!r} is not a model preset; choose one of {sorted(PRESETS)}.",
    )
    require(
        (args.dataset_name is None) != (args.train_data_dir is None),
        "Give exactly one of --dataset_name or --train_data_dir; got "
        f"dataset_name={args.dataset_name!r}, train_data_dir={args.train_data_dir!r}.",
    )
    require(args.resolution > 0, f"--resolution must be positive; got {args.resolution}.")
    if args.vae_preset is not None:
        check_resolution(args.resolution, PRESETS[args.vae_preset]["vae"], f"preset {args.vae_preset!r}")
    for name in ("train_batch_size", "max_train_steps", "num_heldout"):
        require(getattr(args, name) >= 1, f"--{name} must be >= 1; got {getattr(args, name)}.")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        require(getattr(args, name) >= 0, f"--{name} must be >= 0; got {getattr(args, name)}.")
    require(args.learning_rate > 0, f"--learning_rate must be > 0; got {args.learning_rate}.")
    require(args.kl_weight >= 0, f"--kl_weight must be >= 0; got {args.kl_weight}.")
    require(args.max_grad_norm > 0, f"--max_grad_norm must be > 0; got {args.max_grad_norm}.")
    require(
        not (args.lr_scheduler == "constant" and args.lr_warmup_steps > 0),
        f"--lr_scheduler constant has no warm-up but --lr_warmup_steps is {args.lr_warmup_steps}; "
        "use --lr_scheduler constant_with_warmup, or --lr_warmup_steps 0.",
    )
    require(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32); got {args.seed}.")  # numpy's seed range
    given = [f"--{name}" for name in DISC_DEFAULTS if getattr(args, name) is not None]
    require(
        args.use_discriminator or not given,
        f"{', '.join(given)} only apply with --use_discriminator; add it or drop them.",
    )
    if args.use_discriminator:
        for name, default in DISC_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        require(args.disc_weight > 0, f"--disc_weight must be > 0; got {args.disc_weight}.")
        require(
            0 <= args.disc_start_step < args.max_train_steps,
            f"--disc_start_step {args.disc_start_step} must be in [0, max_train_steps={args.max_train_steps}), "
            "or the discriminator never trains; lower it or drop --use_discriminator.",
        )


def check_resolution(resolution: int, vae_config, source: str) -> None:
    """The image side must be a multiple of the VAE's downsampling factor, or the decoder cannot restore it."""
    factor = downsampling_factor(vae_config)
    require(
        resolution % factor == 0,
        f"--resolution {resolution} is not divisible by the downsampling factor {factor} of the VAE ({source}); "
        f"use a multiple of {factor}, e.g. {max(factor, resolution // factor * factor)}.",
    )


# ----------------------------------------------------------------------------- setup helpers


def run_settings(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Everything that determines the trained weights, as JSON values: what a reusable run must match."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["mixed_precision"] = accelerator.mixed_precision
    settings["num_processes"] = accelerator.num_processes
    # The preset's shape too, so that editing PRESETS retrains instead of reusing a VAE of the old shape.
    settings["vae_config"] = PRESETS[args.vae_preset]["vae"] if args.vae_preset else None
    return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from the file


def finished_run(output_dir: Path, settings: dict) -> dict | None:
    """The metrics of a finished run in output_dir with exactly these settings, else None."""
    metrics_path = output_dir / METRICS_FILE
    weights = output_dir / "diffusion_pytorch_model.safetensors"
    if not (metrics_path.is_file() and weights.is_file() and (output_dir / "config.json").is_file()):
        return None
    metrics = json.loads(metrics_path.read_text())
    return metrics if metrics.get("settings") == settings else None


def step_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, step, rank, ...), independent of the global RNG state."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator(device).manual_seed(seed)


def load_vae(args: argparse.Namespace) -> AutoencoderKL:
    """A new VAE of the preset's shape (sample_size = resolution), or the pretrained one to fine-tune."""
    if args.vae_preset:
        return AutoencoderKL(**dict(PRESETS[args.vae_preset]["vae"], sample_size=args.resolution))
    vae = AutoencoderKL.from_pretrained(args.pretrained_vae)
    check_resolution(args.resolution, vae.config, args.pretrained_vae)
    return vae


def build_datasets(args: argparse.Namespace) -> tuple[TrainDataset, TrainDataset]:
    """Training images, and the last --num_heldout images held out (centre crop, never flipped)."""
    source = TrainConfig(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        caption_column=args.caption_column,
        cache_dir=args.cache_dir,
    )
    hf_dataset = load_image_caption_dataset(source)
    n, k = len(hf_dataset), args.num_heldout
    require(n > k, f"The dataset has {n} images; --num_heldout {k} leaves none to train on. Lower it.")
    columns = (args.image_column, args.caption_column)
    train_transform = ImageCaptionTransform(
        args.resolution, center_crop=True, random_flip=args.random_flip, seed=args.seed
    )
    heldout_transform = ImageCaptionTransform(
        args.resolution, center_crop=True, random_flip=False, seed=args.seed
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


# ----------------------------------------------------------------------------- the training step


def autoencoder_loss(
    model, disc, x: torch.Tensor, args, generator: torch.Generator, gan_on: bool, last_layer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """L_rec + kl_weight * KL (+ lambda * L_GAN once the discriminator is on); returns (loss, x_rec, logs)."""
    x_rec, posterior = model(x, generator)  # (B, 3, H, W), q(z|x)
    rec = reconstruction_loss(x_rec, x, args.recon_loss)
    kl = kl_loss(posterior, x[0].numel())
    loss = rec + args.kl_weight * kl
    logs = {"rec": rec.detach(), "kl": kl.detach()}
    if gan_on:
        gan = hinge_generator_loss(disc(x_rec))
        weight = torch.tensor(args.disc_weight, device=x.device)
        if args.disc_weight_mode == "adaptive":
            weight = weight * adaptive_disc_weight(rec, gan, last_layer)
        loss = loss + weight * gan
        logs.update(g_loss=gan.detach(), disc_lambda=weight)
    return loss, x_rec, logs


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except ValueError as err:
        raise SystemExit(f"train_vae.py: {err}") from None
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    settings = run_settings(args, accelerator)
    finished = finished_run(output_dir, settings)
    if finished is not None:
        if accelerator.is_main_process:
            print(
                f"Reusing the VAE in {output_dir}: it was trained with the same settings "
                f"(PSNR {finished['psnr_db']:.2f} dB, scaling_factor {finished['scaling_factor']:.5f})."
            )
        return
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if (output_dir / METRICS_FILE).is_file():
            logger.info(f"{output_dir} holds a VAE trained with other settings; training a new one over it.")
        # Removed before training, so that a run stopped half-way is never taken for a finished one.
        (output_dir / METRICS_FILE).unlink(missing_ok=True)

    # Models: the VAE to train and, with --use_discriminator, the PatchGAN that judges its reconstructions.
    vae = load_vae(args)
    vae.train()
    model = AutoencoderWithPosterior(vae)
    disc = PatchDiscriminator() if args.use_discriminator else None

    # Data: the last --num_heldout images never train; they measure PSNR and the scaling factor at the end.
    train_dataset, heldout = build_datasets(args)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )

    # Optimisation: AdamW for each network; the LR schedule is stepped once per process by accelerate.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if disc is not None:
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=args.learning_rate, weight_decay=0.0)
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
        range(args.max_train_steps), desc="train vae", disable=not accelerator.is_local_main_process
    )
    global_step, skipped_images, start = 0, 0, time.perf_counter()
    for epoch in itertools.count():
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        for batch in train_dataloader:
            skipped_images += batch["num_skipped"]
            x, has_data = pixels_or_placeholder(batch, args.resolution)
            x = x.to(accelerator.device)
            generator = step_generator(accelerator.device, args.seed, global_step, accelerator.process_index)
            gan_on = disc is not None and global_step >= args.disc_start_step

            # The autoencoder (generator) step.
            loss, x_rec, logs = autoencoder_loss(model, disc, x, args, generator, gan_on, last_layer)
            accelerator.backward(loss * has_data)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

            # The discriminator step: real images against the (detached) reconstructions, in one forward.
            if gan_on:
                disc_optimizer.zero_grad()  # drop what the generator loss left in the discriminator
                logits_real, logits_fake = disc(torch.cat([x, x_rec.detach()])).chunk(2)
                d_loss = hinge_discriminator_loss(logits_real, logits_fake)
                accelerator.backward(d_loss * has_data)
                accelerator.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
                disc_optimizer.step()
                disc_optimizer.zero_grad()
                logs["d_loss"] = d_loss.detach()

            global_step += 1
            progress.update(1)
            logs.update(loss=loss.detach(), psnr=psnr_db(x_rec.detach(), x).mean())
            logs = {k: v.item() for k, v in accelerator.reduce(logs, reduction="mean").items()}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"The loss became {logs['loss']} at step {global_step}; training stopped. "
                    "Lower --learning_rate, use bf16 instead of fp16, or check the data."
                )
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.1f}")
            accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()
    seconds = time.perf_counter() - start
    total_skipped = int(accelerator.reduce(torch.tensor(skipped_images, device=accelerator.device), "sum"))
    if total_skipped:
        logger.warning(
            f"Skipped {total_skipped} unreadable training images in total.", main_process_only=True
        )

    # Evaluate on the held-out images and save, on the main process.
    if accelerator.is_main_process:
        heldout_batch = collate_fn([heldout[i] for i in range(len(heldout))])
        require(
            len(heldout_batch["pixel_values"]) > 0,
            f"None of the {len(heldout)} held-out images could be decoded; nothing to evaluate on.",
        )
        vae = accelerator.unwrap_model(model).vae.float()
        metrics = evaluate_vae(
            vae, heldout_batch["pixel_values"], step_generator(vae.device, args.seed, 2**31)
        )
        # register_to_config, not attribute assignment: only the config is written by save_pretrained.
        vae.register_to_config(scaling_factor=metrics["scaling_factor"])
        vae.save_pretrained(output_dir)
        metrics.update(
            steps=global_step,
            seconds=round(seconds, 1),
            num_heldout=len(heldout_batch["pixel_values"]),
            skipped_images=total_skipped + heldout_batch["num_skipped"],
            settings=settings,
        )
        accelerator.log({"heldout_psnr_db": metrics["psnr_db"]}, step=global_step)
        # Written last: its presence marks a finished run that a re-run may reuse.
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        print(
            f"VAE: PSNR {metrics['psnr_db']:.2f} dB on {metrics['num_heldout']} held-out images, "
            f"scaling_factor {metrics['scaling_factor']:.5f} (latent std {metrics['latent_std']:.4f}), "
            f"{global_step} steps in {seconds:.0f} s -> {output_dir}"
        )
    # Every rank waits here with the GIL released, which gives gloo's worker threads time to drop the last
    # collective's tensors before DDP's reducer and the process group are torn down: a worker still holding them
    # at exit needs the GIL that the teardown holds, and the process hangs (seen once on CPU in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
