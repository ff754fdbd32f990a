"""The diffusion objective: draw eps and t, x_t = add_noise(x_0, eps, t), predict with the UNet, regress.

DDPM (Ho et al. 2020, eq. 14) with eps or v targets and optional Min-SNR weighting. The training loss and the
validation loss run the same `denoising_loss`; they differ only in how t and eps are drawn (random per step, or
fixed and evenly spaced so that the validation loss is comparable across steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ldm.seeding import keyed_generator
from ldm.training.config import TrainConfig


def sample_noise_and_timesteps(
    latents: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    timestep_sampling: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps ~ N(0, I) (plus a per-channel offset) and t; both drawn from `generator` on the CPU.

    t ~ U{0, ..., T-1} ("uniform"), or t = floor((1 - u^3) T), u ~ U[0, 1) ("cubic": T2I-Adapter, Mou et al. 2023,
    sec. 3.4; most draws land at high noise, where a sample's layout is decided: for models that learn a control).
    Drawing on the CPU from an explicit generator makes a step's randomness a function of its seed alone, the
    same on every device and after a resume.
    """
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model shift an image's mean brightness.
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    if timestep_sampling == "cubic":
        u = torch.rand((b,), generator=generator)
        timesteps = ((1 - u**3) * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    else:
        timesteps = torch.randint(0, num_train_timesteps, (b,), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def diffusion_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the UNet output and its target: eps for "epsilon", v = sqrt(ab) eps - sqrt(1-ab) x0 for "v_prediction".

    With `snr_gamma`, each sample is weighted by min(SNR_t, gamma) / SNR_t (eps) or / (SNR_t + 1) (v)
    (Min-SNR weighting, Hang et al. 2023, eq. 8).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not trainable here; use epsilon or v_prediction."
        )
    # The loss is computed in fp32 whatever the mixed-precision dtype of the prediction.
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is None:
        return per_sample.mean()
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=snr_gamma)
    weights = clipped / ratio if prediction_type == "epsilon" else clipped / (ratio + 1)
    return (per_sample * weights).mean()


def denoising_loss(
    unet,
    latents: torch.Tensor,
    text_embeds: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    controlnet=None,
    control: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps -> UNet(x_t, t, text) -> `diffusion_loss`.

    With a `controlnet`, it sees (x_t, t, text, `control` (B, 3, H, W) in [0, 1]) and its residuals are added to the
    UNet's skip connections and middle block (Zhang et al. 2023, eq. 5), the UNet itself frozen.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
    # DeepSpeed holds the trained model in half precision without autocast, so inputs must match its weights;
    # under accelerate's autocast the weights are fp32 and autocast picks the compute dtype.
    dtype = next((unet if controlnet is None else controlnet).parameters()).dtype
    noisy, text_embeds = noisy.to(dtype), text_embeds.to(dtype)
    residuals = {}
    if controlnet is not None:
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=text_embeds,
            controlnet_cond=control.to(noisy.device, dtype),
            return_dict=False,
        )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    pred = unet(noisy, timesteps, encoder_hidden_states=text_embeds, return_dict=False, **residuals)[0]
    return diffusion_loss(pred, latents, noise, timesteps, scheduler, snr_gamma)


def training_loss(
    unet,
    batch_encoder,
    batch: dict,
    scheduler: DDPMScheduler,
    config: TrainConfig,
    generator: torch.Generator,
    controlnet=None,
) -> torch.Tensor:
    """One micro-batch's loss, every draw (VAE sample, eps, t) from the step's `generator`; with a `controlnet`
    (the module that trains), conditioned on the batch's "conditioning_pixel_values".

    A micro-batch whose every image was unreadable gives a zero loss that still touches every parameter, so all
    processes run the same backward pass and stay in step.
    """
    trained = unet if controlnet is None else controlnet
    if len(batch["indices"]) == 0:
        return sum(p.sum() for p in trained.parameters()) * 0.0
    latents, text_embeds = batch_encoder(batch, generator)  # (B, C, h, w), (B, 77, D)
    noise, timesteps = sample_noise_and_timesteps(
        latents,
        scheduler.config.num_train_timesteps,
        generator,
        config.noise_offset,
        config.timestep_sampling,
    )
    control = batch.get("conditioning_pixel_values")  # (B, 3, H, W)
    if controlnet is not None and control is None:
        raise ValueError(
            "A ControlNet trains on batches with control images; the data has no conditioning column."
        )
    return denoising_loss(
        unet, latents, text_embeds, noise, timesteps, scheduler, config.snr_gamma, controlnet, control
    )


@torch.no_grad()
def validation_loss(
    unet, batch_encoder, batch: dict, scheduler: DDPMScheduler, seed: int, controlnet=None
) -> float:
    """Loss on a fixed held-out batch with fixed eps and evenly spaced t, captions kept: comparable across steps."""
    generator = keyed_generator(seed, 2**31 - 1)
    latents, text_embeds = batch_encoder(batch, generator, drop_captions=False)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    T = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, T - 1, len(latents)).long().to(latents.device)
    control = batch.get("conditioning_pixel_values")
    return denoising_loss(
        unet, latents, text_embeds, noise, timesteps, scheduler, None, controlnet, control
    ).item()
