"""Shared fixtures: a word-level CLIP tokenizer and tiny random pipelines, built offline."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ldm.presets import build_pipeline
from ldm.tokenizer import write_clip_tokenizer
from tests.training_helpers import make_world

# Both cores for one pytest process; one each when pytest-xdist runs two workers (`make test` does), as two torch
# processes on two cores with two threads each spin-wait on each other's cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WORDS = "a an of the red green blue cat dog circle square on left right top bottom at in center photo".split()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A CLIP tokenizer folder whose vocabulary keeps every test word whole."""
    path = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(WORDS, path)
    return path


@pytest.fixture
def tiny_pipe(tokenizer_dir):
    """A fresh randomly initialised `tiny` LatentPipeline (16 px images, 8x8x4 latents) without progress bars."""
    pipe = build_pipeline("tiny", tokenizer_dir, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def saved_tiny_pipe(tokenizer_dir, tmp_path_factory):
    """A tiny pipeline saved to disk in the Stable Diffusion layout."""
    path = tmp_path_factory.mktemp("tiny-pipe")
    build_pipeline("tiny", tokenizer_dir, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny base pipeline and a 16 px synthetic imagefolder with one corrupt image, for training launches."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def control_world(tmp_path_factory):
    """`world` with an outline per image (one corrupt, one the wrong size), for ControlNet training launches."""
    return make_world(tmp_path_factory.mktemp("control-world"), conditioning="edges")


@pytest.fixture(scope="session")
def lora_dir(tokenizer_dir, tmp_path_factory):
    """A LoRA on the tiny UNet and text encoder (random, non-zero up weights), saved by diffusers."""
    pipe = build_pipeline("tiny", tokenizer_dir, seed=0)
    torch.manual_seed(3)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=LORA_UNET_TARGETS, init_lora_weights=False)
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TEXT_TARGETS, init_lora_weights=False)
    )
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)
        ),
    )
    return folder
