"""Single-file Stable Diffusion 1.x checkpoints (the original key layout AUTOMATIC1111 and ComfyUI load): export and load.

The original layout names the UNet `model.diffusion_model.*` (input_blocks / middle_block / output_blocks), the VAE
`first_stage_model.*` (encoder.down / decoder.up, 1x1-conv attention) and the CLIP text encoder
`cond_stage_model.transformer.text_model.*`. diffusers converts that layout to its own when loading
(`from_single_file`) but has no library function for the way back; `sd_state_dict` below is that way back, built
from the module structure (which original block each diffusers block is), so only SD 1.x's structure is accepted.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import FromSingleFileMixin
from safetensors.torch import save_file

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
)
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# diffusers' names inside a block -> the original names.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class LatentSingleFileMixin(FromSingleFileMixin):
    """diffusers' `from_single_file`, which loads the project's pipelines as they are; `save_single_file` writes one.

    Offline, pass `config=` a local pipeline folder whose component configs describe the file's models.
    """

    def save_single_file(self, path: str | Path, half: bool = False) -> Path:
        """Write the pipeline's UNet, VAE and text encoder as one original-layout .safetensors file."""
        return write_single_file(self.unet, self.vae, self.text_encoder, path, half)


def check_sd_structure(unet_config, vae_config) -> None:
    """The original layout exists only for SD 1.x's block structure; anything else is refused, naming what differs.

    Raises:
        ValueError: listing each setting that is not SD 1.x's.
    """
    expected = {
        "UNet down_block_types": (tuple(unet_config.down_block_types), SD_DOWN_BLOCKS),
        "UNet up_block_types": (tuple(unet_config.up_block_types), SD_UP_BLOCKS),
        "UNet layers_per_block": (unet_config.layers_per_block, 2),
        "UNet mid_block_type": (unet_config.mid_block_type, "UNetMidBlock2DCrossAttn"),
        "UNet use_linear_projection": (bool(unet_config.use_linear_projection), False),
        "UNet transformer_layers_per_block": (unet_config.transformer_layers_per_block, 1),
        "VAE down blocks": (len(vae_config.down_block_types), 4),
        "VAE layers_per_block": (vae_config.layers_per_block, 2),
    }
    wrong = [f"{name} is {got!r}, not {want!r}" for name, (got, want) in expected.items() if got != want]
    if wrong:
        raise ValueError(
            "The single-file (A1111/ComfyUI) layout exists only for Stable Diffusion 1.x's structure (4 levels, 2 "
            "layers per block, conv attention projections); this pipeline differs: " + "; ".join(wrong) + "."
        )


def with_defaults(model_cls, settings: dict) -> SimpleNamespace:
    """A config as `model_cls` would hold it: its constructor's defaults, overridden by `settings`."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(model_cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return SimpleNamespace(**{**defaults, **settings})


def read_config(folder: str | Path | None) -> dict | None:
    """A local model folder's config.json, or None (no folder, or a Hub id)."""
    path = Path(folder) / "config.json" if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def check_sources(unet_settings: dict | None, unet_folder=None, vae_folder=None) -> None:
    """`check_sd_structure` before any model loads, from a preset's UNet settings or a local UNet folder and a local
    VAE folder; what is not local (a Hub id) is checked when the pipeline is written."""
    unet, vae = unet_settings or read_config(unet_folder), read_config(vae_folder)
    if unet is not None and vae is not None:
        check_sd_structure(with_defaults(UNet2DConditionModel, unet), with_defaults(AutoencoderKL, vae))


def unet_prefixes(num_levels: int = 4, layers: int = 2) -> dict[str, str]:
    """diffusers UNet block prefix -> original prefix (input_blocks / middle_block / output_blocks)."""
    names = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}  # fmt: skip
    for i in range(num_levels):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{block}.0."
            names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        if i < num_levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{block}.0."
            names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{block}.1."
        if i < num_levels - 1:  # the upsampler follows the attention, when the level has one
            names[f"up_blocks.{i}.upsamplers.0."] = (
                f"output_blocks.{(layers + 1) * i + layers}.{1 if i == 0 else 2}."
            )
    return names


def vae_prefixes(num_levels: int = 4, layers: int = 2) -> dict[str, str]:
    """diffusers VAE block prefix -> original prefix (encoder.down.i / decoder.up.(n-1-i), mid.block_k, mid.attn_1)."""
    names = {}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_norm_out.": f"{side}.norm_out.", f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
                      f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2.",
                      f"{side}.mid_block.attentions.0.": f"{side}.mid.attn_1."})  # fmt: skip
    for i in range(num_levels):
        for j in range(layers):
            names[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        up = num_levels - 1 - i
        for j in range(layers + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    return names


def rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    """`key` with its block prefix (longest match) and the first inner name after it mapped; others unchanged."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if match is None:
        return key
    rest = key[len(match) :]
    for old, new in inner.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return prefixes[match] + rest


def unet_state(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original names."""
    prefixes = unet_prefixes(len(unet.config.block_out_channels), unet.config.layers_per_block)
    out = {}
    for key, value in unet.state_dict().items():
        inner = UNET_RESNET if ".resnets." in key else {}
        out[UNET_PREFIX + rename(key, prefixes, inner)] = value
    return out


def vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original names; attention projections as the 1x1 convs they were there."""
    prefixes = vae_prefixes(len(vae.config.block_out_channels), vae.config.layers_per_block)
    out = {}
    for key, value in vae.state_dict().items():
        is_attention = ".attentions." in key
        inner = VAE_ATTENTION if is_attention else VAE_RESNET
        if is_attention and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[VAE_PREFIX + rename(key, prefixes, inner)] = value
    return out


def text_state(text_encoder) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's weights under `cond_stage_model.transformer.text_model.`, as SD 1.x files hold them.

    transformers 5's CLIPTextModel names its weights without `text_model.` (4 had it); both are written the same.
    """
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_PREFIX + key] = value
    return out


def sd_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three models' weights in the original single-file layout (after checking the structure)."""
    check_sd_structure(unet.config, vae.config)
    return {**unet_state(unet), **vae_state(vae), **text_state(text_encoder)}


def write_single_file(unet, vae, text_encoder, path: str | Path, half: bool = False) -> Path:
    """Write one .safetensors file A1111/ComfyUI and diffusers' `from_single_file` load; fp16 with `half`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: a single-file checkpoint is written as .safetensors; name it {path.stem}.safetensors."
        )
    state = sd_state_dict(unet, vae, text_encoder)
    dtype = torch.float16 if half else None
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt", "written_by": "ldm-export"})
    return path
