"""Argument and component checks of the pipelines: each names the bad value and the fix, before any model runs."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from ldm.encoding import vae_scale_factor
from ldm.images import convert_mode

logger = logging.get_logger(__name__)

# Guidance past this is never what a user means: Stable Diffusion is sampled at 1-15, and the guided prediction
# eps_u + s (eps_c - eps_u) grows with s until the decoded image is saturated flat colour (at 1e30 it is NaN).
MAX_GUIDANCE_SCALE = 100.0
# A Hub repository id: "name" or "owner/name".
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` can be a Hub repository id ("name" or "owner/name") rather than only a local path."""
    text = os.fspath(name)
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def check_local_or_hub(name: str | os.PathLike, what: str) -> None:
    """A name that can only be a local path must be an existing folder (not left to fail as a bad Hub id)."""
    if not Path(name).expanduser().is_dir() and not looks_like_hub_id(name):
        raise ValueError(f"{what} {os.fspath(name)!r} is not a folder (nor a Hub id of the form owner/name).")


def check_pipeline_folder(path: str | os.PathLike, skipped: tuple[str, ...] = ()) -> None:
    """A local pipeline folder holds model_index.json and a subfolder for every component that file names.

    Hub ids are left to `from_pretrained`. `skipped` components are not loaded, so they need no subfolder.
    """
    check_local_or_hub(path, "The pipeline")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{folder} is not a pipeline folder: it has no model_index.json.")
    for name, spec in json.loads(index_path.read_text()).items():
        is_component = isinstance(spec, list) and len(spec) == 2 and spec[0] is not None
        if is_component and name not in skipped and not (folder / name).is_dir():
            raise ValueError(
                f"The pipeline folder {folder} has no {name}/ subfolder, which its model_index.json lists "
                f"({spec[1]}); copy {name}/ from the pipeline it came from, or save the pipeline again."
            )


def check_components_fit(
    unet, text_encoder, vae, source: str, conditioning_channels: tuple[int, ...] = (0,)
) -> None:
    """The UNet must take the text encoder's width and the VAE's latent channels, plus one of
    `conditioning_channels` more (an inpainting UNet's mask and masked image, an upscaler's image); missing
    components pass.

    A UNet sample size that does not match the VAE's (times its scale factor) is only warned about.
    """
    if unet is not None and text_encoder is not None:
        width, hidden = unet.config.cross_attention_dim, text_encoder.config.hidden_size
        if width != hidden:
            raise ValueError(
                f"In {source} the UNet's cross_attention_dim={width} does not match the text encoder's "
                f"hidden_size={hidden}; use the text encoder the UNet was trained with."
            )
    if unet is not None and vae is not None:
        size = unet.config.sample_size
        image_side = (size if isinstance(size, int) else size[0]) * vae_scale_factor(vae.config)
        vae_side = vae.config.get("sample_size")  # AutoencoderTiny's config has none
        if vae_side is not None and vae_side != image_side:
            # Not an error: both models are convolutional. But the default image size follows the UNet.
            logger.warning(
                "In %s the UNet's sample_size gives %d px images by default, but the VAE was configured for %s px.",
                source,
                image_side,
                vae_side,
            )
        channels, latent = unet.config.in_channels, vae.config.latent_channels
        if channels - latent not in conditioning_channels:
            extra = (
                ""
                if conditioning_channels == (0,)
                else f" (plus one of {conditioning_channels} image channels)"
            )
            raise ValueError(
                f"In {source} the UNet takes {channels} input channels but the VAE makes {latent}-channel "
                f"latents{extra}; use the VAE the UNet was trained with."
            )


def check_upscale_fits(unet, vae, max_noise_level) -> None:
    """An upscaler's UNet reads the latents and a 3-channel image, and has a class embedding for every noise level
    up to `max_noise_level` (missing components pass)."""
    if not isinstance(max_noise_level, int) or isinstance(max_noise_level, bool) or max_noise_level < 0:
        raise ValueError(
            f"max_noise_level={max_noise_level!r} must be an integer >= 0 (350 in Stable Diffusion's)."
        )
    if unet is None:
        return
    if vae is not None and unet.config.in_channels != vae.config.latent_channels + 3:
        raise ValueError(
            f"An upscaler's UNet takes the VAE's {vae.config.latent_channels} latent channels plus 3 image channels "
            f"({vae.config.latent_channels + 3}); this one takes {unet.config.in_channels}. Build it with "
            f"in_channels={vae.config.latent_channels + 3}."
        )
    kind, classes = unet.config.class_embed_type, unet.config.num_class_embeds
    if kind == "timestep":  # a sinusoidal embedding: any level fits
        return
    if kind is not None or classes is None or classes <= max_noise_level:
        raise ValueError(
            f"An upscaler's UNet takes the noise level as a class label: it needs class_embed_type='timestep', or a "
            f"table with num_class_embeds > max_noise_level={max_noise_level}; this one has class_embed_type={kind!r}, "
            f"num_class_embeds={classes}."
        )


def check_noise_level(noise_level, max_noise_level: int) -> None:
    """The upscaler's noise level is an integer in [0, max_noise_level]."""
    if (
        not isinstance(noise_level, int)
        or isinstance(noise_level, bool)
        or not 0 <= noise_level <= max_noise_level
    ):
        raise ValueError(
            f"noise_level={noise_level!r} must be an integer in [0, {max_noise_level}] (max_noise_level); 20 is "
            "Stable Diffusion's default, higher hides more of a flawed input."
        )


def check_image_size(name: str, size, factor: int) -> None:
    """Image sides are positive multiples of the VAE scale factor."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % factor != 0:
        hint = max(factor, round(size / factor) * factor) if isinstance(size, (int, float)) else 512
        raise ValueError(
            f"{name}={size!r} must be a positive multiple of the VAE scale factor {factor}; try {hint}."
        )


def check_count(name: str, value, example: int) -> None:
    """A count such as num_inference_steps is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 (e.g. {example}).")


def check_guidance(guidance_scale, guidance_rescale=0.0, name: str = "guidance_scale") -> None:
    """guidance_scale (called `name` in messages) is finite and in [0, MAX_GUIDANCE_SCALE]; guidance_rescale in
    [0, 1]."""
    if (
        not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE
    ):
        raise ValueError(
            f"{name}={guidance_scale!r} must be a finite number in [0, {MAX_GUIDANCE_SCALE:g}]: 1.0 is no "
            "guidance, 7.5 Stable Diffusion's usual; far larger values saturate the image (and overflow to NaN)."
        )
    if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r} must lie in [0, 1] (0.7 is typical).")


def check_eta(eta, scheduler) -> None:
    """eta is DDIM's, finite and in [0, 1]."""
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(
            f"eta={eta!r} must be a finite number in [0, 1]: 0 is deterministic DDIM, 1 adds DDPM's posterior "
            "noise; more would add noise the model never removes."
        )
    if eta != 0.0 and "eta" not in inspect.signature(scheduler.step).parameters:
        raise ValueError(
            f"eta={eta!r} is only used by DDIM, but the scheduler is {type(scheduler).__name__}; "
            "set eta=0.0 or switch to DDIMScheduler."
        )


def check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
    """Validate the prompt arguments and return the prompt batch size."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError(
            "Pass exactly one of `prompt` and `prompt_embeds`; got "
            f"{'both' if prompt is not None else 'neither'}."
        )
    if prompt is not None:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt=[] is empty; pass at least one prompt string.")
            bad = [p for p in prompt if not isinstance(p, str)]
            if bad:
                raise TypeError(
                    f"Every prompt in the list must be a str; got {bad[0]!r} ({type(bad[0]).__name__})."
                )
        elif not isinstance(prompt, str):
            raise TypeError(
                f"prompt must be a str or a list of str, got {type(prompt).__name__}: {prompt!r}."
            )
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
    else:
        if prompt_embeds.ndim != 3:
            raise ValueError(
                f"prompt_embeds must be (batch, tokens, dim); got shape {tuple(prompt_embeds.shape)}."
            )
        batch_size = prompt_embeds.shape[0]
    check_finite("prompt_embeds", prompt_embeds)
    check_finite("negative_prompt_embeds", negative_prompt_embeds)
    if negative_prompt is not None:
        if negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`, not both.")
        if prompt is not None and type(negative_prompt) is not type(prompt):
            raise TypeError(
                f"negative_prompt is a {type(negative_prompt).__name__} but prompt is a "
                f"{type(prompt).__name__}; give both as str or both as lists."
            )
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries for {batch_size} prompts; "
                "give one negative prompt per prompt, or a single string."
            )
        if not isinstance(negative_prompt, (str, list)):
            raise TypeError(
                f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}."
            )
    if negative_prompt_embeds is not None and (
        prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
    ):
        raise ValueError(
            "negative_prompt_embeds need prompt_embeds of the same shape; got "
            f"{tuple(negative_prompt_embeds.shape)} vs "
            f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}."
        )
    return batch_size


def check_schedule_inputs(num_inference_steps, timesteps, sigmas, scheduler) -> None:
    """Either a step count or one custom schedule (`timesteps` or `sigmas`) the scheduler can take."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass at most one of `timesteps` and `sigmas`, not both.")
    for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
        if custom is None:
            continue
        if len(custom) == 0:
            raise ValueError(f"{name}=[] is empty; pass a descending list, or num_inference_steps instead.")
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom {name}; pass num_inference_steps, or switch to "
                "a scheduler that does (e.g. EulerDiscreteScheduler)."
            )
    if timesteps is None and sigmas is None:
        check_count("num_inference_steps", num_inference_steps, example=50)


def check_conditioning_inputs(
    clip_skip, text_encoder, cross_attention_kwargs, ip_adapter_image, ip_adapter_image_embeds
) -> None:
    """clip_skip fits the text encoder; cross_attention_kwargs is a dict; at most one IP-Adapter input."""
    if clip_skip is not None:
        layers = text_encoder.config.num_hidden_layers
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < layers:
            raise ValueError(
                f"clip_skip={clip_skip!r} must be an integer in [0, {layers - 1}] for this {layers}-layer text "
                "encoder (1 uses the penultimate layer), or None."
            )
    if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
        raise TypeError(
            f"cross_attention_kwargs must be a dict such as {{'scale': 0.5}}, got "
            f"{type(cross_attention_kwargs).__name__}."
        )
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("Pass at most one of `ip_adapter_image` and `ip_adapter_image_embeds`, not both.")


def check_call_tensors(generator, latents, latent_shape: tuple, tensor_inputs, available) -> None:
    """One generator or one per image; given latents of the shape the call needs; callback tensors that exist.

    `latent_shape` is (images, channels, height / f, width / f).
    """
    total = latent_shape[0]
    if isinstance(generator, list) and len(generator) != total:
        raise ValueError(
            f"Got a list of {len(generator)} generators for {total} images (prompts x num_images_per_prompt); "
            f"pass one generator or exactly {total}."
        )
    if latents is not None and tuple(latents.shape) != tuple(latent_shape):
        raise ValueError(
            f"latents have shape {tuple(latents.shape)} but {tuple(latent_shape)} is needed for {total} images of "
            f"{latent_shape[2]}x{latent_shape[3]} latents; match height/width/num_images_per_prompt or leave "
            "latents=None."
        )
    check_finite("latents", latents)
    unknown = [k for k in tensor_inputs if k not in available]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from {available}."
        )


def check_finite(name: str, value) -> None:
    """A tensor or array argument (latents, embeddings, pixels) holds no NaN or infinity; None passes.

    A NaN anywhere spreads through every attention layer, and the call would return black or NaN images silently.
    """
    if value is None or isinstance(value, PIL.Image.Image):
        return
    bad = ~torch.isfinite(torch.as_tensor(value))
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite values of {bad.numel()}; every value must be finite "
            "(look for a division by zero or an overflow where it was made)."
        )


IMAGE_TYPES = "a PIL image, a numpy array, a torch tensor, or a list of one of these"


def image_hw(image, name: str = "image") -> tuple[int, int]:
    """(height, width) of a PIL image, an array (H, W[, C]) / (B, H, W, C), a tensor (..., H, W), or a list.

    Raises:
        TypeError: `image` is none of these; the message names `name` and what it is.
    """
    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray) and first.ndim >= 2:
        channels_last = first.ndim >= 3 and first.shape[-1] in (1, 3, 4)
        return tuple(first.shape[-3:-1] if channels_last else first.shape[-2:])
    if isinstance(first, torch.Tensor) and first.ndim >= 2:
        return tuple(first.shape[-2:])
    raise TypeError(f"{name} must be {IMAGE_TYPES}; got {type(image).__name__}.")


def as_pixels(image, name: str, factor: int, mode: str = "RGB"):
    """`image` ready for the image processor: PIL images converted to `mode` ("RGB" for images, "L" for masks),
    arrays and tensors checked to be finite; each at least `factor` pixels on each side.

    A PIL image is always pixels: an RGBA or CMYK one would otherwise be taken as a 4-channel latent, and an L, I;16 or
    P one fail inside a convolution.

    Raises:
        TypeError: not an image. ValueError: NaN or infinite values; a side that rounds down to 0 at the VAE factor.
    """
    images = image if isinstance(image, list) else [image]
    for k, one in enumerate(images):
        label = name if not isinstance(image, list) else f"{name}[{k}]"
        height, width = image_hw(one, label)
        if height // factor == 0 or width // factor == 0:
            raise ValueError(
                f"{label} is {height}x{width} (height x width); rounded down to a multiple of the VAE scale factor "
                f"{factor} that is {height // factor * factor}x{width // factor * factor}, no pixels. Give an image "
                f"at least {factor} px on each side."
            )
        check_finite(label, one)
    converted = [convert_mode(one, mode) if isinstance(one, PIL.Image.Image) else one for one in images]
    return converted if isinstance(image, list) else converted[0]


def check_strength(strength, num_inference_steps: int | None = None) -> None:
    """strength in [0, 1] (the fraction of the schedule re-run), leaving at least one step to run."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength={strength!r} must be a number in [0, 1]: 0 keeps the image, 1 replaces it entirely."
        )
    if num_inference_steps is not None and int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step "
            f"(int({num_inference_steps} * {strength}) = 0); raise strength or num_inference_steps."
        )


def check_mask_fits(image, mask_image) -> None:
    """The mask covers the image pixel for pixel."""
    image_size, mask_size = image_hw(image), image_hw(mask_image, "mask_image")
    if image_size != mask_size:
        raise ValueError(
            f"mask_image is {mask_size[0]}x{mask_size[1]} (height x width) but image is "
            f"{image_size[0]}x{image_size[1]}; resize the mask to the image's size."
        )


# What a ControlNet copies from the UNet it controls: its residuals fit the UNet's blocks only where these agree.
_ENCODER_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim")


def _encoder_shape(config) -> dict:
    """The config's `_ENCODER_KEYS`, lists as tuples (a loaded config holds lists where a built one has tuples)."""
    return {
        key: tuple(config[key]) if isinstance(config[key], list) else config[key] for key in _ENCODER_KEYS
    }


def check_controlnet_fits(controlnet, unet, factor: int) -> None:
    """Each ControlNet copies the UNet's encoder (block widths, layers, text width) and maps a control image onto
    the latent grid: its conditioning embedding downsamples by the VAE's scale factor `factor`."""
    if controlnet is None or unet is None:
        return
    for k, net in enumerate(getattr(controlnet, "nets", [controlnet])):
        ours, theirs = _encoder_shape(net.config), _encoder_shape(unet.config)
        if ours != theirs:
            raise ValueError(
                f"ControlNet {k} has {ours} but the UNet has {theirs}; its residuals would not fit the UNet's "
                "blocks. Use a ControlNet trained for this UNet (ControlNetModel.from_unet(unet) builds one)."
            )
        channels = net.config.conditioning_embedding_out_channels
        down = 2 ** (len(channels) - 1)
        if down != factor:
            raise ValueError(
                f"ControlNet {k} downsamples control images {down}x (conditioning_embedding_out_channels="
                f"{tuple(channels)}) but the VAE {factor}x, so its residuals would not fit the latents; use a "
                f"ControlNet whose conditioning_embedding_out_channels has {int(math.log2(factor)) + 1} entries."
            )


def image_count(image) -> int:
    """How many images `image` holds: 1 for a PIL image, an (H, W[, C]) array or a (C, H, W) tensor; else its
    batch (a list's length, a 4-D array's or tensor's first dimension)."""
    if isinstance(image, list):
        return len(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image.shape[0]
    return 1


def image_channels(image) -> int | None:
    """Channels of an array (..., H, W, C) / (H, W) or a tensor (..., C, H, W); None for PIL images."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, np.ndarray):
        return first.shape[-1] if first.ndim >= 3 else 1
    if isinstance(first, torch.Tensor):
        return first.shape[-3] if first.ndim >= 3 else 1
    return None


def check_control_images(image, num_nets: int, batch_size: int, channels: int, name: str = "image") -> list:
    """One control image input per ControlNet, each of one image or one per prompt, with finite pixel values.
    `name` is the argument's, for the messages.

    Returns the inputs as a list with one entry per ControlNet: `[image]` for one ControlNet, `image` for several
    (a list with one list of per-ControlNet images per prompt is transposed, as diffusers does).

    Raises:
        TypeError: an input is not an image, or several ControlNets do not get a list.
        ValueError: the wrong number of inputs, batch or channels; NaN or infinite values.
    """
    if num_nets == 1:
        inputs = [image]
    elif not isinstance(image, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of {num_nets} control images, one per ControlNet; got {type(image).__name__}."
        )
    elif image and all(isinstance(per_prompt, (list, tuple)) for per_prompt in image):
        if any(len(per_prompt) != num_nets for per_prompt in image):
            raise ValueError(
                f"{name} is a list of lists, one per prompt, so each must hold one control image per ControlNet "
                f"({num_nets}); got lengths {[len(per_prompt) for per_prompt in image]}."
            )
        inputs = [list(per_net) for per_net in zip(*image, strict=True)]
    else:
        inputs = list(image)
    if len(inputs) != num_nets:
        raise ValueError(
            f"{name} has {len(inputs)} control images for {num_nets} ControlNets; pass exactly one per ControlNet."
        )
    for k, control in enumerate(inputs):
        label = name if num_nets == 1 else f"{name}[{k}]"
        image_hw(control, label)
        count = image_count(control)
        if count not in (1, batch_size):
            raise ValueError(
                f"{label} holds {count} control images for {batch_size} prompts; pass one (used for every prompt) "
                f"or exactly {batch_size}, one per prompt."
            )
        found = image_channels(control)
        if found is not None and found != channels:
            raise ValueError(
                f"{label} has {found} channels but the ControlNet takes {channels}-channel control images; pass an "
                f"RGB image, an (H, W, {channels}) array or a ({channels}, H, W) tensor in [0, 1]."
            )
        arrays = [
            p
            for p in (control if isinstance(control, list) else [control])
            if not isinstance(p, PIL.Image.Image)
        ]
        if any(not torch.isfinite(torch.as_tensor(p)).all() for p in arrays):
            raise ValueError(
                f"{label} has NaN or infinite values; a control image holds pixel values in [0, 1]."
            )
    return inputs


def check_control_scale(scale, num_nets: int) -> list[float]:
    """controlnet_conditioning_scale is a finite number for every ControlNet, or a list of one per ControlNet;
    returns one per ControlNet."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * num_nets
    if any(not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) for s in scales):
        raise ValueError(
            f"controlnet_conditioning_scale={scale!r} must be a finite number (1.0 adds the ControlNet's residuals "
            "as trained, 0 switches it off), or a list with one per ControlNet."
        )
    if len(scales) != num_nets:
        raise ValueError(
            f"controlnet_conditioning_scale={scale!r} has {len(scales)} entries for {num_nets} ControlNets; give "
            "one number per ControlNet, or a single number for all of them."
        )
    return [float(s) for s in scales]


def check_control_window(start, end, num_nets: int) -> tuple[list[float], list[float]]:
    """control_guidance_start < control_guidance_end, fractions of the schedule in [0, 1], one pair per ControlNet
    (a single number serves every ControlNet); returns them as two lists."""
    windows = {}
    for name, value in (("control_guidance_start", start), ("control_guidance_end", end)):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * num_nets
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(
                f"{name}={value!r} must be a fraction of the schedule in [0, 1] (0.0 starts at the first step, 1.0 "
                "ends at the last), or a list with one per ControlNet."
            )
        if len(values) != num_nets:
            raise ValueError(
                f"{name}={value!r} has {len(values)} entries for {num_nets} ControlNets; give one per ControlNet, "
                "or a single number for all of them."
            )
        windows[name] = values
    starts, ends = windows["control_guidance_start"], windows["control_guidance_end"]
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            raise ValueError(
                f"control_guidance_start={s} must be below control_guidance_end={e}: the ControlNet acts from the "
                "start to the end fraction of the schedule (0.0 and 1.0 for every step)."
            )
    return starts, ends
