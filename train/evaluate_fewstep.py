"""What each step count buys: prompt adherence and wall time per image of a distilled LCM, an LCM-LoRA and the
teacher's guided DDIM, on the held-out prompts of the shapes dataset.

    python train/evaluate_fewstep.py --teacher outputs/demo/ldm --lcm outputs/demo/lcm \
        --lcm_lora outputs/demo/lcm-lora --prompts outputs/demo/data/heldout_prompts.jsonl --out_dir outputs/eval

Every row draws each held-out prompt once per seed from the same noise (`evaluate_adherence`) and reads the image
back with the detector. Its time per image is the pipeline calls' alone (text encoding, denoising, VAE decoding,
conversion to PIL: what a user waits for; not the detector's scoring), after one untimed call of the same setting,
every row in this one process, so the times are ratios measured together. Run it alone: the times move with the
machine's load and with OpenMP's wait policy (OMP_WAIT_POLICY, which the report records), the accuracies do not.

    LCM (full)     LatentPipeline + LCMScheduler, guidance 7.5 through the UNet's guidance embedding; 1, 2, 4, 8 steps
    LCM-LoRA       the teacher + LCMScheduler + the adapter, guidance 1 (distilled in); 1, 2, 4, 8 steps
    DDIM           the teacher, classifier-free guidance 7.5 (two UNet branches a step); 1, 2, 4, 8 and 25 steps

With `--tiny_vae DIR` (an AutoencoderTiny from train/train_tiny_vae.py) every row is measured again with it as the
pipelines' decoder; each row's speed-up is over 25-step DDIM with the same decoder.

Writes out_dir/fewstep.json (settings, per row: accuracy, seconds per image), fewstep.txt (the table, also printed)
and grid.png (one row per setting, the first prompts at the first seed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from ldm.images import image_grid
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.schedulers import scheduler_from_name
from ldm.seeding import keyed_generator
from ldm.shapes.adherence import evaluate_adherence, load_heldout_prompts

STEP_COUNTS = (1, 2, 4, 8)
TEACHER_STEPS = 25
GRID_PROMPTS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of train/evaluate_fewstep.py."""
    parser = argparse.ArgumentParser(
        description="Adherence and speed of few-step samplers on held-out prompts."
    )
    parser.add_argument("--teacher", required=True, help="The teacher pipeline folder (the demo's model).")
    parser.add_argument("--lcm", default=None, help="A distilled LCM pipeline folder (train_lcm.py).")
    parser.add_argument(
        "--lcm_lora", default=None, help="An LCM-LoRA folder or file (train_lcm.py --lora_rank)."
    )
    parser.add_argument(
        "--tiny_vae",
        default=None,
        help="An AutoencoderTiny folder distilled from the teacher's VAE (train_tiny_vae.py): every row again with it.",
    )
    parser.add_argument("--prompts", required=True, nargs="+", help="heldout_prompts.jsonl files.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds (default 0 1).")
    parser.add_argument(
        "--guidance_scale", type=float, default=7.5, help="DDIM's and the LCM's (default 7.5)."
    )
    parser.add_argument("--batch_size", type=int, default=30, help="Images per pipeline call (default 30).")
    parser.add_argument("--out_dir", required=True, help="Folder for fewstep.json/.txt and grid.png.")
    return parser.parse_args(argv)


def settings(args) -> list[tuple[str, str, str, int, float, str]]:
    """(label, model kind, scheduler, steps, guidance, decoder) for every row, in table order: every sampler with
    the VAE, then (with --tiny_vae) every sampler with the tiny autoencoder."""
    rows = [("DDIM", "teacher", "ddim", TEACHER_STEPS, args.guidance_scale)]
    rows += [("DDIM", "teacher", "ddim", n, args.guidance_scale) for n in STEP_COUNTS]
    if args.lcm:
        rows += [("LCM", "lcm", "lcm", n, args.guidance_scale) for n in STEP_COUNTS]
    if args.lcm_lora:
        rows += [("LCM-LoRA", "lcm_lora", "lcm", n, 1.0) for n in STEP_COUNTS]
    decoders = ["VAE"] + (["tiny"] if args.tiny_vae else [])
    return [(*row, decoder) for decoder in decoders for row in rows]


class TimedPipe:
    """A pipeline whose calls are timed, and within them its VAE decoding step: what `evaluate_adherence` calls
    instead of the pipeline itself."""

    def __init__(self, pipe: LatentPipeline):
        self.pipe, self.seconds, self.decode_seconds = pipe, 0.0, 0.0

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, *args, **kwargs):
        decode = self.pipe.decode_latents

        def timed_decode(*decode_args, **decode_kwargs):
            clock = time.perf_counter()
            images = decode(*decode_args, **decode_kwargs)
            self.decode_seconds += time.perf_counter() - clock
            return images

        self.pipe.decode_latents = timed_decode  # this instance only, for this call
        clock = time.perf_counter()
        try:
            return self.pipe(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - clock
            del self.pipe.decode_latents


def warm_up(pipe: LatentPipeline, prompts: list[dict], steps: int, guidance: float, batch_size: int) -> None:
    """One untimed call of a row's setting at its batch size before the timed ones: the first call of a shape
    pays oneDNN's kernel set-up and the allocator's first requests (7 ms an image on 25-step DDIM at 60 images a
    call, README), which would fall on whichever row runs first."""
    batch = [prompts[i % len(prompts)]["prompt"] for i in range(batch_size)]
    pipe(
        batch, guidance_scale=guidance, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)
    )


def load_models(args) -> tuple[dict[str, LatentPipeline], dict[str, torch.nn.Module]]:
    """The pipelines by kind (the teacher, the distilled LCM, the teacher with the LCM-LoRA: separate modules)
    and the decoders by name (the teacher's VAE, and the tiny autoencoder when given)."""
    pipes = {"teacher": LatentPipeline.from_pretrained(args.teacher)}
    if args.lcm:
        pipes["lcm"] = LatentPipeline.from_pretrained(args.lcm)
    if args.lcm_lora:
        pipes["lcm_lora"] = LatentPipeline.from_pretrained(args.teacher)
        pipes["lcm_lora"].load_lora_weights(args.lcm_lora)
        pipes["lcm_lora"].fuse_lora()  # as users run an adapter they sample often: no extra matmuls per layer
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    decoders = {"VAE": pipes["teacher"].vae}
    if args.tiny_vae:
        # Channels-last: oneDNN runs its narrow convolutions 2-3x faster so (README, "A tiny autoencoder").
        tiny = AutoencoderTiny.from_pretrained(args.tiny_vae).eval()
        decoders["tiny"] = tiny.to(memory_format=torch.channels_last)
    return pipes, decoders


def format_table(rows: list[dict]) -> str:
    """A Markdown table: sampler, steps, guidance, UNet calls, decoder, accuracy per attribute, time per image and
    its speed-up over the first row with the same decoder (25-step DDIM), in all and before the decoder runs
    (prompt encoding and denoising)."""
    first = {}
    for row in rows:
        first.setdefault(row["decoder"], row)
    lines = [
        "| sampler | steps | guidance | UNet calls/image | decoder | all | shape | color | position | ms/image "
        "| speed-up | ms/image before decoding | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        acc, base_row = row["accuracy"], first[row["decoder"]]
        base, base_denoise = base_row["seconds_per_image"], base_row["denoise_seconds_per_image"]
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['guidance']:g} | {row['unet_calls']} | {row['decoder']} | "
            + " | ".join(f"{100 * acc[k]:.1f} %" for k in ("all", "shape", "color", "position"))
            + f" | {1000 * row['seconds_per_image']:.1f} | {base / row['seconds_per_image']:.1f}x"
            + f" | {1000 * row['denoise_seconds_per_image']:.1f} | {base_denoise / row['denoise_seconds_per_image']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate every row, write the report files and the grid, print the table; returns the rows."""
    args = parse_args(argv)
    prompts = [row for path in args.prompts for row in load_heldout_prompts(path)]
    pipes, decoders = load_models(args)
    rows, grid_images = [], []
    for label, kind, scheduler, steps, guidance, decoder in settings(args):
        pipe = pipes[kind]
        pipe.vae = decoders[decoder]
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
        warm_up(pipe, prompts, steps, guidance, args.batch_size)
        timed = TimedPipe(pipe)
        results = evaluate_adherence(
            timed, prompts, [guidance], args.seeds, num_inference_steps=steps, batch_size=args.batch_size
        )
        entry = results["scales"][guidance]
        guided = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        rows.append(
            {
                "sampler": label,
                "steps": steps,
                "guidance": guidance,
                "unet_calls": steps * (2 if guided else 1),
                "decoder": decoder,
                "accuracy": entry["accuracy"],
                "seconds_per_image": timed.seconds / entry["num_images"],
                "denoise_seconds_per_image": (timed.seconds - timed.decode_seconds) / entry["num_images"],
            }
        )
        shown = prompts[:GRID_PROMPTS]
        grid_images += pipe(
            [p["prompt"] for p in shown],
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=[keyed_generator(args.seeds[0], i) for i in range(len(shown))],
        ).images
    table = format_table(rows)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "num_prompts": len(prompts),
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "rows": rows,
    }
    (out_dir / "fewstep.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "fewstep.txt").write_text(table + "\n", encoding="utf-8")
    image_grid(grid_images, cols=min(GRID_PROMPTS, len(prompts))).save(out_dir / "grid.png")
    print(table)
    print(
        f"wrote {out_dir}/fewstep.json, fewstep.txt, grid.png (rows in table order, {GRID_PROMPTS} prompts each)"
    )
    return rows


if __name__ == "__main__":
    main()
