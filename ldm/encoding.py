"""What the frozen models compute for sampling and training alike: text embeddings and latent scaling.

`LatentPipeline` and the training batch encoders both call these, so the unconditional input that caption dropout
trains on is exactly the one guidance uses, and latents are scaled on the way in exactly as they are unscaled on
the way out.

Notation: z a VAE latent (B, C, H/f, W/f) with f = `vae_scale_factor`; x_0 = (z - shift) * scaling_factor the
unit-variance latent the diffusion model works on (Rombach et al. 2022, sec. 4.3 and App. G).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from diffusers.utils import logging
from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.get_logger(__name__)

# The VAE's mid-block self-attention runs over every latent pixel, so its cost grows with their square: up to 128x128
# latents (a 1024 px Stable Diffusion image) it is fine; a 2048 px image on the tiny 2x VAE (1024x1024 latents) ran
# more than 13 CPU-minutes in one attention. Larger ones go through diffusers' tiled encode/decode, in tiles of
# TILE_LATENT_SIDE latents (Stable Diffusion's own 64 at 512 px) or the VAE's own tile size if larger.
MAX_UNTILED_LATENT_PIXELS = 128 * 128
TILE_LATENT_SIDE = 64


def vae_scale_factor(vae_config: Mapping) -> int:
    """Pixels per latent along each side: 2 per down block but the last (8 for Stable Diffusion's VAE).

    Args:
        vae_config: an `AutoencoderKL` config (`vae.config`) or the plain dict of a preset's VAE arguments.
    """
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def scale_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents to the diffusion model's unit-variance space: x_0 = (z - shift) * scaling_factor."""
    shift = getattr(vae.config, "shift_factor", None)
    return ((z - shift) if shift is not None else z) * vae.config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of `scale_latents`: z = x_0 / scaling_factor + shift, what the VAE decoder takes."""
    z = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return z + shift if shift is not None else z


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's moments (mean, log variance) for pixels (B, 3, H, W) in [-1, 1]: (B, 2C, H/f, W/f).

    The pixels go in channels-last: oneDNN's convolutions then run about 1.3x faster on CPU (measured on the demo's
    8x VAE at 64 px, batch 64: 359 vs 283 ms), and cuDNN prefers that layout too. The result is made contiguous.
    """
    pixels = pixels.to(vae.device, vae.dtype).contiguous(memory_format=torch.channels_last)
    return vae.encode(pixels).latent_dist.parameters.contiguous()


def encode_text(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, texts: list[str], clip_skip: int | None = None
) -> torch.Tensor:
    """CLIP last hidden states (B, model_max_length, D), as Stable Diffusion conditions on them.

    With `clip_skip` = k the output of the k-th layer from the end is taken instead, through the final layer
    norm, as diffusers defines it (k = 1: the penultimate layer).

    Prompts longer than the tokenizer's `model_max_length` are truncated, with a warning naming them.
    """
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    untruncated = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > tokens.input_ids.shape[-1]:
        logger.warning(
            "Prompts longer than the tokenizer's model_max_length=%d tokens were truncated: %s",
            tokenizer.model_max_length,
            texts,
        )
    attention_mask = None
    # SD's CLIP attends over padding; only encoders configured for masks (not CLIP) get one.
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    ids = tokens.input_ids.to(text_encoder.device)
    if clip_skip is None:
        hidden = text_encoder(ids, attention_mask=attention_mask)[0]
    else:
        states = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        # transformers 5's CLIPTextModel holds final_layer_norm itself; 4's kept it under `text_model`.
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = norm(states[-(clip_skip + 1)])
    return hidden.to(dtype=text_encoder.dtype)


def tile_count(side: int, tile: int, overlap_factor: float) -> int:
    """How many tiles diffusers' tiled encode/decode takes along a side of `side` pixels (or latents)."""
    return len(range(0, side, int(tile * (1 - overlap_factor))))


@contextmanager
def vae_tiles(
    pipe, stage: Literal["encode", "decode"], latent_size: tuple[int, int], images: int
) -> Iterator[None]:
    """Run what the block encodes or decodes through `pipe.vae` in tiles, with a progress bar over them, when the
    latents are larger than `MAX_UNTILED_LATENT_PIXELS` (or the user enabled tiling); untouched otherwise.

    Tiling turned on here is turned off again on the way out, and warned about: tiles are blended at their seams,
    so the result differs slightly from an untiled pass (call `pipe.enable_vae_tiling()` to choose it yourself).
    """
    vae = pipe.vae
    height, width = latent_size
    automatic = not vae.use_tiling and height * width > MAX_UNTILED_LATENT_PIXELS
    sizes = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    if automatic:
        factor = vae_scale_factor(vae.config)
        latent_tile = max(vae.tile_latent_min_size, TILE_LATENT_SIDE)
        vae.tile_latent_min_size, vae.tile_sample_min_size = latent_tile, latent_tile * factor
        vae.enable_tiling()
        logger.warning(
            "%dx%d latents are too large to %s in one pass (its attention would take minutes to hours): %sing "
            "in tiles of %d latents. pipe.enable_vae_tiling() makes this your choice and silences this warning.",
            height, width, stage, stage.removesuffix("e"), latent_tile,
        )  # fmt: skip
    if not vae.use_tiling or max(height, width) <= vae.tile_latent_min_size:
        yield
        return
    side = vae.tile_latent_min_size if stage == "decode" else vae.tile_sample_min_size
    factor = 1 if stage == "decode" else vae_scale_factor(vae.config)
    tiles = tile_count(height * factor, side, vae.tile_overlap_factor) * tile_count(
        width * factor, side, vae.tile_overlap_factor
    )
    bar = pipe.progress_bar(total=tiles * images)
    bar.set_description(f"VAE {stage} tiles")
    module = vae.encoder if stage == "encode" else vae.decoder

    def count_tile(*_) -> None:  # a forward hook's return value would replace the output
        bar.update(1)

    hook = module.register_forward_hook(count_tile)
    try:
        yield
    finally:
        hook.remove()
        bar.close()
        if automatic:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = sizes
