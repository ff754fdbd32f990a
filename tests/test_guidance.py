"""Classifier-free guidance: one UNet call per step, and eps_hat = eps_u + s * (eps_c - eps_u)."""

from __future__ import annotations

import pytest
import torch

from ldm import classifier_free_guidance, rescale_guidance


def count_unet_calls(pipe) -> list[int]:
    """Wrap the UNet's forward; returns the list of batch sizes it is called with."""
    calls: list[int] = []
    forward = pipe.unet.forward

    def counting_forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting_forward
    return calls


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_at_most_one_skips_the_unconditional_branch(tiny_pipe, scale):
    calls = count_unet_calls(tiny_pipe)
    tiny_pipe(["a cat", "a dog"], guidance_scale=scale, num_inference_steps=4, output_type="latent")
    assert calls == [2] * 4  # one unbatched call per step: two prompts, no unconditional copies


def test_guidance_above_one_is_one_batched_call_per_step(tiny_pipe):
    calls = count_unet_calls(tiny_pipe)
    tiny_pipe(["a cat", "a dog"], guidance_scale=7.5, num_inference_steps=4, output_type="latent")
    assert calls == [4] * 4  # [uncond(2), cond(2)] in one call


class StubUNet(torch.nn.Module):
    """eps depends only on the text context, so the guided result can be predicted by hand."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, sample, t, encoder_hidden_states, return_dict=False, **conditioning):
        per_sample = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (sample * 0 + per_sample,)


@pytest.mark.parametrize("scale", [1.5, 3.0, 7.5])
def test_guided_prediction_matches_definition(tiny_pipe, scale):
    tiny_pipe.scheduler.set_timesteps(5)
    stub = StubUNet(tiny_pipe.unet.config)
    latents = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    t = tiny_pipe.scheduler.timesteps[0]
    pipe_unet = tiny_pipe.unet
    tiny_pipe.unet = stub
    tiny_pipe.start_call(scale, guidance_rescale=0.0, clip_skip=None, cross_attention_kwargs=None)
    try:
        # Under guidance the context is [negative; positive], as in diffusers.
        eps_hat = tiny_pipe.predict_noise(latents, t, torch.cat([uncond, cond]), guidance_scale=scale)
    finally:
        tiny_pipe.unet = pipe_unet
    eps_c = cond.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(latents)
    eps_u = uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(latents)
    assert torch.allclose(eps_hat, eps_u + scale * (eps_c - eps_u), atol=1e-6)


def test_guidance_functions():
    eps_u, eps_c = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.allclose(classifier_free_guidance(eps_u, eps_c, 1.0), eps_c, atol=1e-6)
    assert torch.equal(classifier_free_guidance(eps_u, eps_c, 0.0), eps_u)
    guided = classifier_free_guidance(eps_u, eps_c, 7.5)
    # rescale = 1 gives eps_hat with eps_cond's per-sample std; rescale = 0 leaves it alone.
    full = rescale_guidance(guided, eps_c, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)), atol=1e-5)
    assert torch.equal(rescale_guidance(guided, eps_c, 0.0), guided)
