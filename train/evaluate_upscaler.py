"""How well a x4 upscaler restores held-out images, and what it does to a base model's samples in a cascade.

    python train/evaluate_upscaler.py --upscaler outputs/demo/upscale/upscaler --base outputs/demo/ldm \
        --prompts outputs/demo/data/heldout_prompts.jsonl --out_dir outputs/demo/upscale/eval

1. Held-out images: each held-out composition drawn once per seed at the upscaler's resolution (the true image x),
   downsampled 4x with the training filter and saved as 8-bit pixels (the input y), then enlarged by bicubic
   interpolation and by the upscaler. Against x: PSNR, and edge sharpness (the mean gradient magnitude of the
   enlarged image over x's edge pixels, as a fraction of x's own: 1 is as sharp as the truth, bicubic blurs below
   it). Consistency: the enlarged image downsampled back with the same filter, against y (PSNR). The upscaler is
   measured as diffusers' pipeline decodes, and with --back_projection_steps rounds of back-projection onto y (the
   same sample: `back_project` of the pipeline, which `back_projection_steps` runs, on its decoded pixels).
2. Cascade (with --base): the base model's samples of the held-out prompts (guidance 7.5, 25 steps, the demo's
   setting) read by the detector at their own size, then upscaled (with the back-projection) and read again at 4x
   that size.

Writes out_dir/upscale.json (settings, per-image and mean metrics, both accuracies), upscale.txt (the table, also
printed) and grid.png (rows of low-res | bicubic | upscaled | back-projected | target for the first prompts at the
first seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ldm.images import image_grid
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.pipelines.upscale import Cascade, LatentUpscalePipeline, back_project, downsample
from ldm.seeding import keyed_generator
from ldm.shapes.adherence import evaluate_adherence, load_heldout_prompts
from ldm.shapes.synthetic import render
from ldm.training.upscaler import to_pil

GRID_PROMPTS = 6
# An edge pixel of the true image: its gradient magnitude is at least this fraction of the image's largest.
EDGE_THRESHOLD = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of train/evaluate_upscaler.py."""
    parser = argparse.ArgumentParser(description="A x4 upscaler on held-out images and in a cascade.")
    parser.add_argument("--upscaler", required=True, help="The upscaler pipeline folder (train_upscaler.py).")
    parser.add_argument("--base", default=None, help="A text-to-image pipeline folder to cascade (optional).")
    parser.add_argument("--prompts", required=True, help="heldout_prompts.jsonl of the shapes dataset.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds (default 0 1).")
    parser.add_argument(
        "--noise_level", type=int, default=20, help="The upscaler's noise level (default 20)."
    )
    parser.add_argument("--steps", type=int, default=25, help="The upscaler's DDIM steps (default 25).")
    parser.add_argument(
        "--guidance_scale", type=float, default=1.0, help="The upscaler's (default 1: no CFG)."
    )
    parser.add_argument(
        "--base_guidance_scale", type=float, default=7.5, help="The base model's (default 7.5)."
    )
    parser.add_argument(
        "--base_steps", type=int, default=25, help="The base model's DDIM steps (default 25)."
    )
    parser.add_argument(
        "--back_projection_steps",
        type=int,
        default=2,
        help="Rounds of back-projection for the second upscaler row and the cascade (default 2).",
    )
    parser.add_argument("--batch_size", type=int, default=10, help="Images per pipeline call (default 10).")
    parser.add_argument("--out_dir", required=True, help="Folder for upscale.json/.txt and grid.png.")
    return parser.parse_args(argv)


def as_array(image: PIL.Image.Image) -> np.ndarray:
    """An RGB image as floats in [0, 1], (H, W, 3)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two [0, 1] images."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the luminance of an (H, W, 3) image: (H - 2, W - 2)."""
    y = image @ np.array([0.299, 0.587, 0.114])
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    return np.hypot(gx, gy)


def edge_sharpness(image: np.ndarray, truth: np.ndarray) -> float:
    """Mean gradient magnitude of `image` over the true image's edge pixels, as a fraction of the truth's."""
    true_gradient = gradient_magnitude(truth)
    edges = true_gradient >= EDGE_THRESHOLD * true_gradient.max()
    return float(gradient_magnitude(image)[edges].mean() / true_gradient[edges].mean())


def downsampled(image: PIL.Image.Image, factor: int) -> PIL.Image.Image:
    """`image` downsampled with the training filter, as 8-bit pixels."""
    pixels = torch.from_numpy(as_array(image)).permute(2, 0, 1)[None].float() * 2 - 1
    return to_pil(downsample(pixels, factor))[0]


def heldout_images(prompts: list[dict], seeds: list[int], resolution: int) -> list[tuple]:
    """(prompt index, row, seed, image): each held-out composition drawn once per seed at `resolution`, its jitter
    keyed by (seed, prompt index)."""
    return [
        (
            i,
            row,
            seed,
            render(row["shape"], row["color"], row["position"], resolution, np.random.default_rng([seed, i])),
        )
        for seed in seeds
        for i, row in enumerate(prompts)
    ]


def restore_heldout(upscaler: LatentUpscalePipeline, prompts, args) -> tuple[dict, list]:
    """Part 1: bicubic and the upscaler on the held-out images; per-method means and the grid's cells."""
    factor = upscaler.vae_scale_factor
    resolution = upscaler.unet.config.sample_size * factor
    samples = heldout_images(prompts, args.seeds, resolution)
    projected = f"+ {args.back_projection_steps} BP"
    scores = {"bicubic": [], "upscaler": [], projected: []}
    cells, seconds = [], 0.0
    for start in range(0, len(samples), args.batch_size):
        batch = samples[start : start + args.batch_size]
        low = [downsampled(truth, factor) for *_, truth in batch]
        began = time.perf_counter()
        decoded = upscaler(
            [row["prompt"] for _, row, _, _ in batch], image=low, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, noise_level=args.noise_level,
            generator=[keyed_generator(seed, i) for i, _, seed, _ in batch], output_type="pt",
        ).images * 2 - 1  # fmt: skip
        seconds += time.perf_counter() - began
        low_pixels = upscaler.image_processor.preprocess(low)
        upscaled = upscaler.image_processor.postprocess(decoded, output_type="pil")
        corrected = upscaler.image_processor.postprocess(
            back_project(decoded, low_pixels, args.back_projection_steps), output_type="pil"
        )
        for (_, row, seed, truth), small, big, fixed in zip(batch, low, upscaled, corrected, strict=True):
            bicubic = small.resize(truth.size, PIL.Image.Resampling.BICUBIC)
            for method, image in (("bicubic", bicubic), ("upscaler", big), (projected, fixed)):
                scores[method].append({
                    "prompt": row["prompt"],
                    "seed": seed,
                    "psnr": psnr(as_array(image), as_array(truth)),
                    "edge_sharpness": edge_sharpness(as_array(image), as_array(truth)),
                    "consistency": psnr(as_array(downsampled(image, factor)), as_array(small)),
                })  # fmt: skip
            if seed == args.seeds[0] and len(cells) < 5 * GRID_PROMPTS:
                cells += [small.resize(truth.size, PIL.Image.Resampling.NEAREST), bicubic, big, fixed, truth]
    means = {
        method: {
            key: float(np.mean([r[key] for r in rows])) for key in ("psnr", "edge_sharpness", "consistency")
        }
        for method, rows in scores.items()
    }
    means["upscaler"]["seconds_per_image"] = seconds / len(samples)
    return {"resolution": resolution, "num_images": len(samples), "means": means, "images": scores}, cells


def cascade_accuracy(base: LatentPipeline, upscaler: LatentUpscalePipeline, prompts, args) -> dict:
    """Part 2: all-attribute accuracy of the base model's samples, and of the same samples upscaled."""
    cascade = Cascade(
        base, upscaler, args.noise_level, args.steps, args.guidance_scale, args.back_projection_steps
    )
    # Attributes only: a ControlNet's masks and outlines (the demo writes them) are at the base model's size.
    prompts = [{k: v for k, v in row.items() if k not in ("mask", "conditioning_image")} for row in prompts]
    accuracy = {}
    for name, pipe in (("base", base), ("cascade", cascade)):
        results = evaluate_adherence(
            pipe, prompts, guidance_scales=[args.base_guidance_scale], seeds=args.seeds,
            num_inference_steps=args.base_steps, batch_size=args.batch_size,
        )  # fmt: skip
        accuracy[name] = results["scales"][args.base_guidance_scale]["accuracy"]
    return accuracy


def format_table(restored: dict, accuracy: dict | None, args) -> str:
    """The README's table."""
    low = restored["resolution"] // 4
    lines = [
        f"Held-out images ({restored['num_images']}: {restored['num_images'] // len(args.seeds)} compositions x "
        f"{len(args.seeds)} seeds), {low} px -> {restored['resolution']} px; upscaler at noise level "
        f"{args.noise_level}, {args.steps} DDIM steps, guidance {args.guidance_scale:g}",
        "",
        "| method            | PSNR (dB) | edge sharpness | consistency (dB) |",
        "|-------------------|-----------|----------------|------------------|",
    ]
    for method, means in restored["means"].items():
        name = f"upscaler {method}" if method.startswith("+") else method
        lines.append(
            f"| {name:<17} | {means['psnr']:9.2f} | {means['edge_sharpness']:14.3f} | {means['consistency']:16.2f} |"
        )
    lines.append(
        f"\nUpscaler: {restored['means']['upscaler']['seconds_per_image']:.2f} s per image. BP: rounds of "
        "back-projection onto the input (the same samples)."
    )
    if accuracy is not None:
        lines += [
            "",
            f"Cascade: the base model at guidance {args.base_guidance_scale:g}, {args.base_steps} steps, then x4 "
            f"({args.back_projection_steps} BP); all-attribute accuracy read by the detector",
            "",
            "| images                | shape  | colour | position | all    |",
            "|-----------------------|--------|--------|----------|--------|",
        ]
        for name, label in (
            ("base", f"base, {low} px"),
            ("cascade", f"cascade, {restored['resolution']} px"),
        ):
            a = accuracy[name]
            lines.append(
                f"| {label:<21} | {a['shape']:6.1%} | {a['color']:6.1%} | {a['position']:8.1%} | {a['all']:6.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = load_heldout_prompts(args.prompts)
    upscaler = LatentUpscalePipeline.from_pretrained(args.upscaler)
    upscaler.set_progress_bar_config(disable=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    restored, cells = restore_heldout(upscaler, prompts, args)
    image_grid(cells, cols=5).save(out / "grid.png")
    accuracy = None
    if args.base is not None:
        accuracy = cascade_accuracy(LatentPipeline.from_pretrained(args.base), upscaler, prompts, args)
    table = format_table(restored, accuracy, args)
    (out / "upscale.txt").write_text(table)
    (out / "upscale.json").write_text(
        json.dumps({"settings": vars(args), **restored, "cascade_accuracy": accuracy}, indent=2) + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
