"""`ldm-generate`: sample images from a saved pipeline folder or Hub repository."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.checks import check_count, check_guidance, check_image_size
from ldm.images import image_grid
from ldm.pipeline import LatentPipeline
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
        "--scheduler", choices=sorted(SCHEDULERS), default="ddim", help="Sampler (default ddim)."
    )
    parser.add_argument("--out", default="out.png", help="PNG path: one image, or a grid of all of them.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LatentPipeline:
    """Check the flags, then load the pipeline; a problem exits 2 with one line that names the flag."""
    try:
        check_count("--steps", args.steps, example=50)
        check_count("--num", args.num, example=1)
        check_guidance(args.guidance, name="--guidance")
    except ValueError as err:
        parser.error(str(err))
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
    return pipe


def main(argv: list[str] | None = None) -> None:
    """Load the pipeline, generate, and write one PNG (a grid with one row per prompt when several images)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pipe = load_checked(parser, args)
    pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
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
        height=args.height,
        width=args.width,
        generator=generators,
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if total == 1 else image_grid(images, cols=args.num)).save(out)
    print(f"wrote {out} ({total} image{'s' if total > 1 else ''})")


if __name__ == "__main__":
    main()
