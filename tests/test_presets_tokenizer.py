"""Model presets against Stable Diffusion 1.5's published sizes; the offline CLIP tokenizer keeps words whole."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm import PRESETS, build_pipeline, write_clip_tokenizer
from ldm.presets import get_preset, unet_config
from tests.conftest import WORDS


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_preset_has_stable_diffusion_15_shapes():
    # Built on the meta device: shapes only, no memory. Reference counts are those of runwayml/stable-diffusion-v1-5.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15", cross_attention_dim=768))
        vae = AutoencoderKL(**PRESETS["sd15"]["vae"])
        text = CLIPTextModel(CLIPTextConfig(**PRESETS["sd15"]["text_encoder"], vocab_size=49408))
    assert n_params(unet) == 859_520_964
    assert n_params(vae) == 83_653_863
    assert n_params(text) == 123_060_480
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and unet.config.sample_size == 64
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_small_narrow_is_the_small_unet_at_half_width():
    small, narrow = get_preset("small"), get_preset("small-narrow")
    assert narrow["vae"] == small["vae"] and narrow["text_encoder"] == small["text_encoder"]
    with torch.device("meta"):
        unets = [
            UNet2DConditionModel(**unet_config(name, cross_attention_dim=128))
            for name in ("small", "small-narrow")
        ]
    widths = [unet.config.block_out_channels for unet in unets]
    assert [2 * width for width in widths[1]] == list(widths[0])
    assert [n_params(unet) for unet in unets] == [3_984_068, 1_034_596]
    # Attention heads of 4 channels in both (diffusers reads attention_head_dim as the number of heads).
    heads = [
        [
            (block.heads, block.inner_dim // block.heads)
            for block in unet.modules()
            if type(block).__name__ == "Attention"
        ]
        for unet in unets
    ]
    assert [set(shapes) for shapes in heads] == [{(32, 4)}, {(16, 4)}]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"\['sd15', 'small', 'small-narrow', 'small-x4', 'tiny', 'tiny-sd', 'tiny-x4'\]"
    ):
        get_preset("huge")


@pytest.mark.parametrize("name", ["tiny", "small", "small-narrow"])
def test_build_pipeline_from_preset(tokenizer_dir, name):
    pipe = build_pipeline(name, tokenizer_dir, seed=0)
    again = build_pipeline(name, tokenizer_dir, seed=0)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = pipe("a cat", num_inference_steps=1, output_type="np").images
    assert images.shape == (1, size, size, 3)


def test_tokenizer_keeps_every_word_whole(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok.model_max_length == 77
    for word in WORDS:
        assert tok.tokenize(word) == [word + "</w>"]
    ids = tok("A Red circle on the LEFT", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:7]) == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "the</w>",
        "left</w>",
    ]
    assert ids[7] == tok.eos_token_id


def test_tokenizer_fixes_merge_conflicts_between_words(tmp_path):
    # "bc" is learnt first and would fire inside "abcd", leaving it in pieces without the repair rounds.
    words = ["bcx", "abcd", "cd", "abc", "xabcdx"]
    tok = write_clip_tokenizer(words, tmp_path)
    assert all(len(tok.tokenize(w)) == 1 for w in words)


def test_tokenizer_vocab_files_load_without_tokenizer_json(tokenizer_dir, tmp_path):
    # Stable Diffusion repositories ship vocab.json + merges.txt; they must give the same ids as tokenizer.json.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    from_json = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text = "a photo of the red dog in the center"
    assert from_files(text).input_ids == from_json(text).input_ids


def test_tokenizer_rejects_multiword_entries(tmp_path):
    with pytest.raises(ValueError, match="'red circle'"):
        write_clip_tokenizer(["red circle"], tmp_path)
