"""LoRA fine-tuning of the UNet: the adapter, what trains, and the two files it is saved as.

A LoRA run freezes the base UNet and trains low-rank adapters on its attention projections (Hu et al. 2021):
W x -> W x + (alpha / r) B A x with A (r, d_in) and B (d_out, r), B = 0 at the start, through peft as diffusers'
`add_adapter` sets it up. It is saved as

- `pytorch_lora_weights.safetensors`: diffusers' format, what `StableDiffusionPipeline.load_lora_weights` (and
  `LatentPipeline.load_lora_weights`) read;
- `pytorch_lora_weights_kohya.safetensors`: the same weights in kohya's key layout (`lora_unet_..._to_q.lora_down
  .weight`, `.lora_up.weight`, `.alpha`), what AUTOMATIC1111 and ComfyUI read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm.training.config import TrainConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"


def add_lora(unet, config: TrainConfig) -> None:
    """Freeze `unet` and add the run's adapter to it (its parameters are the only ones left trainable)."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
    )


def adapted_widths(unet, targets: list[str]) -> dict[str, int]:
    """The layers a LoRA on `targets` adapts (peft's rule: the module name is a target or ends with "." + one), each
    with its width min(in_features, out_features), the highest rank its update B A can have."""
    return {
        name: min(module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    }


def check_lora_rank(config: TrainConfig) -> None:
    """lora_rank fits the base UNet, read from its config alone (a model on the meta device: no weights load).

    A rank above the narrowest adapted layer's width adds parameters but no rank there (B A has rank at most that
    width) and makes every step slower (measured 20x at rank 100000 on 64-wide layers).

    Raises:
        ValueError: the targets match no layer, or the rank is above the narrowest adapted width.
    """
    unet_config = UNet2DConditionModel.load_config(
        config.pretrained_model_name_or_path, subfolder="unet", revision=config.revision
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    widths = adapted_widths(unet, list(config.lora_target_modules))
    if not widths:
        raise ValueError(
            f"lora_target_modules={list(config.lora_target_modules)} match no linear layer of the UNet of "
            f"{config.pretrained_model_name_or_path}; use its attention projections: to_q to_k to_v to_out.0."
        )
    name, width = min(widths.items(), key=lambda item: item[1])
    if config.lora_rank > width:
        raise ValueError(
            f"lora_rank={config.lora_rank} is above the width of the narrowest layer it adapts ({name}: {width}), "
            f"so the extra rank adds parameters and time but nothing a rank-{width} update cannot do; use "
            f"--lora_rank {min(width, 64)} or less (4 to 64 is usual)."
        )


def trainable_parameters(unet) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: the adapter's in a LoRA run, every one otherwise."""
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key layout (without the `unet.` prefix the file adds)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def kohya_state_dict(unet, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout. diffusers' converter writes every `.alpha` as the rank, which is right only
    when alpha = rank; the run's alpha is written instead, so A1111/ComfyUI scale the update as training did."""
    peft = {f"unet.{key}": value for key, value in get_peft_model_state_dict(unet).items()}
    converted = convert_state_dict_to_kohya(peft)
    return {
        key: torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
        for key, value in converted.items()
    }


def save_lora(unet, config: TrainConfig, folder: Path) -> None:
    """Write both files of the adapter into `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    # The adapter's config goes into the file's metadata: without it diffusers loads alpha as the rank, and an
    # adapter trained with alpha != rank would apply at the wrong scale.
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(unet),
        weight_name=LORA_WEIGHTS,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    save_file(
        kohya_state_dict(unet, alpha),
        folder / KOHYA_WEIGHTS,
        metadata={
            "ss_network_dim": str(config.lora_rank),
            "ss_network_alpha": str(alpha),
            "ss_sd_model_name": config.pretrained_model_name_or_path,  # kohya's key for the base it adapts
        },
    )


def lora_model_card(config: TrainConfig, repo_id: str, grid_name: str | None) -> str:
    """README.md of a LoRA output folder: what it adapts and how to load it."""
    base = config.pretrained_model_name_or_path
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}",
        "tags: [lora, text-to-image, diffusers, ldm]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A LoRA (rank {config.lora_rank}, alpha {alpha:g}, on {', '.join(config.lora_target_modules)}) for the UNet "
        f"of `{base}`, trained with `ldm`'s `train/train_ldm.py` on {config.dataset_name or config.train_data_dir} "
        f"for {config.max_train_steps} steps.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline  # or: from ldm import LatentPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
        f'pipe.load_lora_weights("{repo_id}")  # {LORA_WEIGHTS}',
        'image = pipe("a prompt", cross_attention_kwargs={"scale": 1.0}).images[0]',
        "```",
        "",
        f"`{KOHYA_WEIGHTS}` holds the same weights in kohya's layout, for AUTOMATIC1111 and ComfyUI.",
    ]
    if grid_name:
        lines += ["", f"![validation samples]({grid_name})"]
    return "\n".join(lines) + "\n"
