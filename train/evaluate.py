"""Measure how well a trained pipeline follows the held-out prompts of the shapes dataset, per guidance scale.

    python train/evaluate.py --model outputs/tiny --prompts data/shapes/heldout_prompts.jsonl --out_dir outputs/eval

Load the pipeline (DDIM sampler) -> generate every held-out prompt once per seed at each guidance scale, from the
same noise at every scale -> read shape, colour and position back with the detector -> write:

    out_dir/adherence.json   settings, best_guidance_scale, and per scale: accuracy, counts, per-image records
    out_dir/adherence.txt    the accuracy table (also printed)
    out_dir/grid.png         the held-out prompts at the best guidance scale, first seed
    out_dir/grid_g1.png      the same prompts and noise at guidance 1 (no guidance), for contrast
    out_dir/adherence_by_color.txt   per asked-for colour: colour and all-three accuracy at each scale

`--lora` evaluates the pipeline with a LoRA loaded (a folder or .safetensors file train_ldm.py --lora_rank wrote).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldm.pipeline import LatentPipeline
from ldm.schedulers import scheduler_from_name
from ldm.shapes.adherence import (
    adherence_grid,
    best_guidance,
    evaluate_adherence,
    format_color_table,
    format_table,
    load_heldout_prompts,
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate, write the report files, print the table and the best scale; returns the JSON results."""
    args = parse_args(argv)
    # Before the model loads: a bad file fails in a second.
    prompts = [row for path in args.prompts for row in load_heldout_prompts(path)]
    pipe = LatentPipeline.from_pretrained(args.model)
    if args.lora is not None:
        pipe.load_lora_weights(args.lora)
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
    )
    report = results_to_json(results)
    table = format_table(results)
    best = best_guidance(results)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adherence.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "adherence.txt").write_text(table + "\n", encoding="utf-8")
    color_table = format_color_table(results)
    (out_dir / "adherence_by_color.txt").write_text(color_table + "\n", encoding="utf-8")
    grids = {
        scale: adherence_grid(
            pipe,
            prompts,
            scale,
            seed=args.seeds[0],
            num_inference_steps=args.steps,
            batch_size=args.batch_size,
        )
        for scale in dict.fromkeys((best, 1.0))  # one grid when guidance 1 is the best
    }
    grids[best].save(out_dir / "grid.png")
    grids[1.0].save(out_dir / "grid_g1.png")

    print(table)
    print(color_table)
    print(
        f"best guidance scale: {best:g} ({100 * results['scales'][best]['accuracy']['all']:.1f}% all correct)"
    )
    print(f"wrote {out_dir}/adherence.json, adherence.txt, grid.png (guidance {best:g}), grid_g1.png")
    return report


if __name__ == "__main__":
    main()
