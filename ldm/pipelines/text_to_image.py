"""`LatentPipeline`: text-to-image sampling in a frozen VAE's latent space with classifier-free guidance.

Notation (DDIM paper, Song et al. 2021; classifier-free guidance, Ho & Salimans 2022):
    x_t        noisy latents at timestep t, shape (B, C, H/f, W/f) with f the VAE scale factor
    eps        the UNet's noise prediction eps_theta(x_t, t, c)
    eps_hat    guided prediction  eps_uncond + s * (eps_cond - eps_uncond)      (CFG, eq. 6)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, scale_lora_layers, unscale_lora_layers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.call_state import CallStateMixin
from ldm.checks import (
    check_call_tensors,
    check_conditioning_inputs,
    check_count,
    check_eta,
    check_guidance,
    check_image_size,
    check_prompts,
    check_schedule_inputs,
)
from ldm.encoding import encode_text, unscale_latents, vae_scale_factor, vae_tiles
from ldm.guidance import classifier_free_guidance, rescale_guidance
from ldm.pipelines.loading import PipelineLoadingMixin, fix_legacy_scheduler
from ldm.single_file import LatentSingleFileMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of `LatentPipeline.__call__`.

    Args:
        images: PIL images, a numpy array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1], or the final
            latents (B, C, H/f, W/f) for output_type "latent".
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: None = None  # StableDiffusionPipelineOutput's field; no safety checker runs here


class LatentPipeline(
    PipelineLoadingMixin,
    CallStateMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    LatentSingleFileMixin,
):
    """Text-to-image latent diffusion: CLIP text -> UNet denoising in VAE latent space -> VAE decode.

    A drop-in for diffusers' `StableDiffusionPipeline` without the safety checker: the same components, loaders
    (`load_lora_weights`, `load_textual_inversion`, `load_ip_adapter`, `from_single_file`), `StableDiffusionMixin`
    switches (VAE slicing/tiling, FreeU, fused QKV) and `__call__` arguments. Loads any Stable Diffusion 1.x folder or
    Hub repository and saves folders that stock diffusers loads as a `StableDiffusionPipeline`.

    Args:
        vae: Frozen autoencoder; its `scaling_factor` maps latents to unit variance. An `AutoencoderTiny` distilled
            from it (`train/train_tiny_vae.py`, TAESD for Stable Diffusion) decodes the same latents faster.
        text_encoder: Frozen CLIP text encoder whose last hidden state conditions the UNet.
        tokenizer: CLIP tokenizer with `model_max_length` set (77 for Stable Diffusion).
        unet: Noise predictor eps_theta(x_t, t, text).
        scheduler: DDIM by default; DPM-Solver++, Euler or DDPM work the same way. Old configs get the fixes
            `StableDiffusionPipeline` applies (`steps_offset=1`, `clip_sample=False`).
        safety_checker: Accepted for diffusers' call signature; must be None (no safety checker runs here).
        feature_extractor, image_encoder: For IP-Adapters (`load_ip_adapter`); None by default.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        super().__init__()
        if safety_checker is not None:
            raise ValueError(
                f"{type(self).__name__} runs no safety checker; pass safety_checker=None (or use diffusers' "
                "StableDiffusionPipeline if you need one)."
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=fix_legacy_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = vae_scale_factor(vae.config) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._step_state: dict[str, torch.Tensor] = {}

    # diffusers' own steps, reused rather than rewritten (same signatures, same results): prompt encoding with
    # textual inversion, LoRA scale and clip_skip; IP-Adapter image embeddings; the LCM guidance embedding; the
    # scheduler's extra step arguments; the initial noise.
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    prepare_latents = StableDiffusionPipeline.prepare_latents

    @property
    def default_sample_size(self) -> int:
        """Latent side length the UNet was configured for (image side = this x vae_scale_factor)."""
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    # ------------------------------------------------------------------ step 1: check inputs

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
        **extras,
    ) -> int:
        """Validate every argument before any model runs; returns the prompt batch size.

        `extras` are the optional arguments: timesteps, sigmas, clip_skip, cross_attention_kwargs,
        ip_adapter_image, ip_adapter_image_embeds.

        Raises:
            ValueError or TypeError naming the offending value and how to fix it.
        """
        f = self.vae_scale_factor
        check_image_size("height", height, f)
        check_image_size("width", width, f)
        batch_size = check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_schedule_inputs(
            num_inference_steps, extras.get("timesteps"), extras.get("sigmas"), self.scheduler
        )
        check_count("num_images_per_prompt", num_images_per_prompt, example=1)
        check_guidance(guidance_scale, guidance_rescale)
        check_eta(eta, self.scheduler)
        check_conditioning_inputs(
            extras.get("clip_skip"),
            self.text_encoder,
            extras.get("cross_attention_kwargs"),
            extras.get("ip_adapter_image"),
            extras.get("ip_adapter_image_embeds"),
        )
        total = batch_size * num_images_per_prompt
        check_call_tensors(
            generator, latents, (total, self.vae.config.latent_channels, height // f, width // f),
            callback_on_step_end_tensor_inputs, self._callback_tensor_inputs,
        )  # fmt: skip
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; choose one of {OUTPUT_TYPES}.")
        return batch_size

    # ------------------------------------------------------------------ step 2: encode the prompt

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`StableDiffusionPipeline.encode_prompt`: same arguments, same (prompt_embeds, negative_prompt_embeds).

        Only `clip_skip` is computed here (for the prompt, not the negative prompt, as diffusers does): diffusers
        0.42 reads `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
        """
        if clip_skip is not None and prompt_embeds is None:
            texts = self.maybe_convert_prompt([prompt] if isinstance(prompt, str) else prompt, self.tokenizer)
            if lora_scale is not None:
                scale_lora_layers(self.text_encoder, lora_scale)
            try:
                prompt_embeds = encode_text(self.tokenizer, self.text_encoder, texts, clip_skip).to(device)
            finally:
                if lora_scale is not None:
                    unscale_lora_layers(self.text_encoder, lora_scale)
        # Returned by name, as diffusers' pipelines do (its tests read the names to pass them back as arguments).
        prompt_embeds, negative_prompt_embeds = StableDiffusionPipeline.encode_prompt(
            self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, lora_scale,
        )  # fmt: skip
        return prompt_embeds, negative_prompt_embeds

    def encode_conditions(
        self,
        prompt,
        negative_prompt,
        num_images: int,
        prompt_embeds,
        negative_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
        """Step 2: text (and IP-Adapter image) conditioning; under guidance the text is [negative; positive]."""
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, self._execution_device, num_images, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )  # fmt: skip
        context = prompt_embeds
        if self.do_classifier_free_guidance:
            context = torch.cat([negative_prompt_embeds, prompt_embeds])
        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, self._execution_device, prompt_embeds.shape[0],
                self.do_classifier_free_guidance,
            )  # fmt: skip
            added_cond_kwargs = {"image_embeds": image_embeds}
        return context, negative_prompt_embeds, added_cond_kwargs

    # ------------------------------------------------------------------ step 3: timesteps

    def prepare_timesteps(
        self,
        num_inference_steps: int,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Set the scheduler's inference timesteps (from a count, or custom timesteps/sigmas); returns them
        (descending) and their number."""
        return retrieve_timesteps(
            self.scheduler, num_inference_steps, self._execution_device, timesteps, sigmas
        )

    # ------------------------------------------------------------------ step 5: denoise

    def unet_input(self, latent_model_input: torch.Tensor) -> torch.Tensor:
        """What the UNet takes besides x_t; nothing here (an inpainting UNet adds mask channels)."""
        return latent_model_input

    def after_step(self, latents: torch.Tensor, i: int, timesteps: torch.Tensor) -> torch.Tensor:
        """Latents after scheduler step i; unchanged here (inpainting restores the known region)."""
        return latents

    def unet_kwargs(
        self, latents: torch.Tensor, model_input: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict:
        """What else the UNet takes at this step, as keyword arguments; nothing here (a ControlNet's residuals, an
        upscaler's noise level go here). `model_input` is the scaled x_t batch, before `unet_input`."""
        return {}

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """eps_hat for x_t: one UNet call, batched as [unconditional, conditional] under guidance.

        Under guidance `prompt_embeds` is the concatenation [negative; positive] (2B, 77, D), as in diffusers.
        """
        do_cfg = self.do_classifier_free_guidance
        model_input = self.scheduler.scale_model_input(
            torch.cat([latents, latents]) if do_cfg else latents, t
        )
        extra = self.unet_kwargs(latents, model_input, t, prompt_embeds)
        eps = self.unet(
            self.unet_input(model_input),
            t,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
            **extra,
        )[0]
        if not do_cfg:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
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
        extra_step_kwargs: dict,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> torch.Tensor:
        """Run the reverse process x_T -> x_0 with the scheduler; returns the final latents.

        The guidance scale is read at every step, so a callback may change it (or set `_interrupt`).
        """
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            eps = self.predict_noise(
                latents, t, prompt_embeds, self.guidance_scale, self.guidance_rescale, timestep_cond,
                added_cond_kwargs,
            )  # fmt: skip
            latents = self.scheduler.step(eps, t, latents, **extra_step_kwargs, return_dict=False)[0]
            latents = self.after_step(latents, i, timesteps)
            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_prompt_embeds,
                    **self._step_state,
                }
                wanted = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                outputs = dict(callback_on_step_end(self, i, t, wanted) or {})
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                self._step_state.update({k: v for k, v in outputs.items() if k in self._step_state})
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
        with vae_tiles(self, "decode", z.shape[-2:], len(z)):
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False, generator=generator)[0]
        return self.image_processor.postprocess(
            images, output_type=output_type, do_denormalize=[True] * len(images)
        )

    # ------------------------------------------------------------------ shared by every pipeline's __call__

    def finish_call(self, images, return_dict: bool):
        """Free offloaded models and wrap the images as diffusers does (no NSFW check runs: None)."""
        self.maybe_free_model_hooks()
        return LatentPipelineOutput(images=images) if return_dict else (images, None)

    # ------------------------------------------------------------------ the whole call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Generate images from text. The arguments, their order and meaning are `StableDiffusionPipeline`'s.

        Args:
            prompt: One prompt or a list; or pass `prompt_embeds` instead.
            height, width: Image size in pixels, multiples of the VAE scale factor; default
                `unet.config.sample_size * vae_scale_factor`.
            num_inference_steps: Denoising steps (ignored when `timesteps` or `sigmas` are given).
            timesteps, sigmas: A custom descending schedule, for schedulers whose `set_timesteps` takes one.
            guidance_scale: s in eps_uncond + s * (eps_cond - eps_uncond); s <= 1 runs the conditional branch only.
            negative_prompt: What to steer away from (replaces the empty prompt of the unconditional branch).
            num_images_per_prompt: Images per prompt.
            eta: DDIM's noise level (0 deterministic); only for schedulers whose `step` takes eta.
            generator: One torch.Generator, or one per image, for reproducible noise.
            latents: Initial noise (B * num_images_per_prompt, C, H/f, W/f) instead of sampling it.
            prompt_embeds, negative_prompt_embeds: Precomputed text embeddings (B, 77, D).
            ip_adapter_image, ip_adapter_image_embeds: Image prompt for a loaded IP-Adapter.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: Return a `LatentPipelineOutput` (True) or a tuple `(images, None)` (False).
            cross_attention_kwargs: Passed to the attention processors; {"scale": s} scales loaded LoRAs.
            guidance_rescale: phi of Lin et al. 2023 (0 = off, 0.7 typical).
            clip_skip: Text layers to skip from the end (1 = the penultimate layer's output).
            callback_on_step_end: Called as f(pipe, i, t, tensors) after each step; may return replacements.
            callback_on_step_end_tensor_inputs: Which tensors the callback gets (default ["latents"]).

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments, before any model is run.
        """
        # None means the UNet's size; 0 is not "the default" but an error that check_inputs names.
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])

        # 1. Check inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs, timesteps=timesteps, sigmas=sigmas, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip
        self.start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        context, negative_prompt_embeds, added_cond_kwargs = self.encode_conditions(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip

        # 3. Set the timesteps
        timesteps, num_inference_steps = self.prepare_timesteps(num_inference_steps, timesteps, sigmas)

        # 4. Prepare the initial latents x_T
        latents = self.prepare_latents(
            total, self.unet.config.in_channels, height, width, context.dtype, self._execution_device, generator,
            latents,
        )  # fmt: skip

        # 5. Denoise x_T -> x_0
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 6. Decode to images
        return self.finish_call(self.decode_latents(latents, output_type, generator), return_dict)
