"""`LatentInpaintPipeline`: repaint the masked region of an image, with `LatentPipeline`'s steps.

Two kinds of UNet work (mask: 1 = repaint, 0 = keep):
- a text-to-image UNet (4 input channels): after each step the known region is replaced by the image's own latents
  noised to the next timestep, x_t <- (1 - m) * noised(x_0^image) + m * x_t (RePaint-style blending);
- an inpainting UNet (9 channels, as Stable Diffusion 1.5 inpainting): it takes the mask and the masked image's
  latents as extra input channels, [x_t, m, z(masked image)], and needs no blending.
Only steps 3, 4 and the two denoising hooks differ from text-to-image; the rest are `LatentPipeline`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ldm.checks import as_pixels, check_mask_fits, check_strength
from ldm.encoding import vae_tiles
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.text_to_image import LatentPipelineOutput

INPAINT_CHANNELS = (4, 9)  # a text-to-image UNet, or latents + mask + masked-image latents


class LatentInpaintPipeline(LatentImg2ImgPipeline):
    """Inpainting on `LatentPipeline`'s components (4-channel UNet) or an inpainting UNet (9 channels).

    `LatentInpaintPipeline.from_pipe(pipe)` shares a loaded pipeline's components; saves and loads like
    `LatentPipeline`, and a saved folder names diffusers' `StableDiffusionInpaintPipeline`.
    """

    diffusers_class_name = "StableDiffusionInpaintPipeline"
    conditioning_channels = (0, 5)  # a text-to-image UNet, or one that also takes the mask and masked image
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "mask",
        "masked_image_latents",
    ]

    # diffusers' own steps, reused: noise or noised image latents, the mask at latent size with the masked image's
    # latents, and the image encoding both use.
    prepare_latents = StableDiffusionInpaintPipeline.prepare_latents
    prepare_mask_latents = StableDiffusionInpaintPipeline.prepare_mask_latents
    _encode_vae_image = StableDiffusionInpaintPipeline._encode_vae_image

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
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder
        )
        if unet is not None and unet.config.in_channels not in INPAINT_CHANNELS:
            raise ValueError(
                f"An inpainting UNet takes 4 (text-to-image) or 9 (inpainting) input channels; this one takes "
                f"{unet.config.in_channels}."
            )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self._known: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ denoising hooks

    @property
    def is_inpainting_unet(self) -> bool:
        return self.unet.config.in_channels == 9

    def unet_input(self, latent_model_input: torch.Tensor) -> torch.Tensor:
        """An inpainting UNet also takes the mask and the masked image's latents as channels."""
        if not self.is_inpainting_unet:
            return latent_model_input
        state = self._step_state
        return torch.cat([latent_model_input, state["mask"], state["masked_image_latents"]], dim=1)

    def after_step(self, latents: torch.Tensor, i: int, timesteps: torch.Tensor) -> torch.Tensor:
        """With a text-to-image UNet, put back the known region: the image's latents noised to the next step."""
        if self.is_inpainting_unet:
            return latents
        image_latents, noise = self._known
        mask = self._step_state["mask"]
        mask = mask.chunk(2)[0] if self.do_classifier_free_guidance else mask
        if i < len(timesteps) - 1:
            image_latents = self.scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
        return (1 - mask) * image_latents + mask * latents

    # ------------------------------------------------------------------ steps 1 and 4

    def check_images(self, image, mask_image, strength, padding_mask_crop, output_type) -> tuple:
        """Step 1 for the images: types, matching sizes, finite values, strength, and what padding_mask_crop needs.

        Returns (image, mask_image), PIL images converted to RGB and L.
        """
        check_strength(strength)
        image = as_pixels(image, "image", self.vae_scale_factor)
        mask_image = as_pixels(mask_image, "mask_image", self.vae_scale_factor, mode="L")
        check_mask_fits(image, mask_image)
        if padding_mask_crop is not None:
            if not isinstance(padding_mask_crop, int) or padding_mask_crop < 0:
                raise ValueError(
                    f"padding_mask_crop={padding_mask_crop!r} must be a non-negative int or None."
                )
            pil = isinstance(image, PIL.Image.Image) and isinstance(mask_image, PIL.Image.Image)
            if not pil or output_type != "pil":
                raise ValueError(
                    "padding_mask_crop pastes the result back onto the original, so it needs a PIL image and "
                    "mask_image and output_type='pil'; pass those or padding_mask_crop=None."
                )
        return image, mask_image

    def prepare_inpaint_latents(
        self, image, mask_image, masked_image_latents, height, width, padding_mask_crop, strength, timesteps,
        total, dtype, generator, latents,
    ):  # fmt: skip
        """Step 4: x_T (noise, or the noised image when strength < 1), the latent-size mask and masked image.

        Returns (latents, image tensor, crop coordinates); the mask state is kept for the denoising hooks.
        """
        crops = None
        if padding_mask_crop is not None:
            crops = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
        resize_mode = "fill" if crops is not None else "default"
        init_image = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        f = self.vae_scale_factor
        with vae_tiles(self, "encode", (height // f, width // f), total):
            outputs = self.prepare_latents(
                total, self.vae.config.latent_channels, height, width, dtype, self._execution_device, generator,
                latents, image=init_image, timestep=timesteps[:1].repeat(total), is_strength_max=strength == 1.0,
                return_noise=True, return_image_latents=not self.is_inpainting_unet,
            )  # fmt: skip
            latents, noise = outputs[:2]
            mask = self.mask_processor.preprocess(
                mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crops
            )
            masked = init_image * (mask < 0.5) if masked_image_latents is None else masked_image_latents
            mask, masked_image_latents = self.prepare_mask_latents(
                mask, masked, total, height, width, dtype, self._execution_device, generator,
                self.do_classifier_free_guidance,
            )  # fmt: skip
        self._step_state = {"mask": mask, "masked_image_latents": masked_image_latents}
        self._known = None if self.is_inpainting_unet else (outputs[2], noise)
        return latents, crops

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Repaint where `mask_image` is white. Arguments, order and meaning are `StableDiffusionInpaintPipeline`'s.

        Args:
            image: The image to edit (PIL, numpy or tensor, as for img2img).
            mask_image: Same size as `image`; white (1) is repainted, black (0) kept. Binarised at 0.5.
            masked_image_latents: Latents of the masked image, instead of encoding `image * (mask < 0.5)`.
            height, width: Output size; default the UNet's (`sample_size * vae_scale_factor`).
            padding_mask_crop: Work on the mask's bounding box plus this margin, then paste back (PIL only).
            strength: In [0, 1]; 1 starts the masked region from pure noise.
            The other arguments are `LatentPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments (strength outside [0, 1], a mask whose size differs from the
                image's, an image that is not PIL, numpy or a tensor), before any model is run.
        """
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])

        # 1. Check inputs
        image, mask_image = self.check_images(image, mask_image, strength, padding_mask_crop, output_type)
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, 0.0, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
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

        # 4. Prepare x_T, the mask and the masked image's latents
        latents, crops = self.prepare_inpaint_latents(
            image, mask_image, masked_image_latents, height, width, padding_mask_crop, strength, timesteps,
            total, context.dtype, generator, latents,
        )  # fmt: skip

        # 5. Denoise x_T -> x_0, keeping the known region
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), added_cond_kwargs, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 6. Decode to images (pasted back onto the original when only the mask's box was worked on)
        images = self.decode_latents(latents, output_type, generator)
        if crops is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, out, crops) for out in images]
        return self.finish_call(images, return_dict)
