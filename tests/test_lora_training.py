"""LoRA training through `accelerate launch`: only the adapter trains, stock diffusers loads it, resume is exact."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ldm import LatentPipeline
from ldm.training.config import load_config
from ldm.training.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, add_lora, trainable_parameters
from tests.training_helpers import launch, same_tensors, tensors

LORA = ["--unet_preset", "none", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]
UNET_FILE = "diffusion_pytorch_model.safetensors"


def image(pipe, lora=None, **load_kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora, **load_kwargs)
    return pipe("a red circle on the left", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_only_the_adapter_is_optimised(world):
    config = load_config(["--pretrained_model_name_or_path", str(world / "base"), "--train_data_dir",
                          str(world / "data"), "--lora_rank", "4"])  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(world / "base", subfolder="unet")
    add_lora(unet, config)
    names = {id(p): n for n, p in unet.named_parameters()}
    trained = trainable_parameters(unet)
    assert trained and all("lora_" in names[id(p)] for p in trained)
    assert len(trained) == sum("lora_" in n for n in names.values())  # every adapter weight, nothing else


def test_lora_run_saves_adapters_that_stock_diffusers_loads_and_resumes_exactly(world, tmp_path):
    common = [*LORA, "--use_ema", "--ema_decay", "0.5", "--snr_gamma", "5", "--caption_dropout", "0.3",
              "--validation_prompts", "a red circle on the left"]  # fmt: skip
    full = tmp_path / "full"
    launch(world, full, *common)
    # What a LoRA run writes: the adapter in two layouts, config, card, state; never a copy of the base UNet.
    for name in [LORA_WEIGHTS, KOHYA_WEIGHTS, "config.yaml", "README.md", "trainer_state.json", "samples.png",
                 f"checkpoint-6/lora/{LORA_WEIGHTS}", f"checkpoint-6/lora/{KOHYA_WEIGHTS}"]:  # fmt: skip
        assert (full / name).exists(), name
    assert not (full / "unet").exists() and not (full / "checkpoint-6" / "pipeline").exists()
    assert "load_lora_weights" in (full / "README.md").read_text()

    # The base UNet's weights inside the trained model are bitwise the base folder's; the adapter moved.
    state = tensors(full / "checkpoint-6" / "model.safetensors")
    base = tensors(world / "base" / "unet" / UNET_FILE)
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert same_tensors(frozen, base)
    assert any(not torch.all(v == 0) for k, v in state.items() if "lora_B" in k)  # B starts at zero

    # Stock diffusers loads both files and draws what LatentPipeline draws with the same adapter.
    plain = image(StableDiffusionPipeline.from_pretrained(world / "base"))
    theirs = image(StableDiffusionPipeline.from_pretrained(world / "base"), full)
    ours = image(LatentPipeline.from_pretrained(world / "base"), full)
    kohya = image(StableDiffusionPipeline.from_pretrained(world / "base"), full, weight_name=KOHYA_WEIGHTS)
    assert np.abs(theirs - plain).max() > 1e-3  # the adapter changes the image
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(kohya - theirs).max() <= 1e-4  # kohya's alpha = 8 (not the rank) scales as trained

    # The kohya file: lora_down, lora_up and alpha for every adapted module.
    kohya_keys = tensors(full / KOHYA_WEIGHTS).keys()
    modules = {k.split(".")[0] for k in kohya_keys}
    assert modules and all(re.fullmatch(r"lora_unet_\w+_(to_q|to_k|to_v|to_out_0)", m) for m in modules)
    assert kohya_keys == {
        f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert len(modules) == sum(".lora_A." in k for k in state)  # one per adapted module
    assert float(tensors(full / KOHYA_WEIGHTS)[f"{next(iter(modules))}.alpha"]) == 8.0

    # Stopped after checkpoint 3 and resumed: the same adapter (EMA weights) and raw state, bit for bit.
    half = tmp_path / "half"  # a run that died after checkpoint 3: only that checkpoint is left
    shutil.copytree(full / "checkpoint-3", half / "checkpoint-3")
    resumed = launch(world, half, *common, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert same_tensors(tensors(full / LORA_WEIGHTS), tensors(half / LORA_WEIGHTS))
    assert same_tensors(state, tensors(half / "checkpoint-6" / "model.safetensors"))
    assert json.loads((half / "trainer_state.json").read_text())["global_step"] == 6


def test_two_processes_train_one_adapter(world, tmp_path):
    out = tmp_path / "ddp"
    result = launch(world, out, *LORA, "--validation_steps", "100", processes=2)
    assert "UNet weights identical on all 2 processes" in result.stdout + result.stderr
    assert (out / LORA_WEIGHTS).exists() and (out / "checkpoint-6" / "lora" / LORA_WEIGHTS).exists()
    image(StableDiffusionPipeline.from_pretrained(world / "base"), out)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank", "0"], "lora_rank must be >= 1; got 0"),
        (["--lora_rank", "4", "--lora_alpha", "-1"], "lora_alpha must be a finite number > 0; got -1.0"),
        (["--lora_rank", "4", "--unet_preset", "tiny"], "drop --unet_preset (pass none) for LoRA"),
    ],
)
def test_bad_lora_settings_are_refused_at_start_up(world, flags, message):
    base = ["--pretrained_model_name_or_path", str(world / "base"), "--train_data_dir", str(world / "data")]
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config([*base, *flags])  # what train_ldm.py runs first, before any model or data loads
