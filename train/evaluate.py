"""Measure how well a trained pipeline follows the held-out prompts of the shapes dataset, per guidance scale.

    python train/evaluate.py --model outputs/tiny --prompts data/shapes/heldout_prompts.jsonl --out_dir outputs/eval

Load the pipeline (DDIM sampler) -> generate every held-out prompt once per seed at each guidance scale, from the
same noise at every scale -> read shape, colour and position back with the detector -> write:

    out_dir/adherence.json   settings, best_guidance_scale, and per scale: accuracy, counts, per-image records
    out_dir/adherence.txt    the accuracy table (also printed)
    out_dir/adherence.png    the same as a plot: accuracy against guidance scale, one line per attribute
    out_dir/grid.png         the held-out prompts at the best guidance scale, first seed
    out_dir/grid_g1.png      the same prompts and noise at guidance 1 (no guidance), for contrast
    out_dir/adherence_by_color.txt   per asked-for colour: colour and all-three accuracy at each scale

`--lora` evaluates the pipeline with a LoRA loaded (a folder or .safetensors file train_ldm.py --lora_rank wrote).

Prompts from data written with `--conditioning edges` carry a fresh outline and its filled mask each: the table then
gains an `iou` column (mean IoU of the detected shape with the mask), the base model's baseline. `--controlnet DIR`
(a ControlNetModel folder) draws every prompt with its outline as the control image, through
LatentControlNetPipeline, at every guidance scale x `--control_scales` value x seed:

    python train/evaluate.py --model outputs/tiny --controlnet outputs/controlnet --control_scales 0.5 1 \
        --prompts data/shapes/heldout_prompts.jsonl --out_dir outputs/eval-controlnet

The table gains a `control` column, the grids show outline | sample side by side (grid_g1.png: guidance 1 at the
best control scale). `--guess_mode` empties the prompts, so the table shows shape, position and IoU only, and
adherence_by_color.txt is not written; diffusers suggests guidance 3-5 there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import ControlNetModel

from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.schedulers import scheduler_from_name
from ldm.shapes.adherence import (
    adherence_grid,
    best_guidance,
    evaluate_adherence,
    format_color_table,
    format_table,
    load_heldout_prompts,
    plot_adherence,
    results_to_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of train/evaluate.py."""
    parser = argparse.ArgumentParser(description="Prompt adherence of a pipeline on held-out shape prompts.")
    parser.add_argument("--model", required=True, help="Pipeline folder (save_pretrained layout).")
    parser.add_argument(
        "--prompts",
        required=True,
        nargs="+",
        help="heldout_prompts.jsonl files written by ldm.shapes.synthetic.",
    )
    parser.add_argument("--lora", default=None, help="A LoRA folder or file to load into the pipeline first.")
    parser.add_argument(
        "--guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 7.5], help="Scales (default 1 3 7.5)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (default 0 1 2).")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per image (default 25).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call (default 32).")
    parser.add_argument("--out_dir", required=True, help="Folder for adherence.json/.txt and the grids.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--controlnet",
        default=None,
        help="A ControlNetModel folder: sample with each prompt's outline as control.",
    )
    parser.add_argument(
        "--control_scales",
        type=float,
        nargs="+",
        default=None,
        help="ControlNet conditioning scales, with --controlnet (default 1).",
    )
    parser.add_argument(
        "--guess_mode",
        action="store_true",
        help="With --controlnet: empty prompts, the outline alone (scores shape, position and IoU).",
    )
    args = parser.parse_args(argv)
    if args.controlnet is None and (args.control_scales is not None or args.guess_mode):
        parser.error("--control_scales and --guess_mode need --controlnet DIR (a ControlNetModel folder).")
    if args.controlnet is not None and args.control_scales is None:
        args.control_scales = [1.0]
    return args


def describe(results: dict, best) -> str:
    """One line: the best setting and its headline scores."""
    entry = results["scales"][best]
    guidance, *control = best if isinstance(best, tuple) else (best,)
    scores = ("shape", "position") if results.get("guess_mode") else ("all",)
    return (
        f"best guidance scale: {guidance:g}"
        + "".join(f", control scale {c:g}" for c in control)
        + " ("
        + ", ".join(f"{100 * entry['accuracy'][key]:.1f}% {key} correct" for key in scores)
        + (f", IoU {entry['iou']:.3f}" if "iou" in entry else "")
        + ")"
    )


def main(argv: list[str] | None = None) -> dict:
    """Evaluate, write the report files, print the table and the best scale; returns the JSON results."""
    args = parse_args(argv)
    # Before the model loads: a bad file fails in a second.
    prompts = [row for path in args.prompts for row in load_heldout_prompts(path)]
    pipe = LatentPipeline.from_pretrained(args.model)
    if args.lora is not None:
        pipe.load_lora_weights(args.lora)
    if args.controlnet is not None:
        # Shares the loaded components (LoRA included) and adds the ControlNet.
        controlnet = ControlNetModel.from_pretrained(args.controlnet)
        pipe = LatentControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    # Deterministic DDIM (eta = 0) over the saved training schedule, whatever sampler the folder names.
    pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
    pipe.to(args.device)

    results = evaluate_adherence(
        pipe,
        prompts,
        args.guidance_scales,
        args.seeds,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        control_scales=args.control_scales,
        guess_mode=args.guess_mode,
    )
    report = results_to_json(results)
    table = format_table(results)
    best = best_guidance(results)
    best_scale, best_control_scale = best if args.controlnet is not None else (best, None)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adherence.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "adherence.txt").write_text(table + "\n", encoding="utf-8")
    plot_adherence(results, out_dir / "adherence.png")
    print(table)
    if not args.guess_mode:  # no colour is asked for in guess mode
        color_table = format_color_table(results)
        (out_dir / "adherence_by_color.txt").write_text(color_table + "\n", encoding="utf-8")
        print(color_table)
    grids = {
        scale: adherence_grid(
            pipe,
            prompts,
            scale,
            seed=args.seeds[0],
            num_inference_steps=args.steps,
            batch_size=args.batch_size,
            control_scale=best_control_scale,
            guess_mode=args.guess_mode,
        )
        for scale in dict.fromkeys((best_scale, 1.0))  # one grid when guidance 1 is the best
    }
    grids[best_scale].save(out_dir / "grid.png")
    grids[1.0].save(out_dir / "grid_g1.png")

    print(describe(results, best))
    print(
        f"wrote {out_dir}/adherence.json, adherence.txt, adherence.png, grid.png (guidance {best_scale:g}), grid_g1.png"
    )
    return report


if __name__ == "__main__":
    main()
