"""LatentPipeline against diffusers' own StableDiffusionPipeline on identical weights, scheduler and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

CASES = {
    "prompt_cfg": dict(prompt="a red circle", guidance_scale=7.5),
    "negative_prompt": dict(prompt="a red circle", negative_prompt="a blue square", guidance_scale=7.5),
    "two_prompts_x2": dict(
        prompt=["a red circle", "a cat on the left"], num_images_per_prompt=2, guidance_scale=5.0
    ),
    "eta": dict(prompt="a green square", eta=0.5, guidance_scale=7.5),
    "no_guidance": dict(prompt="a dog at the top", guidance_scale=1.0),
    "guidance_rescale": dict(prompt="a red cat", guidance_scale=7.5, guidance_rescale=0.7),
    "non_square": dict(prompt="a blue circle on the right", height=16, width=24, guidance_scale=3.0),
}


def stock_sd(pipe) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline on the same modules, with its own copy of the scheduler."""
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stable_diffusion_pipeline(tiny_pipe, case):
    kwargs = dict(CASES[case], num_inference_steps=3, output_type="np")
    ours = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(7)).images
    theirs = stock_sd(tiny_pipe)(**kwargs, generator=torch.Generator().manual_seed(7)).images
    assert ours.shape == theirs.shape
    n = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1
    assert ours.shape[0] == n * kwargs.get("num_images_per_prompt", 1)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_matches_with_generator_list_and_latents(tiny_pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=2, output_type="np", latents=latents)
    ours = tiny_pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    theirs = stock_sd(tiny_pipe)(
        **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]
    ).images
    assert np.abs(ours - theirs).max() <= 1e-4
