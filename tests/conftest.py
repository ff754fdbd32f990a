"""Shared fixtures: a word-level CLIP tokenizer and tiny random pipelines, built offline."""

from __future__ import annotations

import pytest
import torch

from ldm.presets import build_pipeline
from ldm.tokenizer import write_clip_tokenizer
from tests.training_helpers import make_world

torch.set_num_threads(2)

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
