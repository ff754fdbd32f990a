"""Single-file checkpoints: ldm-export, then diffusers' and LatentPipeline's from_single_file, against the folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ldm import LatentPipeline, build_pipeline
from ldm.export import main as export
from ldm.training.lora import LORA_WEIGHTS
from tests.training_helpers import launch

PROMPT = dict(prompt="a red circle", num_inference_steps=3, output_type="np")


def sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**PROMPT, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def sd_folder(tokenizer_dir, tmp_path_factory):
    """A tiny pipeline with Stable Diffusion 1.x's block structure, saved."""
    path = tmp_path_factory.mktemp("tiny-sd")
    build_pipeline("tiny-sd", tokenizer_dir, seed=0).save_pretrained(path)
    return path


def test_export_then_from_single_file_gives_the_folder_back(sd_folder, tmp_path):
    export([str(sd_folder), str(tmp_path / "model.safetensors")])
    source = LatentPipeline.from_pretrained(sd_folder)
    expected = sample(source)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    # The original layout's three prefixes; the text encoder keeps `text_model.` (what from_single_file reads).
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert len(keys) == sum(len(getattr(source, m).state_dict()) for m in ("unet", "vae", "text_encoder"))

    theirs = StableDiffusionPipeline.from_single_file(
        tmp_path / "model.safetensors", config=str(sd_folder), safety_checker=None, local_files_only=True
    )
    ours = LatentPipeline.from_single_file(
        tmp_path / "model.safetensors", config=str(sd_folder), local_files_only=True
    )
    assert isinstance(ours, LatentPipeline)
    assert np.abs(sample(theirs) - expected).max() <= 1e-4
    assert np.abs(sample(ours) - expected).max() <= 1e-4
    for name in ("unet", "vae", "text_encoder"):  # every tensor comes back bit for bit
        before, after = getattr(source, name).state_dict(), getattr(ours, name).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name


def test_half_writes_fp16(sd_folder, tmp_path, capsys):
    export([str(sd_folder), str(tmp_path / "half.safetensors"), "--half"])
    assert "fp16" in capsys.readouterr().out
    with safe_open(tmp_path / "half.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tiny}", "{tmp}/x.ckpt"], "must end in .safetensors"),
        (["{tmp}/nowhere", "{tmp}/x.safetensors"], "no such folder"),
        (["{tmp}", "{tmp}/x.safetensors"], "has no model_index.json"),
        (["{tiny}", "{tmp}/x.safetensors"], "exists only for Stable Diffusion 1.x's structure"),
    ],
)
def test_export_errors_name_the_argument(saved_tiny_pipe, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        export([a.format(tiny=saved_tiny_pipe, tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_training_writes_a_single_file_beside_the_pipeline(world, sd_folder, tmp_path):
    out = tmp_path / "run"
    launch(world, out, "--pretrained_model_name_or_path", str(sd_folder), "--unet_preset", "none",
           "--resolution", "64", "--max_train_steps", "2", "--export_single_file")  # fmt: skip
    pipe = LatentPipeline.from_single_file(out / "run.safetensors", config=str(out), local_files_only=True)
    trained = LatentPipeline.from_pretrained(out)
    assert np.abs(sample(pipe) - sample(trained)).max() <= 1e-4
    # A UNet without SD 1.x's structure is refused before any model loads; so is a LoRA run.
    refused = launch(world, tmp_path / "tiny", "--unet_preset", "tiny", "--export_single_file", check=False)
    assert refused.returncode != 0 and "exists only for Stable Diffusion 1.x's structure" in refused.stderr
    assert (
        not (tmp_path / "tiny" / LORA_WEIGHTS).exists() and not (tmp_path / "tiny" / "checkpoint-3").exists()
    )
