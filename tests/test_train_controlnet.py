"""train/train_controlnet.py launched for real on tiny models and 16 px shapes with outlines as controls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image

from ldm import LatentControlNetPipeline, LatentPipeline
from tests.training_helpers import HUB_TOKEN, ROOT, launch, load_script, same_tensors, tensors

SCRIPT = "train_controlnet.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def train(world, out, *args, **kwargs):
    """A ControlNet run on the tiny base (its UNet, not a preset) and the world's outlines."""
    return launch(world, out, "--unet_preset", "none", *args, script_name=SCRIPT, **kwargs)


def test_run_saves_a_loadable_controlnet_counts_bad_controls_and_pushes_without_the_token(
    control_world, tmp_path
):
    out = tmp_path / "run"
    control = control_world / "data" / "train" / "conditioning" / "000000.png"
    record = tmp_path / "hub_calls.jsonl"
    env = {
        "PYTHONPATH": str(ROOT / "tests" / "hub_stub"),
        "LDM_TEST_HUB_RECORD": str(record),
        "HF_TOKEN": HUB_TOKEN,
    }
    result = train(
        control_world, out, "--use_ema", "--ema_decay", "0.5", "--mixed_precision", "bf16",
        "--proportion_empty_prompts", "0.5", "--validation_prompts", "a red circle on the left", "a blue square",
        "--validation_image", str(control), "--push_to_hub", "--hub_model_id", "me/tiny-controlnet",
        "--hub_push_checkpoints", env=env,
    )  # fmt: skip
    log = result.stdout + result.stderr

    # A corrupt control and one of the wrong size are skipped and counted, never a crash.
    assert "conditioning image is 8x8 but its image is 16x16" in log
    assert "its conditioning image cannot be read" in log
    assert "unreadable samples in total" in log
    assert "ControlNetModel weights identical on all 1 processes" in log
    # bf16 on a CPU is slower than fp32: said at start-up (issue 19, item 14).
    assert "--mixed_precision bf16 without a CUDA GPU: on CPUs it trains slower than fp32" in log

    # The final folder is a ControlNetModel (EMA weights) that both pipelines load on the base model.
    controlnet = ControlNetModel.from_pretrained(out)
    base = LatentPipeline.from_pretrained(control_world / "base")
    pipe = LatentControlNetPipeline.from_pipe(base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    outline = Image.open(control)
    images = pipe("a red circle", image=outline, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    StableDiffusionControlNetPipeline.from_pretrained(
        control_world / "base", controlnet=controlnet, safety_checker=None
    )
    # It trained: the zero convolutions it started with are no longer zero.
    assert any(float(block.weight.detach().abs().max()) > 0 for block in controlnet.controlnet_down_blocks)

    # Checkpoints hold the ControlNet (EMA weights), its EMA as safetensors and the config; no pipeline.
    ckpt = out / "checkpoint-6"
    for name in [f"controlnet/{WEIGHTS}", "ema_unet.safetensors", "config.yaml", "run.json", "manifest.json"]:
        assert (ckpt / name).exists(), name
    assert same_tensors(tensors(ckpt / "controlnet" / WEIGHTS), tensors(out / WEIGHTS))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["caption_dropout"] == 0.5 and saved["mixed_precision"] == "bf16"
    assert "LatentControlNetPipeline" in (out / "README.md").read_text()
    # The validation grid shows control | sample, one row per prompt.
    assert Image.open(out / "samples.png").size == (2 * 16, 2 * 16)

    # Hub: each checkpoint's ControlNet in the background, then the final folder; never optimizer state or token.
    uploads = [c for c in map(json.loads, record.read_text().splitlines()) if c["call"] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoint-3", "checkpoint-6", None]
    assert all(set(u["files"]) == {"config.json", WEIGHTS} for u in uploads[:2])
    assert {"README.md", "config.json", WEIGHTS, "config.yaml"} <= set(uploads[2]["files"])
    assert not [f for f in uploads[2]["files"] if f.startswith("checkpoint-") or f.endswith((".pkl", ".bin"))]
    assert HUB_TOKEN not in log
    assert not [p for p in out.rglob("*") if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()]


def test_resume_mid_epoch_with_accumulation_is_bitwise_identical(control_world, tmp_path):
    # The cached path, whose controls are decoded per batch beside cached latents (the live path's controls are
    # the same tensors: tests/test_data.py); the loop and its resume are train_ldm.py's, tested there live too.
    common = ["--gradient_accumulation_steps", "2", "--validation_steps", "100"]
    train(control_world, tmp_path / "full", *common)
    train(control_world, tmp_path / "half", *common, "--max_train_steps", "3")
    resumed = train(control_world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "half" / "trainer_state.json").read_text())["latent_cache"] is True
    final = tensors(tmp_path / "full" / WEIGHTS)
    assert same_tensors(final, tensors(tmp_path / "half" / WEIGHTS))
    assert not same_tensors(tensors(tmp_path / "half" / "checkpoint-3" / "controlnet" / WEIGHTS), final)


def test_two_processes_agree(control_world, tmp_path):
    result = train(control_world, tmp_path / "ddp", "--validation_steps", "100", processes=2)
    assert "ControlNetModel weights identical on all 2 processes" in result.stdout + result.stderr
    assert (tmp_path / "ddp" / WEIGHTS).exists()


def start(control_world, tmp_path, *args):
    """train_controlnet.main in-process on the control world; returns its SystemExit message."""
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--unet_preset", "none",
        "--pretrained_model_name_or_path", str(control_world / "base"),
        "--train_data_dir", str(control_world / "data"), "--output_dir", str(tmp_path / "out"), *args,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_controlnet").main(argv)
    return str(exit_info.value.code)


def test_a_pretrained_controlnet_that_does_not_fit_is_refused_from_its_config(control_world, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(control_world / "base" / "unet")
    ControlNetModel.from_unet(unet).save_pretrained(
        tmp_path / "cn-8x"
    )  # an 8x control embedding, the VAE is 2x
    text = start(control_world, tmp_path, "--controlnet_model_name_or_path", str(tmp_path / "cn-8x"))
    assert "does not fit" in text and "downsamples control images 8x" in text and "the VAE 2x" in text, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--conditioning_image_column", "edges"], "no conditioning image column 'edges'"),
        (["--validation_prompts", "a red circle"], "validation_prompts needs --validation_image"),
        (
            ["--validation_prompts", "a", "--validation_image", "missing.png"],
            "--validation_image 'missing.png'",
        ),
        (["--unet_preset", "tiny"], "unet_preset is not a ControlNet option"),
        (["--lora_rank", "4"], "lora_rank is not a ControlNet option"),
        (["--proportion_empty_prompts", "1.5"], "proportion_empty_prompts is a probability"),
        (["--controlnet_model_name_or_path", "nowhere/at/all"], "controlnet_model_name_or_path"),
        (["--proportion_empty_prompts", "0.5", "--caption_dropout", "0.3"], "are the same setting"),
    ],
)
def test_bad_settings_and_data_fail_before_any_model_loads(
    control_world, tmp_path, monkeypatch, args, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the start-up checks ended")

    for cls in (UNet2DConditionModel, ControlNetModel, AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", no_model)
    text = start(control_world, tmp_path, *args)
    assert text.startswith(f"{SCRIPT}: ") and message in text, text


def test_diffusers_flag_names_are_accepted():
    from ldm.training.config import load_config
    from ldm.training.controlnet import ControlNetTrainConfig

    config = load_config(
        ["--pretrained_model_name_or_path", "base", "--train_data_dir", "data", "--validation_prompt", "a", "b",
         "--validation_image", "edges.png", "--proportion_empty_prompts", "0.5"],
        ControlNetTrainConfig,
    )  # fmt: skip
    assert config.validation_prompts == ["a", "b"] and config.caption_dropout == 0.5


def test_a_new_controlnet_starts_at_the_base_model_and_already_sees_its_control(control_world):
    from ldm.training.controlnet import ControlNetTrainConfig, build_controlnet

    unet = UNet2DConditionModel.from_pretrained(control_world / "base" / "unet")
    vae_config = AutoencoderKL.load_config(control_world / "base" / "vae")
    config = ControlNetTrainConfig(pretrained_model_name_or_path="base", train_data_dir="data")
    controlnet = build_controlnet(config, unet, vae_config)
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    text = torch.randn(2, 7, unet.config.cross_attention_dim)
    control = (torch.rand(2, 3, 16, 16) > 0.9).float()  # sparse, like an outline
    down, mid = controlnet(latents, t, text, controlnet_cond=control, return_dict=False)
    assert all(not r.any() for r in [*down, mid])  # zero output convolutions: the base model's prediction
    # The control embedding passes the control on at its scale (diffusers' initialisation makes it zero).
    embedded = controlnet.controlnet_cond_embedding(control)
    assert embedded.shape == (2, unet.config.block_out_channels[0], 8, 8) and embedded.std() > 0.1
