"""How faithfully a shapes VAE keeps the palette's colours, and where the detector splits neighbouring colours.

    python -m ldm.shapes.color_fidelity --vae outputs/lora-demo/vae [--resolution 64] [--num_images 12]

Two of the three places a colour can go wrong between a prompt and the detector's reading (the third, what the
diffusion model draws, is the ``drawn@`` columns of ``train/evaluate.py``'s ``adherence_by_color.txt``):

- the VAE's round trip: solid patches of each palette colour (a square over the middle half of the image) and the
  generator's own shapes, encoded (the posterior's mean) and decoded; the colour that comes back against the palette's, and how far
  apart the encoder puts each colour's patch latents (in the scaled latent space the UNet works in);
- the detector: for each colour, the nearest other one and how far along the line between them the reading flips.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ldm.shapes.detector import color_boundary, detect, drawn_color
from ldm.shapes.synthetic import BACKGROUND, COLORS, POSITIONS, SHAPES, render


@torch.no_grad()
def _round_trip(vae: AutoencoderKL, images: list[Image.Image]) -> tuple[list[Image.Image], torch.Tensor]:
    """The images decoded from their posterior means, and those means scaled as the UNet sees them (N, C, h, w)."""
    processor = VaeImageProcessor(vae_scale_factor=1)
    pixels = processor.preprocess(images).to(dtype=vae.dtype)  # (N, 3, H, W) in [-1, 1]
    latents = vae.encode(pixels).latent_dist.mean
    decoded = processor.postprocess(vae.decode(latents).sample, output_type="pil")
    return decoded, latents * vae.config.scaling_factor


def vae_color_fidelity(vae: AutoencoderKL, resolution: int = 64, num_images: int = 12, seed: int = 0) -> dict:
    """Per palette colour: the RGB a solid patch and the generator's shapes come back as, and the detector's reading.

    Returns:
        ``{"patches": {color: {"rgb": [r, g, b], "error": float}}, "shapes": {color: {"rgb", "error", "read_right"}},
        "latent_distance": {(a, b): float}}``; errors are RGB distances (0-255 units) from the palette colour,
        ``read_right`` the fraction of shapes whose decoded colour the detector reads as asked, and
        ``latent_distance`` the RMS difference of two colours' patch latents (scaled by the VAE's scaling factor).
    """
    names = list(COLORS)
    # A solid square over the middle half of the image on the background, as large as the generator's largest shape
    # and larger; the colour is read off its central quarter, away from the soft edge.
    patches = []
    for name in names:
        patch = Image.new("RGB", (resolution, resolution), BACKGROUND)
        patch.paste(
            COLORS[name], (resolution // 4, resolution // 4, 3 * resolution // 4, 3 * resolution // 4)
        )
        patches.append(patch)
    decoded, latents = _round_trip(vae, patches)
    lo, hi = 3 * resolution // 8, 5 * resolution // 8
    report: dict = {"patches": {}, "shapes": {}, "latent_distance": {}}
    for name, image in zip(names, decoded, strict=True):
        rgb = np.asarray(image, dtype=np.float64)[lo:hi, lo:hi].reshape(-1, 3).mean(axis=0)
        report["patches"][name] = {"rgb": rgb.round(1).tolist(), "error": _distance(rgb, COLORS[name])}
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        report["latent_distance"][(a, b)] = float((latents[i] - latents[j]).pow(2).mean().sqrt())

    rng = np.random.default_rng(seed)
    combos = list(itertools.product(SHAPES, POSITIONS))
    for name in names:
        picks = [
            combos[k] for k in rng.choice(len(combos), size=num_images, replace=num_images > len(combos))
        ]
        shapes = [render(shape, name, position, resolution, rng) for shape, position in picks]
        decoded, _ = _round_trip(vae, shapes)
        drawn = [drawn_color(image) for image in decoded]
        found = [rgb for rgb in drawn if rgb is not None]
        rgb = np.median(found, axis=0) if found else None
        report["shapes"][name] = {
            "rgb": None if rgb is None else rgb.round(1).tolist(),
            "error": None if rgb is None else _distance(rgb, COLORS[name]),
            "read_right": sum(detect(image)["color"] == name for image in decoded) / len(decoded),
        }
    return report


def detector_margins() -> dict[str, dict]:
    """Per palette colour: its nearest other colour (RGB distance) and where the detector's reading flips between them."""
    margins = {}
    for name, rgb in COLORS.items():
        nearest = min(
            (other for other in COLORS if other != name), key=lambda other: _distance(rgb, COLORS[other])
        )
        margins[name] = {
            "nearest": nearest,
            "distance": _distance(rgb, COLORS[nearest]),
            "flips_at": color_boundary(name, nearest),
        }
    return margins


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def format_report(fidelity: dict, margins: dict) -> str:
    """The two measurements as plain-text tables."""
    lines = [
        f"{'colour':>8}{'palette':>14}{'patch back':>20}{'err':>6}{'shapes back':>20}{'err':>6}{'read right':>12}"
        f"{'nearest':>9}{'flips at':>10}{'latent gap':>12}",
    ]
    lines.append("-" * len(lines[0]))
    for name, rgb in COLORS.items():
        patch, shape, margin = fidelity["patches"][name], fidelity["shapes"][name], margins[name]
        pair = tuple(sorted((name, margin["nearest"]), key=list(COLORS).index))
        shape_rgb = "-" if shape["rgb"] is None else ",".join(f"{v:.0f}" for v in shape["rgb"])
        shape_err = "-" if shape["error"] is None else f"{shape['error']:.0f}"
        lines.append(
            f"{name:>8}{','.join(str(v) for v in rgb):>14}{','.join(f'{v:.0f}' for v in patch['rgb']):>20}"
            f"{patch['error']:>6.0f}{shape_rgb:>20}{shape_err:>6}{100 * shape['read_right']:>11.0f}%"
            f"{margin['nearest']:>9}{margin['flips_at']:>10.2f}{fidelity['latent_distance'][pair]:>12.3f}"
        )
    closest = min(fidelity["latent_distance"].items(), key=lambda item: item[1])
    lines.append(
        f"background {BACKGROUND}; 'flips at': the fraction of the way to the nearest colour where the detector's "
        f"reading changes; 'latent gap': RMS distance of the two patches' scaled latents. Closest latents: "
        f"{closest[0][0]}-{closest[0][1]} ({closest[1]:.3f})."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Colour fidelity of a shapes VAE and the detector's colour margins."
    )
    parser.add_argument("--vae", required=True, help="An AutoencoderKL folder (train_vae.py's output).")
    parser.add_argument("--resolution", type=int, default=64, help="Image side (default 64, the demos').")
    parser.add_argument(
        "--num_images", type=int, default=12, help="Generator shapes per colour (default 12)."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the shapes' sizes and places (default 0)."
    )
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}.")
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval()
    fidelity = vae_color_fidelity(vae, args.resolution, args.num_images, args.seed)
    margins = detector_margins()
    print(format_report(fidelity, margins))
    return {"fidelity": fidelity, "margins": margins}


if __name__ == "__main__":
    main()
