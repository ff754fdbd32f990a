"""The benchmarks' own pieces: the bare UNet step and its FLOP count, and the torchvision stand-ins."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, path: Path):
    """A module from a file, without putting its folder on sys.path (the stub must not pose as torchvision)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unet_step = load("unet_step", ROOT / "benchmarks" / "unet_step.py")
transforms = load("torchvision_stub_transforms", ROOT / "benchmarks" / "torchvision_stub" / "transforms.py")


@pytest.fixture
def flush_denormals():
    """AdamW on a random tiny UNet leaves denormal floats that make CPU steps ~30x slower; flush them here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_bare_step_runs_and_its_flops_scale_with_the_batch(flush_denormals):
    unet = unet_step.load_unet("tiny", None, cross_attention_dim=32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    flops = {}
    for batch in (2, 4):
        inputs = unet_step.step_inputs(unet, batch, latent_side=8, text_tokens=16, device=torch.device("cpu"))
        flops[batch] = unet_step.step_flops(unet_step.make_step(unet, optimizer, inputs, None))
    assert flops[2] > 0 and abs(flops[4] / flops[2] - 2) < 0.01
    assert (
        unet_step.time_unet_step("tiny", None, 2, 8, cross_attention_dim=32, warmup=1, steps=2, repeats=1) > 0
    )
    assert unet_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and unet_step.peak_tflops("Quadro") is None


def test_torchvision_stand_ins_do_what_train_text_to_image_asks():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    interpolation = transforms.InterpolationMode.BILINEAR
    pipeline = transforms.Compose(
        [
            transforms.Resize(16, interpolation=interpolation),
            transforms.CenterCrop(16),
            transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    out = pipeline(image)
    assert out.shape == (3, 16, 16) and -1 <= out.min() and out.max() <= 1
    resized = transforms.Resize(16)(image)
    assert resized.size == (27, 16)  # shorter side 16, aspect kept
    assert transforms.RandomCrop(16)(resized).size == (16, 16)
