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
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import FromSingleFileMixin
from safetensors.torch import save_file
from transformers import CLIPTextModel

from ldm.checks import check_pipeline_folder

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
)
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# Settings SD 1.x's original model has no other value for: a different one changes the weights' names or shapes, or
# what the weights mean to a loader that assumes SD 1.x (AUTOMATIC1111, ComfyUI).
SD_UNET = {
    "down_block_types": SD_DOWN_BLOCKS, "up_block_types": SD_UP_BLOCKS, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1, "use_linear_projection": False,
    "only_cross_attention": False, "dual_cross_attention": False, "attention_type": "default",
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
    "resnet_time_scale_shift": "default", "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3,
}  # fmt: skip
SD_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
    "use_post_quant_conv": True,
}  # fmt: skip
PER_LEVEL = {"transformer_layers_per_block"}  # one value, or one per level
# diffusers' names inside a block -> the original names.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class LatentSingleFileMixin(FromSingleFileMixin):
    """diffusers' `from_single_file`, which loads the project's pipelines as they are; `save_single_file` writes one.

    Offline, pass `config=` a local pipeline folder whose component configs describe the file's models, e.g.
    `LatentPipeline.from_single_file("model.safetensors", config="my-pipeline")`.
    """

    # diffusers' own `from_single_file` serves any pipeline class. It takes `cls` itself unless `cls` is
    # DiffusionPipeline (pipelines/pipeline_loading_utils.py `_get_pipeline_class`), reads the components from the
    # `config=` folder's model_index.json and builds `cls(**components)`, filling optional components the folder does
    # not list (image_encoder, feature_extractor, safety_checker) with None (loaders/single_file.py, 0.42.1).

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """diffusers' `from_single_file`; a file whose weights do not fit the `config=` folder's models is refused in
        one line naming the component and the first weight that differs (diffusers' message names neither).

        Raises:
            ValueError: the file does not fit the configs, or diffusers' own errors.
        """
        try:
            return super().from_single_file(pretrained_model_link_or_path, **kwargs)
        except ValueError as err:
            message = config_mismatch(str(err), kwargs.get("config"))
            if message is None:
                raise
            raise ValueError(message) from None

    def save_single_file(self, path: str | Path, half: bool = False) -> Path:
        """Write the pipeline's UNet, VAE and text encoder as one original-layout .safetensors file."""
        return write_single_file(self, path, half)


# diffusers' message when a weight's shape differs from the model built from the config (the name it gives is empty).
_SHAPE_MISMATCH = re.compile(
    r"Cannot load .* because (\S+) expected shape torch\.Size\(\[([\d, ]*)\]\), but got torch\.Size\(\[([\d, ]*)\]\)"
)


def component_of(key: str) -> str:
    """The pipeline component a diffusers-layout weight name belongs to (text encoder, VAE or UNet)."""
    if key.startswith(("text_model.", "embeddings.", "encoder.layers.", "final_layer_norm.")):
        return "text_encoder"
    if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
        return "vae"
    return "unet"


def config_mismatch(error: str, config) -> str | None:
    """One line for diffusers' shape error when a single file does not fit the `config=` folder; None for others."""
    match = _SHAPE_MISMATCH.search(error)
    if match is None:
        return None
    key, expected, got = match.groups()
    component = component_of(key)
    where = f"{config}/{component}/config.json" if config else f"the {component} config diffusers chose"
    return (
        f"The file's {component} does not fit {where}: {key} is ({got}) in the file but ({expected}) in a model "
        "built from that config. Pass config= the pipeline folder the file was exported from (or one of the same "
        "structure)."
    )


# ----------------------------------------------------------------------------- structure checks


def as_compared(name: str, value):
    """A config value in the form SD_UNET / SD_VAE hold it: sequences as tuples, a per-level setting that is the
    same at every level (transformer_layers_per_block (1, 1, 1, 1)) as that one value."""
    if not isinstance(value, (list, tuple)):
        return value
    if name in PER_LEVEL and len(set(value)) == 1:
        return value[0]
    return tuple(value)


def check_sd_structure(unet_config, vae_config) -> None:
    """The original layout exists only for SD 1.x's structure; anything else is refused, naming what differs.

    Raises:
        ValueError: listing each setting that is not SD 1.x's.
    """
    wrong = []
    for model, config, expected in (("UNet", unet_config, SD_UNET), ("VAE", vae_config, SD_VAE)):
        for name, want in expected.items():
            got = as_compared(name, getattr(config, name, want))
            if got != want:
                wrong.append(f"{model} {name} is {got!r}, not {want!r}")
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


# ----------------------------------------------------------------------------- diffusers names -> original names


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
    names = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_in.": f"{side}.conv_in.", f"{side}.conv_out.": f"{side}.conv_out.",
                      f"{side}.conv_norm_out.": f"{side}.norm_out.", f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
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


def rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str | None:
    """`key` with its block prefix (longest match) and the first inner name after it mapped; None if no prefix fits."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if match is None:
        return None
    rest = key[len(match) :]
    for old, new in inner.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return prefixes[match] + rest


def check_all_named(model: str, unnamed: list[str]) -> None:
    """Weights outside every original block (an extra embedding, say) have no name there: refuse, naming them."""
    if unnamed:
        raise ValueError(
            f"The single-file (A1111/ComfyUI) layout exists only for Stable Diffusion 1.x's structure; the {model} "
            f"has weights SD 1.x has no place for: {', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}."
        )


def unet_state(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original names."""
    prefixes = unet_prefixes(len(unet.config.block_out_channels), unet.config.layers_per_block)
    out, unnamed = {}, []
    for key, value in unet.state_dict().items():
        name = rename(key, prefixes, UNET_RESNET if ".resnets." in key else {})
        if name is None:
            unnamed.append(key)
        out[f"{UNET_PREFIX}{name}"] = value
    check_all_named("UNet", unnamed)
    return out


def vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original names; attention projections as the 1x1 convs they were there."""
    prefixes = vae_prefixes(len(vae.config.block_out_channels), vae.config.layers_per_block)
    out, unnamed = {}, []
    for key, value in vae.state_dict().items():
        is_attention = ".attentions." in key
        name = rename(key, prefixes, VAE_ATTENTION if is_attention else VAE_RESNET)
        if name is None:
            unnamed.append(key)
        if is_attention and value.ndim == 2:
            # (C, C) linear -> (C, C, 1, 1) conv; diffusers' loader takes [:, :, 0, 0] back
            # (single_file_utils.py `update_vae_attentions_ldm_to_diffusers`).
            value = value[:, :, None, None]
        out[f"{VAE_PREFIX}{name}"] = value
    check_all_named("VAE", unnamed)
    return out


def text_state(text_encoder) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's weights under `cond_stage_model.transformer.text_model.`, as SD 1.x files hold them.

    transformers 5's CLIPTextModel names its weights without `text_model.` (4 had it); both are written the same.
    The prefix matters: diffusers recognises a CLIP text encoder in a file by
    `cond_stage_model.transformer.text_model.embeddings.position_embedding.weight` (single_file_utils.py
    CHECKPOINT_KEY_NAMES["clip"]) and strips `text_model.` itself for the flat model.
    """
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_PREFIX + key] = value
    return out


def sd_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three models' weights in the original single-file layout (after checking the structure).

    Raises:
        ValueError: when the UNet or VAE is not SD 1.x-structured (see `check_sd_structure`).
    """
    check_sd_structure(unet.config, vae.config)
    return {**unet_state(unet), **vae_state(vae), **text_state(text_encoder)}


# ----------------------------------------------------------------------------- writing


def load_models(folder: str | Path) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The UNet, VAE and text encoder of a pipeline folder, after checking the structure from the configs alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (expected a saved pipeline folder).")
    check_pipeline_folder(folder)
    check_sources(None, folder / "unet", folder / "vae")  # before loading what would be refused
    return (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    )


def write_single_file(pipe_or_folder, out_path: str | Path, half: bool = False) -> Path:
    """Write one .safetensors file that A1111/ComfyUI and diffusers' `from_single_file` load.

    Args:
        pipe_or_folder: A pipeline (anything with `unet`, `vae` and `text_encoder`) or a saved pipeline folder.
        out_path: The file to write; must end in .safetensors.
        half: Store fp16 weights (half the size) instead of the models' own dtype.

    Returns:
        The path written.

    Raises:
        ValueError: a bad output name, a folder that is not a pipeline, or a pipeline without SD 1.x's structure.
    """
    path = Path(out_path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: a single-file checkpoint is written as .safetensors; name it {path.stem}.safetensors."
        )
    if isinstance(pipe_or_folder, (str, Path)):
        unet, vae, text_encoder = load_models(pipe_or_folder)
    else:
        unet, vae, text_encoder = pipe_or_folder.unet, pipe_or_folder.vae, pipe_or_folder.text_encoder
    state = sd_state_dict(unet, vae, text_encoder)
    dtype = torch.float16 if half else None
    # safetensors stores whole, contiguous buffers: the VAE's (C, C, 1, 1) views and any transposed weight are copied.
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, path, metadata={"format": "pt", "written_by": "ldm-export", "layout": "stable-diffusion-v1"}
    )
    return path
