"""`LatentControlNetInpaintPipeline`: inpainting under control images; `LatentInpaintPipeline`'s steps (a 4- or
9-channel UNet) with `LatentControlNetPipeline`'s control steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    StableDiffusionControlNetInpaintPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput

from ldm.pipelines.controlnet import LatentControlNetPipeline, default_size
from ldm.pipelines.inpaint import LatentInpaintPipeline
from ldm.pipelines.text_to_image import LatentPipelineOutput


class LatentControlNetInpaintPipeline(LatentControlNetPipeline, LatentInpaintPipeline):
    """Inpainting under control images: `LatentInpaintPipeline`'s steps (a 4- or 9-channel UNet) with the
    ControlNet steps above; the ControlNets see x_t without the mask channels.

    A drop-in for diffusers' `StableDiffusionControlNetInpaintPipeline`; a saved folder names it.
    """

    diffusers_class_name = "StableDiffusionControlNetInpaintPipeline"
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "control_image",
        "mask",
        "masked_image_latents",
    ]
    control_image_key = "control_image"

    # diffusers' own step, reused: `prepare_image` cropped to the mask's region like the image (padding_mask_crop).
    prepare_image = StableDiffusionControlNetInpaintPipeline.prepare_control_image

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        control_image: PipelineImageInput | list[PipelineImageInput] = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Repaint where `mask_image` is white, under `control_image`. Arguments, order and meaning are
        `StableDiffusionControlNetInpaintPipeline`'s.

        Args:
            image, mask_image, padding_mask_crop, strength: As for `LatentInpaintPipeline`.
            control_image: The control image(s), as `image` is for `LatentControlNetPipeline`; cropped with the
                image when `padding_mask_crop` is set.
            height, width: Output size; default `image`'s, rounded down to a multiple of the VAE scale factor.
            The other arguments are `LatentControlNetPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments, before any model is run.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        height, width = default_size(image, height, width, self.vae_scale_factor)

        # 1. Check inputs
        image, mask_image = self.check_images(image, mask_image, strength, padding_mask_crop, output_type)
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

        # 3. Set the timesteps (the last `strength` fraction of the schedule) and the ControlNets' windows
        timesteps, num_inference_steps = self.prepare_strength_timesteps(
            num_inference_steps, None, None, strength
        )
        self.prepare_control_window(len(timesteps), scales, starts, ends)

        # 4. Prepare x_T, the mask and the masked image's latents
        latents, crops = self.prepare_inpaint_latents(
            image, mask_image, None, height, width, padding_mask_crop, strength, timesteps, total, context.dtype,
            generator, latents,
        )  # fmt: skip

        # 5. Prepare the control image(s), cropped like the image
        self.prepare_control_images(
            control_images, height, width, total, num_images_per_prompt, guess_mode, crops_coords=crops,
            resize_mode="default" if crops is None else "fill",
        )  # fmt: skip

        # 6. Denoise x_T -> x_0, the ControlNets' residuals added inside the UNet, keeping the known region
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 7. Decode to images (pasted back onto the original when only the mask's box was worked on)
        images = self.decode_latents(latents, output_type, generator)
        if crops is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, out, crops) for out in images]
        return self.finish_call(images, return_dict)
