"""Training throughput, measured in one run: diffusers' train_text_to_image.py against train_ldm.py, and the floor.

    python benchmarks/train_throughput.py --diffusers_script PATH/TO/diffusers/examples/text_to_image/train_text_to_image.py
        [--demo_dir outputs/demo] [--steps 10 40] [--batch_size 64]

On the demo's base (its VAE and text stack, plus a randomly initialised `small` UNet saved beside them so that both
scripts load the same weights) and data (64 px, 8x8x4 latents), one process, fp32:

- diffusers' `train_text_to_image.py` (it imports torchvision, which has no CPU build here: the benchmark runs it
  through `benchmarks/run_with_torchvision_stub.py`, with PIL stand-ins for the transforms it uses);
- `train_ldm.py` without the latent cache (VAE and text encoder run every step, as in diffusers), and with it;
- `train_ldm.py` uncached with aspect-ratio buckets, on a copy of the data stretched to 1:2, 1:1 and 2:1
  (`ldm.shapes.aspects`), compared with square training in pixels per second (the buckets' areas differ);
- a bare UNet forward + backward + AdamW step on the same shapes, with nothing else: the floor.

Each script's step time is (wall(N2 steps) - wall(N1 steps)) / (N2 - N1), so start-up, model loading and data
loading before the first step cancel; the cache is built by an earlier launch. On a CUDA machine `--gpu` also
reports the `sd15` UNet at 512 px: TFLOP/s and MFU (FLOPs counted by `torch.utils.flop_counter`), fp32 and bf16,
SDPA and xformers, torch.compile off and on (see `benchmarks/unet_step.py`).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        unet=build_unet("small", cross_attention_dim=text_encoder.config.hidden_size),
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
                "--use_ema", "false", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps",
                "0", "--checkpointing_steps", "1000000", "--validation_prompts", "none", "--report_to", "none",
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


def cpu_table(args: argparse.Namespace) -> None:
    """The one-run CPU comparison, printed as a table with ratios."""
    demo_dir, steps, batch = Path(args.demo_dir), tuple(args.steps), args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_base(demo_dir, tmp / "base")
        data = demo_dir / "data"
        rows = {}
        if args.diffusers_script:
            run = diffusers_run(Path(args.diffusers_script), base, data, tmp / "diffusers", batch)
            rows["diffusers train_text_to_image.py"] = samples_per_second(run, steps, batch)
        rows["train_ldm.py uncached"] = samples_per_second(
            ldm_run(base, data, tmp / "live", tmp / "cache", False, batch), steps, batch
        )
        cached = ldm_run(base, data, tmp / "cached", tmp / "cache", True, batch)
        cached(1)  # builds the cache
        rows["train_ldm.py cached"] = samples_per_second(cached, steps, batch)
        bucket_args, bucket_area = mixed_aspect_data(base, data, tmp / "mixed")
        rows["train_ldm.py bucketed uncached"] = samples_per_second(
            ldm_run(base, tmp / "mixed", tmp / "bucketed", tmp / "cache", False, batch, bucket_args),
            steps,
            batch,
        )
        rows["bare UNet step (floor)"] = time_unet_step("small", base, batch, latent_side=8, device="cpu")
    print(f"samples/s, batch {batch}, 64 px, step time from runs of {steps[0]} and {steps[1]} steps")
    for name, value in rows.items():
        print(f"  {name:<34} {value:8.1f}")
    reference = rows.get("diffusers train_text_to_image.py")
    if reference:
        print(f"uncached / diffusers = {rows['train_ldm.py uncached'] / reference:.2f}x")
        print(f"cached / diffusers   = {rows['train_ldm.py cached'] / reference:.2f}x")
    else:
        print("(pass --diffusers_script to compare with diffusers' train_text_to_image.py)")
    print(f"bare UNet / cached   = {rows['bare UNet step (floor)'] / rows['train_ldm.py cached']:.2f}x")
    pixels = rows["train_ldm.py bucketed uncached"] * bucket_area / (rows["train_ldm.py uncached"] * 64 * 64)
    print(
        f"bucketed / square uncached, in pixels per second = {pixels:.2f}x (the 1:2, 1:1, 2:1 copy of the data: "
        f"{bucket_args[-1]} px bucket steps, mean bucket {bucket_area:.0f} px against 64 x 64 = 4096)"
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
    parser.add_argument(
        "--gpu", action="store_true", help="also the sd15 UNet at 512 px on CUDA (TFLOP/s, MFU)"
    )
    args = parser.parse_args(argv)
    if args.steps[1] <= args.steps[0] or args.steps[0] < 1:
        parser.error(f"--steps {args.steps}: give two run lengths N1 < N2, N1 >= 1 (e.g. 10 40).")
    if args.diffusers_script and not Path(args.diffusers_script).is_file():
        parser.error(f"--diffusers_script {args.diffusers_script}: no such file.")
    if not (Path(args.demo_dir) / "base").is_dir():
        parser.error(f"--demo_dir {args.demo_dir} has no base/: run `make demo` first.")
    cpu_table(args)
    if args.gpu:
        gpu_report()


if __name__ == "__main__":
    main()
