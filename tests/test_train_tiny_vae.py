"""A tiny autoencoder in the pipelines (against diffusers' StableDiffusionPipeline with the same one), and
train/train_tiny_vae.py launched for real on the tiny base's VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline
from PIL import Image

from ldm import LatentImg2ImgPipeline, LatentPipeline
from ldm.encoding import scale_latents
from ldm.training.tiny_vae import TinyVaeTrainConfig, build_tiny_vae, tiny_vae_loss, vae_targets
from tests.training_helpers import ROOT, launch, load_script, same_tensors, tensors

SCRIPT = "train_tiny_vae.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# The tiny preset's VAE has two levels (a factor of 2): the tiny autoencoder gets one entry per level.
SHAPE = [
    "--encoder_block_out_channels", "8", "8", "--num_encoder_blocks", "1", "1",
    "--decoder_block_out_channels", "8", "8", "--num_decoder_blocks", "1", "0",
]  # fmt: skip


def random_tiny_vae(levels: int) -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,
        decoder_block_out_channels=(8,) * levels, num_decoder_blocks=(1,) * levels,
    )  # fmt: skip


# ----------------------------------------------------------------------------- sampling against diffusers


def test_latent_pipeline_with_a_tiny_autoencoder_samples_as_stable_diffusion_pipeline(tiny_pipe, tmp_path):
    tiny = random_tiny_vae(len(tiny_pipe.vae.config.block_out_channels))
    ours = LatentPipeline.from_pipe(tiny_pipe, vae=tiny)
    theirs = StableDiffusionPipeline(
        vae=tiny, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet, scheduler=ours.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=5.0)
    a = ours(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    b = theirs(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (2, 16, 16, 3) and np.abs(a - b).max() <= 1e-4
    # Not the VAE's images: the decoder is another network.
    c = tiny_pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - c).max() > 0.01
    # Saved and loaded back as a pipeline folder with an AutoencoderTiny; img2img encodes through it.
    ours.save_pretrained(tmp_path / "pipe")
    loaded = LatentPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.vae, AutoencoderTiny)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - again).max() <= 1e-6
    edit = LatentImg2ImgPipeline.from_pipe(loaded)
    assert edit("a red circle", image=Image.new("RGB", (16, 16)), strength=0.5).images[0].size == (16, 16)


# ----------------------------------------------------------------------------- the loss


def test_the_loss_regresses_the_vaes_scaled_mean_and_its_decoding(tiny_pipe):
    vae = tiny_pipe.vae
    config = TinyVaeTrainConfig(
        pretrained_model_name_or_path="unused", train_data_dir="unused",
        encoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
        decoder_block_out_channels=[8, 8], num_decoder_blocks=[1, 0],
    )  # fmt: skip
    tiny = build_tiny_vae(config, vae)
    assert tiny.config.scaling_factor == 1.0 and tiny.config.latent_channels == vae.config.latent_channels
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    means, latents, decoded = vae_targets(vae, pixels, torch.Generator().manual_seed(0))
    posterior = vae.encode(pixels).latent_dist
    assert torch.allclose(means, scale_latents(posterior.mean, vae))
    # The decoder's input is a posterior sample (not the mean), and its target the VAE's decoding of that sample.
    z = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(latents, scale_latents(z, vae), atol=1e-6) and not torch.allclose(latents, means)
    assert torch.allclose(decoded, vae.decode(z).sample.clamp(-1, 1), atol=1e-5)
    loss = tiny_vae_loss(tiny, vae, pixels, config, torch.Generator().manual_seed(0))
    expected = torch.nn.functional.mse_loss(tiny.decoder(latents), decoded) + torch.nn.functional.mse_loss(
        tiny.encoder(pixels), means
    )
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in tiny.parameters())
    # A batch whose every image was unreadable: zero, with a zero gradient on every parameter.
    tiny.zero_grad()
    empty = tiny_vae_loss(tiny, vae, torch.empty(0, 3, 0, 0), config, torch.Generator().manual_seed(0))
    empty.backward()
    assert empty.item() == 0 and all(p.grad is not None and not p.grad.any() for p in tiny.parameters())


# ----------------------------------------------------------------------------- train/train_tiny_vae.py


def train(world, out, *args, **kwargs):
    """A tiny-autoencoder run on the tiny base's VAE with the tiny config's data and steps (no UNet, no cache)."""
    return launch(
        world, out, "--unet_preset", "none", "--cache_dir", "none", "--validation_prompts", "none", *SHAPE, *args,
        script_name=SCRIPT, **kwargs,
    )  # fmt: skip


def test_a_run_saves_an_autoencoder_tiny_that_decodes_like_the_vae_and_resumes_bitwise(world, tmp_path):
    common = ["--gradient_accumulation_steps", "2", "--use_ema", "--max_train_steps", "8", "--checkpointing_steps",
              "4", "--validation_steps", "4", "--learning_rate", "1e-2"]  # fmt: skip
    result = train(world, tmp_path / "full", *common)
    log = result.stdout + result.stderr
    assert "unreadable" in log and "weights identical on all 1 processes" in log
    out = tmp_path / "full"
    tiny = AutoencoderTiny.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert list(tiny.config.decoder_block_out_channels) == [8, 8] and tiny.config.scaling_factor == 1.0
    # The final weights are the last checkpoint's EMA; validation logged the decoder's PSNR against the VAE's, and
    # it rose as the run trained.
    assert same_tensors(tensors(out / "checkpoint-8" / "tiny_vae" / WEIGHTS), tensors(out / WEIGHTS))
    scores = [row["psnr_decoder_vs_vae"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "psnr_decoder_vs_vae" in row]  # fmt: skip
    assert len(scores) == 2 and scores[1] > scores[0]
    assert Image.open(out / "samples.png").size == (8 * 16, 3 * 16)  # image | VAE | tiny, 8 held-out images
    assert "AutoencoderTiny.from_pretrained" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["num_decoder_blocks"] == [1, 0]

    # Stopped after the first checkpoint and resumed: the same weights, optimizer state and EMA to the last bit.
    train(world, tmp_path / "half", *common, "--max_train_steps", "4")
    resumed = train(world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    for name in ("checkpoint-8/model.safetensors", "checkpoint-8/ema_unet.safetensors", WEIGHTS):
        assert same_tensors(tensors(tmp_path / "full" / name), tensors(tmp_path / "half" / name)), name


def test_two_processes_agree(world, tmp_path):
    result = train(world, tmp_path / "ddp", "--validation_steps", "100", processes=2)
    assert "weights identical on all 2 processes" in result.stdout + result.stderr
    assert (tmp_path / "ddp" / WEIGHTS).exists()


def start(world, tmp_path, *args):
    """train_tiny_vae.main in-process on the world's base; returns its SystemExit message."""
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(world / "base"),
        "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "out"), "--unet_preset", "none",
        "--validation_prompts", "none", *args,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_tiny_vae").main(argv)
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (SHAPE[:6] + ["--decoder_block_out_channels", "8", "16", "--num_decoder_blocks", "1", "0"],
         "AutoencoderTiny needs one positive width at every level (e.g. [16, 16])"),
        (SHAPE[:6] + ["--decoder_block_out_channels", "8", "8", "--num_decoder_blocks", "1"],
         "need one entry per level"),
        ([], "The VAE has 2 levels (a factor of 2); give encoder_block_out_channels"),
        (SHAPE + ["--cache_dir", "cache"], "cache_dir is not a tiny autoencoder option"),
        (SHAPE + ["--snr_gamma", "5"], "snr_gamma is not a tiny autoencoder option"),
        (SHAPE + ["--aspect_buckets"], "aspect_buckets is not a tiny autoencoder option"),
        (SHAPE + ["--num_decoder_blocks", "1", "-1"], "block counts must be >= 0"),
        (SHAPE + ["--decoder_block_out_channels", "8", "x"], "decoder_block_out_channels"),
    ],
)  # fmt: skip
def test_bad_settings_fail_before_any_model_loads(world, tmp_path, monkeypatch, args, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the start-up checks ended")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", no_model)
    text = start(world, tmp_path, *args)
    assert text.startswith(f"{SCRIPT}: ") and message in text, text


def test_ldm_generate_decodes_with_a_tiny_autoencoder_that_reads_the_models_latents(
    tiny_pipe, tmp_path, capsys
):
    from ldm.cli import main
    from ldm.schedulers import scheduler_from_name

    tiny_pipe.save_pretrained(tmp_path / "model")
    random_tiny_vae(2).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "tiny.png"
    main(["a red circle", "--model", str(tmp_path / "model"), "--steps", "3", "--tiny_vae", str(tmp_path / "tiny"),
          "--out", str(out)])  # fmt: skip
    pipe = LatentPipeline.from_pretrained(tmp_path / "model")
    pipe.vae = AutoencoderTiny.from_pretrained(tmp_path / "tiny")
    pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        ["a red circle"],
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(0)],
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))

    # One made for a VAE with another factor (three levels: 4x) is refused in one line naming the flag.
    random_tiny_vae(3).save_pretrained(tmp_path / "tiny-4x")
    with pytest.raises(SystemExit) as exit_info:
        main(["a red circle", "--model", str(tmp_path / "model"), "--tiny_vae", str(tmp_path / "tiny-4x"),
              "--out", str(tmp_path / "no.png")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--tiny_vae" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
