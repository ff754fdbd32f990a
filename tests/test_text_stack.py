"""The offline text stack: a tokenizer from the captions, a frozen random CLIP text encoder, a full base folder."""

from __future__ import annotations

import pytest
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from ldm import PRESETS
from ldm.shapes.synthetic import generate_dataset
from ldm.shapes.text_stack import caption_words, main, read_captions


def test_base_folder_from_captions(tmp_path, capsys):
    generate_dataset(tmp_path / "data", num_images=30, resolution=16, seed=0, num_heldout=2)
    AutoencoderKL(**PRESETS["tiny"]["vae"]).save_pretrained(tmp_path / "vae")
    args = ["--captions", str(tmp_path / "data/train/metadata.jsonl"), "--vae", str(tmp_path / "vae"),
            "--out_dir", str(tmp_path / "base"), "--preset", "tiny", "--max_length", "16"]  # fmt: skip
    main(args)
    captions = read_captions(tmp_path / "data/train/metadata.jsonl")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "base", subfolder="tokenizer")
    assert tokenizer.model_max_length == 16
    for word in caption_words(captions):
        assert tokenizer.tokenize(word) == [word + "</w>"]
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "base", subfolder="text_encoder")
    assert text_encoder.config.vocab_size == len(tokenizer)
    DDPMScheduler.from_pretrained(tmp_path / "base", subfolder="scheduler")
    AutoencoderKL.from_pretrained(tmp_path / "base", subfolder="vae")
    main(args)
    assert "Reusing the text stack" in capsys.readouterr().out


def test_max_length_too_short_for_the_captions(tmp_path):
    from ldm.shapes.text_stack import build_text_stack

    with pytest.raises(ValueError, match="max_length=4"):
        build_text_stack(["a red circle on the left"], tmp_path, preset="tiny", max_length=4)
