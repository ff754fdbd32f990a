"""train/seed_spread.py: mean and worst seed per row of several evaluations."""

from __future__ import annotations

import json

import pytest

from tests.training_helpers import load_script


def _report(folder, green_right: int, scale_all: float):
    """An adherence.json with 4 green and 2 red samples at guidance 7.5, `green_right` of the green ones right."""
    samples = []
    for k in range(6):
        color = "green" if k < 4 else "red"
        right = k < green_right if color == "green" else True
        samples.append({"expected": {"color": color}, "correct": {"color": right, "all": right}})
    accuracy = {"shape": 1.0, "color": 0.5, "position": 1.0, "all": scale_all}
    folder.mkdir()
    report = {"scales": [{"guidance_scale": 7.5, "accuracy": accuracy, "samples": samples}]}
    (folder / "adherence.json").write_text(json.dumps(report))
    return folder


def test_mean_and_worst_seed_per_colour_and_per_scale(tmp_path, capsys):
    a, b = _report(tmp_path / "seed0", 4, 0.9), _report(tmp_path / "seed1", 1, 0.6)
    script = load_script("seed_spread")
    text = script.main(["--by", "color", str(a), str(b)])
    assert "| green | 62.5 % | 25.0 % | 62.5 % | 25.0 % |" in text  # (100 + 25) / 2, worst 25
    assert "| red | 100.0 % | 100.0 % | 100.0 % | 100.0 % |" in text
    text = script.main([str(a), str(b)])
    assert "| 7.5 | 100.0 % | 100.0 % | 50.0 % | 50.0 % | 100.0 % | 100.0 % | 75.0 % | 60.0 % |" in text
    with pytest.raises(SystemExit):
        script.main([str(a)])
    with pytest.raises(FileNotFoundError, match="adherence.json"):
        script.main([str(a), str(tmp_path)])
