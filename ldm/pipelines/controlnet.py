"""`LatentControlNetPipeline`: text-to-image steered by a control image (edges, depth, pose) through ControlNets.

A ControlNet (Zhang et al. 2023) is a trainable copy of the UNet's encoder that reads x_t, t, the text and a control
image c_img, and returns one residual per UNet down-block output plus one for the mid block. The UNet adds them, each
times the conditioning scale s_k:

    eps_theta(x_t, t, text; c_img) = UNet(x_t, t, text, down + s_k * r_down(c_img), mid + s_k * r_mid(c_img))

Several ControlNets (diffusers' `MultiControlNetModel`) add their residuals up. Each acts only inside its guidance
window [start, end] of the schedule. In guess mode the ControlNet sees no prompt (only the conditional half of the
guidance batch; the unconditional half gets zero residuals) and its down residuals are scaled from 0.1 at the first
block up to 1.0 at the mid block (`ControlNetModel`'s logspace(-1, 0)), as in diffusers.
Only the control steps are new here; the rest are `LatentPipeline`'s. The img2img and inpainting variants are in
`controlnet_img2img.py` and `controlnet_inpaint.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.checks import (
    check_control_images,
    check_control_scale,
    check_control_window,
    check_controlnet_fits,
    image_hw,
)
from ldm.pipelines.text_to_image import LatentPipeline, LatentPipelineOutput


def default_size(image, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """`height` and `width`, or where None the first image's (of a possibly nested list), rounded down to a
    multiple of `factor` as diffusers' ControlNet pipelines do."""
    first = image
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    image_height, image_width = image_hw(first)
    height = image_height - image_height % factor if height is None else height
    width = image_width - image_width % factor if width is None else width
    return height, width


class LatentControlNetPipeline(LatentPipeline):
    """Text-to-image with one or several ControlNets on `LatentPipeline`'s components.

    A drop-in for diffusers' `StableDiffusionControlNetPipeline` without the safety checker: the same components
    and `__call__` arguments, and the same images for the same weights and seed.
    `LatentControlNetPipeline.from_pipe(pipe, controlnet=controlnet)` shares a loaded pipeline's modules; a saved
    folder names `StableDiffusionControlNetPipeline` (several ControlNets are saved as controlnet/, controlnet_1/,
    ..., as diffusers does) and loads in stock diffusers.

    Args:
        controlnet: A `ControlNetModel` whose encoder copies the UNet's, or a list/tuple of them (wrapped in
            diffusers' `MultiControlNetModel`; their residuals add up).
        The other components are `LatentPipeline`'s.

    Raises:
        ValueError: a ControlNet does not fit the UNet (block widths, layers, text width) or the VAE (its control
            image downsampling must equal the VAE's scale factor).
    """

    diffusers_class_name = "StableDiffusionControlNetPipeline"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "image"]
    # Where `_step_state` (and a step callback) finds the prepared control image(s): diffusers' name for them.
    control_image_key = "image"

    # diffusers' own step, reused: the control image resized to (height, width), batched to the prompts and
    # doubled under guidance (not in guess mode, where only the conditional half sees it).
    prepare_image = StableDiffusionControlNetPipeline.prepare_image

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder
        )
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        check_controlnet_fits(controlnet, unet, self.vae_scale_factor)
        self.register_modules(controlnet=controlnet)
        # Control images stay in [0, 1] (no normalisation to [-1, 1]); PIL images in other modes become RGB.
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @property
    def controlnets(self) -> list[ControlNetModel]:
        """The ControlNets, one or several."""
        return (
            list(self.controlnet.nets)
            if isinstance(self.controlnet, MultiControlNetModel)
            else [self.controlnet]
        )

    # ------------------------------------------------------------------ step 1: check the control inputs

    def check_control_inputs(
        self,
        image,
        batch_size: int,
        controlnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
    ) -> tuple[list, list[float], list[float], list[float]]:
        """Step 1 for the control arguments: one image input per ControlNet, its scale and window.

        Returns the image inputs, scales, window starts and ends, each a list with one entry per ControlNet.

        Raises:
            ValueError, TypeError: naming the argument, its value and the fix.
        """
        nets = self.controlnets
        channels = nets[0].config.conditioning_channels
        images = check_control_images(image, len(nets), batch_size, channels, name=self.control_image_key)
        scales = check_control_scale(controlnet_conditioning_scale, len(nets))
        starts, ends = check_control_window(control_guidance_start, control_guidance_end, len(nets))
        return images, scales, starts, ends

    # ------------------------------------------------------------------ step 3: prepare the control images

    def prepare_control_images(
        self, images: list, height: int, width: int, total: int, num_images_per_prompt: int, guess_mode: bool,
        **crop,
    ) -> None:  # fmt: skip
        """Step 3: each ControlNet's image as a (total [x2 under guidance], 3, H, W) tensor in [0, 1], kept in
        `_step_state` where the noise prediction and step callbacks find it (a tensor for one ControlNet, a list
        for several, as in diffusers). `crop` is the inpainting variant's crop region and resize mode."""
        # diffusers reads global_pool_conditions from the first ControlNet only.
        self._guess_mode = guess_mode or self.controlnets[0].config.global_pool_conditions
        prepared = [
            self.prepare_image(
                image=image,
                width=width,
                height=height,
                batch_size=total,
                num_images_per_prompt=num_images_per_prompt,
                device=self._execution_device,
                dtype=self.controlnet.dtype,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                guess_mode=self._guess_mode,
                **crop,
            )
            for image in images
        ]
        is_multi = isinstance(self.controlnet, MultiControlNetModel)
        self._step_state[self.control_image_key] = prepared if is_multi else prepared[0]

    # ------------------------------------------------------------------ step 4: the guidance window

    def prepare_control_window(
        self, num_steps: int, scales: list[float], starts: list[float], ends: list[float]
    ) -> None:
        """Step 4: each ControlNet's scale at each of the `num_steps` steps: s_k inside its window, 0 outside.

        Step i covers [i / n, (i + 1) / n] of the schedule; it is inside [start, end] when i / n >= start and
        (i + 1) / n <= end, as in diffusers.
        """
        self._control_scales = [
            [scale * float(start <= i / num_steps and (i + 1) / num_steps <= end)
             for scale, start, end in zip(scales, starts, ends, strict=True)]
            for i in range(num_steps)
        ]  # fmt: skip
        self._control_step = 0

    def after_step(self, latents: torch.Tensor, i: int, timesteps: torch.Tensor) -> torch.Tensor:
        """The next noise prediction is step i + 1's (for its window); the latents are the parent's."""
        self._control_step = i + 1
        return super().after_step(latents, i, timesteps)

    # ------------------------------------------------------------------ step 6: ControlNet residuals in the noise

    def unet_kwargs(
        self, latents: torch.Tensor, model_input: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict:
        """The ControlNets' summed residuals for the UNet's down blocks and mid block at this step; none outside
        every window, where they would all be zero.

        `model_input` is the scaled x_t batch ([x_t, x_t] under guidance). In guess mode under guidance the
        ControlNets see only the conditional half and the unconditional half gets zero residuals.
        """
        scales = self._control_scales[self._control_step]
        if not any(scales):
            return {}
        images = self._step_state[self.control_image_key]
        is_multi = isinstance(self.controlnet, MultiControlNetModel)
        guess_cfg = self._guess_mode and self.do_classifier_free_guidance
        if guess_cfg:
            model_input = self.scheduler.scale_model_input(latents, t)
            prompt_embeds = prompt_embeds.chunk(2)[1]  # [negative; positive]: the positive half
        down, mid = self.controlnet(
            model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            controlnet_cond=images,
            conditioning_scale=scales if is_multi else scales[0],
            guess_mode=self._guess_mode,
            return_dict=False,
        )
        if guess_cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # ------------------------------------------------------------------ the whole call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | list[PipelineImageInput] = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_rescale: float = 0.0,
    ) -> LatentPipelineOutput | tuple:
        """Generate images from text under control images. Arguments, order and meaning are
        `StableDiffusionControlNetPipeline`'s (plus `LatentPipeline`'s `guidance_rescale`, last).

        Args:
            image: The control image(s): PIL, numpy (H, W, 3) or a tensor (B, 3, H, W), in [0, 1]; one image or one
                per prompt. With several ControlNets, a list with one such input per ControlNet (or a list per
                prompt of one image per ControlNet). Resized to (height, width).
            height, width: Output size in pixels; default the (first) control image's, rounded down to a multiple
                of the VAE scale factor.
            controlnet_conditioning_scale: s_k multiplying ControlNet k's residuals; one number, or one per
                ControlNet.
            guess_mode: The ControlNets see no prompt; their residuals go to the conditional half of the guidance
                batch only, scaled from 0.1 (first block) to 1.0 (mid block). Guidance 3-5 is recommended.
            control_guidance_start, control_guidance_end: The fractions of the schedule between which each
                ControlNet acts; one number, or one per ControlNet.
            The other arguments are `LatentPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments (a control image count that does not match the
                ControlNets or prompts, a scale list of the wrong length, a window outside [0, 1] or with
                start >= end, NaN or infinite control values), before any model is run.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        height, width = default_size(image, height, width, self.vae_scale_factor)

        # 1. Check inputs (the control inputs after the prompts, whose number they must match)
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs, timesteps=timesteps, sigmas=sigmas, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip
        images, scales, starts, ends = self.check_control_inputs(
            image, batch_size, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        self.start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        context, negative_prompt_embeds, added_cond_kwargs = self.encode_conditions(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip

        # 3. Prepare the control image(s) at the output size
        self.prepare_control_images(images, height, width, total, num_images_per_prompt, guess_mode)

        # 4. Set the timesteps, and each ControlNet's scale at each of them
        timesteps, num_inference_steps = self.prepare_timesteps(num_inference_steps, timesteps, sigmas)
        self.prepare_control_window(len(timesteps), scales, starts, ends)

        # 5. Prepare the initial latents x_T
        latents = self.prepare_latents(
            total, self.unet.config.in_channels, height, width, context.dtype, self._execution_device, generator,
            latents,
        )  # fmt: skip

        # 6. Denoise x_T -> x_0, the ControlNets' residuals added inside the UNet
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 7. Decode to images
        return self.finish_call(self.decode_latents(latents, output_type, generator), return_dict)
