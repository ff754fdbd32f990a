"""The ControlNet pipelines against diffusers' own on identical weights, images and seed; their checks, saving,
ldm-generate's ControlNet flags and the Canny edge map."""

from __future__ import annotations

import json
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)

from ldm import (
    LatentControlNetImg2ImgPipeline,
    LatentControlNetInpaintPipeline,
    LatentControlNetPipeline,
    LatentPipeline,
)
from ldm.cli import main
from ldm.control import canny_edges
from tests.test_image_pipelines import mask_image, rgb_image, same_images, stock

# A ControlNet's zero-initialised layers, and the random scale each gets in tests: the convolutions that make its
# residuals, and the control image embedding's last convolution (larger, so that the control image matters).
ZERO_LAYERS = {
    "controlnet_down_blocks": 0.3,
    "controlnet_mid_block": 0.3,
    "controlnet_cond_embedding.conv_out": 1.0,
}


def make_controlnet(unet, seed: int) -> ControlNetModel:
    """A ControlNet copied from `unet` with random instead of zero `ZERO_LAYERS`, so that it changes the image.

    Two conditioning blocks downsample control images 2x, the tiny VAE's factor.
    """
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, scale in ZERO_LAYERS.items():
            for param in controlnet.get_submodule(layer).parameters():
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return controlnet


@pytest.fixture
def controlnets(tiny_pipe):
    return make_controlnet(tiny_pipe.unet, 1), make_controlnet(tiny_pipe.unet, 2)


def controlnet_pipe(cls, tiny_pipe, controlnet):
    pipe = cls.from_pipe(tiny_pipe, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BASE = dict(prompt=["a red circle", "a cat"], num_inference_steps=3, guidance_scale=7.5, output_type="np")
CASES = {
    "one_controlnet": (1, dict(image=rgb_image(0))),
    "two_controlnets": (
        2,
        dict(image=[rgb_image(0), rgb_image(1)], controlnet_conditioning_scale=[0.5, 1.5]),
    ),
    "guess_mode": (1, dict(image=[rgb_image(0), rgb_image(1)], guess_mode=True, guidance_scale=4.0)),
    "guidance_window": (1, dict(image=rgb_image(0), control_guidance_start=0.3, control_guidance_end=0.7)),
}


def sample(pipe, kwargs) -> np.ndarray:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(11)).images


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stable_diffusion_controlnet_pipeline(tiny_pipe, controlnets, case):
    num_nets, extra = CASES[case]
    controlnet = list(controlnets) if num_nets == 2 else controlnets[0]
    pipe = controlnet_pipe(LatentControlNetPipeline, tiny_pipe, controlnet)
    kwargs = {**BASE, **extra}
    ours = sample(pipe, kwargs)
    assert np.abs(ours - sample(stock(StableDiffusionControlNetPipeline, pipe), kwargs)).max() <= 1e-4
    # The ControlNet matters: another control image gives another picture.
    other = [rgb_image(7)] * num_nets if num_nets == 2 else rgb_image(7)
    assert np.abs(ours - sample(pipe, {**kwargs, "image": other})).max() > 1e-3


def test_img2img_matches_diffusers(tiny_pipe, controlnets):
    pipe = controlnet_pipe(LatentControlNetImg2ImgPipeline, tiny_pipe, controlnets[0])
    kwargs = {
        **BASE,
        "image": rgb_image(5),
        "control_image": rgb_image(0),
        "strength": 0.7,
        "num_inference_steps": 4,
    }
    assert same_images(pipe, stock(StableDiffusionControlNetImg2ImgPipeline, pipe), kwargs) <= 1e-4


def test_inpaint_matches_diffusers(tiny_pipe, controlnets):
    pipe = controlnet_pipe(LatentControlNetInpaintPipeline, tiny_pipe, list(controlnets))
    kwargs = dict(
        BASE, image=rgb_image(5), mask_image=mask_image(), control_image=[rgb_image(0), rgb_image(1)]
    )
    kwargs.update(strength=0.8, num_inference_steps=4)
    assert same_images(pipe, stock(StableDiffusionControlNetInpaintPipeline, pipe), kwargs) <= 1e-4


def test_a_grey_control_image_is_read_as_rgb(tiny_pipe, controlnets):
    pipe = controlnet_pipe(LatentControlNetPipeline, tiny_pipe, controlnets[0])
    grey = rgb_image(0).convert("L")
    kwargs = dict(BASE, prompt="a cat")
    assert np.array_equal(
        sample(pipe, dict(kwargs, image=grey)), sample(pipe, dict(kwargs, image=grey.convert("RGB")))
    )


def test_a_step_callback_sees_the_control_images(tiny_pipe, controlnets):
    pipe = controlnet_pipe(LatentControlNetPipeline, tiny_pipe, list(controlnets))
    seen = []

    def record(pipe, i, t, tensors):
        seen.append([tuple(image.shape) for image in tensors["image"]])
        return {}

    kwargs = dict(BASE, image=[rgb_image(0), rgb_image(1)], num_inference_steps=2)
    pipe(**kwargs, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "image"])
    assert seen == [[(4, 3, 16, 16)] * 2] * 2  # 2 prompts, doubled under guidance, one tensor per ControlNet


def test_from_pipe_shares_modules(tiny_pipe, controlnets):
    pipe = LatentControlNetPipeline.from_pipe(tiny_pipe, controlnet=controlnets[0])
    assert (
        pipe.unet is tiny_pipe.unet
        and pipe.vae is tiny_pipe.vae
        and pipe.text_encoder is tiny_pipe.text_encoder
    )
    assert pipe.controlnet is controlnets[0]
    two = LatentControlNetPipeline.from_pipe(tiny_pipe, controlnet=list(controlnets))
    assert [net for net in two.controlnet.nets] == list(controlnets)
    back = LatentPipeline.from_pipe(pipe)
    assert type(back) is LatentPipeline and back.unet is tiny_pipe.unet


@pytest.mark.parametrize("num_nets", [1, 2])
def test_saves_for_stock_diffusers_and_loads_its_folders(tiny_pipe, controlnets, tmp_path, num_nets):
    controlnet = list(controlnets) if num_nets == 2 else controlnets[0]
    pipe = controlnet_pipe(LatentControlNetPipeline, tiny_pipe, controlnet)
    images = [rgb_image(0), rgb_image(1)] if num_nets == 2 else rgb_image(0)
    kwargs = dict(BASE, image=images, num_inference_steps=2)
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    # diffusers' layout for several ControlNets: controlnet/, controlnet_1/, ...
    folders = ["controlnet", "controlnet_1"][:num_nets]
    assert all((tmp_path / "ours" / f / "diffusion_pytorch_model.safetensors").is_file() for f in folders)
    theirs = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert same_images(pipe, theirs, kwargs) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = LatentControlNetPipeline.from_pretrained(tmp_path / "theirs")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.controlnet) is type(pipe.controlnet)
    assert same_images(pipe, loaded, kwargs) <= 1e-6


NAN_IMAGE = torch.full((1, 3, 16, 16), float("nan"))
BAD = {
    "one image for two nets": (
        2,
        dict(image=rgb_image(0)),
        TypeError,
        "image must be a list of 2 control images",
    ),
    "three images for two nets": (
        2,
        dict(image=[rgb_image(0)] * 3),
        ValueError,
        "image has 3 control images for 2",
    ),
    "scale list length": (
        2,
        dict(controlnet_conditioning_scale=[1.0, 0.5, 0.2]),
        ValueError,
        "controlnet_conditioning_scale=[1.0, 0.5, 0.2] has 3 entries for 2 ControlNets",
    ),
    "start after end": (
        1,
        dict(control_guidance_start=0.8, control_guidance_end=0.2),
        ValueError,
        "control_guidance_start=0.8 must be below control_guidance_end=0.2",
    ),
    "end above 1": (
        1,
        dict(control_guidance_end=1.5),
        ValueError,
        "control_guidance_end=1.5 must be a fraction",
    ),
    "start below 0": (1, dict(control_guidance_start=-0.1), ValueError, "control_guidance_start=-0.1"),
    "nan control": (1, dict(image=NAN_IMAGE), ValueError, "image has NaN or infinite values"),
    "control batch": (
        1,
        dict(image=[rgb_image(0)] * 3),
        ValueError,
        "image holds 3 control images for 2 prompts",
    ),
    "control channels": (1, dict(image=torch.rand(1, 4, 16, 16)), ValueError, "image has 4 channels"),
    "not an image": (1, dict(image="edges.png"), TypeError, "image must be a PIL image"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_control_inputs_fail_before_any_model_call(tiny_pipe, controlnets, case):
    num_nets, extra, error, message = BAD[case]
    pipe = LatentControlNetPipeline.from_pipe(tiny_pipe, controlnet=list(controlnets)[:num_nets])
    pipe.unet.forward = None  # any UNet call would fail differently
    kwargs = dict(prompt=["a cat", "a dog"], image=[rgb_image(0)] * num_nets, num_inference_steps=2)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipe(**{**kwargs, **extra})


def test_a_controlnet_that_does_not_fit_is_refused(tiny_pipe):
    eightfold = ControlNetModel.from_unet(tiny_pipe.unet)  # downsamples 8x; the tiny VAE 2x
    with pytest.raises(ValueError, match="downsamples control images 8x .* but the VAE 2x"):
        LatentControlNetPipeline.from_pipe(tiny_pipe, controlnet=eightfold)


# ------------------------------------------------------------------ ldm-generate and the Canny edge map


def test_canny_edges_of_a_square_are_its_outline():
    square = np.zeros((16, 16), dtype=np.uint8)
    square[4:12, 4:12] = 255  # rows and columns 4..11
    edges = np.asarray(canny_edges(PIL.Image.fromarray(square).convert("RGB")))
    assert edges.shape == (16, 16, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges == edges[:, :, :1]).all()  # the same edge map in all three channels
    on = edges[:, :, 0] > 0
    ring = np.zeros_like(on)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False  # within one pixel of the square's border
    assert not (on & ~ring).any()
    for k in range(5, 11):  # every side is traced along its whole length
        assert on[3:5, k].any() and on[11:13, k].any() and on[k, 3:5].any() and on[k, 11:13].any()


def test_canny_without_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "ldm\[canny\]"'):
        canny_edges(PIL.Image.new("RGB", (8, 8)))


@pytest.fixture
def control_files(tiny_pipe, controlnets, tmp_path):
    controlnets[0].save_pretrained(tmp_path / "controlnet")
    rgb_image(0).save(tmp_path / "control.png")
    square = np.zeros((16, 16), dtype=np.uint8)
    square[4:12, 4:12] = 255
    PIL.Image.fromarray(square).save(tmp_path / "square.png")
    return tmp_path


def generate(model, out, *flags) -> np.ndarray:
    main(["a red cat", "--model", str(model), "--steps", "3", "--out", str(out), *map(str, flags)])
    return np.asarray(PIL.Image.open(out), dtype=np.int16)


def test_controlnet_flags(saved_tiny_pipe, control_files):
    d = control_files
    flags = ("--controlnet", d / "controlnet", "--control_image", d / "control.png")
    controlled = generate(saved_tiny_pipe, d / "a.png", *flags, "--control_scale", 0.5)
    pipe = LatentControlNetPipeline.from_pretrained(
        saved_tiny_pipe, controlnet=ControlNetModel.from_pretrained(d / "controlnet")
    )
    expected = pipe(
        ["a red cat"], image=rgb_image(0), controlnet_conditioning_scale=0.5, num_inference_steps=3,
        generator=[torch.Generator().manual_seed(0)],
    ).images[0]  # fmt: skip
    assert np.abs(controlled - np.asarray(expected, dtype=np.int16)).max() <= 1
    canny = generate(saved_tiny_pipe, d / "b.png", *flags[:3], d / "square.png", "--canny")
    plain_square = generate(saved_tiny_pipe, d / "c.png", *flags[:3], d / "square.png")
    assert np.abs(canny - plain_square).max() > 0  # the edge map, not the filled square, steered it
    inpainted = generate(
        saved_tiny_pipe, d / "e.png", *flags, "--image", d / "control.png", "--mask", d / "square.png"
    )
    assert inpainted.shape == (16, 16, 3)


ERRORS = [
    (["--control_image", "{d}/control.png"], "--control_image needs --controlnet"),
    (["--controlnet", "{d}/controlnet"], "--controlnet needs --control_image"),
    (["--control_scale", "0.5"], "--control_scale needs --controlnet"),
    (["--canny"], "--canny needs --controlnet"),
    (
        ["--controlnet", "{d}/nowhere", "--control_image", "{d}/control.png"],
        "--controlnet {d}/nowhere: no such folder",
    ),
    (
        ["--controlnet", "{d}/controlnet", "--control_image", "{d}/none.png"],
        "--control_image {d}/none.png: no such file",
    ),
    (
        ["--controlnet", "{d}/controlnet", "--control_image", "{d}/control.png", "--control_scale", "inf"],
        "--control_scale=inf must be a finite number",
    ),
    (["--controlnet", "{d}", "--control_image", "{d}/control.png"], "--controlnet {d}:"),
]


@pytest.mark.parametrize("flags, message", ERRORS)
def test_bad_controlnet_flags_exit_2_naming_the_flag(saved_tiny_pipe, control_files, capsys, flags, message):
    flags = [f.format(d=control_files) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["a cat", "--model", str(saved_tiny_pipe), "--out", str(control_files / "x.png"), *flags])
    assert exit_info.value.code == 2
    assert message.format(d=control_files) in capsys.readouterr().err
