"""Training throughput with the latent/text cache against without it, on the demo model and data.

    python benchmarks/cache_speed.py [--steps 100] [--demo_dir outputs/demo]   (after `make demo` built it)

Both runs launch the real `train/train_ldm.py` with the demo config; the cached run's cache is built first (its
build time is reported separately) and each run's samples/s covers the training steps (batch loading included, validation and saving excluded). Prints one ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(
    config: Path, demo_dir: Path, out: Path, steps: int, cache_dir: Path, cached: bool
) -> tuple[float, float]:
    """Launch a short training run; returns (samples/s of the steps, wall seconds of the whole launch).

    The throughput is what training recorded in the output folder's trainer_state.json.
    """
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_machines", "1",
        "--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0))),
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "train_ldm.py"),
        "--config", str(config), "--pretrained_model_name_or_path", str(demo_dir / "base"),
        "--train_data_dir", str(demo_dir / "data"), "--output_dir", str(out), "--max_train_steps", str(steps),
        "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--validation_prompts", "none",
        "--cache_latents", str(cached).lower(), "--cache_dir", str(cache_dir), "--report_to", "none",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"training run failed:\n{result.stderr[-3000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    if state["latent_cache"] != cached:
        sys.exit(
            f"the run into {out} {'did not use' if cached else 'used'} the latent cache; expected the opposite."
        )
    return state["samples_per_second"], wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--demo_dir",
        default=str(ROOT / "outputs" / "demo"),
        help="the DEMO folder of `make demo` (base/, data/)",
    )
    args = parser.parse_args()
    demo_dir = Path(args.demo_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, build_wall = run(
            Path(args.config), demo_dir, tmp / "build", 1, tmp / "cache", cached=True
        )  # builds the cache
        cached, cached_wall = run(
            Path(args.config),
            demo_dir,
            tmp / "cached",
            args.steps,
            tmp / "cache",
            cached=True,
        )
        live, live_wall = run(
            Path(args.config), demo_dir, tmp / "live", args.steps, tmp / "cache", cached=False
        )
    print(f"steps per run: {args.steps} (demo config {args.config})")
    print(f"cache build (one launch, incl. start-up): {build_wall:.1f} s")
    print(f"uncached: {live:.1f} samples/s  (launch {live_wall:.1f} s)")
    print(f"cached:   {cached:.1f} samples/s  (launch {cached_wall:.1f} s)")
    print(f"cached / uncached = {cached / live:.2f}x")


if __name__ == "__main__":
    main()
