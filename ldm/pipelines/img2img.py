"""`LatentImg2ImgPipeline`: text-guided image-to-image (SDEdit, Meng et al. 2022) with `LatentPipeline`'s steps.

The image is encoded to latents x_0, noised to x_t at the timestep `strength` of the way into the schedule
(x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps), and denoised from there with classifier-free guidance.
Only steps 3 and 4 differ from text-to-image; the rest are `LatentPipeline`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput

from ldm.checks import as_pixels, check_finite, check_strength, image_hw
from ldm.encoding import vae_tiles
from ldm.pipelines.text_to_image import LatentPipeline, LatentPipelineOutput


class LatentImg2ImgPipeline(LatentPipeline):
    """Image-to-image on `LatentPipeline`'s components; `LatentImg2ImgPipeline.from_pipe(pipe)` shares them.

    Saves and loads like `LatentPipeline`; a saved folder names diffusers' `StableDiffusionImg2ImgPipeline`.
    """

    diffusers_class_name = "StableDiffusionImg2ImgPipeline"

    # diffusers' own steps, reused: the timesteps left after `strength`, and x_0 -> x_t from the encoded image.
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps
    prepare_latents = StableDiffusionImg2ImgPipeline.prepare_latents

    def preprocess_image(self, image: PipelineImageInput) -> tuple[torch.Tensor, int, int]:
        """Step 0: the image as a (B, 3, H, W) tensor in [-1, 1] (H, W rounded to the VAE factor), H and W.

        A tensor with the VAE's latent channels is taken as latents already, as diffusers does; a PIL image is
        always pixels (converted to RGB).
        """
        image_hw(image)  # a clear TypeError for anything that is not an image
        if (
            isinstance(image, torch.Tensor)
            and image.ndim == 4
            and image.shape[1] == self.vae.config.latent_channels
        ):
            check_finite("image", image)
            return image, image.shape[2] * self.vae_scale_factor, image.shape[3] * self.vae_scale_factor
        image = self.image_processor.preprocess(as_pixels(image, "image", self.vae_scale_factor))
        return image, image.shape[2], image.shape[3]

    def prepare_strength_timesteps(
        self, num_inference_steps: int, timesteps, sigmas, strength: float
    ) -> tuple[torch.Tensor, int]:
        """Step 3: the full schedule, then only its last `strength` fraction (what is left to denoise)."""
        timesteps, num_inference_steps = self.prepare_timesteps(num_inference_steps, timesteps, sigmas)
        check_strength(strength, num_inference_steps)
        return self.get_timesteps(num_inference_steps, strength, self._execution_device)

    def noised_image_latents(
        self, image: torch.Tensor, timesteps: torch.Tensor, batch_size: int, num_images_per_prompt: int, dtype,
        generator,
    ) -> torch.Tensor:  # fmt: skip
        """Step 4: the preprocessed image encoded (through the VAE in tiles when it is large) and noised to x_t at the
        first of `timesteps`, one per image."""
        total = batch_size * num_images_per_prompt
        f = self.vae_scale_factor
        with vae_tiles(self, "encode", (image.shape[-2] // f, image.shape[-1] // f), total):
            return self.prepare_latents(
                image, timesteps[:1].repeat(total), batch_size, num_images_per_prompt, dtype,
                self._execution_device, generator,
            )  # fmt: skip

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Turn `image` towards `prompt`. Arguments, order and meaning are `StableDiffusionImg2ImgPipeline`'s.

        Args:
            image: The starting image(s): PIL, numpy (H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [0, 1] or
                [-1, 1]; its size sets the output's (rounded down to a multiple of the VAE scale factor).
            strength: In [0, 1]: how far into the noise schedule the image is pushed before denoising (0 keeps
                it; 1 ignores it). Runs int(num_inference_steps * strength) steps.
            The other arguments are `LatentPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments (strength outside [0, 1], an image that is not PIL, numpy or
                a tensor), before any model is run.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])

        # 1. Check inputs (the image's size is the output's)
        check_strength(strength)
        image, height, width = self.preprocess_image(image)
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, 0.0, eta,
            num_images_per_prompt, generator, None, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs, timesteps=timesteps, sigmas=sigmas, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip
        self.start_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        context, negative_prompt_embeds, added_cond_kwargs = self.encode_conditions(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip

        # 3. Set the timesteps: the last `strength` fraction of the schedule
        timesteps, num_inference_steps = self.prepare_strength_timesteps(
            num_inference_steps, timesteps, sigmas, strength
        )

        # 4. Encode the image and noise it to x_t at the first remaining timestep
        latents = self.noised_image_latents(
            image, timesteps, batch_size, num_images_per_prompt, context.dtype, generator
        )

        # 5. Denoise x_t -> x_0
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 6. Decode to images
        return self.finish_call(self.decode_latents(latents, output_type, generator), return_dict)
