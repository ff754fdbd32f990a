"""What sampling and training share: latent scaling against its definition, the VAE factor, keyed generators."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from ldm.encoding import scale_latents, unscale_latents, vae_scale_factor
from ldm.presets import PRESETS
from ldm.seeding import keyed_generator


def test_scaling_matches_its_definition_and_inverts():
    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8, latent_channels=4, scaling_factor=0.25)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scale_latents(z, vae), z * 0.25)
    torch.testing.assert_close(unscale_latents(scale_latents(z, vae), vae), z)
    vae.register_to_config(shift_factor=0.5)
    torch.testing.assert_close(scale_latents(z, vae), (z - 0.5) * 0.25)
    torch.testing.assert_close(unscale_latents(scale_latents(z, vae), vae), z)


def test_vae_scale_factor_from_a_model_config_and_a_preset_dict():
    vae = AutoencoderKL(**PRESETS["small"]["vae"])
    assert vae_scale_factor(vae.config) == vae_scale_factor(PRESETS["small"]["vae"]) == 8
    assert vae_scale_factor(PRESETS["tiny"]["vae"]) == 2


def test_keyed_generator_depends_on_its_key_alone():
    torch.manual_seed(123)  # the global RNG must not matter
    a = torch.randn(4, generator=keyed_generator(0, 5, 1))
    torch.manual_seed(456)
    assert torch.equal(a, torch.randn(4, generator=keyed_generator(0, 5, 1)))
    assert not torch.equal(a, torch.randn(4, generator=keyed_generator(0, 5, 0)))
    assert not torch.equal(a, torch.randn(4, generator=keyed_generator(0, 6, 1)))
