"""Launching train/train_ldm.py for real in tests, and comparing what it saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm import build_pipeline, write_clip_tokenizer
from ldm.shapes.synthetic import CAPTION_WORDS, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
HUB_TOKEN = "hf_test_token_that_must_never_be_written"


def make_world(root: Path) -> Path:
    """A tiny base pipeline and a 16 px synthetic imagefolder (40 images) with one corrupt image."""
    generate_dataset(root / "data", num_images=40, resolution=16, seed=0, num_heldout=4)
    (root / "data" / "train" / "000005.png").write_bytes(b"not a png at all")
    tokenizer = write_clip_tokenizer(CAPTION_WORDS, root / "tokenizer")
    build_pipeline("tiny", tokenizer, seed=0).save_pretrained(root / "base")
    return root


def launch_command(world: Path, out: Path, *args: str, processes: int = 1) -> list[str]:
    """`accelerate launch train/train_ldm.py --config configs/tiny.yaml` on the world's base and data."""
    topology = ["--cpu"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes)]
    return [
        str(ACCELERATE), "launch", *topology, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(ROOT / "train" / "train_ldm.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--pretrained_model_name_or_path", str(world / "base"), "--train_data_dir", str(world / "data"),
        "--output_dir", str(out), "--cache_dir", str(world / "cache"), *args,
    ]  # fmt: skip


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launched run: one thread per process, plus `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def launch(
    world: Path, out: Path, *args: str, processes: int = 1, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a training launch to the end; with `check`, assert it succeeded."""
    cmd = launch_command(world, out, *args, processes=processes)
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=launch_env(env), timeout=600, cwd=out.parent
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_file(path)


def same_tensors(a: dict, b: dict) -> bool:
    """Same names and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
