"""The real image set's builder (from an npm tarball in the package's layout, built here) and its retrieval judge."""

from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.emoji import data, retrieval

COLORS = {"1f436.png": (200, 40, 40), "1f431.png": (40, 200, 40), "1f34e.png": (40, 40, 200)}


def rgba_png(color: tuple[int, int, int]) -> bytes:
    """A 64 px RGBA PNG: a coloured disc on pixels that are transparent black, as the package's are."""
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    pixels = np.zeros((64, 64, 4), np.uint8)
    pixels[disc] = (*color, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def package(tmp_path):
    entries = [
        {"name": "DOG FACE", "short_name": "dog", "image": "1f436.png", "category": "Animals & Nature", "sort_order": 2},
        {"name": None, "short_name": "cat_face", "image": "1f431.png", "category": "Animals & Nature", "sort_order": 1},
        {"name": "RED APPLE", "short_name": "apple", "image": "1f34e.png", "category": "Food & Drink", "sort_order": 3},
        {"name": "GHOST", "short_name": "ghost", "image": "1f47b.png", "category": "Food & Drink", "sort_order": 4},
        {"name": "FLAG", "short_name": "flag", "image": "1f3f4.png", "category": "Flags", "sort_order": 5},
    ]  # fmt: skip
    path = tmp_path / "package.tgz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "package/emoji.json", json.dumps(entries).encode())
        for image, color in COLORS.items():
            add(tar, f"package/img/twitter/64/{image}", rgba_png(color))
        add(tar, "package/img/twitter/64/1f3f4.png", rgba_png((0, 0, 0)))
        # 1f47b.png (the ghost) is missing: skipped and counted, not fatal.
    return path


def test_the_set_has_captions_from_names_white_backgrounds_and_counts_what_it_skips(package, tmp_path):
    source = data.build_dataset(package, tmp_path / "set")
    rows = [
        json.loads(line) for line in (tmp_path / "set" / "train" / "metadata.jsonl").read_text().splitlines()
    ]
    # In the package's sort order, the chosen categories only; a missing name falls back to the short name.
    assert [row["text"] for row in rows] == ["cat face", "dog face", "red apple"]
    assert set(rows[0]) == {
        "file_name",
        "text",
        "category",
        "emoji_file",
    }  # no "image": it would shadow the pixels
    assert (
        source["num_images"] == 3
        and source["num_skipped"] == 1
        and source["skipped"][0]["image"] == "1f47b.png"
    )
    assert json.loads((tmp_path / "set" / "source.json").read_text()) == source
    image = Image.open(tmp_path / "set" / "train" / rows[1]["file_name"])
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent black became white, not black
    assert image.getpixel((32, 32)) == COLORS["1f436.png"]


def test_an_unknown_category_is_refused_with_the_known_ones(package, tmp_path):
    with pytest.raises(ValueError, match=r"unknown categories \['Animals'\].*'Food & Drink'"):
        data.build_dataset(package, tmp_path / "set", ("Animals",))


def test_a_download_is_checked_against_npm_integrity_and_cached(package, tmp_path, monkeypatch):
    payload = package.read_bytes()
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError, match="does not match npm's integrity"):
        data.download_package(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing corrupt is kept
    monkeypatch.setattr(data, "INTEGRITY", data.integrity_of(payload))
    path = data.download_package(tmp_path / "cache")
    assert path.read_bytes() == payload and data.download_package(tmp_path / "cache") == path
    assert calls == [data.TARBALL_URL] * 2  # the second call read the cache


def test_ranks_count_the_references_at_least_as_near_as_the_asked_one():
    references = np.array([[0.0], [1.0], [3.0], [1.0]])
    queries = np.array([[0.9], [0.9], [3.0], [0.0]])
    # Query 0 asks for reference 1 (nearest, tied with 3: a tie counts against it); query 1 for reference 0 (third);
    # query 2 for reference 2 (exact); query 3 for reference 2 (last).
    rank = retrieval.ranks(queries, references, [1, 0, 2, 2])
    assert rank.tolist() == [1, 2, 0, 3]
    assert retrieval.top_k(rank, (1, 2, 4)) == {"top1": 0.25, "top2": 0.5, "top4": 1.0}


def test_prompt_indices_spread_over_the_set():
    assert retrieval.prompt_indices(5, None) == [0, 1, 2, 3, 4]
    assert retrieval.prompt_indices(101, 3) == [0, 50, 100]


class Drawer:
    """A pipeline stand-in that draws the training image of the caption it is given, or always the first image."""

    def __init__(self, data_dir, exact: bool):
        captions, self.images = retrieval.load_captioned_set(data_dir)
        self.index = {caption: i for i, caption in enumerate(captions)}
        self.exact = exact

    def __call__(self, prompts, generator, **kwargs):
        assert len(generator) == len(prompts)
        return SimpleNamespace(images=[self.images[self.index[p] if self.exact else 0] for p in prompts])


def test_the_judge_finds_exact_drawings_and_not_a_constant_one(package, tmp_path):
    data.build_dataset(package, tmp_path / "set")
    exact = retrieval.judge_pipeline(
        Drawer(tmp_path / "set", True), tmp_path / "set", seeds=(0, 1), batch_size=2
    )
    constant = retrieval.judge_pipeline(Drawer(tmp_path / "set", False), tmp_path / "set", seeds=(0,))
    assert exact == {"top1": 1.0, "top10": 1.0}
    assert constant["top1"] == pytest.approx(1 / 3)  # right only for the caption of image 0


def test_the_ceiling_judges_the_vae_reconstructions(package, tmp_path):
    data.build_dataset(package, tmp_path / "set")

    class Vae:
        """Encodes to the pixels themselves and decodes them back, or decodes everything to grey."""

        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self, grey: bool):
            self.grey = grey

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            return SimpleNamespace(sample=torch.zeros_like(z) if self.grey else z)

    assert retrieval.judge_ceiling(Vae(grey=False), tmp_path / "set") == {"top1": 1.0, "top10": 1.0}
    assert retrieval.judge_ceiling(Vae(grey=True), tmp_path / "set")["top1"] < 1.0


def test_the_judge_runs_on_a_pipeline_folder(package, saved_tiny_pipe, tmp_path, capsys):
    data.build_dataset(package, tmp_path / "set")
    scores = retrieval.main(
        ["--model", str(saved_tiny_pipe), "--data_dir", str(tmp_path / "set"), "--steps", "2"]
    )
    assert set(scores) == {"samples", "ceiling"}
    assert all(0 <= value <= 1 for part in scores.values() for value in part.values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == scores
