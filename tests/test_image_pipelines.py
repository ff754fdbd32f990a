"""img2img and inpainting against diffusers' own pipelines on identical weights, scheduler, images and seed."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, UNet2DConditionModel

from ldm import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentPipeline
from ldm.presets import unet_config


def rgb_image(seed: int, size: tuple[int, int] = (16, 16)) -> PIL.Image.Image:
    """A random RGB image of `size` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def mask_image(size: tuple[int, int] = (16, 16)) -> PIL.Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    return PIL.Image.fromarray(mask)


def stock(cls, pipe):
    """diffusers' pipeline `cls` on the same modules, with its own copy of the scheduler."""
    components = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "scheduler")}
    sd = cls(
        **components,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        safety_checker=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def same_images(ours, theirs, kwargs) -> float:
    a = ours(**kwargs, generator=torch.Generator().manual_seed(11)).images
    b = theirs(**kwargs, generator=torch.Generator().manual_seed(11)).images
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.fixture
def inpainting_pipe(tiny_pipe):
    """The tiny pipeline with a 9-channel inpainting UNet (latents + mask + masked-image latents)."""
    torch.manual_seed(1)
    config = unet_config("tiny", cross_attention_dim=32)
    unet = UNet2DConditionModel(**config, in_channels=9, out_channels=4).eval()
    pipe = LatentInpaintPipeline.from_pipe(tiny_pipe, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(tiny_pipe, strength):
    pipe = LatentImg2ImgPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a red circle", image=rgb_image(0, (24, 16)), strength=strength, num_inference_steps=4
    )
    kwargs.update(guidance_scale=7.5, output_type="np")
    assert same_images(pipe, stock(StableDiffusionImg2ImgPipeline, pipe), kwargs) <= 1e-4


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_with_a_text_to_image_unet_matches_diffusers(tiny_pipe, strength):
    pipe = LatentInpaintPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=["a red circle", "a cat"], image=rgb_image(1), mask_image=mask_image(), strength=strength
    )
    kwargs.update(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    assert same_images(pipe, stock(StableDiffusionInpaintPipeline, pipe), kwargs) <= 1e-4


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_with_an_inpainting_unet_matches_diffusers(inpainting_pipe, strength):
    kwargs = dict(prompt="a blue square", image=rgb_image(2), mask_image=mask_image(), strength=strength)
    kwargs.update(num_inference_steps=4, guidance_scale=7.5, output_type="np", num_images_per_prompt=2)
    theirs = stock(StableDiffusionInpaintPipeline, inpainting_pipe)
    assert same_images(inpainting_pipe, theirs, kwargs) <= 1e-4


def test_inpainting_keeps_the_unmasked_region(tiny_pipe):
    """With a text-to-image UNet the kept half's latents end as the image's own (the decoder then mixes them)."""
    pipe = LatentInpaintPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    image = rgb_image(3)
    kwargs = dict(prompt="a cat", image=image, num_inference_steps=3, output_type="latent")
    out = pipe(**kwargs, mask_image=mask_image(), generator=torch.Generator().manual_seed(0)).images
    keep_all = pipe(
        **kwargs, mask_image=PIL.Image.new("L", (16, 16), 0), generator=torch.Generator().manual_seed(0)
    ).images
    # Latents are 8x8 for 16 px images: the left 4 latent columns are kept, the right 4 repainted.
    assert torch.equal(out[..., :4], keep_all[..., :4])
    assert not torch.allclose(out[..., 4:], keep_all[..., 4:], atol=1e-2)


def test_from_pipe_shares_components_and_each_saves_and_loads(tiny_pipe, tmp_path):
    img2img = LatentImg2ImgPipeline.from_pipe(tiny_pipe)
    inpaint = LatentInpaintPipeline.from_pipe(img2img)
    assert img2img.unet is tiny_pipe.unet and inpaint.vae is tiny_pipe.vae
    assert isinstance(LatentPipeline.from_pipe(inpaint), LatentPipeline)
    kwargs = dict(prompt="a dog", image=rgb_image(4), num_inference_steps=2, output_type="np")
    for pipe, extra in ((img2img, {}), (inpaint, {"mask_image": mask_image()})):
        folder = tmp_path / type(pipe).__name__
        pipe.save_pretrained(folder)
        loaded = type(pipe).from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        before = pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(0)).images
        after = loaded(**kwargs, **extra, generator=torch.Generator().manual_seed(0)).images
        assert np.abs(before - after).max() <= 1e-6


BAD = {
    "strength above 1": (dict(strength=1.5), ValueError, "strength=1.5 must be a number in [0, 1]"),
    "strength below 0": (dict(strength=-0.1), ValueError, "strength=-0.1"),
    "strength leaves no step": (
        dict(strength=0.1, num_inference_steps=4),
        ValueError,
        "leaves no denoising step",
    ),
    "image not an image": (dict(image="photo.png"), TypeError, "image must be a PIL image"),
    "mask size": (dict(mask_image=mask_image((16, 24))), ValueError, "mask_image is 24x16"),
    "mask not an image": (dict(mask_image=3), TypeError, "mask_image must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_inputs_fail_before_any_model_call(tiny_pipe, case):
    extra, error, message = BAD[case]
    pipe = LatentInpaintPipeline.from_pipe(tiny_pipe)
    pipe.unet.forward = None  # any UNet call would fail differently
    kwargs = dict(prompt="a cat", image=rgb_image(5), mask_image=mask_image(), num_inference_steps=4)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipe(**{**kwargs, **extra})
    if "mask" not in case:
        img2img = LatentImg2ImgPipeline.from_pipe(tiny_pipe)
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            img2img(**{k: v for k, v in {**kwargs, **extra}.items() if k != "mask_image"})
