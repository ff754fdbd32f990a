"""train/train_upscaler.py launched for real on a tiny x4 base and 16 px shapes; the upscaler's training pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionUpscalePipeline, UNet2DConditionModel
from PIL import Image

from ldm import LatentUpscalePipeline, build_pipeline
from ldm.encoding import scale_latents, unscale_latents
from ldm.training.transforms import random_windows
from ldm.training.upscaler import downsample, rescale_vae_latents
from tests.training_helpers import HUB_TOKEN, ROOT, launch, load_script, make_world, same_tensors, tensors

SCRIPT = "train_upscaler.py"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def upscale_world(tmp_path_factory):
    """The training world (40 images of 16 px, one corrupt) with a base of the tiny preset's x4 VAE: 4x4 latents,
    4 px low-resolution inputs. Its VAE's scaling factor is not diffusers' upscaler's, so training rescales it."""
    root = make_world(tmp_path_factory.mktemp("upscale-world"))
    build_pipeline("tiny-x4", root / "tokenizer", seed=0).save_pretrained(root / "base-x4")
    return root


def train(world, out, *args, **kwargs):
    return launch(
        world,
        out,
        "--pretrained_model_name_or_path",
        str(world / "base-x4"),
        *args,
        script_name=SCRIPT,
        **kwargs,
    )


def test_run_saves_an_upscaler_both_libraries_load_and_pushes_without_the_token(upscale_world, tmp_path):
    out, record = tmp_path / "run", tmp_path / "hub_calls.jsonl"
    env = {
        "PYTHONPATH": str(ROOT / "tests" / "hub_stub"),
        "LDM_TEST_HUB_RECORD": str(record),
        "HF_TOKEN": HUB_TOKEN,
    }
    result = train(
        upscale_world, out, "--use_ema", "--crop_resolution", "8", "--max_noise_level", "100",
        "--push_to_hub", "--hub_model_id", "me/tiny-upscaler", "--hub_push_checkpoints", env=env,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "unreadable" in log and "UNet weights identical on all 1 processes" in log

    # The final folder: an upscaler pipeline whose VAE now has diffusers' factor, sampling alike in both libraries.
    ours = LatentUpscalePipeline.from_pretrained(out)
    assert ours.vae.config.scaling_factor == 0.08333 and ours.config.max_noise_level == 100
    # v-prediction is the trainer's default, as Stable Diffusion's x4 upscaler's.
    assert ours.scheduler.config.prediction_type == "v_prediction"
    theirs = StableDiffusionUpscalePipeline.from_pretrained(out)
    low = Image.open(upscale_world / "data" / "train" / "000000.png").convert("RGB").resize((4, 4))
    kwargs = dict(prompt="a red circle", image=low, num_inference_steps=2, noise_level=20, output_type="np")
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    a, b = (p(**kwargs, generator=torch.Generator().manual_seed(0)).images for p in (ours, theirs))
    assert a.shape == (1, 16, 16, 3) and np.abs(a - b).max() <= 1e-6

    # Checkpoints hold the pipeline (EMA weights) and the EMA as safetensors; the final UNet is the last EMA.
    ckpt = out / "checkpoint-6"
    for name in [
        f"pipeline/{UNET}",
        "pipeline/low_res_scheduler/scheduler_config.json",
        "ema_unet.safetensors",
    ]:
        assert (ckpt / name).exists(), name
    assert same_tensors(tensors(ckpt / "pipeline" / UNET), tensors(out / UNET))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["crop_resolution"] == 8 and saved["max_noise_level"] == 100
    assert "LatentUpscalePipeline" in (out / "README.md").read_text()
    # The grid: low-res | bicubic | upscaled | target, one row per held-out image (4 of 16 px).
    assert Image.open(out / "samples.png").size == (4 * 16, 4 * 16)

    uploads = [c for c in map(json.loads, record.read_text().splitlines()) if c["call"] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoint-3", "checkpoint-6", None]
    assert HUB_TOKEN not in log
    assert not [p for p in out.rglob("*") if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()]


def test_resume_mid_epoch_with_accumulation_is_bitwise_identical(upscale_world, tmp_path):
    common = [
        "--gradient_accumulation_steps",
        "2",
        "--crop_resolution",
        "8",
        "--use_ema",
        "--validation_steps",
        "100",
    ]
    train(upscale_world, tmp_path / "full", *common)
    train(upscale_world, tmp_path / "half", *common, "--max_train_steps", "3")
    resumed = train(upscale_world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "half" / "trainer_state.json").read_text())["latent_cache"] is True
    for name in ("checkpoint-6/model.safetensors", "checkpoint-6/ema_unet.safetensors", UNET):
        assert same_tensors(tensors(tmp_path / "full" / name), tensors(tmp_path / "half" / name)), name
    assert not same_tensors(
        tensors(tmp_path / "half" / "checkpoint-3" / "pipeline" / UNET), tensors(tmp_path / "half" / UNET)
    )


def test_two_processes_agree(upscale_world, tmp_path):
    result = train(upscale_world, tmp_path / "ddp", "--validation_steps", "100", processes=2)
    assert "UNet weights identical on all 2 processes" in result.stdout + result.stderr
    assert (tmp_path / "ddp" / UNET).exists()


def start(world, tmp_path, *args):
    """train_upscaler.main in-process on the world's x4 base; returns its SystemExit message."""
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(world / "base-x4"),
        "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "out"), *args,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_upscaler").main(argv)
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--unet_preset", "none", "--lora_rank", "4"], "lora_rank is not an upscaler option"),
        (["--validation_prompts", "a red circle"], "validation_prompts is not an upscaler option"),
        (["--crop_resolution", "12"], "crop_resolution=12 must be a multiple of 8"),
        (["--crop_resolution", "32"], "crop_resolution=32 must be a multiple of 8 in (0, resolution=16]"),
        (
            ["--unet_preset", "tiny-sd", "--resolution", "64", "--crop_resolution", "16"],
            "not a multiple of 32",
        ),
        (["--max_noise_level", "-1"], "max_noise_level must be >= 0"),
        (
            ["--validation_noise_level", "400"],
            "validation_noise_level=400 must be in [0, max_noise_level=350]",
        ),
        (["--export_single_file"], "an upscaler saves a pipeline folder"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(upscale_world, tmp_path, monkeypatch, args, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the start-up checks ended")

    for cls in (UNet2DConditionModel, AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", no_model)
    text = start(upscale_world, tmp_path, *args)
    assert text.startswith(f"{SCRIPT}: ") and message in text, text


def test_a_text_to_image_unet_is_refused_as_the_upscaler_to_fine_tune(upscale_world, tmp_path):
    text = start(upscale_world, tmp_path, "--unet_preset", "none")  # base-x4/unet reads the latents alone
    assert "the UNet takes 4 input channels but the VAE makes 4-channel latents (plus one of (3,)" in text, (
        text
    )


def test_rescaling_the_vae_keeps_what_it_computes(tokenizer_dir):
    vae = build_pipeline("tiny-x4", tokenizer_dir, seed=0).vae
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    before = scale_latents(vae.encode(pixels).latent_dist.sample(generator), vae)
    decoded = vae.decode(unscale_latents(before, vae)).sample
    rescale_vae_latents(vae, 0.08333)
    assert vae.config.scaling_factor == 0.08333
    after = scale_latents(vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0)), vae)
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(decoded, vae.decode(unscale_latents(after, vae)).sample, atol=1e-5)


def test_downsampling_filters_before_it_decimates():
    """A one-pixel checkerboard has nothing a 4x smaller image can show: antialiasing leaves its mean, grey."""
    board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    small = downsample(board.expand(1, 3, 16, 16).contiguous(), 4)
    assert small.shape == (1, 3, 4, 4) and small.abs().max() < 0.1


def test_windows_are_cut_at_the_same_place_in_latents_and_pixels():
    pixels = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    latents = pixels[:, :, ::4, ::4].clone()  # the pixel at each latent's top-left corner
    cut_latents, cut_pixels = random_windows(torch.Generator().manual_seed(3), 4, latents, pixels)
    assert cut_latents.shape == (2, 3, 4, 4) and cut_pixels.shape == (2, 3, 16, 16)
    assert torch.equal(cut_pixels[:, :, ::4, ::4], cut_latents)
    whole = random_windows(torch.Generator(), 8, latents, pixels)
    assert whole[0] is latents and whole[1] is pixels


def test_evaluate_upscaler_scores_bicubic_and_the_upscaler_and_the_cascade(upscale_world, tmp_path):
    from ldm.presets import build_upscale_pipeline

    build_upscale_pipeline("tiny-x4", upscale_world / "tokenizer", seed=0).save_pretrained(tmp_path / "up")
    load_script("evaluate_upscaler").main(
        ["--upscaler", str(tmp_path / "up"), "--base", str(upscale_world / "base"), "--prompts",
         str(upscale_world / "data" / "heldout_prompts.jsonl"), "--seeds", "0", "1", "--steps", "2", "--base_steps",
         "2", "--out_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    report = json.loads((tmp_path / "eval" / "upscale.json").read_text())
    assert (
        report["resolution"] == 16 and report["num_images"] == 8
    )  # 4 held-out prompts x 2 seeds, 4 px -> 16 px
    for method in ("bicubic", "upscaler", "+ 2 BP"):
        assert {"psnr", "edge_sharpness", "consistency"} <= set(report["means"][method])
        assert all(np.isfinite(list(report["means"][method].values())))
    # Back-projected, the upscaler's output downsamples to (nearly) its input.
    assert report["means"]["+ 2 BP"]["consistency"] > report["means"]["upscaler"]["consistency"] + 3
    assert report["means"]["upscaler"]["seconds_per_image"] > 0
    assert {"base", "cascade"} == set(report["cascade_accuracy"])
    assert all(0 <= a["all"] <= 1 for a in report["cascade_accuracy"].values())
    table = (tmp_path / "eval" / "upscale.txt").read_text()
    assert (
        "| bicubic           |" in table and "| upscaler + 2 BP   |" in table and "| cascade, 16 px" in table
    )
    assert Image.open(tmp_path / "eval" / "grid.png").size == (5 * 16, 4 * 16)  # 4 prompts at seed 0


def test_the_evaluation_metrics_against_their_definitions():
    evaluate = load_script("evaluate_upscaler")
    square = np.zeros((32, 32, 3))
    square[8:24, 8:24] = 1.0
    blurred = (
        np.asarray(
            Image.fromarray((square * 255).astype(np.uint8))
            .resize((8, 8), Image.Resampling.BOX)
            .resize((32, 32))
        )
        / 255.0
    )
    assert evaluate.psnr(square, square) == float("inf")
    assert evaluate.psnr(square, np.zeros_like(square)) == pytest.approx(10 * np.log10(1 / 0.25))
    assert evaluate.edge_sharpness(square, square) == pytest.approx(1.0)
    assert evaluate.edge_sharpness(blurred, square) < 0.8
