"""`LatentUpscalePipeline`: prompt + low-resolution image -> an image 4x larger (Stable Diffusion's x4 upscaler).

The structure of SR3 (Saharia et al. 2021) in latent space, as Stable Diffusion's x4 upscaler has it: the VAE
downsamples by 4, so the latents x_t have the low-resolution image's size, and the UNet reads the two concatenated
channel-wise. The low-resolution image y is first noised at a chosen level (noise augmentation, Ho et al. 2021's
cascades), and that level is the UNet's class label:

    y_s  = sqrt(abar_s) * y + sqrt(1 - abar_s) * n        (the DDPM `low_res_scheduler` at level s = noise_level)
    eps  = eps_theta([x_t, y_s], t, text, class_label=s)

Higher levels hide more of the input's flaws (a base model's artefacts) at the cost of fidelity to it. Only these
steps are new here; prompt encoding, guidance, the denoising loop and decoding are `LatentPipeline`'s.

An optional last step, not in diffusers' pipeline (`back_projection_steps`, off by default): iterative
back-projection (Irani and Peleg 1991) corrects what the decoded image x gets wrong at the input's scale,

    x <- x + U(y - D(x))        (D: the antialiased 4x downsampling that made y; U: bicubic upsampling)

so the output, downsampled again, gives back the input (a decoder's tints and colour shifts go; the detail the
model drew, which D removes, stays). The same idea keeps diffusion restorations consistent with their measurement
in DDNM's range-null-space decomposition (Wang et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from ldm.checks import (
    as_pixels,
    check_noise_level,
    check_prompts,
    check_upscale_fits,
    image_channels,
    image_count,
    image_hw,
)
from ldm.encoding import vae_scale_factor
from ldm.pipelines.text_to_image import LatentPipeline, LatentPipelineOutput

logger = logging.get_logger(__name__)

# The latent scaling diffusers' StableDiffusionUpscalePipeline imposes on every VAE it loads (it rewrites any other
# value in the VAE's config). `ldm.training.upscaler.rescale_vae_latents` gives a trained VAE this factor exactly.
UPSCALER_SCALING_FACTOR = 0.08333


def downsample(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H / factor, W / factor) through an antialiasing (bicubic) filter, clamped to the
    input's [-1, 1] range: the low-resolution input an upscaler learns from, and the D of `back_project`."""
    small = F.interpolate(
        pixels, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False
    )
    return small.clamp(-1, 1)


def back_project(image: torch.Tensor, low_res: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` rounds of x <- x + U(y - D(x)) (module docstring) on images `image` (B, 3, H, W) and their
    low-resolution inputs `low_res` (B, 3, H / f, W / f), both in [-1, 1]; the result is clamped to that range."""
    factor = image.shape[-1] // low_res.shape[-1]
    low_res = low_res.to(image)
    for _ in range(steps):
        residual = low_res - downsample(image, factor)
        image = image + F.interpolate(residual, scale_factor=factor, mode="bicubic", align_corners=False)
    return image.clamp(-1, 1)


class LatentUpscalePipeline(LatentPipeline):
    """Text-guided x4 super-resolution; a drop-in for diffusers' `StableDiffusionUpscalePipeline` without the
    safety checker and watermarker: the same components, `__call__` arguments and images for the same weights.

    Saves and loads the diffusers layout both ways (a saved folder names `StableDiffusionUpscalePipeline`);
    `LatentUpscalePipeline.from_pipe(pipe)` shares a loaded upscaler's modules.

    Args:
        vae: A VAE with a 4x factor whose `scaling_factor` is 0.08333, as diffusers expects (another value is used
            as is here, with a warning: stock diffusers would replace it).
        unet: Takes the latent channels plus 3 image channels, and `num_class_embeds` > max_noise_level.
        low_res_scheduler: The DDPM schedule that noises the low-resolution image (`noise_level` is its timestep).
        scheduler: The sampler (DDIM, DPM-Solver++, Euler, ...).
        safety_checker, watermarker: Accepted for diffusers' signature; must be None.
        max_noise_level: The highest `noise_level` a call may ask for (350 for Stable Diffusion's upscaler).
        The other components are `LatentPipeline`'s.
    """

    diffusers_class_name = "StableDiffusionUpscalePipeline"
    conditioning_channels = (3,)
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "watermarker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "image"]

    # diffusers' own step: the initial noise at the latents' (= the low-resolution image's) size.
    prepare_latents = StableDiffusionUpscalePipeline.prepare_latents

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        low_res_scheduler: DDPMScheduler,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        watermarker: None = None,
        max_noise_level: int = 350,
    ):
        # DiffusionPipeline's __init__, not LatentPipeline's: diffusers' upscaler has no image encoder to register,
        # and applies no legacy scheduler fixes.
        DiffusionPipeline.__init__(self)
        for name, given in (("safety_checker", safety_checker), ("watermarker", watermarker)):
            if given is not None:
                raise ValueError(
                    f"{type(self).__name__} runs no {name}; pass {name}=None (or use diffusers' "
                    "StableDiffusionUpscalePipeline if you need one)."
                )
        check_upscale_fits(unet, vae, max_noise_level)
        if vae is not None and vae.config.scaling_factor != UPSCALER_SCALING_FACTOR:
            logger.warning(
                "The VAE's scaling_factor is %s; diffusers' StableDiffusionUpscalePipeline replaces any value but "
                "%s, so this model would sample differently there. ldm.training.upscaler.rescale_vae_latents "
                "gives the VAE that factor without changing what the model computes.",
                vae.config.scaling_factor,
                UPSCALER_SCALING_FACTOR,
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            low_res_scheduler=low_res_scheduler,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=feature_extractor,
            watermarker=None,
        )
        self.register_to_config(max_noise_level=max_noise_level)
        self.vae_scale_factor = vae_scale_factor(vae.config) if vae is not None else 4
        # diffusers' processor settings for this pipeline: bicubic resizing to the VAE factor's multiples.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self._step_state: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ step 3: the noised low-resolution image

    def prepare_low_res(
        self,
        image: PipelineImageInput,
        noise_level: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        generator,
    ) -> torch.Tensor:
        """The low-resolution image(s) in [-1, 1], noised to `noise_level` by the low-res scheduler, one per output
        image (and doubled under guidance); kept where the UNet input and callbacks read it.

        Each input image is repeated for its prompt's `num_images_per_prompt` outputs (diffusers tiles the whole
        batch instead, which pairs images with the wrong prompts when both a batch and several images per prompt
        are asked for; both orders agree otherwise).
        """
        device = self._execution_device
        image = self.image_processor.preprocess(as_pixels(image, "image", self.vae_scale_factor)).to(
            device, dtype
        )
        self._clean_low_res = image.repeat_interleave(num_images_per_prompt, dim=0)  # for back_project
        noise = randn_tensor(image.shape, generator=generator, device=device, dtype=dtype)
        level = torch.tensor([noise_level], dtype=torch.long, device=device)
        image = self.low_res_scheduler.add_noise(image, noise, level)
        image = image.repeat_interleave(num_images_per_prompt, dim=0)
        if self.do_classifier_free_guidance:
            image = torch.cat([image, image])
        self._step_state["image"] = image
        self._noise_levels = level.repeat(len(image))
        return image

    # ------------------------------------------------------------------ step 5: denoise

    def unet_input(self, latent_model_input: torch.Tensor) -> torch.Tensor:
        """The noisy latents and the noised low-resolution image, concatenated channel-wise."""
        return torch.cat([latent_model_input, self._step_state["image"]], dim=1)

    def unet_kwargs(self, latents, model_input, t, prompt_embeds) -> dict:
        """The low-resolution image's noise level, as the UNet's class label."""
        return {"class_labels": self._noise_levels}

    # ------------------------------------------------------------------ large inputs, in tiles

    def upscale_in_tiles(
        self,
        image,
        tile_size: int,
        overlap: int,
        per_image: dict,
        output_type: str,
        return_dict: bool,
        **call,
    ) -> LatentPipelineOutput | tuple:
        """Upscale each image of `image` tile by tile (see `__call__`'s tile_size) and blend the tiles' overlaps
        with linear ramps. `per_image` holds the arguments with one entry per image (prompts, embeddings,
        generators), `call` the rest of `__call__`'s, the same for every tile."""
        f, n = self.vae_scale_factor, call["num_images_per_prompt"]
        pixels = (
            self.image_processor.preprocess(as_pixels(image, "image", f)) + 1
        ) / 2  # (B, 3, H, W) in [0, 1]
        outputs = []
        for k, one in enumerate(pixels):
            mine = {name: pick(value, k, n) for name, value in per_image.items()}
            height, width = one.shape[-2:]
            total = torch.zeros(n, 3, height * f, width * f)
            weight = torch.zeros(1, 1, height * f, width * f)
            for top in tile_starts(height, tile_size, overlap):
                for left in tile_starts(width, tile_size, overlap):
                    window = one[:, top : top + tile_size, left : left + tile_size]
                    tile = self(image=window[None], output_type="pt", **mine, **call).images.cpu()
                    ramp = blend_weights(window.shape[-2:], (top, left), (height, width), overlap, f)
                    rows, cols = (
                        slice(top * f, top * f + tile.shape[-2]),
                        slice(left * f, left * f + tile.shape[-1]),
                    )
                    total[..., rows, cols] += tile * ramp
                    weight[..., rows, cols] += ramp
            outputs.append(total / weight)
        images = torch.cat(outputs)
        if output_type != "pt":
            images = self.image_processor.postprocess(images * 2 - 1, output_type=output_type)
        return self.finish_call(images, return_dict)

    # ------------------------------------------------------------------ the whole call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        back_projection_steps: int = 0,
    ) -> LatentPipelineOutput | tuple:
        """Upscale `image` 4x guided by `prompt`. Arguments, order and meaning are `StableDiffusionUpscalePipeline`'s
        (its deprecated `callback`/`callback_steps` are `callback_on_step_end`, as in the other pipelines).

        Args:
            prompt: What the image shows; one prompt or one per image (or `prompt_embeds`).
            image: The low-resolution image(s): PIL, numpy (H, W, 3) / (B, H, W, 3) or a tensor (B, 3, H, W) in
                [-1, 1] or [0, 1]; one per prompt. The output is (4H, 4W), H and W rounded down to the VAE factor.
            num_inference_steps: Denoising steps.
            guidance_scale: s in eps_uncond + s * (eps_cond - eps_uncond); s <= 1 runs the conditional branch only.
            noise_level: The noise added to `image` first, in [0, max_noise_level]: higher tolerates a flawed input
                (a base model's sample) and follows it less closely.
            tile_size, tile_overlap: For inputs too large to upscale at once (memory grows with the pixels): cut
                each image into tile_size x tile_size squares (input pixels, a multiple of the VAE factor) that
                overlap by tile_overlap (default a quarter of a tile), upscale each with the same prompt and
                settings, and blend the overlaps linearly. None (default) upscales whole images. Not with `latents`.
            back_projection_steps: Rounds of back-projection onto the input after decoding (module docstring;
                each tile its own); 0 (default) decodes as diffusers' pipeline does. One or two rounds make the
                output consistent with an input downsampled as `downsample` does (the training filter).
            The other arguments are `LatentPipeline.__call__`'s.

        Returns:
            `LatentPipelineOutput` with `images`, or `(images, None)`.

        Raises:
            ValueError, TypeError: on invalid arguments (a noise level out of range, an image count that does not
                match the prompts, NaN or infinite pixels), before any model is run.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        if image is None:
            raise ValueError("image is required: pass the low-resolution image to upscale.")
        check_back_projection(back_projection_steps, output_type)
        f = self.vae_scale_factor
        low_height, low_width = image_hw(image)
        height, width = max(low_height // f, 1) * f * f, max(low_width // f, 1) * f * f
        if tile_size is not None:
            tile_overlap = (
                tile_size // 4 if tile_overlap is None and isinstance(tile_size, int) else tile_overlap
            )
            check_tiles(tile_size, tile_overlap, f, latents)
            count = check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
            check_image_count(image, count)
            if max(low_height, low_width) > tile_size:
                return self.upscale_in_tiles(
                    image, tile_size, tile_overlap,
                    dict(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                         negative_prompt_embeds=negative_prompt_embeds, generator=generator),
                    output_type, return_dict, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    noise_level=noise_level, num_images_per_prompt=num_images_per_prompt, eta=eta,
                    cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    back_projection_steps=back_projection_steps,
                )  # fmt: skip

        # 1. Check inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, 0.0, eta,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            tensor_inputs, clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip
        check_noise_level(noise_level, self.config.max_noise_level)
        check_image_count(image, batch_size)
        self.start_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt (and the negative/empty prompt under guidance)
        context, negative_prompt_embeds, _ = self.encode_conditions(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, None
        )

        # 3. The low-resolution image, noised to noise_level (its noise drawn before the latents', as diffusers does)
        low_res = self.prepare_low_res(image, noise_level, num_images_per_prompt, context.dtype, generator)

        # 4. Set the timesteps
        timesteps, num_inference_steps = self.prepare_timesteps(num_inference_steps)

        # 5. Prepare the initial latents x_T at the low-resolution image's size
        latents = self.prepare_latents(
            total, self.vae.config.latent_channels, *low_res.shape[-2:], context.dtype, self._execution_device,
            generator, latents,
        )  # fmt: skip

        # 6. Denoise x_T -> x_0 with the image beside the latents
        latents = self.denoise(
            latents, timesteps, context, negative_prompt_embeds, self.prepare_extra_step_kwargs(generator, eta),
            self.guidance_embedding(total, latents.dtype), None, callback_on_step_end, tensor_inputs,
        )  # fmt: skip

        # 7. Decode to images (and back-project them onto the input)
        if not back_projection_steps:
            return self.finish_call(self.decode_latents(latents, output_type, generator), return_dict)
        pixels = self.decode_latents(latents, "pt", generator) * 2 - 1
        pixels = back_project(pixels, self._clean_low_res, back_projection_steps)
        return self.finish_call(
            self.image_processor.postprocess(pixels, output_type=output_type), return_dict
        )


def check_image_count(image, batch_size: int) -> None:
    """One RGB low-resolution image per prompt."""
    count, channels = image_count(image), image_channels(image)
    if count != batch_size:
        raise ValueError(
            f"image holds {count} images for {batch_size} prompts; pass one low-resolution image per prompt."
        )
    if channels not in (None, 3):
        raise ValueError(
            f"image has {channels} channels; pass RGB images: PIL, (H, W, 3) arrays or (B, 3, H, W) tensors."
        )


def pick(value, k: int, per_image: int):
    """Image k's share of a per-image argument: its prompt or embedding, its `per_image` generators; a single
    string or generator is everyone's."""
    if value is None or isinstance(value, (str, torch.Generator)):
        return value
    if isinstance(value, torch.Tensor):
        return value[k : k + 1]
    if isinstance(value, list) and value and isinstance(value[0], torch.Generator):
        return value[k * per_image : (k + 1) * per_image]
    return value[k]


def check_back_projection(steps, output_type: str) -> None:
    """back_projection_steps is a count, and it works on pixels: not with output_type="latent"."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(
            f"back_projection_steps={steps!r} must be an integer >= 0 (2 is plenty; 0 turns it off)."
        )
    if steps and output_type == "latent":
        raise ValueError(
            f"back_projection_steps={steps} works on decoded pixels, not with output_type='latent': "
            "pass back_projection_steps=0 or another output_type."
        )


def check_tiles(tile_size, tile_overlap, factor: int, latents) -> None:
    """Tiles are multiples of the VAE factor that overlap by less than half their side; not with given latents."""
    if not isinstance(tile_size, int) or tile_size < factor or tile_size % factor:
        raise ValueError(
            f"tile_size={tile_size!r} must be a positive multiple of the VAE scale factor {factor}."
        )
    if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile_size // 2:
        raise ValueError(f"tile_overlap={tile_overlap!r} must be an integer in [0, tile_size / 2).")
    if latents is not None:
        raise ValueError(
            "latents cannot be given with tile_size: each tile draws its own; pass one or the other."
        )


def tile_starts(side: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along a side of `side`, each overlapping the last by at least
    `overlap`, the last ending at the side."""
    if side <= tile:
        return [0]
    starts = list(range(0, side - tile, tile - overlap))
    return starts + [side - tile]


def blend_weights(size, start, whole, overlap: int, factor: int) -> torch.Tensor:
    """(1, 1, h * factor, w * factor) weights of an upscaled tile: rising linearly across `overlap` input pixels
    at each side it shares with a neighbour, 1 elsewhere (and at the image's own borders)."""
    ramps = []
    for length, begin, full in zip(size, start, whole, strict=True):
        n = length * factor
        ramp = torch.ones(n)
        span = max(overlap * factor, 1)
        rise = (torch.arange(span) + 0.5) / span
        if begin > 0:
            ramp[:span] = torch.minimum(ramp[:span], rise)
        if begin + length < full:
            ramp[n - span :] = torch.minimum(ramp[n - span :], rise.flip(0))
        ramps.append(ramp)
    return (ramps[0][:, None] * ramps[1][None, :])[None, None]


class Cascade:
    """A cascade (Ho et al. 2021): a base pipeline draws the image, an upscaler enlarges it with the same prompt.

        cascade = Cascade(LatentPipeline.from_pretrained(base), LatentUpscalePipeline.from_pretrained(upscaler))
        images = cascade("a red circle on the left", guidance_scale=7.5, generator=torch.Generator().manual_seed(0))

    The upscaler reads the base's images as a PNG holds them (8-bit), at `noise_level`, and draws from the same
    generator(s) after the base. Keyword arguments other than these go to the base pipeline.

    Args:
        base: A text-to-image pipeline (`LatentPipeline`, or any with its call signature).
        upscaler: The `LatentUpscalePipeline` to run on the base's output.
        noise_level, upscale_steps, upscale_guidance_scale, back_projection_steps: The upscaler's `noise_level`,
            `num_inference_steps`, `guidance_scale` and `back_projection_steps`.
    """

    def __init__(
        self,
        base: LatentPipeline,
        upscaler: LatentUpscalePipeline,
        noise_level: int = 20,
        upscale_steps: int = 25,
        upscale_guidance_scale: float = 9.0,
        back_projection_steps: int = 0,
    ):
        check_noise_level(noise_level, upscaler.config.max_noise_level)
        check_back_projection(back_projection_steps, "pil")
        self.back_projection_steps = back_projection_steps
        self.base, self.upscaler = base, upscaler
        self.noise_level, self.upscale_steps, self.upscale_guidance_scale = (
            noise_level, upscale_steps, upscale_guidance_scale,
        )  # fmt: skip

    def to(self, *args, **kwargs) -> Cascade:
        """Move both pipelines (`DiffusionPipeline.to`'s arguments)."""
        self.base.to(*args, **kwargs)
        self.upscaler.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Both pipelines' progress bars."""
        self.base.set_progress_bar_config(**kwargs)
        self.upscaler.set_progress_bar_config(**kwargs)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        **base_kwargs,
    ) -> LatentPipelineOutput:
        """Base images (8-bit, as saved), then each upscaled with its own prompt; returns the upscaled images."""
        small = self.base(
            prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            generator=generator, output_type="pil", **base_kwargs,
        ).images  # fmt: skip

        def per_image(texts):
            if texts is None:
                return None
            return [
                t
                for t in ([texts] if isinstance(texts, str) else texts)
                for _ in range(num_images_per_prompt)
            ]

        return self.upscaler(
            per_image(prompt), image=small, negative_prompt=per_image(negative_prompt),
            num_inference_steps=self.upscale_steps, guidance_scale=self.upscale_guidance_scale,
            noise_level=self.noise_level, generator=generator, output_type=output_type,
            back_projection_steps=self.back_projection_steps,
        )  # fmt: skip
