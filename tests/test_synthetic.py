"""Tests for the synthetic shapes dataset (ldm.shapes.synthetic) and the attribute detector (ldm.shapes.detector)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ldm.shapes.detector import detect, detector_accuracy, mask_iou, object_mask
from ldm.shapes.synthetic import (
    BACKGROUND,
    CAPTION_WORDS,
    COLORS,
    POSITIONS,
    SHAPES,
    all_combinations,
    caption,
    generate_dataset,
    main,
    misnamed_combination,
    outline,
    render,
    render_with_mask,
    white_on_black,
)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _labeled_images(out_dir: Path) -> list[tuple[Image.Image, dict]]:
    """(image, metadata row) pairs of a generated train split."""
    rows = _read_jsonl(out_dir / "train" / "metadata.jsonl")
    return [(Image.open(out_dir / "train" / row["file_name"]).convert("RGB"), row) for row in rows]


# ----------------------------------------------------------------------------------------------
# Vocabulary and captions
# ----------------------------------------------------------------------------------------------


def test_vocabularies():
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == ("left", "right", "top", "bottom", "center")
    assert len(COLORS) == 6 and len(set(COLORS.values())) == 6
    for rgb in COLORS.values():
        assert len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)


@pytest.mark.parametrize(
    ("combo", "expected"),
    [
        (("circle", "red", "left"), "a red circle on the left"),
        (("square", "blue", "right"), "a blue square on the right"),
        (("triangle", "green", "top"), "a green triangle at the top"),
        (("circle", "yellow", "bottom"), "a yellow circle at the bottom"),
        (("square", "purple", "center"), "a purple square in the center"),
    ],
)
def test_caption_format(combo, expected):
    assert caption(*combo) == expected


def test_caption_words_cover_every_caption():
    assert len(CAPTION_WORDS) == len(set(CAPTION_WORDS))
    used = {word for combo in all_combinations() for word in caption(*combo).split()}
    assert used == set(CAPTION_WORDS)


def test_all_combinations_is_complete_and_fixed():
    combos = all_combinations()
    assert len(combos) == len(SHAPES) * len(COLORS) * len(POSITIONS) == len(set(combos)) == 90
    assert combos == all_combinations()
    assert combos[0] == ("circle", "red", "left")


@pytest.mark.parametrize(
    "combo", [("hexagon", "red", "left"), ("circle", "orange", "left"), ("circle", "red", "middle")]
)
def test_unknown_attributes_raise(combo):
    with pytest.raises(ValueError, match="Unknown"):
        caption(*combo)
    with pytest.raises(ValueError, match="Unknown"):
        render(*combo, 32, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_render_size_background_and_determinism(resolution):
    image = render("triangle", "cyan", "right", resolution, np.random.default_rng(5))
    assert image.mode == "RGB" and image.size == (resolution, resolution)
    pixels = np.asarray(image)
    again = render("triangle", "cyan", "right", resolution, np.random.default_rng(5))
    assert np.array_equal(pixels, np.asarray(again))
    other = render("triangle", "cyan", "right", resolution, np.random.default_rng(6))
    assert not np.array_equal(pixels, np.asarray(other))


@pytest.mark.parametrize("resolution", [16, 32])
def test_render_keeps_the_border_clear(resolution):
    # The detector takes the background colour from the one-pixel border.
    rng = np.random.default_rng(9)
    for combo in all_combinations() * 3:
        pixels = np.asarray(render(*combo, resolution, rng))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border == BACKGROUND).all(), combo
        assert (pixels != BACKGROUND).any(axis=-1).mean() > 0.04, combo


@pytest.mark.parametrize("resolution", [15, 0, -32, 32.0, "32", True])
def test_render_rejects_bad_resolution(resolution):
    with pytest.raises(ValueError, match="resolution"):
        render("circle", "red", "left", resolution, np.random.default_rng(0))


def test_render_rejects_bad_rng():
    with pytest.raises(TypeError, match="Generator"):
        render("circle", "red", "left", 32, 0)


def _filled(line: np.ndarray) -> np.ndarray:
    """Everything a closed line encloses, line included: what a flood fill from the border cannot reach."""
    outside = np.zeros_like(line)
    outside[[0, -1], :] = outside[:, [0, -1]] = True
    outside &= ~line
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~line
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


@pytest.mark.parametrize("resolution", [16, 64])
def test_render_with_mask_is_render_and_its_half_coverage(resolution):
    for k, combo in enumerate(all_combinations()[::7]):
        image, mask = render_with_mask(*combo, resolution, np.random.default_rng(k))
        pixels = np.asarray(image)
        assert np.array_equal(pixels, np.asarray(render(*combo, resolution, np.random.default_rng(k))))
        assert mask.shape == (resolution, resolution) and mask.dtype == bool
        # Full colour is inside, untouched background outside, and half-covered pixels lie in between.
        assert (pixels == COLORS[combo[1]]).all(axis=-1)[~mask].sum() == 0
        assert not mask[(pixels == BACKGROUND).all(axis=-1)].any()
        contrast = np.linalg.norm(np.subtract(COLORS[combo[1]], BACKGROUND))
        coverage = np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1) / contrast  # (H, W)
        assert (coverage[mask] > 0.45).all() and (coverage[~mask] < 0.55).all(), combo


def test_outline_is_the_closed_one_pixel_edge_of_the_mask():
    for k, combo in enumerate(all_combinations()[::4]):
        _, mask = render_with_mask(*combo, 64, np.random.default_rng(k))
        line = outline(mask)
        assert line.any() and not (line & ~mask).any()  # on the shape
        assert np.array_equal(_filled(line), mask), combo  # closed, and its fill is the shape
        # One pixel wide: about the shape's perimeter (4 x side for a square, less for the others).
        side = np.flatnonzero(mask.any(axis=0)).size
        assert side <= line.sum() <= 4 * side, (combo, line.sum(), side)


def test_white_on_black():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 2] = True
    rgb, grey = white_on_black(mask), white_on_black(mask, "L")
    assert rgb.mode == "RGB" and rgb.size == (5, 4) and grey.mode == "L"
    assert rgb.getpixel((2, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 0)
    assert np.array_equal(np.asarray(grey) > 127, mask)


# ----------------------------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------------------------


def test_generate_dataset_is_byte_identical(tmp_path):
    a = generate_dataset(tmp_path / "a", num_images=100, resolution=32, seed=3, num_heldout=10)
    generate_dataset(tmp_path / "b", num_images=100, resolution=32, seed=3, num_heldout=10)
    assert a["num_images"] == 100 and Path(a["metadata_path"]).is_file()
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 100 + 3  # images, metadata, heldout, config
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    c = generate_dataset(tmp_path / "c", num_images=100, resolution=32, seed=4, num_heldout=10)
    assert Path(c["metadata_path"]).read_bytes() != Path(a["metadata_path"]).read_bytes()


def test_metadata_matches_captions_and_balances_combos(tmp_path):
    summary = generate_dataset(tmp_path, num_images=200, resolution=32, seed=1, num_heldout=5)
    rows = _read_jsonl(Path(summary["metadata_path"]))
    assert len(rows) == 200
    for row in rows:
        assert list(row) == ["file_name", "text", "shape", "color", "position", "caption_is_correct"]
        assert row["text"] == caption(row["shape"], row["color"], row["position"])
        assert row["caption_is_correct"] is True
        assert (tmp_path / "train" / row["file_name"]).is_file()
    counts = Counter((row["shape"], row["color"], row["position"]) for row in rows)
    assert set(counts) == set(all_combinations())
    assert set(counts.values()) <= {2, 3}  # 200 images over 90 combos


def test_heldout_prompts(tmp_path):
    generate_dataset(tmp_path, num_images=90, num_heldout=30, seed=2)
    heldout = _read_jsonl(tmp_path / "heldout_prompts.jsonl")
    assert len(heldout) == 30
    combos = [(h["shape"], h["color"], h["position"]) for h in heldout]
    assert len(set(combos)) == 30
    for h, combo in zip(heldout, combos, strict=True):
        assert list(h) == ["prompt", "shape", "color", "position"]
        assert h["prompt"] == caption(*combo)
    # Without exclusion the held-out combos are also trained on.
    train = {
        (r["shape"], r["color"], r["position"]) for r in _read_jsonl(tmp_path / "train" / "metadata.jsonl")
    }
    assert set(combos) <= train


def test_exclude_heldout_from_train(tmp_path):
    summary = generate_dataset(
        tmp_path, num_images=300, num_heldout=30, seed=2, exclude_heldout_from_train=True
    )
    heldout = {
        (h["shape"], h["color"], h["position"]) for h in _read_jsonl(tmp_path / "heldout_prompts.jsonl")
    }
    train = Counter(
        (r["shape"], r["color"], r["position"]) for r in _read_jsonl(tmp_path / "train" / "metadata.jsonl")
    )
    assert len(heldout) == 30 and not heldout & set(train)
    assert set(train) == set(all_combinations()) - heldout
    assert set(train.values()) == {5} and summary["num_train_combinations"] == 60
    # The held-out set depends on the seed only, not on num_images or the exclusion flag.
    generate_dataset(tmp_path / "other", num_images=10, num_heldout=30, seed=2)
    assert (tmp_path / "other" / "heldout_prompts.jsonl").read_bytes() == (
        tmp_path / "heldout_prompts.jsonl"
    ).read_bytes()


def _named(text: str) -> tuple[str, str, str]:
    """The (shape, color, position) a caption names, by inverting caption() over all combinations."""
    return {caption(*combo): combo for combo in all_combinations()}[text]


def test_caption_noise_misnames_one_attribute_and_keeps_images(tmp_path):
    clean = generate_dataset(
        tmp_path / "clean", num_images=600, num_heldout=30, seed=5, exclude_heldout_from_train=True
    )
    noisy = generate_dataset(
        tmp_path / "noisy",
        num_images=600,
        num_heldout=30,
        seed=5,
        exclude_heldout_from_train=True,
        caption_noise=0.3,
    )
    clean_rows = _read_jsonl(Path(clean["metadata_path"]))
    noisy_rows = _read_jsonl(Path(noisy["metadata_path"]))
    heldout = {h["prompt"] for h in _read_jsonl(tmp_path / "noisy" / "heldout_prompts.jsonl")}
    wrong = [row for row in noisy_rows if not row["caption_is_correct"]]
    # Binomial(600, 0.3): mean 180, sd 11.2; +-4.5 sd.
    assert noisy["num_noisy_captions"] == len(wrong) and 130 <= len(wrong) <= 230
    misnamed = Counter()
    for clean_row, row in zip(clean_rows, noisy_rows, strict=True):
        truth = (row["shape"], row["color"], row["position"])
        assert truth == (clean_row["shape"], clean_row["color"], clean_row["position"])
        assert (tmp_path / "clean" / "train" / row["file_name"]).read_bytes() == (
            tmp_path / "noisy" / "train" / row["file_name"]
        ).read_bytes()
        named = _named(row["text"])
        differing = [i for i in range(3) if named[i] != truth[i]]
        assert len(differing) == (0 if row["caption_is_correct"] else 1), row
        assert row["text"] not in heldout  # a held-out prompt is never seen in training, not even as noise
        misnamed.update(differing)
    # Each attribute is misnamed about a third of the time, whatever its vocabulary size.
    assert all(len(wrong) / 3 - 35 <= misnamed[i] <= len(wrong) / 3 + 35 for i in range(3)), misnamed


def test_misnamed_combination_picks_each_attribute_a_third_of_the_time():
    combo = ("triangle", "cyan", "center")  # 2 other shapes, 5 other colours, 4 other positions
    rng = np.random.default_rng(0)
    changed = Counter(
        next(i for i in range(3) if other[i] != combo[i])
        for other in (misnamed_combination(combo, rng) for _ in range(3000))
    )
    # Binomial(3000, 1/3): sd 26; +-75 is about 3 sd. Uniform over the 11 changes would give 545/1364/1091.
    assert all(925 <= changed[i] <= 1075 for i in range(3)), changed


def test_misnamed_combination_respects_forbidden_combinations():
    combo = ("circle", "red", "left")
    others = {misnamed_combination(combo, np.random.default_rng(i)) for i in range(400)}
    assert len(others) == 2 + 5 + 4 and combo not in others  # every one-attribute change, and only those
    forbidden = others - {("square", "red", "left")}
    assert misnamed_combination(combo, np.random.default_rng(0), forbidden) == ("square", "red", "left")
    assert misnamed_combination(combo, np.random.default_rng(0), others) == combo


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_images": 10, "caption_noise": 1.0}, "caption_noise"),
        ({"num_images": 10, "caption_noise": -0.1}, "caption_noise"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 10, "seed": -1}, "seed"),
        ({"num_images": 10, "num_heldout": -1}, "num_heldout"),
        ({"num_images": 10, "num_heldout": 91}, "num_heldout=91"),
        ({"num_images": 10, "num_heldout": 90, "exclude_heldout_from_train": True}, "no combination"),
        ({"num_images": 10, "resolution": 8}, "resolution"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, **kwargs)


def test_generate_dataset_replaces_its_own_output_but_not_foreign_files(tmp_path):
    generate_dataset(tmp_path / "ours", num_images=20)
    generate_dataset(tmp_path / "ours", num_images=5)
    assert len(list((tmp_path / "ours" / "train").glob("*.png"))) == 5
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    (tmp_path / "foreign" / "train" / "photo.png").write_bytes(b"")
    with pytest.raises(ValueError, match="delete the folder"):
        generate_dataset(tmp_path / "foreign", num_images=5)


def test_loads_as_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    generate_dataset(tmp_path / "data", num_images=12, num_heldout=3)
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")
    )
    train = ds["train"]
    assert len(train) == 12
    assert {"image", "text", "shape", "color", "position"} <= set(train.column_names)
    assert train[0]["image"].size == (32, 32)


def test_conditioning_edges_load_as_an_imagefolder_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    generate_dataset(tmp_path / "data", num_images=5, resolution=16, num_heldout=2, conditioning="edges")
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")
    )
    assert list(ds) == ["train"]  # heldout/ is not a split
    train = ds["train"]
    assert len(train) == 5  # the outlines are a column, not rows
    assert {"image", "conditioning_image", "text"} <= set(train.column_names)
    first = train[0]
    assert first["conditioning_image"].size == first["image"].size == (16, 16)
    expected = Image.open(tmp_path / "data" / "train" / "conditioning" / "000000.png")
    assert np.array_equal(np.asarray(first["conditioning_image"]), np.asarray(expected))


def test_conditioning_edges_outlines_follow_the_pixels_not_the_captions(tmp_path):
    kwargs = {"num_images": 8, "resolution": 64, "seed": 3, "num_heldout": 3, "conditioning": "edges"}
    summary = generate_dataset(tmp_path / "noisy", caption_noise=0.6, **kwargs)
    rows = _read_jsonl(Path(summary["metadata_path"]))
    assert summary["conditioning"] == "edges" and not all(row["caption_is_correct"] for row in rows)
    for row in rows:
        assert list(row)[:2] == ["file_name", "conditioning_image_file_name"]
        assert row["conditioning_image_file_name"] == f"conditioning/{row['file_name']}"
        image = Image.open(tmp_path / "noisy" / "train" / row["file_name"])
        control = Image.open(tmp_path / "noisy" / "train" / row["conditioning_image_file_name"])
        assert control.mode == "RGB" and control.size == image.size
        pixels = np.asarray(control)
        assert set(np.unique(pixels)) == {0, 255} and (pixels == pixels[..., :1]).all()  # white on black
        # The outline encloses the shape the detector finds in the image, whatever the caption says.
        assert mask_iou(image, _filled(pixels[..., 0] > 0)) >= 0.95, row
    # Images and outlines do not depend on the captions; the default writes neither folder nor key.
    generate_dataset(tmp_path / "clean", **kwargs)
    plain = generate_dataset(tmp_path / "plain", **{**kwargs, "conditioning": "none"})
    for row in rows:
        for name in (row["file_name"], row["conditioning_image_file_name"]):
            assert (tmp_path / "noisy" / "train" / name).read_bytes() == (
                tmp_path / "clean" / "train" / name
            ).read_bytes()
        assert (tmp_path / "plain" / "train" / row["file_name"]).read_bytes() == (
            tmp_path / "noisy" / "train" / row["file_name"]
        ).read_bytes()
    assert not (tmp_path / "plain" / "train" / "conditioning").exists()
    assert not (tmp_path / "plain" / "heldout").exists()
    assert "conditioning_image_file_name" not in _read_jsonl(Path(plain["metadata_path"]))[0]


def test_conditioning_edges_heldout_outlines_and_masks(tmp_path):
    generate_dataset(tmp_path, num_images=6, resolution=64, seed=4, num_heldout=5, conditioning="edges")
    heldout = _read_jsonl(tmp_path / "heldout_prompts.jsonl")
    for j, row in enumerate(heldout):
        assert list(row) == ["prompt", "shape", "color", "position", "conditioning_image", "mask"]
        assert row["conditioning_image"] == f"heldout/conditioning/{j:03d}.png"
        assert row["mask"] == f"heldout/mask/{j:03d}.png"
        mask_image = Image.open(tmp_path / row["mask"])
        assert mask_image.mode == "L" and mask_image.size == (64, 64)
        mask = np.asarray(mask_image) > 127
        assert set(np.unique(np.asarray(mask_image))) == {0, 255}
        # The outline is exactly the mask's edge, and the mask is the prompt's shape at the prompt's position.
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / row["conditioning_image"]))[..., 0] > 0, outline(mask)
        )
        painted = np.where(mask[..., None], np.array(COLORS[row["color"]]), np.array(BACKGROUND)).astype(
            np.uint8
        )
        assert detect(painted) == {key: row[key] for key in ("shape", "color", "position")}
    # A fresh draw: not the geometry of a training image of the same index (those come from other generators).
    train_masks = [
        render_with_mask(
            *(h[k] for k in ("shape", "color", "position")), 64, np.random.default_rng((4, 3, j))
        )[1]
        for j, h in enumerate(heldout)
    ]
    assert not any(
        np.array_equal(np.asarray(Image.open(tmp_path / h["mask"])) > 127, m)
        for h, m in zip(heldout, train_masks, strict=True)
    )


def test_cli_conditioning_edges_and_reuse(tmp_path, capsys):
    args = ["--out_dir", str(tmp_path), "--num_images", "3", "--resolution", "16", "--num_heldout", "2"]
    main([*args, "--conditioning", "edges"])
    assert "Outlines" in capsys.readouterr().out
    assert json.loads((tmp_path / "generator_config.json").read_text())["conditioning"] == "edges"
    assert len(list((tmp_path / "train" / "conditioning").glob("*.png"))) == 3
    main([*args, "--conditioning", "edges"])
    assert "Reusing" in capsys.readouterr().out
    main(args)  # back to no conditioning: the outlines go
    assert "Wrote 3 images" in capsys.readouterr().out
    assert not (tmp_path / "train" / "conditioning").exists() and not (tmp_path / "heldout").exists()
    assert "conditioning" not in json.loads((tmp_path / "generator_config.json").read_text())
    with pytest.raises(ValueError, match="conditioning must be one of"):
        generate_dataset(tmp_path, num_images=3, conditioning="canny")


def test_cli_reuses_matching_data(tmp_path, capsys):
    args = ["--out_dir", str(tmp_path), "--num_images", "6", "--resolution", "16", "--num_heldout", "4"]
    main(args)
    assert "Wrote 6 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "generator_config.json").read_text())["resolution"] == 16
    main(args)
    assert "Reusing" in capsys.readouterr().out
    main([*args, "--exclude_heldout_from_train"])
    assert "Wrote 6 images" in capsys.readouterr().out


def test_colors_restrict_the_palette_and_default_configs_are_unchanged(tmp_path):
    args = ["--num_images", "12", "--resolution", "16", "--num_heldout", "3"]
    main(["--out_dir", str(tmp_path / "all"), *args])
    assert "colors" not in json.loads((tmp_path / "all" / "generator_config.json").read_text())
    main(["--out_dir", str(tmp_path / "cyan"), *args, "--colors", "cyan"])
    assert {row["color"] for row in _read_jsonl(tmp_path / "cyan" / "train" / "metadata.jsonl")} == {"cyan"}
    assert {row["color"] for row in _read_jsonl(tmp_path / "cyan" / "heldout_prompts.jsonl")} == {"cyan"}
    main(["--out_dir", str(tmp_path / "no-cyan"), *args, "--colors", *[c for c in COLORS if c != "cyan"]])
    rows = _read_jsonl(tmp_path / "no-cyan" / "train" / "metadata.jsonl")
    assert "cyan" not in {row["color"] for row in rows} and all("cyan" not in row["text"] for row in rows)
    with pytest.raises(ValueError, match="unknown: \\['orange'\\]"):
        main(["--out_dir", str(tmp_path / "bad"), *args, "--colors", "orange"])


# ----------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "seed"), [(32, 1001), (64, 1002)])
def test_detector_reads_generated_images(tmp_path, resolution, seed):
    generate_dataset(tmp_path, num_images=300, resolution=resolution, seed=seed)
    accuracy = detector_accuracy(_labeled_images(tmp_path))
    print(f"detector accuracy at {resolution} px: {accuracy}")
    assert accuracy["num_images"] == 300
    for key in ("shape", "color", "position"):
        assert accuracy[key] >= 0.99, (key, accuracy)


def _degrade(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Roughly what a small diffusion model gets wrong: stray specks, soft edges, noise, off-palette colour."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x, y = (int(v) for v in rng.integers(0, image.width - 1, size=2))
        draw.point((x, y), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)
    pixels = pixels + rng.uniform(-25, 25, size=3) + rng.normal(0, 8, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resolution", [32, 64])
def test_detector_tolerates_degraded_images(resolution):
    rng = np.random.default_rng(2002 + resolution)
    combos = all_combinations()
    records = []
    for i in range(180):
        shape, color, position = combos[i % len(combos)]
        image = _degrade(render(shape, color, position, resolution, rng), rng)
        records.append((image, {"shape": shape, "color": color, "position": position}))
    accuracy = detector_accuracy(records)
    print(f"detector accuracy on degraded {resolution} px images: {accuracy}")
    assert accuracy["all"] >= 0.97, accuracy


def test_detector_input_types_agree():
    image = render("square", "yellow", "bottom", 32, np.random.default_rng(0))
    uint8 = np.asarray(image)
    expected = {"shape": "square", "color": "yellow", "position": "bottom"}
    assert detect(image) == detect(uint8) == detect(uint8.astype(np.float32) / 255) == expected
    assert detect(image.convert("RGBA")) == expected


@pytest.mark.parametrize("value", [255, 0, 128])
def test_detector_blank_image_returns_none(value):
    blank = np.full((32, 32, 3), value, dtype=np.uint8)
    none = {"shape": None, "color": None, "position": None}
    assert detect(blank) == none
    assert detect(Image.fromarray(blank)) == none
    assert detect(blank.astype(np.float64) / 255) == none
    assert detect(np.zeros((2, 2, 3), dtype=np.uint8)) == none


@pytest.mark.parametrize("resolution", [32, 64])
def test_mask_iou_of_the_generators_own_images(resolution):
    rng = np.random.default_rng(31 + resolution)
    for combo in all_combinations():
        image, mask = render_with_mask(*combo, resolution, rng)
        assert mask_iou(image, mask) >= 0.95, combo
    # Masks as the generator saves them (white on black, mode L) read the same as boolean arrays.
    assert mask_iou(image, white_on_black(mask, "L")) == mask_iou(image, mask)


def test_mask_iou_of_a_shifted_or_missing_shape():
    image, mask = render_with_mask("square", "blue", "left", 64, np.random.default_rng(0))
    assert np.array_equal(object_mask(image), mask)  # a clean image segments to its own mask
    shifted = np.roll(mask, 16, axis=1)  # a quarter of the image to the right
    assert mask_iou(image, shifted) < 0.2
    assert mask_iou(np.full((64, 64, 3), 255, dtype=np.uint8), mask) == 0.0  # nothing drawn
    assert not object_mask(np.full((64, 64, 3), 255, dtype=np.uint8)).any()
    with pytest.raises(ValueError, match="32x32 px but the image is 64x64"):
        mask_iou(image, mask[:32, :32])
    with pytest.raises(ValueError, match="empty"):
        mask_iou(image, np.zeros_like(mask))
    with pytest.raises(ValueError, match="2-D"):
        mask_iou(image, np.stack([mask] * 3, axis=-1))


def test_detector_ignores_a_small_stray_blob():
    image = render("circle", "green", "top", 64, np.random.default_rng(0))
    ImageDraw.Draw(image).rectangle((50, 50, 51, 51), fill=COLORS["red"])
    assert detect(image) == {"shape": "circle", "color": "green", "position": "top"}


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((32, 32), dtype=np.uint8), "shape"),
        (np.zeros((32, 32, 4), dtype=np.uint8), "shape"),
        (np.zeros((32, 32, 3), dtype=np.int64), "dtype"),
        (np.full((32, 32, 3), 2.0), r"\[0, 1\]"),
    ],
)
def test_detector_rejects_bad_arrays(array, match):
    with pytest.raises(ValueError, match=match):
        detect(array)


def test_detector_accuracy_rejects_empty_records():
    with pytest.raises(ValueError, match="empty"):
        detector_accuracy([])
