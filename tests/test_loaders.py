"""diffusers' loaders and call arguments on LatentPipeline, against StableDiffusionPipeline on the same files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from ldm import LatentPipeline


def both(folder, scheduler=None):
    """LatentPipeline and StableDiffusionPipeline loaded from one folder: separate modules, same weights."""
    extra = {} if scheduler is None else {"scheduler": scheduler}
    ours = LatentPipeline.from_pretrained(folder, **extra)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, **extra)
    if scheduler is not None:
        theirs.scheduler = type(scheduler).from_config(scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def max_diff(ours, theirs, **kwargs) -> float:
    kwargs = dict(dict(prompt="a red cat", num_inference_steps=3, output_type="np"), **kwargs)
    a = ours(**kwargs, generator=torch.Generator().manual_seed(5)).images
    b = theirs(**kwargs, generator=torch.Generator().manual_seed(5)).images
    return float(np.abs(a - b).max())


def test_lora_loads_scales_and_fuses_as_in_diffusers(saved_tiny_pipe, lora_dir):
    ours, theirs = both(saved_tiny_pipe)
    without = ours(prompt="a red cat", num_inference_steps=3, output_type="np").images
    for pipe in (ours, theirs):
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    with_lora = ours(prompt="a red cat", num_inference_steps=3, output_type="np").images
    assert np.abs(with_lora - without).max() > 1e-3  # the adapter changes the image
    assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(ours, theirs, cross_attention_kwargs={"scale": 0.5}) <= 1e-4
    for pipe in (ours, theirs):
        pipe.fuse_lora(lora_scale=0.7)
    assert max_diff(ours, theirs) <= 1e-4
    assert ours.get_active_adapters() == ["style"]


def test_textual_inversion_matches_diffusers(saved_tiny_pipe, tmp_path):
    embedding = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"<shiny>": embedding}, tmp_path / "shiny.safetensors")
    ours, theirs = both(saved_tiny_pipe)
    for pipe in (ours, theirs):
        pipe.load_textual_inversion(tmp_path / "shiny.safetensors")
    token = ours.tokenizer.convert_tokens_to_ids("<shiny>")
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[token], embedding)
    assert max_diff(ours, theirs, prompt="a <shiny> cat") <= 1e-4


def test_clip_skip_matches_diffusers_definition_and_changes_the_image(saved_tiny_pipe):
    """diffusers 0.42's own clip_skip reads `text_encoder.text_model`, gone in transformers 5; so the oracle is
    diffusers' definition (the penultimate layer through the final layer norm) fed to StableDiffusionPipeline."""
    ours, theirs = both(saved_tiny_pipe)
    ids = ours.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = theirs.text_encoder(ids, output_hidden_states=True).hidden_states
        penultimate = theirs.text_encoder.final_layer_norm(states[-2])
    kwargs = dict(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(5))
    skipped = ours(prompt="a red cat", clip_skip=1, **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(5)
    expected = theirs(prompt_embeds=penultimate, **kwargs).images
    assert np.abs(skipped - expected).max() <= 1e-4
    full = ours(prompt="a red cat", num_inference_steps=3, output_type="np").images
    assert np.abs(skipped - full).max() > 1e-4


def test_custom_timesteps_and_sigmas_match_diffusers(saved_tiny_pipe):
    euler = EulerDiscreteScheduler.from_pretrained(saved_tiny_pipe, subfolder="scheduler")
    ours, theirs = both(saved_tiny_pipe, scheduler=euler)
    assert max_diff(ours, theirs, timesteps=[999, 600, 200]) <= 1e-4
    assert max_diff(ours, theirs, sigmas=[14.0, 3.0, 0.5]) <= 1e-4
    ours(prompt="a cat", timesteps=[999, 600, 200], output_type="latent")
    assert ours.num_timesteps == 3
    with pytest.raises(ValueError, match="at most one of `timesteps` and `sigmas`"):
        ours(prompt="a cat", timesteps=[999], sigmas=[1.0])
    ddim, _ = both(saved_tiny_pipe)
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom sigmas"):
        ddim(prompt="a cat", sigmas=[14.0, 1.0])


def test_an_old_scheduler_config_is_fixed_as_diffusers_fixes_it(saved_tiny_pipe):
    """steps_offset 0 and clip_sample true, as early Stable Diffusion repositories saved them."""
    config = dict(
        DDIMScheduler.load_config(saved_tiny_pipe, subfolder="scheduler"), steps_offset=0, clip_sample=True
    )
    old = DDIMScheduler.from_config(config)
    ours, theirs = both(saved_tiny_pipe, scheduler=old)
    theirs.scheduler = DDIMScheduler.from_config(config)
    ours.scheduler = DDIMScheduler.from_config(config)
    ours = LatentPipeline(**ours.components)  # the fix happens where diffusers makes it: at construction
    theirs = StableDiffusionPipeline(**theirs.components, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    ours.scheduler.set_timesteps(2)
    assert ours.scheduler.timesteps.tolist() == [501, 1]
    assert max_diff(ours, theirs, num_inference_steps=2) <= 1e-4


def test_interrupt_and_callbacks_read_the_guidance_properties(tiny_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps))
        pipe._interrupt = i == 1
        return tensors

    tiny_pipe(prompt="a cat", num_inference_steps=4, guidance_scale=3.0, callback_on_step_end=callback)
    assert seen == [(3.0, True, 4)] * 2  # steps 2 and 3 were skipped after the interrupt


def test_safety_checker_must_be_none(tiny_pipe):
    with pytest.raises(ValueError, match="runs no safety checker"):
        LatentPipeline(**{**tiny_pipe.components, "safety_checker": torch.nn.Identity()})
