"""Classifier-free guidance (Ho & Salimans 2022) and its rescaling (Lin et al. 2023), as plain tensor math.

Notation: eps_uncond and eps_cond are the UNet's noise predictions without and with the text, (B, C, h, w).
"""

from __future__ import annotations

import torch


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_hat = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_guidance(eps_hat: torch.Tensor, eps_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Blend eps_hat with itself rescaled to eps_cond's per-sample std (Lin et al. 2023, sec. 3.4, eq. 15-16)."""
    dims = list(range(1, eps_hat.ndim))
    rescaled = eps_hat * (eps_cond.std(dim=dims, keepdim=True) / eps_hat.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps_hat
