"""Loading, saving and uploading for the project's pipelines, shared by text-to-image, img2img and inpainting.

Every pipeline here saves Stable Diffusion's folder layout with safetensors weights, so stock diffusers loads it, and
loads any Stable Diffusion 1.x folder or Hub repository without its safety checker.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from diffusers.configuration_utils import FrozenDict
from diffusers.utils import logging
from safetensors import safe_open

from ldm.checks import check_components_fit, check_pipeline_folder, looks_like_hub_id
from ldm.hub import upload_pipeline
from ldm.tokenizer import write_vocab_files

logger = logging.get_logger(__name__)

# Stable Diffusion ships a safety checker that these pipelines never run; loading skips it (and its weights).
SKIPPED_COMPONENTS = ("safety_checker",)


def fix_legacy_scheduler(scheduler):
    """Apply the two fixes `StableDiffusionPipeline.__init__` makes to old scheduler configs, in place.

    Early Stable Diffusion repositories saved `steps_offset: 0` and `clip_sample: true`; diffusers samples them with
    `steps_offset=1` and no clipping, so the same weights give the same images here. diffusers does this inline in
    each pipeline's __init__ rather than in a function, hence this one.
    """
    if scheduler is None:
        return scheduler
    fixes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        old = {key: scheduler.config[key] for key in fixes}
        logger.warning(
            "The scheduler config is outdated (%s); sampling with %s as Stable Diffusion does. Update "
            "scheduler/scheduler_config.json to silence this.",
            old,
            fixes,
        )
        scheduler._internal_dict = FrozenDict({**scheduler.config, **fixes})
    return scheduler


LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape "
    r"in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def check_lora_source(source, weight_name: str | None = None) -> None:
    """A LoRA given as a path exists (diffusers would take a missing one for a Hub id and ask for a weight_name), and
    a folder holds a .safetensors file. Dicts and Hub ids pass."""
    if not isinstance(source, (str, os.PathLike)):
        return
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix in LORA_SUFFIXES or not looks_like_hub_id(source):
            raise ValueError(
                f"LoRA {os.fspath(source)}: no such file or folder; pass a .safetensors file, a folder holding "
                "pytorch_lora_weights.safetensors, or a Hub repository id."
            )
        return
    if path.is_dir() and weight_name is None and not any(path.glob("*.safetensors")):
        raise ValueError(
            f"LoRA folder {path} holds no .safetensors file; pass the LoRA file itself (or weight_name=...)."
        )


def lora_base(source) -> str | None:
    """The base model a LoRA names: kohya's `ss_sd_model_name` in the file, or `base_model:` in its folder's model
    card; None when neither is there."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            name = (f.metadata() or {}).get("ss_sd_model_name")
        if name:
            return name
        path = path.parent
    card = path / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines():
            if line.startswith("base_model:"):
                return line.split(":", 1)[1].strip() or None
    return None


def lora_mismatch(source, error: str, unet) -> str | None:
    """One line for torch's list of size mismatches when a LoRA made for another UNet is loaded; None for any other
    error. It names the first layer that differs, how, and the base the LoRA names."""
    mismatches = _SIZE_MISMATCH.findall(error)
    if not mismatches:
        return None
    layer, theirs, ours = mismatches[0]
    layer = re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", layer)
    base = lora_base(source)
    trained_for = f"trained for {base}" if base else "trained for another UNet"
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the LoRA state dict"
    return (
        f"LoRA {where} was {trained_for}: {len(mismatches)} of its tensors do not fit this UNet "
        f"(block_out_channels={list(unet.config.block_out_channels)}, cross_attention_dim="
        f"{unet.config.cross_attention_dim}); the first, {layer}, is ({theirs}) in the LoRA but ({ours}) here. "
        "Load it onto the base it was trained on."
    )


def _drop_size_mismatches(record) -> bool:
    """A logging filter: False (drop) for diffusers' log of a LoRA's size mismatches."""
    return "size mismatch" not in record.getMessage()


class PipelineLoadingMixin:
    """`from_pretrained`, `save_pretrained`, `push_to_hub` and xformers for a `DiffusionPipeline` subclass.

    `diffusers_class_name` is the stock diffusers class a saved folder names in its model_index.json, so that
    `DiffusionPipeline.from_pretrained` loads it without this package.
    """

    diffusers_class_name = "StableDiffusionPipeline"
    # Channels the UNet may take beside the latents (an inpainting UNet's 5, an upscaler's 3).
    conditioning_channels: tuple[int, ...] = (0,)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder or Hub repository saved by this package or by diffusers' Stable Diffusion pipelines.

        The safety checker is not loaded. Keyword arguments are those of `DiffusionPipeline.from_pretrained`
        (`torch_dtype`, `scheduler`, ...).

        Raises:
            ValueError: a local folder lacks a component's subfolder, or the components do not fit together
                (cross-attention width vs text hidden size, UNet input channels vs VAE latent channels).
        """
        check_pipeline_folder(pretrained_model_name_or_path, SKIPPED_COMPONENTS)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_components_fit(
            pipe.unet,
            pipe.text_encoder,
            pipe.vae,
            str(pretrained_model_name_or_path),
            cls.conditioning_channels,
        )
        return pipe

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Drop the safety checker from model_index.json before diffusers matches the rest to __init__."""
        config_dict = {k: v for k, v in config_dict.items() if k not in SKIPPED_COMPONENTS}
        config_dict.pop("requires_safety_checker", None)
        for name in SKIPPED_COMPONENTS:
            kwargs.pop(name, None)
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save in Stable Diffusion's layout with safetensors weights, loadable by stock diffusers.

        `model_index.json` names `diffusers_class_name` (with no safety checker); this package's `from_pretrained`
        reads it too. Keyword arguments are those of `DiffusionPipeline.save_pretrained`.
        """
        if kwargs.get("safe_serialization") is False:
            raise ValueError(
                f"{type(self).__name__} saves safetensors only, never pickles; drop safe_serialization=False."
            )
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use pipe.push_to_hub(repo_id) to upload; save_pretrained only writes a folder.")
        super().save_pretrained(save_directory, **kwargs)
        write_vocab_files(Path(save_directory) / "tokenizer")
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = self.diffusers_class_name
        index.update({name: [None, None] for name in SKIPPED_COMPONENTS})
        index["requires_safety_checker"] = False
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        model_card: str | None = None,
        **kwargs,
    ) -> str:
        """Save to a temporary folder and upload it to the Hub repository `repo_id` (created if missing).

        Args:
            repo_id: "user/name" on the Hub.
            commit_message: Defaults to "Upload LatentPipeline".
            private: Visibility when the repository is created.
            token: A Hub token; by default the `HF_TOKEN` environment variable or the saved login is used.
                It is only passed to `huggingface_hub`, never written anywhere.
            model_card: Text of README.md; a short generated card by default.

        Returns:
            The URL of the commit.
        """
        return upload_pipeline(
            self, repo_id, commit_message=commit_message, private=private, token=token, model_card=model_card
        )

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs
    ):
        """diffusers' `load_lora_weights` (diffusers and kohya files, Hub ids), with one-line errors where diffusers
        gives a misleading one (a missing path: "you must specify a weight_name") or dozens of lines (a LoRA made
        for another UNet: one size mismatch per tensor). A failed load leaves the pipeline without the adapter.

        Raises:
            ValueError: the path does not exist, or the LoRA does not fit this UNet (naming the base it was made for
                and the first layer that differs).
        """
        check_lora_source(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"))
        # diffusers logs the whole mismatch list before raising it; the one-line error below replaces both.
        peft_logger = logging.get_logger("diffusers.loaders.peft")
        peft_logger.addFilter(_drop_size_mismatches)
        try:
            super().load_lora_weights(
                pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs
            )
        except RuntimeError as err:
            message = lora_mismatch(pretrained_model_name_or_path_or_dict, str(err), self.unet)
            if message is None:
                raise
            raise ValueError(message) from None
        finally:
            peft_logger.removeFilter(_drop_size_mismatches)

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """Use xformers attention (CUDA only); PyTorch SDPA, the default, needs no call.

        Raises:
            ImportError: xformers is not installed (`pip install "ldm[xformers]"`).
            RuntimeError: the pipeline is not on a CUDA device.
        """
        try:
            import xformers  # noqa: F401
        except ImportError as err:
            raise ImportError(
                'xformers is not installed; install it with `pip install "ldm[xformers]"` (CUDA only), '
                "or keep the default PyTorch SDPA attention."
            ) from err
        if self.unet.device.type != "cuda":
            raise RuntimeError(
                f"xformers attention runs only on CUDA, but the pipeline is on {self.unet.device}. Move it first "
                "with pipe.to('cuda'), or keep the default PyTorch SDPA attention, which works on every device."
            )
        super().enable_xformers_memory_efficient_attention(attention_op)
