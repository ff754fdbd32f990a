"""A tiny autoencoder distilled from a pipeline's VAE (TAESD-style: diffusers' `AutoencoderTiny`): its options, its
loss, its validation and what its checkpoints and output folder hold.

Notation: ``x`` an image batch in [-1, 1] (B, 3, H, W); ``E``, ``D`` the frozen VAE's encoder (posterior mean) and
decoder; ``s`` its latent scaling (`scale_latents`: the diffusion model's unit-variance space, where a sampler's
latents live); ``e``, ``d`` the tiny encoder and decoder, which work in that scaled space directly (as TAESD does for
Stable Diffusion, so their `scaling_factor` is 1)::

    z ~ q(z | x)                                 the VAE's posterior, sampled
    L = || e(x) - s(E(x)) ||^2 + || d(s(z)) - D(z) ||^2

Both targets are the VAE's, not the image: the tiny decoder learns to draw what the VAE's decoder draws from the same
latents (its reconstruction, errors included), so that a pipeline gives the same pictures with either, only faster.
The decoder reads sampled latents, not only means, as a sampler's latents are not exactly any image's mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor

from ldm.encoding import scale_latents
from ldm.images import image_grid
from ldm.training.config import TrainConfig, require
from ldm.training.distributed import full_model
from ldm.training.vae import psnr_db
from ldm.training.validation import save_grid

logger = get_logger(__name__)

# The held-out images the validation grid shows (its rows: image | VAE | tiny autoencoder).
GRID_IMAGES = 8
# The folder of a checkpoint that holds the tiny autoencoder (the final output folder holds it at its top).
EXPORT_FOLDER = "tiny_vae"


@dataclass
class TinyVaeTrainConfig(TrainConfig):
    """`train/train_tiny_vae.py`'s options: `TrainConfig`'s (data, optimiser, EMA, checkpoints, Hub), with the
    shape of the tiny autoencoder in `AutoencoderTiny`'s own argument names (their defaults are TAESD's).

    `pretrained_model_name_or_path` is the pipeline whose VAE is distilled (or `pretrained_vae_model_name_or_path`
    a VAE folder); the tiny autoencoder has one block level per VAE level, so that it has the VAE's factor.
    """

    encoder_block_out_channels: list[int] = field(default_factory=lambda: [64, 64, 64, 64])
    num_encoder_blocks: list[int] = field(default_factory=lambda: [1, 3, 3, 3])
    decoder_block_out_channels: list[int] = field(default_factory=lambda: [64, 64, 64, 64])
    num_decoder_blocks: list[int] = field(default_factory=lambda: [3, 3, 3, 1])
    center_crop: bool = True
    tracker_project_name: str = "ldm-tiny-vae"
    output_dir: str = "ldm-tiny-vae"

    def validate(self) -> None:
        """`TrainConfig.validate`, then what a tiny autoencoder adds.

        Raises:
            ValueError: naming the first field or rule that is violated and how to fix it.
        """
        super().validate()
        for name, why in (
            ("lora_rank", "the whole tiny autoencoder trains"),
            ("unet_preset", "no UNet trains; the tiny autoencoder's shape is its *_blocks options"),
            ("validation_prompts", "the grid shows held-out images through both autoencoders"),
            ("cache_dir", "the tiny encoder learns from pixels, which the latent cache does not hold"),
            ("snr_gamma", "there is no diffusion loss"),
            ("prediction_type", "there is no diffusion loss"),
        ):
            require(
                getattr(self, name) is None, f"{name} is not a tiny autoencoder option: {why}; drop --{name}."
            )
        for name, why in (
            ("aspect_buckets", "it trains at one resolution"),
            ("noise_offset", "there is no diffusion loss"),
            ("rescale_betas_zero_snr", "there is no diffusion loss"),
            ("lora_alpha", "the whole tiny autoencoder trains"),
        ):
            require(
                not getattr(self, name), f"{name} is not a tiny autoencoder option: {why}; drop --{name}."
            )
        require(
            self.timestep_sampling == "uniform",
            "timestep_sampling is not a tiny autoencoder option: there is no diffusion loss; drop --timestep_sampling.",
        )
        require(
            not self.export_single_file,
            "export_single_file writes a text-to-image checkpoint; a tiny autoencoder saves its own folder. Drop "
            "--export_single_file.",
        )
        for side in ("encoder", "decoder"):
            channels = getattr(self, f"{side}_block_out_channels")
            blocks = getattr(self, f"num_{side}_blocks")
            require(
                len(channels) == len(blocks) >= 1,
                f"{side}_block_out_channels={channels} and num_{side}_blocks={blocks} need one entry per level, "
                "as many as the VAE has.",
            )
            # AutoencoderTiny's blocks keep their width between levels (each level's blocks read the last one's
            # output unchanged), so a level of another width fails at its first forward pass.
            require(
                len(set(channels)) == 1 and channels[0] >= 1,
                f"{side}_block_out_channels={channels}: AutoencoderTiny needs one positive width at every level "
                f"(e.g. {[max(channels)] * len(channels)}).",
            )
            require(all(n >= 0 for n in blocks), f"num_{side}_blocks={blocks}: block counts must be >= 0.")


def check_levels(config: TinyVaeTrainConfig, vae_config) -> None:
    """The tiny autoencoder has the VAE's factor: as many levels, and the VAE's latent channels (from its config,
    before any weight loads)."""
    levels = len(vae_config["block_out_channels"])
    require(
        len(config.decoder_block_out_channels) == levels and len(config.encoder_block_out_channels) == levels,
        f"The VAE has {levels} levels (a factor of {2 ** (levels - 1)}); give encoder_block_out_channels, "
        f"num_encoder_blocks, decoder_block_out_channels and num_decoder_blocks {levels} entries each (got "
        f"{len(config.encoder_block_out_channels)} and {len(config.decoder_block_out_channels)}).",
    )


class TinyVaeStudent(AutoencoderTiny):
    """The AutoencoderTiny that trains: its forward runs both halves on their own inputs, (pixels, scaled latents)
    -> (latents, pixels), so that the loss goes through the module accelerate prepared (DDP syncs gradients only
    through its forward). AutoencoderTiny's own forward rounds the latents to 8 bits between the halves, which
    has no gradient. Saved as a plain AutoencoderTiny (`plain_tiny_vae`)."""

    def forward(self, pixels: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(pixels), self.decoder(latents)


def build_tiny_vae(config: TinyVaeTrainConfig, vae: AutoencoderKL) -> TinyVaeStudent:
    """A new tiny autoencoder of the configured shape, with the VAE's image and latent channels; scaling_factor 1,
    since it reads and writes the VAE's latents already scaled."""
    return TinyVaeStudent(
        in_channels=vae.config.in_channels,
        out_channels=vae.config.out_channels,
        latent_channels=vae.config.latent_channels,
        encoder_block_out_channels=tuple(config.encoder_block_out_channels),
        num_encoder_blocks=tuple(config.num_encoder_blocks),
        decoder_block_out_channels=tuple(config.decoder_block_out_channels),
        num_decoder_blocks=tuple(config.num_decoder_blocks),
        scaling_factor=1.0,
    )


# ----------------------------------------------------------------------------- the loss


@torch.no_grad()
def vae_targets(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator):
    """(scaled posterior means, scaled posterior samples, the VAE's decoding of those samples) for pixels in
    [-1, 1]; the sample's noise drawn from `generator` on the CPU."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    z = posterior.mean + posterior.std * noise
    decoded = vae.decode(z, return_dict=False)[0].clamp(-1, 1)
    return scale_latents(posterior.mean, vae).float(), scale_latents(z, vae).float(), decoded.float()


def tiny_vae_loss(
    model: torch.nn.Module, vae: AutoencoderKL, pixels: torch.Tensor, config: TinyVaeTrainConfig, generator
) -> torch.Tensor:
    """The distillation loss of one batch of pixels (module docstring); `model` is the `TinyVaeStudent` as
    prepared by accelerate.

    A micro-batch whose every image was unreadable gives a zero loss that still touches every parameter, so all
    processes run the same backward pass and stay in step.
    """
    if len(pixels) == 0:
        return sum(p.sum() for p in model.parameters()) * 0.0
    means, latents, decoded = vae_targets(vae, pixels, generator)
    encoded, tiny_decoded = model(pixels, latents.to(pixels))
    loss = F.mse_loss(tiny_decoded.float(), decoded)
    return loss + F.mse_loss(encoded.float(), means)


# ----------------------------------------------------------------------------- validation and export


@torch.no_grad()
def tiny_vae_metrics(tiny: AutoencoderTiny, vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[dict, list]:
    """PSNRs (dB) on held-out pixels: the tiny decoder against the VAE's decoder on the VAE's latents, each
    autoencoder's round trip against the image; and the grid's rows (image, VAE, tiny round trips)."""
    pixels = pixels.to(vae.device, vae.dtype)
    z = vae.encode(pixels).latent_dist.mean
    by_vae = vae.decode(z, return_dict=False)[0].float()
    tiny_decoded = tiny.decode(scale_latents(z, vae).to(tiny.dtype), return_dict=False)[0].float()
    round_trip = tiny.decode(tiny.encode(pixels.to(tiny.dtype), return_dict=False)[0], return_dict=False)[0]
    logs = {
        "psnr_decoder_vs_vae": psnr_db(tiny_decoded, by_vae).mean().item(),
        "psnr_vae": psnr_db(by_vae, pixels).mean().item(),
        "psnr_tiny": psnr_db(round_trip.float(), pixels).mean().item(),
    }
    return logs, [pixels.float(), by_vae, round_trip.float()]


def validate_tiny_vae(accelerator, model, vae, ema, heldout_batch, config: TinyVaeTrainConfig, step: int):
    """The held-out PSNRs and a grid (rows: image | VAE | tiny autoencoder; EMA weights when on), on the main
    process. A collective call; a failing validation is logged, never fatal: its checkpoint is already saved."""
    trained = full_model(accelerator, model)
    if not accelerator.is_main_process:
        return {}, None
    try:
        tiny = plain_tiny_vae(trained, ema).eval()
        logs, rows = tiny_vae_metrics(tiny, vae, heldout_batch["pixel_values"])
        cols = min(GRID_IMAGES, len(rows[0]))
        images = [
            im for row in rows for im in VaeImageProcessor().postprocess(row[:cols].cpu(), output_type="pil")
        ]
        grid = image_grid(images, cols=cols)
        return logs, save_grid(accelerator, grid, config, step, "image | VAE | tiny autoencoder")
    except Exception as err:
        logger.warning(f"Validation at step {step} failed ({type(err).__name__}: {err}); training goes on.")
        return {}, None


def plain_tiny_vae(trained: TinyVaeStudent, ema) -> AutoencoderTiny:
    """The trained weights (the EMA's when EMA is on) in a plain AutoencoderTiny, what diffusers loads."""
    # AutoencoderTiny records block_out_channels in its config for the pipelines but does not take it back.
    tiny = AutoencoderTiny.from_config({k: v for k, v in trained.config.items() if k != "block_out_channels"})
    tiny.to(trained.device)
    if ema is None:
        tiny.load_state_dict(trained.state_dict())
    else:
        ema.copy_to(tiny.parameters())
    return tiny


@dataclass
class TinyVaeExport:
    """What a checkpoint writes besides accelerate's state: the tiny autoencoder (EMA weights when on)."""

    ema: object = None

    def save(self, trained: TinyVaeStudent, config: TrainConfig, folder: Path) -> str:
        plain_tiny_vae(trained, self.ema).save_pretrained(folder / EXPORT_FOLDER)
        return EXPORT_FOLDER


def tiny_vae_model_card(config: TinyVaeTrainConfig, repo_id: str, grid_name: str | None) -> str:
    """README.md of a tiny autoencoder folder: what it was distilled from and how to sample with it."""
    settings = {
        k: getattr(config, k)
        for k in (
            "pretrained_model_name_or_path", "encoder_block_out_channels", "num_encoder_blocks",
            "decoder_block_out_channels", "num_decoder_blocks", "resolution", "train_batch_size",
            "max_train_steps", "learning_rate", "seed",
        )
    }  # fmt: skip
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {config.pretrained_model_name_or_path}",
        "tags: [ldm, autoencoder, taesd]",
        "---",
        f"# {repo_id}",
        "",
        f"A tiny autoencoder (diffusers' `AutoencoderTiny`) distilled from the VAE of "
        f"`{config.pretrained_model_name_or_path}` with ldm's `train/train_tiny_vae.py`: it reads and writes that "
        "pipeline's latents, and decodes them in a fraction of the VAE's time.",
        "",
        "```python",
        "from diffusers import AutoencoderTiny",
        "from ldm import LatentPipeline",
        f'pipe = LatentPipeline.from_pretrained("{config.pretrained_model_name_or_path}")',
        f'pipe.vae = AutoencoderTiny.from_pretrained("{repo_id}")',
        "```",
        "",
        "## Training settings",
        "",
        *[f"- {k}: {v}" for k, v in settings.items()],
    ]
    if grid_name:
        lines += ["", f"![validation: image | VAE | tiny autoencoder]({grid_name})"]
    return "\n".join(lines) + "\n"
