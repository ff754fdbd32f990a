"""Autoencoder training: the run's options, the autoencoder loss, a PatchGAN discriminator, metrics.

Notation: ``x`` an image batch in [-1, 1] (B, 3, H, W); ``q(z|x) = N(mu, sigma^2)`` the encoder's posterior
over latents ``z`` (B, C, H/f, W/f); ``x_rec`` the decoder's reconstruction. The objective is that of the
Stable Diffusion autoencoder (Rombach et al. 2022, App. G; Esser et al. 2021, eq. 5-7)::

    L = L_rec(x, x_rec) + kl_weight * KL(q(z|x) || N(0, I)) + lambda * L_GAN

Both L_rec and the KL are divided by the number of pixel values (3 H W), so ``kl_weight`` means what it
means in the LDM configs (1e-6), where both are summed over the image instead, while the printed loss
reads as a per-pixel error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm.encoding import vae_scale_factor
from ldm.presets import PRESETS
from ldm.training.config import (
    INF,
    MixedPrecision,
    check_data_source,
    check_fields,
    check_preset,
    check_ranges,
    require,
)

ReconLoss = Literal["l1", "l2"]

RECON_LOSSES = {
    "l1": F.l1_loss,
    "l2": F.mse_loss,
}


# ----------------------------------------------------------------------------------------------------
# The run's options
# ----------------------------------------------------------------------------------------------------


VAE_RANGES: dict[str, tuple[float, float, bool, bool]] = {  # as config.TRAIN_RANGES
    "resolution": (1, INF, True, False),
    "num_heldout": (1, INF, True, False),
    "dataloader_num_workers": (0, INF, True, False),
    "train_batch_size": (1, INF, True, False),
    "max_train_steps": (1, INF, True, False),
    "learning_rate": (0, INF, False, False),
    "lr_warmup_steps": (0, INF, True, False),
    "adam_weight_decay": (0, INF, True, False),
    "max_grad_norm": (0, INF, False, False),
    "kl_weight": (0, INF, True, False),
}


@dataclass
class VaeTrainConfig:
    """Every option of an autoencoder training run (``train/train_vae.py``)."""

    # --- Data ---
    train_data_dir: str | None = field(
        default=None, metadata={"help": "an imagefolder or a folder of webdataset .tar shards"}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset (its train split)"})
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str = field(
        default="text", metadata={"help": "unused, but the data loader checks it exists"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "where datasets caches downloads"})
    resolution: int = field(default=64, metadata={"help": "side of the square centre crop"})
    crop_resolution: int | None = field(
        default=None,
        metadata={
            "help": "train on random squares of this side cut from each resolution-sized image (the held-out PSNR "
            "stays on whole images): the scale the VAE will encode, at a fraction of the cost; default whole images"
        },
    )
    random_flip: bool = field(default=False, metadata={"help": "flip training images horizontally at random"})
    num_heldout: int = field(default=64, metadata={"help": "last N images: PSNR and scaling factor"})
    dataloader_num_workers: int = 0

    # --- Model (exactly one of) ---
    vae_preset: str | None = field(
        default=None, metadata={"help": f"build a new VAE from PRESETS[name]['vae']: {sorted(PRESETS)}"}
    )
    pretrained_vae: str | None = field(
        default=None, metadata={"help": "fine-tune this AutoencoderKL folder or Hub id"}
    )

    # --- Loss ---
    # l2 reached 34 dB where l1 reached 24 dB on 32 px shapes with a 4x VAE (same 700 steps).
    recon_loss: ReconLoss = "l2"
    kl_weight: float = 1e-6
    use_discriminator: bool = field(default=False, metadata={"help": "add a PatchGAN hinge loss"})
    disc_weight: float | None = field(default=None, metadata={"help": "default 0.5"})
    disc_weight_mode: Literal["adaptive", "fixed"] | None = field(
        default=None, metadata={"help": "default adaptive"}
    )
    disc_start_step: int | None = field(default=None, metadata={"help": "default 1000"})

    # --- Optimisation ---
    train_batch_size: int = 16
    max_train_steps: int = 700
    learning_rate: float = 1e-3
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "cosine"
    lr_warmup_steps: int = 50
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision | None = field(default=None, metadata={"help": "default: accelerate's"})
    seed: int = 0

    # --- Output ---
    output_dir: str = "ldm-vae"
    report_to: Literal["none", "tensorboard"] = "none"

    def validate(self) -> None:
        """Check types and rules, naming the flag and the fix; fill in the discriminator defaults.

        Raises:
            ValueError: naming the first field or rule that is violated.
        """
        check_fields(self)
        require(
            (self.vae_preset is None) != (self.pretrained_vae is None),
            "Give exactly one of --vae_preset (train a new VAE) or --pretrained_vae (fine-tune one); got "
            f"vae_preset={self.vae_preset!r}, pretrained_vae={self.pretrained_vae!r}.",
        )
        check_preset("--vae_preset", self.vae_preset)
        check_data_source(self.dataset_name, self.train_data_dir)
        check_ranges(self, VAE_RANGES, prefix="--")
        if self.vae_preset is not None:
            check_vae_resolution(
                self.resolution, PRESETS[self.vae_preset]["vae"], f"preset {self.vae_preset!r}"
            )
        if self.crop_resolution is not None:
            require(
                0 < self.crop_resolution <= self.resolution,
                f"--crop_resolution {self.crop_resolution} must be in (0, --resolution {self.resolution}]; or drop "
                "it to train on whole images.",
            )
            if self.vae_preset is not None:
                vae = PRESETS[self.vae_preset]["vae"]
                check_vae_resolution(
                    self.crop_resolution, vae, f"preset {self.vae_preset!r}", "--crop_resolution"
                )
        require(
            not (self.lr_scheduler == "constant" and self.lr_warmup_steps > 0),
            f"--lr_scheduler constant has no warm-up but --lr_warmup_steps is {self.lr_warmup_steps}; "
            "use --lr_scheduler constant_with_warmup, or --lr_warmup_steps 0.",
        )
        require(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32); got {self.seed}.")  # numpy's range
        self._check_discriminator()

    def _check_discriminator(self) -> None:
        """The GAN options apply only with use_discriminator, which fills in their defaults."""
        defaults = {"disc_weight": 0.5, "disc_weight_mode": "adaptive", "disc_start_step": 1000}
        given = [f"--{name}" for name in defaults if getattr(self, name) is not None]
        require(
            self.use_discriminator or not given,
            f"{', '.join(given)} only apply with --use_discriminator; add it or drop them.",
        )
        if not self.use_discriminator:
            return
        for name, default in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        require(self.disc_weight > 0, f"--disc_weight must be > 0; got {self.disc_weight}.")
        require(
            0 <= self.disc_start_step < self.max_train_steps,
            f"--disc_start_step {self.disc_start_step} must be in [0, max_train_steps={self.max_train_steps}), "
            "or the discriminator never trains; lower it or drop --use_discriminator.",
        )


def check_vae_resolution(resolution: int, vae_config, source: str, flag: str = "--resolution") -> None:
    """The image side must be a multiple of the VAE's downsampling factor, or the decoder cannot restore it."""
    factor = vae_scale_factor(vae_config)
    require(
        resolution % factor == 0,
        f"{flag} {resolution} is not divisible by the downsampling factor {factor} of the VAE ({source}); "
        f"use a multiple of {factor}, e.g. {max(factor, resolution // factor * factor)}.",
    )


# ----------------------------------------------------------------------------------------------------
# The autoencoder and its losses
# ----------------------------------------------------------------------------------------------------


class AutoencoderWithPosterior(nn.Module):
    """An ``AutoencoderKL`` whose forward returns the reconstruction and the posterior.

    ``AutoencoderKL.forward`` returns only the reconstruction; the KL term needs ``q(z|x)`` as well, and
    under DDP both must come out of one ``forward`` call of the wrapped module, so this is what
    ``accelerator.prepare`` wraps. Save ``.vae``.

    Args:
        vae: the autoencoder to train.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """``x`` (B, 3, H, W) -> ``(x_rec, q(z|x))``, decoding a posterior sample ``z ~ q(z|x)``."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator)  # (B, C, H/f, W/f)
        return self.vae.decode(z).sample, posterior


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: ReconLoss) -> torch.Tensor:
    """Mean L1 or squared error per pixel value, in the [-1, 1] range the VAE works in."""
    return RECON_LOSSES[kind](x_rec.float(), x.float())


def kl_loss(posterior: DiagonalGaussianDistribution, num_pixel_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch, divided by 3 H W (see module doc)."""
    return posterior.kl().float().mean() / num_pixel_values


# ----------------------------------------------------------------------------------------------------
# Adversarial loss
# ----------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): one real/fake logit per overlapping image patch.

    ``num_layers`` stride-2 4x4 convolutions (GroupNorm and LeakyReLU between them), then a 3x3
    convolution to one channel; a (B, 3, H, W) image gives logits (B, 1, H / 2^num_layers, W / 2^num_layers).
    GroupNorm rather than the original BatchNorm, so the output does not depend on the batch size.

    Args:
        in_channels: image channels.
        base_channels: channels after the first convolution; doubled by each later one, up to 8x.
        num_layers: stride-2 convolutions; the image side must be divisible by 2^num_layers.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for i in range(1, num_layers):
            out = base_channels * min(2**i, 8)
            layers += [
                nn.Conv2d(channels, out, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the pix2pix initialisation
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> patch logits (B, 1, H / 2^num_layers, W / 2^num_layers)."""
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator (the decoder): -mean D(x_rec)."""
    return -logits_fake.float().mean()


def adaptive_disc_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """lambda = ||grad_L rec_loss|| / (||grad_L gan_loss|| + 1e-4) at the decoder's last layer L (Esser et al. eq. 7).

    It balances the two gradients where they meet, so the GAN term neither swamps nor vanishes next to the
    reconstruction term as their scales drift during training. Detached: it is a weight, not a loss.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def psnr_db(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(1 / MSE), of images in [-1, 1] mapped to [0, 1]; shape (B,).

    The reconstruction is clamped to the valid range first, as it would be when saved as an image.
    """
    x01 = (x.float() + 1) / 2
    rec01 = ((x_rec.float() + 1) / 2).clamp(0, 1)
    mse = (rec01 - x01).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_vae(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, batch_size: int = 64
) -> dict[str, float]:
    """Held-out reconstruction quality and latent statistics of a VAE.

    The scaling factor is measured on posterior *samples* z ~ q(z|x), because samples are what a latent
    diffusion model trains on (``vae.encode(x).latent_dist.sample() * scaling_factor``). Their variance is
    var(mu) + E[sigma^2], a little more than the means' (about 2% in std for the 32 px shapes VAE). PSNR uses
    the posterior mean, the deterministic reconstruction.

    Args:
        vae: the autoencoder, in fp32; put in eval mode here.
        images: (N, 3, H, W) in [-1, 1], on any device.
        generator: source of the posterior samples, for a reproducible scaling factor.
        batch_size: images per forward pass.

    Returns:
        ``psnr_db`` (mean over images of the per-image PSNR), ``latent_mean``, ``latent_std`` (over every
        element of every sampled latent) and ``scaling_factor`` = 1 / ``latent_std``.

    Raises:
        ValueError: if ``images`` is empty.
    """
    if len(images) == 0:
        raise ValueError("evaluate_vae needs at least one image.")
    vae.eval()
    device = vae.device
    psnrs, latents = [], []
    for chunk in images.split(batch_size):
        x = chunk.to(device, vae.dtype)
        posterior = vae.encode(x).latent_dist
        latents.append(posterior.sample(generator).float().cpu())  # (b, C, h, w)
        psnrs.append(psnr_db(vae.decode(posterior.mean).sample, x).cpu())
    z = torch.cat(latents)
    latent_std = z.std().item()
    return {
        "psnr_db": torch.cat(psnrs).mean().item(),
        "latent_mean": z.mean().item(),
        "latent_std": latent_std,
        "scaling_factor": 1.0 / latent_std,
    }


def autoencoder_loss(
    model, disc, x: torch.Tensor, config, generator: torch.Generator, gan_on: bool, last_layer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """L_rec + kl_weight * KL (+ lambda * L_GAN once the discriminator is on); returns (loss, x_rec, logs).

    `config` is the run's `VaeTrainConfig` (recon_loss, kl_weight, disc_weight, disc_weight_mode).
    """
    x_rec, posterior = model(x, generator)  # (B, 3, H, W), q(z|x)
    rec = reconstruction_loss(x_rec, x, config.recon_loss)
    kl = kl_loss(posterior, x[0].numel())
    loss = rec + config.kl_weight * kl
    logs = {"rec": rec.detach(), "kl": kl.detach()}
    if gan_on:
        gan = hinge_generator_loss(disc(x_rec))
        weight = torch.tensor(config.disc_weight, device=x.device)
        if config.disc_weight_mode == "adaptive":
            weight = weight * adaptive_disc_weight(rec, gan, last_layer)
        loss = loss + weight * gan
        logs.update(g_loss=gan.detach(), disc_lambda=weight)
    return loss, x_rec, logs
