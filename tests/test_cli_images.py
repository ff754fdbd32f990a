"""ldm-generate's img2img, inpainting and LoRA flags, run in-process on a saved tiny pipeline."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from ldm import LatentImg2ImgPipeline
from ldm.cli import main
from tests.test_image_pipelines import mask_image, rgb_image


@pytest.fixture
def images(tmp_path):
    rgb_image(0, (24, 16)).save(tmp_path / "photo.png")
    mask_image((24, 16)).save(tmp_path / "mask.png")
    mask_image((16, 16)).save(tmp_path / "small_mask.png")
    return tmp_path


def generate(model, out, *flags) -> np.ndarray:
    main(["a red cat", "--model", str(model), "--steps", "4", "--out", str(out), *map(str, flags)])
    return np.asarray(PIL.Image.open(out), dtype=np.int16)


def test_image_flags_run_img2img_and_inpainting(saved_tiny_pipe, images):
    photo = images / "photo.png"
    img2img = generate(saved_tiny_pipe, images / "a.png", "--image", photo, "--strength", 0.5)
    assert img2img.shape == (16, 24, 3)  # the image's size, not the model's 16x16
    pipe = LatentImg2ImgPipeline.from_pretrained(saved_tiny_pipe)
    expected = pipe(
        ["a red cat"], image=PIL.Image.open(photo).convert("RGB"), strength=0.5, num_inference_steps=4,
        generator=[torch.Generator().manual_seed(0)],
    ).images[0]  # fmt: skip
    assert np.abs(img2img - np.asarray(expected, dtype=np.int16)).max() <= 1
    inpainted = generate(saved_tiny_pipe, images / "b.png", "--image", photo, "--mask", images / "mask.png")
    assert inpainted.shape == (16, 24, 3) and np.abs(inpainted - img2img).max() > 0


def test_lora_flag_applies_the_lora_at_its_scale(saved_tiny_pipe, lora_dir, tmp_path):
    plain = generate(saved_tiny_pipe, tmp_path / "plain.png")
    full = generate(saved_tiny_pipe, tmp_path / "full.png", "--lora", lora_dir)
    off = generate(saved_tiny_pipe, tmp_path / "off.png", "--lora", lora_dir / "pytorch_lora_weights.safetensors",
                   "--lora_scale", 0)  # fmt: skip
    assert np.abs(full - plain).max() > 2
    assert np.abs(off - plain).max() <= 1  # scale 0 switches the LoRA off


ERRORS = [
    (["--mask", "{d}/mask.png"], "--mask needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "{d}/photo.png", "--strength", "2"], "--strength=2.0 must be a number in [0, 1]"),
    (["--image", "{d}/photo.png", "--height", "32"], "--height/--width do not apply with --image alone"),
    (["--image", "{d}/nothing.png"], "--image {d}/nothing.png: not a readable image"),
    (
        ["--image", "{d}/photo.png", "--mask", "{d}/small_mask.png"],
        "mask_image is 16x16 (height x width) but",
    ),
    (["--lora", "{d}/no_lora"], "--lora {d}/no_lora: no such file or folder"),
    (["--lora", "{d}/photo.png"], "--lora {d}/photo.png"),
    (["--lora_scale", "nan"], "--lora_scale=nan must be a finite number"),
]


@pytest.mark.parametrize("flags, message", ERRORS)
def test_bad_image_flags_exit_2_naming_the_flag(saved_tiny_pipe, images, capsys, flags, message):
    flags = [f.format(d=images) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["a cat", "--model", str(saved_tiny_pipe), "--out", str(images / "x.png"), *flags])
    assert exit_info.value.code == 2
    assert message.format(d=images) in capsys.readouterr().err
