"""The latent / text-embedding cache: hits, misses, invalidation, and equality with live encoding."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from ldm.presets import build_pipeline
from ldm.shapes.synthetic import CAPTION_WORDS, generate_dataset
from ldm.tokenizer import write_clip_tokenizer
from ldm.training.config import TrainConfig
from ldm.training.data import build_train_and_heldout, collate_fn
from ldm.training.encoders import CachedBatchEncoder, LiveBatchEncoder
from ldm.training.latent_cache import build_cache
from ldm.training.loss import diffusion_loss, sample_noise_and_timesteps
from ldm.training.transforms import caption_dropout_mask

SEED = 3


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-world")
    generate_dataset(root / "data", num_images=12, resolution=16, seed=0, num_heldout=2)
    (root / "data" / "train" / "000004.png").write_bytes(b"\x89PNG broken")
    pipe = build_pipeline("tiny", write_clip_tokenizer(CAPTION_WORDS, root / "tok"), seed=0)
    return root, pipe


def make_config(root, **overrides) -> TrainConfig:
    fields = dict(
        pretrained_model_name_or_path="unused", train_data_dir=str(root / "data"), resolution=16, center_crop=True,
        random_flip=True, caption_dropout=0.3, cache_dir=str(root / "cache"), seed=SEED,
    )  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def cache_for(root, pipe, config):
    train, _ = build_train_and_heldout(config, SEED, 0)
    return train, build_cache(
        Accelerator(cpu=True), train, pipe.vae, pipe.text_encoder, pipe.tokenizer, config
    )


def test_miss_then_hit_without_encoding(parts, caplog):
    root, pipe = parts
    config = make_config(root, cache_dir=str(root / "cache-hit"))
    with caplog.at_level(logging.INFO, logger="ldm.training.latent_cache"):
        _, first = cache_for(root, pipe, config)
    assert "cache miss" in caplog.text
    assert [m.shape for m in first.moments] == [(12, 2, 8, 8, 8)] and first.num_skipped == 1
    assert first.captions[0] == "" and len(first.text_embeds) == len(first.captions)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not encode")

    encode = pipe.vae.encode
    pipe.vae.encode = forbidden
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ldm.training.latent_cache"):
            _, second = cache_for(root, pipe, config)
    finally:
        pipe.vae.encode = encode
    assert "cache hit" in caplog.text
    assert torch.equal(first.moments[0], second.moments[0]) and torch.equal(
        first.text_embeds, second.text_embeds
    )


def cache_folders(root, name):
    return sorted(p.name for p in (root / name).iterdir())


@pytest.mark.parametrize(
    "change",
    ["resolution", "center_crop", "random_flip", "vae", "text_encoder", "tokenizer", "data"],
)
def test_any_input_change_invalidates(parts, tmp_path, change):
    root, pipe = parts
    import shutil

    world = tmp_path / "w"
    shutil.copytree(root / "data", world / "data")
    config = make_config(world, cache_dir=str(world / "cache"))
    cache_for(world, pipe, config)
    assert len(cache_folders(world, "cache")) == 1
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    if change == "resolution":
        config = make_config(world, cache_dir=str(world / "cache"), resolution=32)
    elif change == "center_crop":
        config = make_config(world, cache_dir=str(world / "cache"), center_crop=False)
    elif change == "random_flip":
        config = make_config(world, cache_dir=str(world / "cache"), random_flip=False)
    elif change == "vae":
        vae = type(vae).from_config(vae.config)
    elif change == "text_encoder":
        text_encoder = type(text_encoder)(text_encoder.config)
    elif change == "tokenizer":
        tokenizer = write_clip_tokenizer(CAPTION_WORDS, tmp_path / "tok2", model_max_length=32)
    elif change == "data":
        Image.new("RGB", (16, 16), "red").save(world / "data" / "train" / "000001.png")
    train, _ = build_train_and_heldout(config, SEED, 0)
    build_cache(Accelerator(cpu=True), train, vae, text_encoder, tokenizer, config)
    assert len(cache_folders(world, "cache")) == 2, change


def test_cached_training_loss_equals_live(parts):
    root, pipe = parts
    config = make_config(root, cache_dir=str(root / "cache-eq"))
    train, cache = cache_for(root, pipe, config)
    live = LiveBatchEncoder(pipe.vae, pipe.text_encoder, pipe.tokenizer, config, SEED)
    cached = CachedBatchEncoder(cache, pipe.vae, config, SEED)
    scheduler = pipe.scheduler
    for epoch in range(3):  # flips and caption dropout differ per epoch; both paths must agree on each
        train.set_epoch(epoch)
        live.set_epoch(epoch)
        cached.set_epoch(epoch)
        batch = collate_fn([train[i] for i in [0, 1, 2, 3, 5, 6, 7]])
        losses = []
        for encoder in (live, cached):
            generator = torch.Generator().manual_seed(epoch)
            latents, text = encoder(batch, generator)
            noise, t = sample_noise_and_timesteps(latents, 1000, generator)
            noisy = scheduler.add_noise(latents, noise, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=text).sample
            losses.append(diffusion_loss(pred, latents, noise, t, scheduler))
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5, abs=1e-6)


def test_cached_caption_dropout_rate_and_redraw(parts):
    root, pipe = parts
    config = make_config(root, cache_dir=str(root / "cache-eq"), caption_dropout=0.3)
    _, cache = cache_for(root, pipe, config)
    cached = CachedBatchEncoder(cache, pipe.vae, config, SEED)
    # Count how often the empty-prompt embedding is used, over many epochs of the valid samples.
    valid = [i for i in range(12) if cache.valid[i]]
    empty = cache.text_embeds[cache.empty_caption_id]
    drops = []
    for epoch in range(300):
        cached.set_epoch(epoch)
        _, text = cached({"indices": torch.tensor(valid)}, torch.Generator().manual_seed(0))
        drops.append(torch.tensor([torch.equal(row, empty) for row in text]))
    drops = torch.stack(drops).float()  # (epochs, samples)
    assert drops.mean().item() == pytest.approx(0.3, abs=0.03)
    assert 0.15 < drops[:, 0].mean().item() < 0.45  # one sample is dropped in some epochs, not in others
    expected = torch.stack([caption_dropout_mask(SEED, e, valid, 0.3) for e in range(300)]).float()
    assert torch.equal(drops, expected)


def test_random_crop_of_non_square_images_disables_the_cache(parts, tmp_path, caplog):
    root, pipe = parts
    generate_dataset(tmp_path / "data", num_images=10, resolution=16, seed=1, num_heldout=2)
    Image.new("RGB", (24, 16), "white").save(tmp_path / "data" / "train" / "000000.png")
    config = make_config(tmp_path, center_crop=False, cache_dir=str(tmp_path / "cache"))
    train, _ = build_train_and_heldout(config, SEED, 0)
    with caplog.at_level(logging.WARNING, logger="ldm.training.latent_cache"):
        cache = build_cache(Accelerator(cpu=True), train, pipe.vae, pipe.text_encoder, pipe.tokenizer, config)
    assert cache is None and "center_crop" in caplog.text
