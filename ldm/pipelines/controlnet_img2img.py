"""`LatentControlNetImg2ImgPipeline`: image-to-image under control images; `LatentImg2ImgPipeline`'s steps with
`LatentControlNetPipeline`'s control steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput

from ldm.checks import as_pixels, check_strength
from ldm.pipelines.controlnet import LatentControlNetPipeline, default_size
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.text_to_image import LatentPipelineOutput


class LatentControlNetImg2ImgPipeline(LatentControlNetPipeline, LatentImg2ImgPipeline):
    """Image-to-image under control images: `LatentImg2ImgPipeline`'s steps with the ControlNet steps above.

    A drop-in for diffusers' `StableDiffusionControlNetImg2ImgPipeline`; a saved folder names it.
    """

    diffusers_class_name = "StableDiffusionControlNetImg2ImgPipeline"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "control_image"]
    control_image_key = "control_image"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        control_image: PipelineImageInput | list[PipelineImageInput] = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Turn `image` towards `prompt` under `control_image`. Arguments, order and meaning are
        `StableDiffusionControlNetImg2ImgPipeline`'s.

        Args:
            image: The starting image(s), as for `LatentImg2ImgPipeline`.
            control_image: The control image(s), as `image` is for `LatentControlNetPipeline`.
            height, width: Output size; default `image`'s, rounded down to a multiple of the VAE scale factor.
                Both images are resized to it.
            strength: In [0, 1], as for `LatentImg2ImgPipeline`.
            latents: x_t to denoise from instead of the noised `image` latents (diffusers' meaning).
            The other arguments are `LatentControlNetPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments, before any model is run.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        image = as_pixels(image, "image", self.vae_scale_factor)
        height, width = default_size(image, height, width, self.vae_scale_factor)

        # 1. Check inputs
        check_strength(strength)
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, 0.0, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs, clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip
        control_images, scales, starts, ends = self.check_control_inputs(
            control_image,
            batch_size,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
        )
        self.start_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        context, negative_prompt_embeds, added_cond_kwargs = self.encode_conditions(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip

        # 3. Prepare the image and the control image(s) at the output size
        image = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        self.prepare_control_images(control_images, height, width, total, num_images_per_prompt, guess_mode)

        # 4. Set the timesteps (the last `strength` fraction of the schedule) and the ControlNets' windows
        timesteps, num_inference_steps = self.prepare_strength_timesteps(
            num_inference_steps, None, None, strength
        )
        self.prepare_control_window(len(timesteps), scales, starts, ends)

        # 5. Encode the image and noise it to x_t at the first remaining timestep
        if latents is None:
            latents = self.noised_image_latents(
                image, timesteps, batch_size, num_images_per_prompt, context.dtype, generator
            )

        # 6. Denoise x_t -> x_0, the ControlNets' residuals added inside the UNet
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 7. Decode to images
        return self.finish_call(self.decode_latents(latents, output_type, generator), return_dict)
