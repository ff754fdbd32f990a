"""`ldm-generate`: sample images from a saved pipeline folder or Hub repository."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.images import image_grid
from ldm.pipeline import LatentPipeline
from ldm.schedulers import SCHEDULERS, scheduler_from_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ldm-generate."""
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the pipeline, generate, and write one PNG (a grid with one row per prompt when several images)."""
    args = parse_args(argv)
    pipe = LatentPipeline.from_pretrained(args.model)
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
