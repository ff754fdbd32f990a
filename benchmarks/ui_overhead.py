"""What `ldm-ui` adds on top of the pipeline: start-up after the model loads, and the cost of a request.

    python benchmarks/ui_overhead.py [--model outputs/demo/ldm] [--steps 25] [--rounds 5]

Launches `ldm-ui` as a user does (a subprocess on 127.0.0.1) on `--model` (default: a tiny random pipeline built
here, 16 px), then in one run:
- start-up: seconds from the "model loaded" line the app prints to the page answering HTTP (target: under 30 s);
- a text-to-image request through gradio_client (/txt2img: prompt -> PNG written with its settings -> gallery)
  against the same call on the pipeline in this process (same steps, size, seed), median of `--rounds` each,
  alternating (target: the UI within 2 s of the pipeline).
Prints both; nothing is asserted (the machine is shared and noisy). Run it alone: two torch jobs on 2 cores slow
each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = "a red green blue circle square triangle on the left right top bottom at center".split()


def tiny_model(folder: Path) -> Path:
    from ldm.presets import build_pipeline
    from ldm.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(WORDS, folder / "tokenizer")
    build_pipeline("tiny", folder / "tokenizer", seed=0).save_pretrained(folder / "tiny")
    return folder / "tiny"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: Path, outputs: Path, port: int) -> tuple[subprocess.Popen, float, float]:
    """Launch ldm-ui; returns (process, seconds to the model-loaded line, seconds from there to serving)."""
    cmd = [
        sys.executable,
        "-m",
        "ldm.ui.app",
        "--model",
        str(model),
        "--outputs_dir",
        str(outputs),
        "--port",
        str(port),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    loaded = threading.Event()
    loaded_at = []

    def watch() -> None:
        for line in process.stdout:
            if line.startswith("ldm-ui: Loaded") and not loaded.is_set():
                loaded_at.append(time.perf_counter())
                loaded.set()

    threading.Thread(target=watch, daemon=True).start()
    if not loaded.wait(timeout=300):
        process.kill()
        raise RuntimeError("ldm-ui did not load the model within 300 s.")
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("ldm-ui exited.") from None
            time.sleep(0.05)
    served = time.perf_counter()
    return process, loaded_at[0] - start, served - loaded_at[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="A pipeline folder (default: a tiny one built here).")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from gradio_client import Client

    from ldm.pipelines.text_to_image import LatentPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(tmp)
        port = free_port()
        process, load_s, serve_s = start_app(model, tmp / "outputs", port)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            pipe = LatentPipeline.from_pretrained(model)
            pipe.set_progress_bar_config(disable=True)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            request = {"prompt": "a red circle on the left", "negative": "", "steps": args.steps, "guidance": 7.5,
                       "sampler": "ddim", "seed": 0, "num_images": 1, "width": size, "height": size, "lora": "",
                       "lora_scale": 1.0}  # fmt: skip
            ui, direct = [], []
            for _ in range(args.rounds + 1):  # the first round of each warms up and is dropped
                start = time.perf_counter()
                client.predict(api_name="/txt2img", **request)
                ui.append(time.perf_counter() - start)
                start = time.perf_counter()
                generator = torch.Generator().manual_seed(0)
                pipe("a red circle on the left", num_inference_steps=args.steps, height=size, width=size,
                     generator=generator)  # fmt: skip
                direct.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)
    ui_s, direct_s = statistics.median(ui[1:]), statistics.median(direct[1:])
    print(f"model: {model if args.model else 'tiny (16 px, built here)'}, {args.steps} steps, {size} px, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip
    print(
        f"start-up: model loaded {load_s:.1f} s after launch; page served {serve_s:.1f} s after that (target < 30 s)"
    )
    print(
        f"txt2img: pipeline {1000 * direct_s:.0f} ms, through the UI {1000 * ui_s:.0f} ms median; the UI adds "
        f"{1000 * (ui_s - direct_s):.0f} ms (target < 2000 ms)"
    )


if __name__ == "__main__":
    main()
