"""Tests for the colour measurements: the detector's colour readout and boundaries (ldm.shapes.detector), and the
VAE round-trip report (ldm.shapes.color_fidelity)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm.shapes.color_fidelity import detector_margins, format_report, main, vae_color_fidelity
from ldm.shapes.detector import _nearest_color, color_boundary, detect, drawn_color
from ldm.shapes.synthetic import BACKGROUND, COLORS, render


class PixelVAE(torch.nn.Module):
    """An 'autoencoder' whose latents are the pixels, and whose decoder adds `shift` (RGB units) to every pixel."""

    def __init__(self, shift=(0.0, 0.0, 0.0)):
        super().__init__()
        self.shift = torch.tensor(shift).view(1, 3, 1, 1) / 127.5  # RGB units in [-1, 1] space
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.dtype = torch.float32

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=(z + self.shift).clamp(-1, 1))


@pytest.mark.parametrize("color", list(COLORS))
def test_drawn_color_is_the_generators_fill(color):
    image = render("square", color, "center", 64, np.random.default_rng(0))
    assert drawn_color(image).tolist() == list(COLORS[color])
    assert drawn_color(np.full((32, 32, 3), 255, dtype=np.uint8)) is None


def test_color_boundary_splits_the_line_where_the_reading_flips():
    background = np.array(BACKGROUND, dtype=np.float64)
    for inside, outside in [("green", "cyan"), ("red", "purple"), ("blue", "purple")]:
        t = color_boundary(inside, outside)
        assert 0.3 < t < 0.7
        start, end = np.array(COLORS[inside], dtype=np.float64), np.array(COLORS[outside], dtype=np.float64)
        assert _nearest_color(start + (t - 1e-6) * (end - start), background) == inside
        assert _nearest_color(start + (t + 1e-6) * (end - start), background) == outside
        # The same point seen from the other end.
        assert color_boundary(outside, inside) == pytest.approx(1 - t, abs=1e-9)


def test_color_boundary_rejects_unknown_or_equal_colours():
    with pytest.raises(ValueError, match="orange"):
        color_boundary("green", "orange")
    with pytest.raises(ValueError, match="two different"):
        color_boundary("green", "green")


def test_detector_margins_name_the_nearest_colour():
    margins = detector_margins()
    assert margins["green"]["nearest"] == "cyan"  # (30, 170, 40) and (30, 200, 210): 172.6 apart
    assert margins["green"]["distance"] == pytest.approx(np.hypot(30, 170))
    for name, margin in margins.items():
        others = [np.linalg.norm(np.subtract(COLORS[name], COLORS[o])) for o in COLORS if o != name]
        assert margin["distance"] == pytest.approx(min(others))


def test_a_faithful_vae_gives_back_every_colour_exactly():
    report = vae_color_fidelity(PixelVAE(), resolution=32, num_images=4)
    for name in COLORS:
        assert report["patches"][name]["error"] == pytest.approx(0.0, abs=0.6)  # 8-bit rounding only
        assert report["shapes"][name]["error"] == pytest.approx(0.0, abs=0.6)
        assert report["shapes"][name]["read_right"] == 1.0
    # Pixel latents: two patches differ by their colours over a quarter of the image.
    for (a, b), gap in report["latent_distance"].items():
        diff = (np.subtract(COLORS[a], COLORS[b]) / 127.5) ** 2
        assert gap == pytest.approx(np.sqrt(diff.mean() / 4), rel=1e-3)
    text = format_report(report, detector_margins())
    assert "green" in text and "Closest latents" in text


def test_a_vae_that_tints_green_towards_cyan_is_caught():
    # +100 on the blue channel: green (30, 170, 40) comes back (30, 170, 140), beyond the detector's green/cyan split.
    report = vae_color_fidelity(PixelVAE(shift=(0, 0, 100)), resolution=32, num_images=4)
    green = report["shapes"]["green"]
    assert green["rgb"] == pytest.approx([30, 170, 140], abs=1)
    assert green["error"] == pytest.approx(100, abs=1)
    assert green["read_right"] == 0.0
    image = render("circle", "green", "left", 32, np.random.default_rng(0))
    tinted = np.clip(np.asarray(image, dtype=np.float64) + [0, 0, 100], 0, 255).astype(np.uint8)
    assert detect(tinted)["color"] == "cyan"


def test_cli_reads_a_saved_vae(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from ldm.presets import get_preset

    AutoencoderKL(**get_preset("tiny")["vae"]).save_pretrained(tmp_path / "vae")
    result = main(["--vae", str(tmp_path / "vae"), "--resolution", "32", "--num_images", "2"])
    assert set(result["fidelity"]["patches"]) == set(COLORS)
    assert len(result["fidelity"]["latent_distance"]) == len(list(itertools.combinations(COLORS, 2)))
    assert "flips at" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--vae", str(tmp_path / "vae"), "--num_images", "0"])
