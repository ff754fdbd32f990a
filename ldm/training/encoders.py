"""Batch encoders: a training batch -> (x_0 latents, text embeddings), live or from the latent cache.

Both give the same result for the same batch and generator. Each sample's caption choice and flip come from
`draw_sample` in `ldm.training.transforms`, and caption dropout from `caption_dropout_mask`, both keyed by
(seed, epoch, index): the live path made the choices when the sample was transformed, the cached path makes them
here from the sample index alone. The VAE's posterior moments (mean, log variance) are what the cache holds, not a
latent sample, so each use still draws a fresh z ~ q(z | x) from the step's generator in both paths.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.encoding import encode_moments, encode_text, scale_latents
from ldm.training.config import TrainConfig
from ldm.training.latent_cache import LatentCache
from ldm.training.transforms import caption_dropout_mask, draw_sample


def sample_latents(moments: torch.Tensor, vae, generator: torch.Generator) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) from posterior moments (B, 2C, h, w), scaled: x_0 (B, C, h, w) in fp32."""
    z = DiagonalGaussianDistribution(moments.float()).sample(generator=generator)
    return scale_latents(z, vae)


class _BatchEncoder:
    """What both encoders share: the epoch whose draws apply, and caption dropout."""

    def __init__(self, vae, config: TrainConfig, seed: int):
        self.vae, self.caption_dropout, self.seed, self.epoch = vae, config.caption_dropout, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample draws (flip, caption, dropout) apply."""
        self.epoch = epoch

    def dropped(self, indices: list[int], drop_captions: bool) -> list[bool]:
        """Which samples' captions become the empty prompt (classifier-free guidance's unconditional input)."""
        if not drop_captions or self.caption_dropout == 0:
            return [False] * len(indices)
        return caption_dropout_mask(self.seed, self.epoch, indices, self.caption_dropout).tolist()


class LiveBatchEncoder(_BatchEncoder):
    """Encodes each batch of pixels and captions through the frozen VAE and text encoder."""

    def __init__(self, vae, text_encoder, tokenizer, config: TrainConfig, seed: int):
        super().__init__(vae, config, seed)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator, drop_captions: bool = True):
        """(latents (B, C, h, w) fp32, text embeddings (B, 77, D)) for a batch of pixels and captions."""
        moments = encode_moments(self.vae, batch["pixel_values"])  # (B, 2C, h, w)
        latents = sample_latents(moments, self.vae, generator)
        dropped = self.dropped(batch["indices"].tolist(), drop_captions)
        captions = ["" if d else c for c, d in zip(batch["captions"], dropped, strict=True)]
        return latents, encode_text(self.tokenizer, self.text_encoder, captions)


class CachedBatchEncoder(_BatchEncoder):
    """Looks each batch up in a `LatentCache`; batches carry only sample indices."""

    def __init__(self, cache: LatentCache, vae, config: TrainConfig, seed: int):
        super().__init__(vae, config, seed)
        self.cache, self.random_flip = cache, config.random_flip

    def __call__(self, batch: dict, generator: torch.Generator, drop_captions: bool = True):
        """(latents, text embeddings) for the indices of `batch`, with the same draws as the live path."""
        indices = batch["indices"].tolist()
        flips, caption_ids = [], []
        for index in indices:
            options = self.cache.sample_captions[index]
            draws = draw_sample(self.seed, self.epoch, index, len(options), self.random_flip)
            flips.append(int(draws.flip))
            caption_ids.append(options[draws.caption_index])
        dropped = self.dropped(indices, drop_captions)
        caption_ids = [
            self.cache.empty_caption_id if d else c for c, d in zip(caption_ids, dropped, strict=True)
        ]
        moments = self.cache.lookup(indices, flips)  # (B, 2C, h, w)
        latents = sample_latents(moments.to(self.vae.device), self.vae, generator)
        text = self.cache.text_embeds[torch.tensor(caption_ids)].to(self.vae.device)
        return latents, text
