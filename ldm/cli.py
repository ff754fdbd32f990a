"""`ldm-generate`: sample images from a saved pipeline folder or Hub repository.

Text-to-image by default; `--image` turns it into img2img, `--image` with `--mask` into inpainting, and `--lora`
loads a LoRA (diffusers or kohya format) first. `--controlnet` with `--control_image` adds a ControlNet to any of
the three (`--canny` first turns the control image into its Canny edge map). `--upscaler` runs a x4 upscaler on
what any of them draws, with the same prompts (a cascade). `--tiny_vae` decodes with a tiny autoencoder distilled
from the model's VAE.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderTiny, ControlNetModel

from ldm.checks import check_count, check_guidance, check_image_size, check_mask_fits, check_strength
from ldm.control import canny_edges, import_cv2
from ldm.encoding import vae_scale_factor
from ldm.images import image_grid
from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.pipelines.controlnet_img2img import LatentControlNetImg2ImgPipeline
from ldm.pipelines.controlnet_inpaint import LatentControlNetInpaintPipeline
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.inpaint import LatentInpaintPipeline
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.pipelines.upscale import Cascade, LatentUpscalePipeline, check_back_projection
from ldm.schedulers import SCHEDULERS, scheduler_from_name


def build_parser() -> argparse.ArgumentParser:
    """The command line of ldm-generate."""
    parser = argparse.ArgumentParser(prog="ldm-generate", description="Generate images from text prompts.")
    parser.add_argument("prompts", nargs="+", help="One or more prompts.")
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub repository id.")
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps (default 50).")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="Classifier-free guidance scale (default 7.5)."
    )
    parser.add_argument("--negative", default=None, help="Negative prompt, applied to every prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; image k of the run uses seed + k.")
    parser.add_argument("--num", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--height", type=int, default=None, help="Pixels; default from the model.")
    parser.add_argument("--width", type=int, default=None, help="Pixels; default from the model.")
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="Sampler (default ddim; lcm for a consistency-distilled model, whose UNet takes a guidance embedding: "
        "use --steps 1 to 8 there).",
    )
    parser.add_argument("--image", default=None, help="Start from this image (img2img; its size is kept).")
    parser.add_argument("--mask", default=None, help="With --image: repaint where this mask is white.")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="With --image: 0 keeps it, 1 replaces it (default 0.8, 1.0 with --mask).",
    )
    parser.add_argument(
        "--lora", default=None, help="A LoRA folder or .safetensors file (diffusers or kohya keys)."
    )
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="How strongly the LoRA applies (default 1)."
    )
    parser.add_argument(
        "--tiny_vae",
        default=None,
        help="An AutoencoderTiny folder distilled from the model's VAE (train_tiny_vae.py): decode (and encode an "
        "--image) with it, in a fraction of the VAE's time.",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        help="A ControlNetModel folder (safetensors) to steer with --control_image.",
    )
    parser.add_argument(
        "--control_image",
        default=None,
        help="With --controlnet: the control image (edges, depth, pose); without --image it sets the output size.",
    )
    parser.add_argument(
        "--control_scale",
        type=float,
        default=None,
        help="With --controlnet: its residuals' scale (default 1).",
    )
    parser.add_argument(
        "--canny",
        action="store_true",
        help='With --control_image: use its Canny edge map (needs OpenCV: pip install "ldm[canny]").',
    )
    parser.add_argument(
        "--upscaler",
        default=None,
        help="A x4 upscaler pipeline folder or Hub id (train_upscaler.py, or Stable Diffusion's): upscale every "
        "image with its prompt.",
    )
    parser.add_argument(
        "--noise_level", type=int, default=20, help="With --upscaler: noise added to its input (default 20)."
    )
    parser.add_argument(
        "--upscale_steps", type=int, default=25, help="With --upscaler: its denoising steps (default 25)."
    )
    parser.add_argument(
        "--upscale_guidance",
        type=float,
        default=9.0,
        help="With --upscaler: its classifier-free guidance scale (default 9, diffusers' upscaler's).",
    )
    parser.add_argument(
        "--back_projection_steps",
        type=int,
        default=0,
        help="With --upscaler: rounds of back-projection onto its input (default 0, as diffusers; 2 makes the "
        "output downsample back to the input).",
    )
    parser.add_argument(
        "--out",
        default="out.png",
        help="Image path (.png, .jpg, .webp): one image, or a grid of all of them.",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace --out if it exists (refused otherwise)."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def open_image(
    parser: argparse.ArgumentParser, flag: str, path: str | None, mode: str
) -> PIL.Image.Image | None:
    """The image at `path` converted to `mode`, or exit 2 naming the flag."""
    if path is None:
        return None
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError) as err:
        parser.error(f"{flag} {path}: not a readable image ({err}).")


def check_out(parser: argparse.ArgumentParser, out: str, overwrite: bool) -> None:
    """--out is a format PIL writes, and not an existing file unless --overwrite: checked before any model loads."""
    path = Path(out)
    PIL.Image.init()
    writable = sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.SAVE)
    if path.suffix.lower() not in writable:
        parser.error(
            f"--out {out}: {path.suffix or 'no extension'} is not an image format; use .png (or .jpg, .webp)."
        )
    if path.is_dir():
        parser.error(f"--out {out} is a folder; give a file name such as {path / 'out.png'}.")
    if path.exists() and not overwrite:
        parser.error(f"--out {out} exists; pass --overwrite to replace it, or choose another name.")


def check_image_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags that only make sense together, and their values."""
    if args.image is None:
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                parser.error(f"{flag} needs --image (the picture to start from or repaint).")
    elif args.mask is None and (args.height is not None or args.width is not None):
        parser.error("--height/--width do not apply with --image alone: the image's size is kept; resize it.")
    if args.strength is not None:
        check_strength(args.strength)
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora_scale={args.lora_scale} must be a finite number (1 = as trained).")
    if args.lora is not None and not Path(args.lora).exists():
        raise ValueError(f"--lora {args.lora}: no such file or folder.")


def check_control_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--controlnet and --control_image go together; --control_scale and --canny need them."""
    if args.controlnet is not None and args.control_image is None:
        parser.error("--controlnet needs --control_image (the image the ControlNet reads).")
    if args.control_image is not None and args.controlnet is None:
        parser.error("--control_image needs --controlnet (the ControlNet that reads it).")
    if args.controlnet is None:
        for flag, used in (("--control_scale", args.control_scale is not None), ("--canny", args.canny)):
            if used:
                parser.error(f"{flag} needs --controlnet and --control_image.")
        return
    if not Path(args.controlnet).is_dir():
        raise ValueError(f"--controlnet {args.controlnet}: no such folder (a saved ControlNetModel).")
    if not Path(args.control_image).is_file():
        raise ValueError(f"--control_image {args.control_image}: no such file.")
    if args.control_scale is not None and not math.isfinite(args.control_scale):
        raise ValueError(f"--control_scale={args.control_scale} must be a finite number (1 = as trained).")
    if args.canny:
        try:
            import_cv2()
        except ImportError as err:
            parser.error(f"--canny: {err}")


def load_checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LatentPipeline:
    """Check the flags, then load the pipeline (and LoRA); a problem exits 2 with one line that names the flag."""
    check_out(parser, args.out, args.overwrite)
    try:
        check_count("--steps", args.steps, example=50)
        check_count("--num", args.num, example=1)
        check_guidance(args.guidance, name="--guidance")
        check_image_flags(parser, args)
        check_control_flags(parser, args)
        check_count("--upscale_steps", args.upscale_steps, example=25)
        check_guidance(args.upscale_guidance, name="--upscale_guidance")
        check_back_projection(args.back_projection_steps, "pil")
    except ValueError as err:
        flags = str(err).replace("strength=", "--strength=")
        parser.error(flags.replace("back_projection_steps=", "--back_projection_steps="))
    try:
        pipe = LatentPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: {str(err).strip().splitlines()[0]}")
    try:
        for flag, size in (("--height", args.height), ("--width", args.width)):
            if size is not None:
                check_image_size(flag, size, pipe.vae_scale_factor)
    except ValueError as err:
        parser.error(str(err))
    if args.lora is not None:
        try:
            pipe.load_lora_weights(args.lora)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--lora {args.lora}: {str(err).strip().splitlines()[0]}")
    if args.tiny_vae is not None:
        pipe.vae = load_tiny_vae(parser, args.tiny_vae, pipe)
    return pipe


def load_tiny_vae(parser: argparse.ArgumentParser, path: str, pipe: LatentPipeline) -> AutoencoderTiny:
    """The --tiny_vae folder, which must read the model's latents: the VAE's factor and latent channels."""
    try:
        tiny = AutoencoderTiny.from_pretrained(path)
    except (OSError, ValueError) as err:
        parser.error(f"--tiny_vae {path}: {str(err).strip().splitlines()[0]}")
    factor, channels = vae_scale_factor(tiny.config), tiny.config.latent_channels
    if (factor, channels) != (pipe.vae_scale_factor, pipe.vae.config.latent_channels):
        parser.error(
            f"--tiny_vae {path}: it reads {channels}-channel latents {factor}x smaller than the image, the model's "
            f"VAE {pipe.vae.config.latent_channels}-channel ones {pipe.vae_scale_factor}x smaller; distil one from "
            f"this model's VAE with train/train_tiny_vae.py."
        )
    return tiny


def image_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, pipe: LatentPipeline):
    """The pipeline for the mode the flags ask for, and its image arguments."""
    image, mask = (
        open_image(parser, "--image", args.image, "RGB"),
        open_image(parser, "--mask", args.mask, "L"),
    )
    if image is None:
        return pipe, {"height": args.height, "width": args.width}
    if mask is None:
        return LatentImg2ImgPipeline.from_pipe(pipe), {"image": image, "strength": args.strength or 0.8}
    try:
        check_mask_fits(image, mask)
    except ValueError as err:
        parser.error(f"--mask {args.mask}: {err}")
    strength = 1.0 if args.strength is None else args.strength
    sizes = {"height": args.height or image.height, "width": args.width or image.width}
    return LatentInpaintPipeline.from_pipe(pipe), {
        "image": image,
        "mask_image": mask,
        "strength": strength,
        **sizes,
    }


# The ControlNet pipeline of each mode; its control image argument is "image" for text-to-image (diffusers' names).
CONTROLNET_PIPELINES = {
    LatentPipeline: (LatentControlNetPipeline, "image"),
    LatentImg2ImgPipeline: (LatentControlNetImg2ImgPipeline, "control_image"),
    LatentInpaintPipeline: (LatentControlNetInpaintPipeline, "control_image"),
}


def control_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, pipe: LatentPipeline):
    """With --controlnet: the mode's ControlNet pipeline sharing `pipe`'s modules, and its control arguments."""
    if args.controlnet is None:
        return pipe, {}
    control = open_image(parser, "--control_image", args.control_image, "RGB")
    if args.canny:
        control = canny_edges(control)
    try:
        controlnet = ControlNetModel.from_pretrained(args.controlnet, use_safetensors=True)
        cls, image_argument = CONTROLNET_PIPELINES[type(pipe)]
        pipe = cls.from_pipe(pipe, controlnet=controlnet)
    except (OSError, ValueError) as err:
        parser.error(f"--controlnet {args.controlnet}: {str(err).strip().splitlines()[0]}")
    scale = 1.0 if args.control_scale is None else args.control_scale
    return pipe, {image_argument: control, "controlnet_conditioning_scale": scale}


def upscaled(parser: argparse.ArgumentParser, args: argparse.Namespace, pipe: LatentPipeline):
    """With --upscaler: a cascade of `pipe` and the upscaler (its noise level checked against the upscaler's
    maximum); else `pipe`."""
    if args.upscaler is None:
        return pipe
    try:
        upscaler = LatentUpscalePipeline.from_pretrained(args.upscaler)
    except (OSError, ValueError) as err:
        parser.error(f"--upscaler {args.upscaler}: {str(err).strip().splitlines()[0]}")
    try:
        return Cascade(
            pipe,
            upscaler,
            args.noise_level,
            args.upscale_steps,
            args.upscale_guidance,
            args.back_projection_steps,
        )
    except ValueError as err:
        parser.error(str(err).replace("noise_level=", "--noise_level="))


def main(argv: list[str] | None = None) -> None:
    """Load the pipeline, generate, and write one PNG (a grid with one row per prompt when several images)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pipe = load_checked(parser, args)
    distilled = pipe.unet.config.time_cond_proj_dim is not None  # train_lcm.py's LCMs (and diffusers' own)
    scheduler = args.scheduler or ("lcm" if distilled else "ddim")
    pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    pipe, image_kwargs = image_inputs(parser, args, pipe)
    pipe, control_kwargs = control_inputs(parser, args, pipe)
    pipe = upscaled(parser, args, pipe)
    pipe.to(args.device)
    total = len(args.prompts) * args.num
    # One generator per image, so an image does not change when more prompts or images are asked for.
    generators = [torch.Generator(args.device).manual_seed(args.seed + k) for k in range(total)]
    negative = None if args.negative is None else [args.negative] * len(args.prompts)
    images = pipe(
        args.prompts,
        negative_prompt=negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num,
        generator=generators,
        cross_attention_kwargs=None if args.lora is None else {"scale": args.lora_scale},
        **image_kwargs,
        **control_kwargs,
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if total == 1 else image_grid(images, cols=args.num)).save(out)
    print(f"wrote {out} ({total} image{'s' if total > 1 else ''})")


if __name__ == "__main__":
    main()
