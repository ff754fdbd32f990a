"""The diffusion training objective: noise the latents, predict, regress (DDPM, Ho et al. 2020, eq. 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def sample_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps ~ N(0, I) (plus a per-channel offset), t ~ U{0, ..., T-1}; both drawn from `generator` on the CPU.

    Drawing on the CPU from an explicit generator makes a step's randomness a function of its seed alone, the
    same on every device and after a resume.
    """
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model shift an image's mean brightness.
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator)
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
