"""ControlNet training: its options, its initialisation from the base UNet, what its checkpoints and output folder
hold, its validation controls and its model card.

A ControlNet (Zhang et al. 2023) is a trainable copy of the UNet's encoder whose outputs join the frozen UNet's
skip connections through zero-initialised convolutions, so training starts from exactly the base model's
predictions. Only the ControlNet trains; the UNet, VAE and text encoder stay frozen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from PIL import Image

from ldm.checks import check_controlnet_fits
from ldm.encoding import vae_scale_factor
from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.training.checkpoint import ema_weights
from ldm.training.config import TrainConfig, require
from ldm.training.transforms import DECODE_ERRORS, open_image

CONTROLNET_FOLDER = "controlnet"
# diffusers' default conditioning embedding: 3 stride-2 convolutions, for a VAE that downsamples 8x.
EMBEDDING_CHANNELS = (16, 32, 96, 256)


@dataclass
class ControlNetTrainConfig(TrainConfig):
    """`train/train_controlnet.py`'s options: `TrainConfig`'s, with diffusers' `train_controlnet.py` names for
    what a ControlNet adds. `pretrained_model_name_or_path` is the base pipeline whose UNet the ControlNet steers."""

    # Start from this ControlNet (a folder or Hub id) instead of a copy of the base UNet's encoder.
    controlnet_model_name_or_path: str | None = None
    # The image column of the controls (an imagefolder's metadata.jsonl names it `<column>_file_name`).
    conditioning_image_column: str = "conditioning_image"
    # diffusers' name for caption dropout: the share of captions replaced by the empty prompt, which teaches the
    # ControlNet to read the control alone (guess mode). When set, it is the run's caption_dropout (one of the
    # two may be given, or both with the same value).
    proportion_empty_prompts: float | None = None
    # Control images for the validation grid: one per validation prompt, or one for every prompt.
    validation_image: list[str] | None = None
    # diffusers' train_controlnet.py spells it --validation_prompt; both names set this one field.
    validation_prompts: list[str] | None = dataclasses.field(
        default=None, metadata={"aliases": ["--validation_prompt"]}
    )
    tracker_project_name: str = "ldm-controlnet"
    output_dir: str = "ldm-controlnet"

    def validate(self) -> None:
        """`TrainConfig.validate`, then what a ControlNet run adds.

        Raises:
            ValueError: naming the first field or rule that is violated and how to fix it.
        """
        super().validate()
        for name, why in (
            ("unet_preset", "a ControlNet steers the pretrained UNet of pretrained_model_name_or_path"),
            ("lora_rank", "the whole ControlNet trains (LoRA adapts a UNet: use train_ldm.py)"),
        ):
            require(getattr(self, name) is None, f"{name} is not a ControlNet option: {why}; drop --{name}.")
        require(
            not self.export_single_file,
            "export_single_file writes a text-to-image pipeline; a ControlNet run saves a ControlNetModel folder. "
            "Drop --export_single_file.",
        )
        if self.proportion_empty_prompts is not None:
            require(
                0.0 <= self.proportion_empty_prompts < 1.0,
                f"proportion_empty_prompts is a probability in [0, 1); got {self.proportion_empty_prompts}.",
            )
            default = TrainConfig.caption_dropout
            require(
                self.caption_dropout in (default, self.proportion_empty_prompts),
                f"proportion_empty_prompts={self.proportion_empty_prompts} and caption_dropout={self.caption_dropout} "
                "are the same setting (diffusers' name and ldm's); give one of them.",
            )
            self.caption_dropout = self.proportion_empty_prompts
        require(
            bool(self.conditioning_image_column),
            "conditioning_image_column must name the column of the control images (e.g. conditioning_image).",
        )
        if self.validation_image is not None:
            prompts = self.validation_prompts or []
            require(
                len(self.validation_image) in (1, len(prompts)) and prompts,
                f"validation_image gives {len(self.validation_image)} control images for {len(prompts)} "
                "validation_prompts; give one per prompt, or one for all of them.",
            )


def load_validation_controls(config: ControlNetTrainConfig) -> list[Image.Image] | None:
    """The validation control images, one per validation prompt, decoded at start-up (before any model loads).

    Raises:
        ValueError: a file is missing or cannot be decoded, naming it and the flag.
    """
    if not config.validation_prompts:
        return None
    if config.validation_image is None:
        raise ValueError(
            "validation_prompts needs --validation_image: a ControlNet samples each prompt with a control image "
            "(one per prompt, or one for all of them)."
        )
    controls = []
    for path in config.validation_image:
        try:
            controls.append(open_image(path))
        except (*DECODE_ERRORS, TypeError) as error:
            raise ValueError(
                f"--validation_image {path!r} cannot be read ({error}); give an image file."
            ) from None
    return controls * len(config.validation_prompts) if len(controls) == 1 else controls


def check_controlnet_source(config: ControlNetTrainConfig) -> None:
    """A pretrained ControlNet (--controlnet_model_name_or_path) must fit the base model: checked on the configs
    alone, before any weights load.

    Raises:
        ValueError: naming what does not fit and what to do.
    """
    if config.controlnet_model_name_or_path is None:
        return
    base, revision = config.pretrained_model_name_or_path, config.revision
    controlnet = ControlNetModel.load_config(config.controlnet_model_name_or_path, revision=revision)
    unet = UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision)
    vae_source = config.pretrained_vae_model_name_or_path
    vae = (
        AutoencoderKL.load_config(vae_source)
        if vae_source
        else AutoencoderKL.load_config(base, subfolder="vae")
    )
    try:
        check_controlnet_fits(
            SimpleNamespace(config=FrozenDict(controlnet)),
            SimpleNamespace(config=FrozenDict(unet)),
            vae_scale_factor(vae),
        )
    except ValueError as err:
        raise ValueError(
            f"--controlnet_model_name_or_path {config.controlnet_model_name_or_path} does not fit {base}: {err}"
        ) from None
    require(
        controlnet["in_channels"] == vae["latent_channels"],
        f"The ControlNet {config.controlnet_model_name_or_path} takes {controlnet['in_channels']}-channel latents, "
        f"the VAE of {base} makes {vae['latent_channels']}; use a ControlNet made for this base, or drop "
        "--controlnet_model_name_or_path to start from its UNet.",
    )


def build_controlnet(
    config: ControlNetTrainConfig, unet: UNet2DConditionModel, vae_config
) -> ControlNetModel:
    """The ControlNet to train: `controlnet_model_name_or_path` (checked by `check_controlnet_source`), or a copy
    of the UNet's encoder with zero convolutions (`ControlNetModel.from_unet`) whose control embedding
    downsamples as the VAE does.

    Raises:
        ValueError: a VAE that downsamples more than diffusers' control embedding can (8x).
    """
    if config.controlnet_model_name_or_path is not None:
        return ControlNetModel.from_pretrained(config.controlnet_model_name_or_path, revision=config.revision)
    factor = vae_scale_factor(vae_config)
    levels = (
        int(math.log2(factor)) + 1
    )  # one stride-2 convolution per halving: the control lands on the latents
    require(
        levels <= len(EMBEDDING_CHANNELS),
        f"The VAE downsamples {factor}x; a ControlNet's control embedding here goes to 8x at most. Train a "
        "ControlNet for an 8x (or smaller) VAE.",
    )
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS[:levels]
    )
    init_control_embedding(controlnet)
    return controlnet


def init_control_embedding(controlnet: ControlNetModel) -> None:
    """He-initialise the control embedding (the convolutions that bring the control image to the latent grid).

    diffusers zeroes its last convolution and leaves the others at PyTorch's default, which shrinks activations
    layer after layer. Measured on the demo model (64 held-out samples, empty prompt, t from 400 to 999): after 200
    steps at lr 5e-4 or 2e-3 the loss was the same with the control and with an empty one (0.0271 and 0.0274), the
    slow start the paper calls sudden convergence; even with the last convolution re-initialised, a random control
    moved the residuals by 1e-4. With He initialisation the control reaches the ControlNet from the first step: 0.0225
    with the control against 0.0285 without, after 150 steps at lr 1e-3. The ControlNet's output convolutions stay
    zero, so training still starts from exactly the base model's predictions.
    """
    embedding = controlnet.controlnet_cond_embedding
    for conv in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)


@dataclass
class ControlNetExport:
    """The frozen base (VAE, text encoder, tokenizer, UNet, schedule) and the EMA shadow, to turn trained
    ControlNet weights into what a checkpoint saves and validation samples."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    unet: UNet2DConditionModel
    ema: object | None = None

    def controlnet(self, trained: ControlNetModel) -> ControlNetModel:
        """The weights to sample with: the EMA weights when EMA is on, else the trained ones."""
        return trained if self.ema is None else ema_weights(self.ema, trained)

    def pipeline(self, trained: ControlNetModel) -> LatentControlNetPipeline:
        """A LatentControlNetPipeline of the base and the trained ControlNet, with DDIM sampling."""
        pipe = LatentControlNetPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            controlnet=self.controlnet(trained),
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, trained: ControlNetModel, config: TrainConfig, folder: Path) -> str:
        """Write the ControlNet (EMA weights when EMA is on) to `folder`/controlnet; returns that subfolder.
        (`config` is `PipelineExport.save`'s argument, which a LoRA's files need; a ControlNet's do not.)"""
        self.controlnet(trained).save_pretrained(folder / CONTROLNET_FOLDER)
        return CONTROLNET_FOLDER


def controlnet_model_card(config: ControlNetTrainConfig, repo_id: str, grid_name: str | None) -> str:
    """README.md of a ControlNet output folder: what it steers, how it was trained and how to load it."""
    base = config.pretrained_model_name_or_path
    settings = {
        k: getattr(config, k)
        for k in (
            "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "max_train_steps", "caption_dropout", "mixed_precision", "use_ema",
        )
    }  # fmt: skip
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}",
        "tags: [controlnet, text-to-image, diffusers, ldm]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A ControlNet for `{base}`, trained with `ldm`'s `train/train_controlnet.py` on "
        f"{config.dataset_name or config.train_data_dir} (controls in column `{config.conditioning_image_column}`).",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "```python",
        "from diffusers import ControlNetModel",
        "from ldm import LatentControlNetPipeline, LatentPipeline",
        "",
        f'controlnet = ControlNetModel.from_pretrained("{repo_id}")',
        f'pipe = LatentControlNetPipeline.from_pipe(LatentPipeline.from_pretrained("{base}"), controlnet=controlnet)',
        'image = pipe("a prompt", image=control_image, controlnet_conditioning_scale=1.0).images[0]',
        "```",
        "",
        "diffusers' `StableDiffusionControlNetPipeline` loads it the same way.",
    ]
    if grid_name:
        lines += ["", f"![validation: control | sample]({grid_name})"]
    return "\n".join(lines) + "\n"
