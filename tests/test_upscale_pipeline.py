"""`LatentUpscalePipeline` against diffusers' `StableDiffusionUpscalePipeline` on identical weights, images and seed;
its checks, saving and loading both ways, and `from_pipe`."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline, UNet2DConditionModel

from ldm import Cascade, LatentPipeline, LatentUpscalePipeline
from ldm.cli import main
from ldm.pipelines.upscale import back_project, downsample
from ldm.presets import build_upscale_pipeline, unet_config
from tests.test_image_pipelines import rgb_image


@pytest.fixture
def upscaler(tokenizer_dir):
    """A random tiny x4 upscaler (a 4x VAE; 8 px in, 32 px out) whose UNet changes the image noticeably."""
    pipe = build_upscale_pipeline("tiny-x4", tokenizer_dir, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(pipe) -> StableDiffusionUpscalePipeline:
    """diffusers' upscaler on the same modules, with its own copy of the scheduler."""
    components = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "watermarker")}
    components["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
    theirs = StableDiffusionUpscalePipeline(
        **components, max_noise_level=pipe.config.max_noise_level, safety_checker=None, watermarker=None
    )
    theirs.set_progress_bar_config(disable=True)
    return theirs


def difference(ours, theirs, kwargs) -> float:
    a = ours(**kwargs, generator=torch.Generator().manual_seed(5)).images
    b = theirs(**kwargs, generator=torch.Generator().manual_seed(5)).images
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


LOW = [rgb_image(0, (8, 8)), rgb_image(1, (8, 8))]
BASE = dict(num_inference_steps=3, output_type="np")
CASES = {
    "noise_level_20": dict(prompt=["a red circle", "a cat"], image=LOW, noise_level=20, guidance_scale=7.5),
    "noise_level_250": dict(prompt=["a red circle", "a cat"], image=LOW, noise_level=250, guidance_scale=7.5),
    "unguided": dict(prompt="a red circle", image=LOW[0], noise_level=100, guidance_scale=1.0),
    "two_per_prompt": dict(
        prompt="a cat",
        image=LOW[1],
        noise_level=20,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        negative_prompt="blurry",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stable_diffusion_upscale_pipeline(upscaler, case):
    kwargs = dict(BASE, **CASES[case])
    images = upscaler(**kwargs, generator=torch.Generator().manual_seed(5)).images
    assert images.shape[1:] == (32, 32, 3)
    assert difference(upscaler, stock(upscaler), kwargs) <= 1e-4


def test_the_noise_level_and_the_image_change_the_output(upscaler):
    kwargs = dict(BASE, prompt="a cat", image=LOW[0], guidance_scale=1.0)
    at = {level: upscaler(**kwargs, noise_level=level, generator=torch.Generator().manual_seed(5)).images
          for level in (0, 300)}  # fmt: skip
    other = upscaler(
        **dict(kwargs, image=LOW[1]), noise_level=0, generator=torch.Generator().manual_seed(5)
    ).images
    assert np.abs(at[0] - at[300]).max() > 1e-3 and np.abs(at[0] - other).max() > 1e-3


def test_a_table_of_noise_levels_runs_as_in_diffusers(upscaler):
    """Stable Diffusion's own x4 upscaler has one learned vector per noise level (num_class_embeds=1000)."""
    torch.manual_seed(3)
    config = dict(unet_config("tiny-x4", 32), in_channels=7, out_channels=4, num_class_embeds=1000)
    pipe = LatentUpscalePipeline.from_pipe(upscaler, unet=UNet2DConditionModel(**config).eval())
    assert difference(pipe, stock(pipe), dict(BASE, **CASES["noise_level_20"])) <= 1e-4


def test_saves_for_stock_diffusers_and_loads_its_folders(upscaler, tmp_path):
    kwargs = dict(BASE, **CASES["noise_level_20"])
    upscaler.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    assert "image_encoder" not in index
    theirs = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "ours")
    theirs.set_progress_bar_config(disable=True)
    assert theirs.vae.config.scaling_factor == upscaler.vae.config.scaling_factor
    assert difference(upscaler, theirs, kwargs) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = LatentUpscalePipeline.from_pretrained(tmp_path / "theirs")
    loaded.set_progress_bar_config(disable=True)
    assert difference(upscaler, loaded, kwargs) <= 1e-6


def test_from_pipe_shares_modules(upscaler):
    pipe = LatentUpscalePipeline.from_pipe(upscaler)
    assert pipe.unet is upscaler.unet and pipe.vae is upscaler.vae and pipe.low_res_scheduler is not None
    assert pipe.config.max_noise_level == 350


def test_a_step_callback_sees_the_noised_image(upscaler):
    seen = []

    def record(pipe, i, t, tensors):
        seen.append(tensors["image"].shape)
        return {}

    upscaler(**dict(BASE, **CASES["noise_level_20"]), callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["latents", "image"])  # fmt: skip
    assert seen == [torch.Size([4, 3, 8, 8])] * 3  # [uncond; cond] for two prompts


def test_back_projection_is_a_fixed_point_on_consistent_images_and_converges_on_others():
    """x <- x + U(y - D(x)) leaves an x with D(x) = y alone, and brings D(x) towards y for any other x."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=generator) * 1.6 - 0.8
    assert torch.allclose(back_project(image, downsample(image, 4), 3), image, atol=1e-6)
    low_res = torch.rand(2, 3, 8, 8, generator=generator) * 1.6 - 0.8
    errors = [
        float((downsample(back_project(image, low_res, k), 4) - low_res).abs().mean()) for k in range(4)
    ]
    # Random pixels are the slowest case (U's gain through D is lowest at the highest frequencies).
    assert errors[0] > 0.3 and errors == sorted(errors, reverse=True) and errors[3] < errors[0] / 4


def test_back_projection_steps_correct_the_decoded_images(upscaler):
    kwargs = dict(BASE, **CASES["two_per_prompt"], output_type="pt")
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    plain = upscaler(**kwargs, generator=seeded()).images * 2 - 1
    projected = upscaler(**kwargs, back_projection_steps=2, generator=seeded()).images * 2 - 1
    low_res = upscaler.image_processor.preprocess(LOW[1]).repeat(2, 1, 1, 1)  # two images of one prompt
    assert torch.allclose(projected, back_project(plain, low_res, 2), atol=1e-5)
    miss = lambda x: float((downsample(x, 4) - low_res).abs().mean())  # noqa: E731
    assert miss(projected) < miss(plain) / 3


BAD = {
    "negative back-projection": (
        dict(back_projection_steps=-1),
        "back_projection_steps=-1 must be an integer >= 0",
    ),
    "back-projection of latents": (
        dict(back_projection_steps=1, output_type="latent"),
        "back_projection_steps=1 works on decoded pixels",
    ),
    "noise level above the maximum": (
        dict(noise_level=351),
        r"noise_level=351 must be an integer in \[0, 350\]",
    ),
    "negative noise level": (dict(noise_level=-1), "noise_level=-1"),
    "two images for one prompt": (dict(image=LOW), "image holds 2 images for 1 prompts"),
    "no image": (dict(image=None), "image is required"),
    "NaN pixels": (dict(image=torch.full((1, 3, 8, 8), float("nan"))), "NaN"),
    "four channels": (dict(image=torch.zeros(1, 4, 8, 8)), "image has 4 channels"),
    "too small": (dict(image=rgb_image(0, (2, 2))), "at least 4 px"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_fail_before_any_model_call(upscaler, monkeypatch, case):
    overrides, message = BAD[case]

    def unet_must_not_run(*args, **kwargs):
        raise AssertionError("the UNet ran")

    monkeypatch.setattr(upscaler.unet, "forward", unet_must_not_run)
    kwargs = {**BASE, "prompt": "a cat", "image": LOW[0], **overrides}
    with pytest.raises((ValueError, TypeError), match=message):
        upscaler(**kwargs)


def test_a_unet_that_is_no_upscaler_is_refused(upscaler, tiny_pipe):
    with pytest.raises(ValueError, match="in_channels=7"):
        LatentUpscalePipeline.from_pipe(upscaler, unet=tiny_pipe.unet)
    config = dict(unet_config("tiny-x4", 32), in_channels=7, out_channels=4, num_class_embeds=100)
    with pytest.raises(ValueError, match="num_class_embeds > max_noise_level=350"):
        LatentUpscalePipeline.from_pipe(upscaler, unet=UNet2DConditionModel(**config))


def test_a_cascade_upscales_the_base_models_8_bit_images_with_their_prompts(tiny_pipe, upscaler):
    cascade = Cascade(
        tiny_pipe,
        upscaler,
        noise_level=30,
        upscale_steps=2,
        upscale_guidance_scale=3.0,
        back_projection_steps=1,
    )
    prompts = ["a red circle", "a cat"]
    seeded = lambda: [torch.Generator().manual_seed(k) for k in range(4)]  # noqa: E731
    out = cascade(
        prompts, num_images_per_prompt=2, num_inference_steps=2, generator=seeded(), output_type="np"
    )
    assert out.images.shape == (4, 64, 64, 3)  # 16 px base images, x4
    generators = seeded()
    small = tiny_pipe(prompts, num_images_per_prompt=2, num_inference_steps=2, generator=generators).images
    expected = upscaler(
        [p for p in prompts for _ in range(2)], image=small, noise_level=30, num_inference_steps=2,
        guidance_scale=3.0, generator=generators, output_type="np", back_projection_steps=1,
    ).images  # fmt: skip
    assert np.abs(out.images - expected).max() <= 1e-6


def test_ldm_generate_cascades_with_upscaler(saved_tiny_pipe, upscaler, tmp_path):
    upscaler.save_pretrained(tmp_path / "upscaler")
    main([
        "a red cat", "a blue dog", "--model", str(saved_tiny_pipe), "--steps", "2", "--upscaler",
        str(tmp_path / "upscaler"), "--upscale_steps", "2", "--noise_level", "50", "--out", str(tmp_path / "x.png"),
    ])  # fmt: skip
    grid = PIL.Image.open(tmp_path / "x.png")
    assert grid.size == (64, 128)  # one column, two rows of 64 px upscaled images
    base = LatentPipeline.from_pretrained(saved_tiny_pipe)
    base.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    small = base(["a red cat", "a blue dog"], num_inference_steps=2, generator=generators).images
    expected = upscaler(
        ["a red cat", "a blue dog"], image=small, noise_level=50, num_inference_steps=2, guidance_scale=9.0,
        generator=generators,
    ).images  # fmt: skip
    first = np.asarray(grid, dtype=np.int16)[:64]
    assert np.abs(first - np.asarray(expected[0], dtype=np.int16)).max() <= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--upscaler", "{d}/nowhere"], "--upscaler {d}/nowhere"),
        (["--upscaler", "{d}/upscaler", "--noise_level", "400"], "--noise_level=400 must be an integer in"),
        (["--upscaler", "{d}/upscaler", "--upscale_steps", "0"], "--upscale_steps=0 must be an integer >= 1"),
        (
            ["--upscaler", "{d}/upscaler", "--back_projection_steps", "-2"],
            "--back_projection_steps=-2 must be an integer >= 0",
        ),
    ],
)
def test_bad_upscaler_flags_exit_2_naming_the_flag(
    saved_tiny_pipe, upscaler, tmp_path, capsys, flags, message
):
    upscaler.save_pretrained(tmp_path / "upscaler")
    argv = ["a cat", "--model", str(saved_tiny_pipe), "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + [f.format(d=tmp_path) for f in flags])
    assert exit_info.value.code == 2
    assert message.format(d=tmp_path) in capsys.readouterr().err


def test_large_inputs_upscale_in_blended_tiles(upscaler):
    wide = rgb_image(4, (16, 8))  # 16 px wide, 8 high: tiles of 8 overlapping by 2 start at x = 0, 6 and 8
    kwargs = dict(BASE, prompt="a cat", noise_level=20, guidance_scale=3.0)
    tiled = upscaler(
        **kwargs, image=wide, tile_size=8, tile_overlap=2, generator=torch.Generator().manual_seed(5)
    )
    assert tiled.images.shape == (1, 32, 64, 3)
    # Left of every overlap only the first tile counts: there the image is that tile's, upscaled on its own.
    first = upscaler(
        **kwargs, image=wide.crop((0, 0, 8, 8)), generator=torch.Generator().manual_seed(5)
    ).images
    assert np.abs(tiled.images[:, :, :24] - first[:, :, :24]).max() <= 1e-5
    assert np.isfinite(tiled.images).all()
    # Inputs no larger than a tile run whole.
    whole = upscaler(**kwargs, image=LOW[0], tile_size=8, generator=torch.Generator().manual_seed(5)).images
    assert np.array_equal(
        whole, upscaler(**kwargs, image=LOW[0], generator=torch.Generator().manual_seed(5)).images
    )


@pytest.mark.parametrize(
    ("tiles", "message"),
    [
        (dict(tile_size=6), "tile_size=6 must be a positive multiple of the VAE scale factor 4"),
        (dict(tile_size=8, tile_overlap=4), r"tile_overlap=4 must be an integer in \[0, tile_size / 2\)"),
        (dict(tile_size=8, latents=torch.zeros(1, 4, 2, 4)), "latents cannot be given with tile_size"),
    ],
)
def test_bad_tiles_are_refused(upscaler, tiles, message):
    with pytest.raises(ValueError, match=message):
        upscaler(**dict(BASE, prompt="a cat", image=rgb_image(4, (16, 8))), **tiles)
