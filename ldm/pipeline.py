"""`LatentPipeline`: text-to-image sampling in a frozen VAE's latent space with classifier-free guidance.

Notation (DDIM paper, Song et al. 2021; classifier-free guidance, Ho & Salimans 2022):
    x_t        noisy latents at timestep t, shape (B, C, H/f, W/f) with f the VAE scale factor
    eps        the UNet's noise prediction eps_theta(x_t, t, c)
    eps_hat    guided prediction  eps_uncond + s * (eps_cond - eps_uncond)      (CFG, eq. 6)
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.checks import (
    check_components_fit,
    check_count,
    check_eta,
    check_guidance,
    check_image_size,
    check_pipeline_folder,
    check_prompts,
)
from ldm.encoding import encode_text, unscale_latents, vae_scale_factor
from ldm.hub import upload_pipeline
from ldm.tokenizer import write_vocab_files

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Entries of Stable Diffusion's model_index.json that this pipeline does not use; loading skips them.
SD_EXTRA_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of `LatentPipeline.__call__`.

    Args:
        images: PIL images, a numpy array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1], or the final
            latents (B, C, H/f, W/f) for output_type "latent".
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_hat = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_guidance(eps_hat: torch.Tensor, eps_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Blend eps_hat with itself rescaled to eps_cond's per-sample std (Lin et al. 2023, sec. 3.4, eq. 15-16)."""
    dims = list(range(1, eps_hat.ndim))
    rescaled = eps_hat * (eps_cond.std(dim=dims, keepdim=True) / eps_hat.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps_hat


class LatentPipeline(DiffusionPipeline):
    """Text-to-image latent diffusion: CLIP text -> UNet denoising in VAE latent space -> VAE decode.

    Loads any Stable Diffusion 1.x folder or Hub repository (its safety checker, feature extractor and image encoder
    are ignored) and saves folders that stock diffusers loads as a `StableDiffusionPipeline`.

    Args:
        vae: Frozen autoencoder; its `scaling_factor` maps latents to unit variance.
        text_encoder: Frozen CLIP text encoder whose last hidden state conditions the UNet.
        tokenizer: CLIP tokenizer with `model_max_length` set (77 for Stable Diffusion).
        unet: Noise predictor eps_theta(x_t, t, text).
        scheduler: DDIM by default; DPM-Solver++, Euler or DDPM work the same way.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = vae_scale_factor(self.vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LatentPipeline:
        """Load a folder or Hub repository saved by this class or by diffusers' `StableDiffusionPipeline`.

        Stable Diffusion's extra components (safety checker, feature extractor, image encoder) are not loaded.
        Keyword arguments are those of `DiffusionPipeline.from_pretrained` (`torch_dtype`, `scheduler`, ...).

        Raises:
            ValueError: a local folder lacks a component's subfolder, or the components do not fit together
                (cross-attention width vs text hidden size, UNet input channels vs VAE latent channels).
        """
        check_pipeline_folder(pretrained_model_name_or_path, SD_EXTRA_COMPONENTS)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_components_fit(
            pipe.unet, pipe.text_encoder, pipe.vae, source=str(pretrained_model_name_or_path)
        )
        return pipe

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Drop Stable Diffusion's extra model_index.json entries before diffusers matches the rest to __init__."""
        config_dict = {k: v for k, v in config_dict.items() if k not in SD_EXTRA_COMPONENTS}
        config_dict.pop("requires_safety_checker", None)
        for name in SD_EXTRA_COMPONENTS:
            kwargs.pop(name, None)
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save in Stable Diffusion's layout with safetensors weights, loadable by stock diffusers.

        `model_index.json` names `StableDiffusionPipeline` (with no safety checker) so that
        `DiffusionPipeline.from_pretrained` works without this package; `LatentPipeline.from_pretrained` reads it
        too. Keyword arguments are those of `DiffusionPipeline.save_pretrained`.
        """
        if kwargs.get("safe_serialization") is False:
            raise ValueError("LatentPipeline saves safetensors only; drop safe_serialization=False.")
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use pipe.push_to_hub(repo_id) to upload; save_pretrained only writes a folder.")
        super().save_pretrained(save_directory, **kwargs)
        write_vocab_files(Path(save_directory) / "tokenizer")
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "StableDiffusionPipeline"
        index.update({name: [None, None] for name in SD_EXTRA_COMPONENTS})
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

    # ------------------------------------------------------------------ step 1: check inputs

    @property
    def default_sample_size(self) -> int:
        """Latent side length the UNet was configured for (image side = this x vae_scale_factor)."""
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        eta: float,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> int:
        """Validate every argument before any model runs; returns the prompt batch size.

        Raises:
            ValueError or TypeError naming the offending value and how to fix it.
        """
        f = self.vae_scale_factor
        check_image_size("height", height, f)
        check_image_size("width", width, f)
        batch_size = check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_count("num_inference_steps", num_inference_steps, example=50)
        check_count("num_images_per_prompt", num_images_per_prompt, example=1)
        check_guidance(guidance_scale, guidance_rescale)
        check_eta(eta, self.scheduler)
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {total} images ({batch_size} prompts x "
                f"num_images_per_prompt={num_images_per_prompt}); pass one generator or exactly {total}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; choose one of {OUTPUT_TYPES}.")
        if latents is not None:
            expected = (total, self.unet.config.in_channels, height // f, width // f)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)} but {expected} is needed for {total} images of "
                    f"{height}x{width} px; match height/width/num_images_per_prompt or leave latents=None."
                )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )
        return batch_size

    # ------------------------------------------------------------------ step 2: encode the prompt

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP last hidden states for `texts`, padded to the tokenizer's length: (B, 77, D)."""
        return encode_text(self.tokenizer, self.text_encoder, texts)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings for the prompts and, under guidance, for the negative (default: empty) prompts.

        Returns:
            (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, D); the second is None
            when guidance is off, since the unconditional branch is never run then.
        """
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self.embed_text(prompt)
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(self._execution_device).repeat_interleave(
            num_images_per_prompt, dim=0
        )
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                # The empty prompt: the same unconditional input that caption dropout trains on.
                negative_prompt = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch_size
            negative_prompt_embeds = self.embed_text(negative_prompt)
        negative_prompt_embeds = negative_prompt_embeds.to(self._execution_device, prompt_embeds.dtype)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    # ------------------------------------------------------------------ steps 3-4: timesteps and latents

    def prepare_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Set the scheduler's inference timesteps and return them (descending)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        return self.scheduler.timesteps

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial x_T ~ N(0, sigma_init^2 I), shape (B, C, H/f, W/f); a given `latents` is used as the noise."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        else:
            latents = latents.to(self._execution_device, dtype)
        # Schedulers that work in sigma space (Euler) start from noise of std sigma_max, not 1.
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ step 5: denoise

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """eps_hat for x_t: one UNet call, batched as [unconditional, conditional] when guidance is on."""
        if negative_prompt_embeds is None:
            model_input = self.scheduler.scale_model_input(latents, t)
            return self.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)  # (2B, C, h, w)
        context = torch.cat([negative_prompt_embeds, prompt_embeds])
        eps_uncond, eps_cond = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[
            0
        ].chunk(2)
        eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
        if guidance_rescale > 0:
            eps = rescale_guidance(eps, eps_cond, guidance_rescale)
        return eps

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> torch.Tensor:
        """Run the reverse process x_T -> x_0 with the scheduler; returns the final latents."""
        step_kwargs = {}
        step_params = inspect.signature(self.scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.predict_noise(
                latents, t, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale
            )
            latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_prompt_embeds,
                }
                outputs = (
                    callback_on_step_end(
                        self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    or {}
                )
                latents = outputs.get("latents", latents)
                prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = outputs.get("negative_prompt_embeds", negative_prompt_embeds)
        return latents

    # ------------------------------------------------------------------ step 6: decode

    def decode_latents(
        self,
        latents: torch.Tensor,
        output_type: str = "pil",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Latents -> images through the VAE, undoing the scaling that training applied to its latents."""
        if output_type == "latent":
            return latents
        z = unscale_latents(latents, self.vae)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False, generator=generator)[0]
        return self.image_processor.postprocess(
            images, output_type=output_type, do_denormalize=[True] * len(images)
        )

    # ------------------------------------------------------------------ the whole call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: One prompt or a list; or pass `prompt_embeds` instead.
            negative_prompt: What to steer away from (replaces the empty prompt of the unconditional branch).
            height, width: Image size in pixels, multiples of the VAE scale factor; default
                `unet.config.sample_size * vae_scale_factor`.
            num_inference_steps: Denoising steps.
            guidance_scale: s in eps_uncond + s * (eps_cond - eps_uncond); s <= 1 runs the conditional branch only.
            guidance_rescale: phi of Lin et al. 2023 (0 = off, 0.7 typical).
            eta: DDIM's noise level (0 deterministic); only for schedulers whose `step` takes eta.
            num_images_per_prompt: Images per prompt.
            generator: One torch.Generator, or one per image, for reproducible noise.
            latents: Initial noise (B * num_images_per_prompt, C, H/f, W/f) instead of sampling it.
            prompt_embeds, negative_prompt_embeds: Precomputed text embeddings (B, 77, D).
            output_type: "pil", "np", "pt" or "latent".
            return_dict: Return a `LatentPipelineOutput` (True) or a tuple (False).
            callback_on_step_end: Called as f(pipe, i, t, tensors) after each step; may return replacements.
            callback_on_step_end_tensor_inputs: Which tensors the callback gets (default ["latents"]).

        Returns:
            `LatentPipelineOutput` with `images`, or `(images,)`.

        Raises:
            ValueError, TypeError: on invalid arguments, before any model is run.
        """
        # None means the UNet's size; 0 is not "the default" but an error that check_inputs names.
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])

        # 1. Check inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs,
        )  # fmt: skip
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds
        )

        # 3. Set the timesteps
        timesteps = self.prepare_timesteps(num_inference_steps)

        # 4. Prepare the initial latents x_T
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, height, width, prompt_embeds.dtype, generator, latents
        )

        # 5. Denoise x_T -> x_0
        latents = self.denoise(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale, eta,
            generator, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 6. Decode to images
        images = self.decode_latents(latents, output_type, generator)
        self.maybe_free_model_hooks()
        return LatentPipelineOutput(images=images) if return_dict else (images,)
