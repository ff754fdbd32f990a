"""Single-file checkpoints: ldm-export, then diffusers' and LatentPipeline's from_single_file, against the folder."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from ldm import LatentPipeline, build_pipeline
from ldm.export import main as export
from ldm.presets import PRESETS
from ldm.single_file import check_sd_structure, unet_state, with_defaults, write_single_file
from ldm.training.checkpoint import save_final
from ldm.training.config import TrainConfig
from tests.training_helpers import ROOT, launch, same_tensors, tensors

PROMPT = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
SD_MESSAGE = "exists only for Stable Diffusion 1.x's structure"


def sample(pipe) -> np.ndarray:
    """Two DDIM steps from a fixed generator, as a (1, H, W, 3) array."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(**PROMPT, generator=torch.Generator().manual_seed(0)).images


def same_weights(a, b) -> bool:
    """Same names and bitwise-equal tensors in two models."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these toy models: on a shared 2-core machine two threads spin-wait on each other
    (a 20 ms UNet call took 6 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        keys, metadata = list(f.keys()), f.metadata()
        assert all(f.get_tensor(k).is_contiguous() for k in keys)
    assert metadata["format"] == "pt"
    # The original layout's three prefixes; the text encoder keeps `text_model.` (what from_single_file reads),
    # the VAE's attention projections are 1x1 convs.
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # the first up level's upsampler
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
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
        assert same_weights(getattr(source, name), getattr(ours, name)), name

    # A pipeline in memory writes the same file as its folder.
    source.save_single_file(tmp_path / "again.safetensors")
    assert same_tensors(tensors(tmp_path / "again.safetensors"), tensors(tmp_path / "model.safetensors"))


def test_half_writes_fp16(sd_folder, tmp_path, capsys):
    export([str(sd_folder), str(tmp_path / "half.safetensors"), "--half"])
    assert "fp16" in capsys.readouterr().out
    with safe_open(tmp_path / "half.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tiny}", "{tmp}/x.ckpt"], "OUT {tmp}/x.ckpt: must end in .safetensors"),
        (["{tmp}/nowhere", "{tmp}/x.safetensors"], "PIPELINE_DIR {tmp}/nowhere: no such folder"),
        (["{tmp}", "{tmp}/x.safetensors"], "{tmp} is not a pipeline folder: it has no model_index.json"),
        (["{tiny}", "{tmp}/x.safetensors"], "UNet layers_per_block is 1, not 2"),
    ],
)
def test_export_errors_name_the_argument(saved_tiny_pipe, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        export([a.format(tiny=saved_tiny_pipe, tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_linear_projection": True}, "UNet use_linear_projection is True, not False"),
        ({"resnet_time_scale_shift": "scale_shift"}, "UNet resnet_time_scale_shift is 'scale_shift'"),
        ({"class_embed_type": "timestep"}, "UNet class_embed_type is 'timestep', not None"),
        (PRESETS["tiny"]["unet"], "UNet down_block_types is ('DownBlock2D', 'CrossAttnDownBlock2D'), not"),
        ({"vae_levels": 2}, "VAE down_block_types is ('DownEncoderBlock2D', 'DownEncoderBlock2D'), not"),
    ],
)
def test_non_sd_structure_is_refused_naming_the_setting(change, message):
    def configs(vae_levels=4, **unet):
        vae = {**PRESETS["tiny-sd"]["vae"], "block_out_channels": (8, 16, 16, 16)[:vae_levels]}
        vae.update(
            down_block_types=["DownEncoderBlock2D"] * vae_levels,
            up_block_types=["UpDecoderBlock2D"] * vae_levels,
        )
        unet_config = with_defaults(UNet2DConditionModel, {**PRESETS["tiny-sd"]["unet"], **unet})
        return unet_config, with_defaults(AutoencoderKL, vae)

    # SD 1.x's structure at any width passes, lists as in a config.json, a per-level setting once or per level.
    check_sd_structure(*configs(transformer_layers_per_block=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match=SD_MESSAGE) as err:
        check_sd_structure(*configs(**change))
    assert message in str(err.value)


def test_weights_outside_every_original_block_are_refused():
    # The key-level safety net behind check_sd_structure: an extra embedding has no original name.
    unet = UNet2DConditionModel(
        **PRESETS["tiny-sd"]["unet"], cross_attention_dim=32, class_embed_type="timestep"
    )
    with pytest.raises(ValueError, match=r"SD 1.x has no place for: class_embedding.linear_1.weight"):
        unet_state(unet)


def test_a_structure_refused_at_the_final_save_keeps_the_folder(tiny_pipe, saved_tiny_pipe, tmp_path):
    # A Hub base cannot be checked at start-up; refused at the end, the saved run must stay whole.
    config = TrainConfig(pretrained_model_name_or_path=str(saved_tiny_pipe), output_dir=str(tmp_path / "run"))
    config.export_single_file = True
    with pytest.raises(ValueError, match=SD_MESSAGE):
        save_final(Accelerator(cpu=True), config, tiny_pipe, None, {"train_seconds": 0.0})
    saved = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "model_index.json",
        "unet",
        "config.yaml",
        "README.md",
    } <= saved and "run.safetensors" not in saved
    with pytest.raises(ValueError, match="x.ckpt: a single-file checkpoint is written as .safetensors"):
        write_single_file(tiny_pipe, tmp_path / "x.ckpt")


def test_training_writes_a_single_file_beside_the_pipeline(world, sd_folder, tmp_path):
    out = tmp_path / "run"
    launch(world, out, "--pretrained_model_name_or_path", str(sd_folder), "--unet_preset", "none",
           "--resolution", "64", "--max_train_steps", "2", "--export_single_file")  # fmt: skip
    pipe = LatentPipeline.from_single_file(out / "run.safetensors", config=str(out), local_files_only=True)
    trained = LatentPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, name), getattr(trained, name)), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--unet_preset", "tiny"], "UNet layers_per_block is 1, not 2"),  # known from the preset
        (
            ["--unet_preset", "none"],
            "UNet layers_per_block is 1, not 2",
        ),  # known from the base's unet/config.json
        (["--unet_preset", "none", "--lora_rank", "4"], "a LoRA run saves only its adapter"),
    ],
)
def test_training_refuses_a_non_sd_export_before_models_load(world, tmp_path, args, message):
    spec = importlib.util.spec_from_file_location("train_ldm_script", ROOT / "train" / "train_ldm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(world / "base"),
            "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "run"), "--export_single_file",
            *args]  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        script.main(argv)
    assert not (tmp_path / "run").exists()  # refused before the run claimed its folder
