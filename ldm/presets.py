"""Named model shapes (what to build), kept apart from how a run uses them (configs/*.yaml).

Each preset is one plain dict of constructor arguments for diffusers' `UNet2DConditionModel` and `AutoencoderKL`
and transformers' `CLIPTextConfig`. The text encoder's `vocab_size` and the token ids come from the tokenizer the
model is built with, so any CLIP-format tokenizer fits any preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.pipelines.text_to_image import LatentPipeline
from ldm.pipelines.upscale import UPSCALER_SCALING_FACTOR, LatentUpscalePipeline

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Unit tests: two UNet blocks, a 2x VAE, a two-layer text encoder; 16 px images, 8x8x4 latents.
    "tiny": {
        "unet": {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {
            "sample_size": 16,
            "block_out_channels": (16, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
        },
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
    },
    # Stable Diffusion 1.x's structure (4 levels, 2 layers per block, 3 cross-attention levels) at toy widths: the
    # smallest model the single-file (A1111/ComfyUI) layout fits. 64 px images, 8x8x4 latents.
    "tiny-sd": {
        "unet": {
            "sample_size": 8,
            "block_out_channels": (8, 16, 32, 32),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "vae": {
            "sample_size": 64,
            "block_out_channels": (8, 16, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 8,
        },
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
    },
    # CPU demos: 64 px images, an 8x VAE (Stable Diffusion's factor), 8x8x4 latents, a 4M-parameter UNet with
    # attention at 4x4 only (self-attention over the 8x8 level cost twice the step time on 2 CPU cores for no
    # adherence gain).
    "small": {
        "unet": {
            "sample_size": 8,
            "block_out_channels": (64, 128),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": 32,
            "norm_num_groups": 32,
        },
        "vae": {
            "sample_size": 64,
            "block_out_channels": (32, 64, 64, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
        },
        "text_encoder": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 128,
        },
    },
    # Stable Diffusion 1.5: 512 px images, 8x VAE, 64x64x4 latents, CLIP ViT-L/14 text (768-d cross-attention).
    "sd15": {
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
    },
}


def with_x4_vae(name: str) -> dict[str, dict[str, Any]]:
    """Preset `name` with a 4x VAE (three levels: its first three, the last width repeated if it has fewer), the
    factor of Stable Diffusion's x4 upscaler: latents the size of an image 4x smaller, which an upscaler's UNet reads
    beside that image. The image size stays, so the UNet's sample_size follows the new factor."""
    preset = PRESETS[name]
    widths = tuple(preset["vae"]["block_out_channels"])
    vae = dict(
        preset["vae"],
        block_out_channels=(widths + widths[-1:] * 3)[:3],
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Convolutions only: an upscaler's VAE encodes images 4x larger than the windows it may be trained on, and
        # self-attention over 16x more positions than in training shifted the colours of whole images.
        mid_block_add_attention=False,
    )
    image_side = preset["unet"]["sample_size"] * 2 ** (len(widths) - 1)
    return dict(preset, vae=vae, unet=dict(preset["unet"], sample_size=image_side // 4))


# The `small` UNet at half the width (1.0M parameters, a quarter of the FLOPs, 2.3-2.5x the steps per second on 2
# CPU cores; the same heads of 4 channels, the same 2 channels per norm group), with `small`'s VAE and text encoder. It
# learns the shapes demo's held-out compositions in as many steps as `small` does, so in under half the training
# time (README, "Time to quality").
PRESETS["small-narrow"] = dict(
    PRESETS["small"],
    unet=dict(
        PRESETS["small"]["unet"], block_out_channels=(32, 64), attention_head_dim=16, norm_num_groups=16
    ),
)

# tiny-x4: 16 px images, 4x4x4 latents (tests); small-x4: 64 px images, 16x16x4 latents (the upscaler demo's VAE).
PRESETS["tiny-x4"] = with_x4_vae("tiny")
PRESETS["small-x4"] = with_x4_vae("small")


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    """The preset called `name`; a ValueError lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def unet_config(name: str, cross_attention_dim: int, sample_size: int | None = None) -> dict[str, Any]:
    """UNet constructor arguments for a preset, with cross-attention sized to the text encoder."""
    config = dict(get_preset(name)["unet"], cross_attention_dim=cross_attention_dim)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def text_encoder_config(name: str, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A CLIPTextConfig for a preset, sized to the tokenizer's vocabulary and special tokens."""
    return CLIPTextConfig(
        **get_preset(name)["text_encoder"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_unet(name: str, cross_attention_dim: int, sample_size: int | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel of the named preset."""
    return UNet2DConditionModel(**unet_config(name, cross_attention_dim, sample_size))


def upscaler_unet_config(
    name: str, cross_attention_dim: int, latent_channels: int = 4, sample_size: int | None = None
) -> dict[str, Any]:
    """UNet constructor arguments for an upscaler of a preset's shape: it reads the latents and the 3-channel
    low-resolution image, and takes the image's noise level as a class label.

    The noise level goes through a sinusoidal embedding (`class_embed_type="timestep"`), as the timestep does, not
    Stable Diffusion's table of one learned vector per level: nearby levels then share what they learn, so a short
    run trains every level it samples instead of 1/350th of its steps each. `LatentUpscalePipeline` runs both.
    """
    return dict(
        unet_config(name, cross_attention_dim, sample_size),
        in_channels=latent_channels + 3,
        out_channels=latent_channels,
        class_embed_type="timestep",
    )


def upscaler_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """An upscaler's (low_res_scheduler, scheduler): Stable Diffusion's x4 upscaler noises the low-resolution image
    on a linear DDPM schedule (betas 0.0001 to 0.02, 1000 steps); the sampler is DDIM over `sd_scheduler`'s schedule."""
    low_res = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02
    )
    return low_res, sd_scheduler()


def build_pipeline(name: str, tokenizer: CLIPTokenizer | str | Path, seed: int = 0):
    """Build a randomly initialised `LatentPipeline` of the named preset.

    Args:
        name: A key of `PRESETS` ("tiny", "small", "sd15").
        tokenizer: A CLIPTokenizer, or a folder holding one (see `ldm.tokenizer.write_clip_tokenizer`).
        seed: Seed for the random weights, so two builds with one seed are identical.

    Returns:
        A `LatentPipeline` with a DDIM scheduler in Stable Diffusion's training configuration.
    """
    preset = get_preset(name)
    if not isinstance(tokenizer, CLIPTokenizer):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(name, tokenizer)).eval()
    vae = AutoencoderKL(**preset["vae"]).eval()
    unet = build_unet(name, cross_attention_dim=text_encoder.config.hidden_size).eval()
    return LatentPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler()
    )


def build_upscale_pipeline(name: str, tokenizer: CLIPTokenizer | str | Path, seed: int = 0):
    """Build a randomly initialised `LatentUpscalePipeline` of the named x4 preset ("tiny-x4", "small-x4"), its VAE's
    latents scaled by 0.08333 as diffusers' upscaler expects, its UNet from `upscaler_unet_config`."""
    base = build_pipeline(name, tokenizer, seed)
    base.vae.register_to_config(scaling_factor=UPSCALER_SCALING_FACTOR)
    unet = UNet2DConditionModel(**upscaler_unet_config(name, base.text_encoder.config.hidden_size)).eval()
    low_res_scheduler, scheduler = upscaler_schedulers()
    return LatentUpscalePipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        low_res_scheduler=low_res_scheduler, scheduler=scheduler,
    )  # fmt: skip


def sd_scheduler() -> DDIMScheduler:
    """DDIM over Stable Diffusion's training schedule: 1000 steps, scaled-linear betas 0.00085 to 0.012."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
