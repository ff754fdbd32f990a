"""Training throughput, measured in one run: diffusers' train_text_to_image.py against train_ldm.py, and the floor.

    python benchmarks/train_throughput.py --diffusers_script PATH/TO/diffusers/examples/text_to_image/train_text_to_image.py
        [--demo_dir outputs/demo] [--steps 10 40] [--batch_size 64] [--rounds 3]

On the demo's base (its VAE and text stack, plus a randomly initialised `small` UNet saved beside them so that both
scripts load the same weights) and data (64 px, 8x8x4 latents), one process, fp32:

- diffusers' `train_text_to_image.py` (it imports torchvision, which has no CPU build here: the benchmark runs it
  through `benchmarks/run_with_torchvision_stub.py`, with PIL stand-ins for the transforms it uses);
- `train_ldm.py` without the latent cache (VAE and text encoder run every step, as in diffusers), and with it;
- `train_ldm.py` cached with `--mixed_precision bf16`: what a user who picks bf16 for speed gets on this machine;
- `train_ldm.py` uncached with aspect-ratio buckets, on a copy of the data stretched to 1:2, 1:1 and 2:1
  (`ldm.shapes.aspects`), compared with square training in pixels per second (the buckets' areas differ);
- a bare UNet forward + backward + AdamW step on the same shapes, with nothing else: the floor.

Each script's step time is (wall(N2 steps) - wall(N1 steps)) / (N2 - N1), so start-up, model loading and data
loading before the first step cancel; the cache is built by an earlier launch. A shared machine drifts by a quarter
from one minute to the next, so the rows are measured in `--rounds` rounds, each running every row in turn, and the
table gives each row's median and range over the rounds, and each ratio's median and range over the rounds'
ratios (a row against the reference measured in the same round). On a CUDA machine `--gpu` also
reports the `sd15` UNet at 512 px: TFLOP/s and MFU (FLOPs counted by `torch.utils.flop_counter`), fp32 and bf16,
SDPA and xformers, torch.compile off and on (see `benchmarks/unet_step.py`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from unet_step import gpu_report, time_unet_step  # noqa: E402

STUB_RUNNER = ROOT / "benchmarks" / "run_with_torchvision_stub.py"
DIFFUSERS = "diffusers train_text_to_image.py"
UNCACHED = "train_ldm.py uncached"
CACHED = "train_ldm.py cached"
BF16 = "train_ldm.py cached, bf16"
BUCKETED = "train_ldm.py bucketed uncached"
FLOOR = "bare UNet step (floor)"


def launcher() -> list[str]:
    """`accelerate launch` on this machine's CPUs, one process, no mixed precision."""
    threads = str(len(os.sched_getaffinity(0)))
    return [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_machines", "1",
        "--num_processes", "1", "--num_cpu_threads_per_process", threads, "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]  # fmt: skip


def timed(cmd: list[str]) -> float:
    """Wall seconds of one launch; a failed launch stops the benchmark with its error."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def samples_per_second(run, steps: tuple[int, int], batch_size: int) -> float:
    """batch / per-step seconds, the step time from two launches that differ only in their step count."""
    short, long = (run(n) for n in steps)
    return batch_size * (steps[1] - steps[0]) / (long - short)


BASE_PRESET = "small"  # the random UNet of every base make_base saves


def make_base(demo_dir: Path, out: Path) -> Path:
    """The demo's base parts plus a random `small` UNet, saved as one pipeline folder both scripts load."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm import LatentPipeline
    from ldm.presets import build_unet

    base = demo_dir / "base"
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    torch.manual_seed(0)
    pipe = LatentPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        unet=build_unet(BASE_PRESET, cross_attention_dim=text_encoder.config.hidden_size),
        scheduler=DDIMScheduler.from_pretrained(base / "scheduler"),
    )
    pipe.save_pretrained(out)
    return out


def ldm_run(base: Path, data: Path, out: Path, cache_dir: Path, cached: bool, batch_size: int, extra=()):
    """A function steps -> wall seconds of a train_ldm.py launch with the demo config on `base` (plus `extra`)."""

    def run(steps: int) -> float:
        shutil.rmtree(out, ignore_errors=True)
        return timed(
            [
                *launcher(), str(ROOT / "train" / "train_ldm.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                "--pretrained_model_name_or_path", str(base), "--unet_preset", "none", "--train_data_dir", str(data),
                "--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch_size),
                "--use_ema", "false", "--snr_gamma", "none", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--validation_prompts", "none", "--report_to", "none",
                "--cache_latents", str(cached).lower(), "--cache_dir", str(cache_dir), *extra,
            ]
        )  # fmt: skip

    return run


def diffusers_run(script: Path, base: Path, data: Path, out: Path, batch_size: int):
    """A function steps -> wall seconds of a diffusers train_text_to_image.py launch with the same settings."""

    def run(steps: int) -> float:
        shutil.rmtree(out, ignore_errors=True)
        return timed(
            [
                *launcher(), str(STUB_RUNNER), str(script), "--pretrained_model_name_or_path", str(base), "--train_data_dir",
                str(data / "train"), "--resolution", "64", "--center_crop", "--train_batch_size", str(batch_size),
                "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--output_dir", str(out),
                "--report_to", "tensorboard", "--seed", "0", "--dataloader_num_workers", "0",
            ]
        )  # fmt: skip

    return run


def measure_rows(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Samples/s of every row in each of `args.rounds` rounds (each round runs every row once, in turn)."""
    demo_dir, steps, batch = Path(args.demo_dir), tuple(args.steps), args.batch_size
    base = make_base(demo_dir, tmp / "base")
    data = demo_dir / "data"
    bucket_args, bucket_area = mixed_aspect_data(base, data, tmp / "mixed")
    cached = ldm_run(base, data, tmp / "cached", tmp / "cache", True, batch)
    cached(1)  # builds the cache
    runs = {}
    if args.diffusers_script:
        runs[DIFFUSERS] = diffusers_run(Path(args.diffusers_script), base, data, tmp / "diffusers", batch)
    runs[UNCACHED] = ldm_run(base, data, tmp / "live", tmp / "cache", False, batch)
    runs[CACHED] = cached
    runs[BF16] = ldm_run(base, data, tmp / "bf16", tmp / "cache", True, batch, ["--mixed_precision", "bf16"])
    runs[BUCKETED] = ldm_run(base, tmp / "mixed", tmp / "bucketed", tmp / "cache", False, batch, bucket_args)
    rows: dict[str, list[float]] = {name: [] for name in [*runs, FLOOR]}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            rows[name].append(samples_per_second(run, steps, batch))
            if name == BUCKETED:  # in pixels per second against the square's: the buckets' areas differ
                rows[name][-1] *= bucket_area / (64 * 64)
        rows[FLOOR].append(time_unet_step("small", base, batch, latent_side=8, device="cpu"))
        print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items())
        )
    rows["mean bucket area"] = [bucket_area]
    return rows


def spread(values: list[float]) -> str:
    """Median and range, as `median (min-max)`."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def cpu_table(args: argparse.Namespace) -> None:
    """The CPU comparison over several rounds, printed as a table of medians and ranges, with ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_rows(args, Path(tmp))
    bucket_area = rows.pop("mean bucket area")[0]
    print(
        f"samples/s, batch {args.batch_size}, 64 px, step time from runs of {args.steps[0]} and {args.steps[1]} "
        f"steps; median (range) over {args.rounds} rounds"
    )
    for name, values in rows.items():
        print(f"  {name:<40} {spread(values)}")
    ratios = [
        (UNCACHED, DIFFUSERS),
        (CACHED, DIFFUSERS),
        (BF16, CACHED),
        (FLOOR, CACHED),
        (BUCKETED, UNCACHED),
    ]
    print("ratios, median (range) of the rounds' ratios:")
    for row, reference in ratios:
        if reference in rows:
            per_round = [a / b for a, b in zip(rows[row], rows[reference], strict=True)]
            print(f"  {row} / {reference}: {spread(per_round)}x")
    if DIFFUSERS not in rows:
        print("(pass --diffusers_script to compare with diffusers' train_text_to_image.py)")
    print(
        f"(bucketed: pixels/s scaled to 64 x 64 samples; the 1:2, 1:1, 2:1 copy's mean bucket is {bucket_area:.0f} px)"
    )


def mixed_aspect_data(base: Path, data: Path, out: Path) -> tuple[list[str], float]:
    """A 1:2 / 1:1 / 2:1 copy of the demo data, the train_ldm.py flags that bucket it, and its mean bucket area.

    At 64 px the default step (8 latent pixels) leaves only the square bucket, so the finest step the UNet takes is
    used: the VAE's factor times 2 per UNet down-sampling.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm.encoding import vae_scale_factor
    from ldm.shapes.aspects import make_mixed_aspect
    from ldm.training.buckets import assign_buckets, bucket_spec
    from ldm.training.transforms import upright_size

    make_mixed_aspect(data, out, [(1, 2), (1, 1), (2, 1)])
    factor = vae_scale_factor(AutoencoderKL.load_config(base / "vae"))
    levels = len(UNet2DConditionModel.load_config(base / "unet")["block_out_channels"])
    spec = bucket_spec(64, factor, levels, step=factor * 2 ** (levels - 1))
    sizes = [upright_size(path) for path in sorted((out / "train").glob("*.png"))]
    buckets = [b for b in assign_buckets(sizes, spec).bucket_of if b is not None]
    area = sum(w * h for w, h in buckets) / len(buckets)
    return ["--aspect_buckets", "--bucket_step", str(spec.step)], area


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo_dir", default=str(ROOT / "outputs" / "demo"), help="`make demo`'s folder")
    parser.add_argument(
        "--diffusers_script", default=None, help="diffusers' examples/text_to_image/train_text_to_image.py"
    )
    parser.add_argument(
        "--steps", type=int, nargs=2, default=[10, 40], help="the two run lengths (default 10 40)"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row, in turn (default 3)")
    parser.add_argument(
        "--gpu", action="store_true", help="also the sd15 UNet at 512 px on CUDA (TFLOP/s, MFU)"
    )
    args = parser.parse_args(argv)
    if args.steps[1] <= args.steps[0] or args.steps[0] < 1:
        parser.error(f"--steps {args.steps}: give two run lengths N1 < N2, N1 >= 1 (e.g. 10 40).")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1.")
    if args.diffusers_script and not Path(args.diffusers_script).is_file():
        parser.error(f"--diffusers_script {args.diffusers_script}: no such file.")
    if not (Path(args.demo_dir) / "base").is_dir():
        parser.error(f"--demo_dir {args.demo_dir} has no base/: run `make demo` first.")
    cpu_table(args)
    if args.gpu:
        gpu_report()


if __name__ == "__main__":
    main()
