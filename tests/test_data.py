"""Data pipeline: loading imagefolders and webdataset shards, the deterministic transform, bad images."""

import io
import json
import logging
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.training.config import TrainConfig
from ldm.training.data import (
    StreamingTrainDataset,
    TrainDataset,
    build_train_dataset,
    collate_fn,
    make_dataloader,
)
from ldm.training.sources import load_image_caption_dataset, shard_for_process
from ldm.training.transforms import (
    ImageCaptionTransform,
    caption_dropout_mask,
    draw_sample_randomness,
    open_image,
)

RESOLUTION = 32
CAPTIONS = [["a red cat"], ["a dog", "a blue dog", "the dog"], ["a circle"]]
SEED = 1234


def random_image(seed: int, width: int = 40, height: int = 48) -> Image.Image:
    """A noise image, so that crops and flips change the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def imagefolder(tmp_path):
    """Three 40x48 PNGs with list captions, a corrupt PNG (random bytes) and a zero-byte PNG.

    Arrow needs one type per column, so every caption is a list; string captions are covered by
    the webdataset shards.
    """
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, captions in enumerate(CAPTIONS):
        random_image(i).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": captions})
    (folder / "corrupt.png").write_bytes(np.random.default_rng(9).bytes(200))
    (folder / "empty.png").write_bytes(b"")
    rows += [{"file_name": "corrupt.png", "text": ["bad"]}, {"file_name": "empty.png", "text": ["empty"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture
def webdataset_dir(tmp_path):
    """Two tar shards of three samples each, members named like 000.png / 000.txt."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"{shard:03d}.tar", "w") as tar:
            for i in range(3 * shard, 3 * shard + 3):
                for name, data in (
                    (f"{i:03d}.png", png_bytes(random_image(i))),
                    (f"{i:03d}.txt", f"sample {i}".encode()),
                ):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return folder


def make_config(data_dir, tmp_path, **overrides) -> TrainConfig:
    fields = {
        "pretrained_model_name_or_path": "unused",
        "train_data_dir": str(data_dir),
        "resolution": RESOLUTION,
        "random_flip": True,
        "cache_dir": str(tmp_path / "hf-cache"),
        "train_batch_size": 5,
        **overrides,
    }
    config = TrainConfig(**fields)
    config.validate()
    return config


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def test_imagefolder_loads_undecoded(imagefolder, tmp_path):
    dataset = load_image_caption_dataset(make_config(imagefolder, tmp_path))
    assert isinstance(dataset, datasets.Dataset)
    assert len(dataset) == 5
    assert set(dataset.column_names) == {"image", "text"}
    assert dataset.features["image"].decode is False
    assert dataset[1]["text"] == CAPTIONS[1]
    assert open_image(dataset[0]["image"]).size == (40, 48)


def test_max_train_samples_truncates(imagefolder, tmp_path):
    dataset = load_image_caption_dataset(make_config(imagefolder, tmp_path, max_train_samples=2))
    assert [row["text"] for row in dataset] == CAPTIONS[:2]


def test_missing_column_names_columns_found(imagefolder, tmp_path):
    with pytest.raises(ValueError, match=r"'caption'.*--caption_column.*columns found: \['image', 'text'\]"):
        load_image_caption_dataset(make_config(imagefolder, tmp_path, caption_column="caption"))
    with pytest.raises(ValueError, match=r"image column 'img'.*--image_column"):
        load_image_caption_dataset(make_config(imagefolder, tmp_path, image_column="img"))


def test_missing_data_dir(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_caption_dataset(make_config(tmp_path / "nowhere", tmp_path))


def test_webdataset_shards_load_with_captions(webdataset_dir, tmp_path):
    dataset = load_image_caption_dataset(make_config(webdataset_dir, tmp_path))
    assert isinstance(dataset, datasets.Dataset)
    assert set(dataset.column_names) == {"image", "text"}  # renamed from "png" / "txt"
    assert sorted(dataset["text"]) == [f"sample {i}" for i in range(6)]
    sample = TrainDataset(dataset, ImageCaptionTransform(RESOLUTION, False, True, SEED), "image", "text")[4]
    assert sample["caption"] == dataset[4]["text"]
    assert sample["pixel_values"].shape == (3, RESOLUTION, RESOLUTION)


def test_webdataset_explicit_column_names(webdataset_dir, tmp_path):
    config = make_config(webdataset_dir, tmp_path, image_column="png", caption_column="txt")
    assert set(load_image_caption_dataset(config).column_names) == {"png", "txt"}


# ----------------------------------------------------------------------------------------------------
# Transform and randomness
# ----------------------------------------------------------------------------------------------------


def test_transform_shape_and_range(imagefolder, tmp_path):
    dataset = build_train_dataset(make_config(imagefolder, tmp_path), SEED)
    for index in range(3):
        sample = dataset[index]
        assert sample["pixel_values"].shape == (3, RESOLUTION, RESOLUTION)  # (3, H, W)
        assert sample["pixel_values"].dtype == torch.float32
        assert -1.0 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1.0
        assert sample["caption"] in CAPTIONS[index]
        assert sample["index"] == index


def test_pixels_match_crop_and_flip_draws():
    # A coordinate image already RESOLUTION tall, so there is no resize: red encodes x, green encodes y.
    width, height = 64, RESOLUTION
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 3, y * 7, np.zeros_like(x)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    transform = ImageCaptionTransform(RESOLUTION, center_crop=False, random_flip=True, seed=SEED)
    seen_flips = set()
    for index in range(20):
        pixel_values, _ = transform(image, "c", epoch=0, index=index)
        draws = draw_sample_randomness(
            SEED, 0, index, 1, RESOLUTION, image.size, center_crop=False, random_flip=True
        )
        expected = pixels[:, draws["crop_left"] : draws["crop_left"] + RESOLUTION]
        if draws["flip"]:
            expected = expected[:, ::-1]
        seen_flips.add(draws["flip"])
        assert draws["crop_top"] == 0
        torch.testing.assert_close(
            pixel_values, torch.from_numpy(expected / 127.5 - 1.0).permute(2, 0, 1).float()
        )
    assert seen_flips == {True, False}


def test_center_crop_and_no_flip():
    for index in range(10):
        draws = draw_sample_randomness(SEED, 3, index, 1, 32, (40, 48), center_crop=True, random_flip=False)
        # 40x48 -> 32x38 (round(48 * 0.8) = 38): the centre window starts 3 rows down.
        assert draws["flip"] is False
        assert (draws["crop_top"], draws["crop_left"]) == (3, 0)


def test_randomness_is_a_function_of_seed_epoch_index():
    def draw(seed, epoch, index, image_size=(40, 48)):
        return draw_sample_randomness(
            seed, epoch, index, 3, RESOLUTION, image_size, center_crop=False, random_flip=True
        )

    assert all(draw(SEED, 2, i) == draw(SEED, 2, i) for i in range(50))
    # Flip and caption choice do not depend on the image size, so the latent cache can recompute them.
    for i in range(50):
        a, b = draw(SEED, 2, i), draw(SEED, 2, i, image_size=(300, 90))
        assert (a["flip"], a["caption_index"]) == (b["flip"], b["caption_index"])

    epoch0 = [draw(SEED, 0, i) for i in range(200)]
    epoch1 = [draw(SEED, 1, i) for i in range(200)]
    for key in ("flip", "crop_top", "caption_index"):
        assert [d[key] for d in epoch0] != [d[key] for d in epoch1], key
    assert {d["caption_index"] for d in epoch0} == {0, 1, 2}
    assert {d["crop_top"] for d in epoch0} == set(range(38 - RESOLUTION + 1))
    assert [d["flip"] for d in epoch0] != [d["flip"] for d in (draw(SEED + 1, 0, i) for i in range(200))]


def test_dataset_samples_repeat_per_epoch_and_change_across_epochs(imagefolder, tmp_path):
    config = make_config(imagefolder, tmp_path)

    def pixels(epoch):
        dataset = build_train_dataset(config, SEED)  # a fresh instance, as after a resume
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["pixel_values"] for i in range(3)])

    torch.testing.assert_close(pixels(1), pixels(1), rtol=0, atol=0)
    assert not torch.equal(pixels(0), pixels(1))


def test_dataloader_workers_do_not_change_batches(imagefolder, tmp_path):
    dataset = build_train_dataset(make_config(imagefolder, tmp_path), SEED)
    dataset.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = make_dataloader(
            dataset, make_config(imagefolder, tmp_path, dataloader_num_workers=workers), 7
        )
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]["indices"], batches[1]["indices"])
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])
    assert batches[0]["captions"] == batches[1]["captions"]


def test_dataloader_shuffle_is_seeded(imagefolder, tmp_path):
    config = make_config(imagefolder, tmp_path)
    dataset = build_train_dataset(config, SEED)

    def order(epoch_seed):
        return next(iter(make_dataloader(dataset, config, epoch_seed)))["indices"].tolist()

    assert order(0) == order(0)
    assert len({tuple(order(seed)) for seed in range(6)}) > 1


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_caption_dropout_rate(p):
    indices = torch.arange(20_000)
    mask = caption_dropout_mask(SEED, 0, indices, p)
    assert mask.dtype == torch.bool and mask.shape == (20_000,)
    tolerance = 5 * (p * (1 - p) / 20_000) ** 0.5
    assert abs(mask.float().mean().item() - p) < tolerance


def test_caption_dropout_is_pure_and_redrawn_per_epoch():
    indices = list(range(2_000))
    epoch0 = caption_dropout_mask(SEED, 0, indices, 0.5)
    assert torch.equal(epoch0, caption_dropout_mask(SEED, 0, torch.tensor(indices), 0.5))
    epoch1 = caption_dropout_mask(SEED, 1, indices, 0.5)
    # Independent coins agree about half the time.
    assert 0.4 < (epoch0 == epoch1).float().mean().item() < 0.6
    assert caption_dropout_mask(SEED, 0, [5, 7], 0.0).tolist() == [False, False]


# ----------------------------------------------------------------------------------------------------
# Corrupt images
# ----------------------------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_and_counted(imagefolder, tmp_path, caplog):
    dataset = build_train_dataset(make_config(imagefolder, tmp_path), SEED)
    with caplog.at_level(logging.WARNING, logger="ldm.training.data"):
        assert dataset[3] is None and dataset[4] is None
        assert dataset[3] is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2  # once per bad index
    assert "corrupt.png" in warnings[0] and "empty.png" in warnings[1]

    batch = collate_fn([dataset[i] for i in range(5)])
    assert batch["pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION)
    assert batch["indices"].tolist() == [0, 1, 2] and batch["indices"].dtype == torch.long
    assert len(batch["captions"]) == 3
    assert batch["num_skipped"] == 2

    empty = collate_fn([dataset[3], dataset[4]])
    assert empty["pixel_values"].shape[0] == 0 and empty["captions"] == [] and empty["num_skipped"] == 2


def test_open_image_accepts_every_form(imagefolder):
    path = imagefolder / "0.png"
    forms = [str(path), path, {"bytes": path.read_bytes(), "path": None}, {"bytes": None, "path": str(path)}]
    forms.append(Image.open(path).convert("L"))
    for value in forms:
        image = open_image(value)
        assert image.mode == "RGB" and image.size == (40, 48)
    with pytest.raises(ValueError, match="neither bytes nor path"):
        open_image({"bytes": None, "path": None})


# ----------------------------------------------------------------------------------------------------
# Streaming and process sharding
# ----------------------------------------------------------------------------------------------------


def test_streaming_yields_samples(webdataset_dir, tmp_path):
    config = make_config(webdataset_dir, tmp_path, streaming=True, max_train_steps=1)
    dataset = build_train_dataset(config, SEED)
    assert isinstance(dataset, StreamingTrainDataset)
    samples = list(dataset)
    assert [s["index"] for s in samples] == list(range(6))
    assert sorted(s["caption"] for s in samples) == [f"sample {i}" for i in range(6)]
    assert all(s["pixel_values"].shape == (3, RESOLUTION, RESOLUTION) for s in samples)
    batch = next(iter(make_dataloader(dataset, config, epoch_seed=0)))
    assert batch["pixel_values"].shape == (5, 3, RESOLUTION, RESOLUTION)


@pytest.mark.parametrize("num_processes", [2, 3])
def test_shard_for_process_is_disjoint(webdataset_dir, tmp_path, num_processes):
    stream = load_image_caption_dataset(
        make_config(webdataset_dir, tmp_path, streaming=True, max_train_steps=1)
    )
    assert isinstance(stream, datasets.IterableDataset)
    transform = ImageCaptionTransform(RESOLUTION, False, False, SEED)
    captions, indices = [], []
    for rank in range(num_processes):
        shard = shard_for_process(stream, rank, num_processes)
        part = list(StreamingTrainDataset(shard, transform, "image", "text", rank, num_processes))
        assert part  # every process gets data
        captions += [s["caption"] for s in part]
        indices += [s["index"] for s in part]
    assert sorted(captions) == [f"sample {i}" for i in range(6)]  # disjoint and complete
    assert len(set(indices)) == len(indices)  # sample indices are unique across processes


@pytest.mark.parametrize("bucket", [None, (24, 16)])
def test_a_control_gets_its_targets_crop_and_flip(bucket):
    # The image as its own control: the control's window is the target's, in [0, 1], whatever the caption count.
    image = random_image(3, width=48, height=40)
    transform = ImageCaptionTransform(16, center_crop=False, random_flip=True, seed=SEED)
    flips = set()
    for index in range(12):
        target, _ = transform(image, ["a", "b", "c"], epoch=2, index=index, bucket=bucket)
        control = transform.conditioning_pixels(image, epoch=2, index=index, bucket=bucket)
        assert torch.equal(control, (target + 1) / 2)
        flips.add(
            bool(
                draw_sample_randomness(
                    SEED, 2, index, 1, 16, image.size, center_crop=False, random_flip=True
                )["flip"]
            )
        )
    assert flips == {True, False}


def test_cached_controls_are_the_live_ones_and_bad_controls_are_skipped(tmp_path, caplog):
    from ldm.shapes.synthetic import generate_dataset
    from ldm.training.data import build_train_and_heldout
    from ldm.training.latent_cache import ConditionedIndexDataset

    generate_dataset(
        tmp_path / "data", num_images=12, resolution=24, seed=0, num_heldout=0, conditioning="edges"
    )
    controls = tmp_path / "data" / "train" / "conditioning"
    (controls / "000001.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(controls / "000002.png")
    config = TrainConfig(
        pretrained_model_name_or_path="unused", train_data_dir=str(tmp_path / "data"), resolution=16,
        center_crop=False, random_flip=True, seed=SEED,
    )  # fmt: skip
    live, _ = build_train_and_heldout(config, SEED, 0, conditioning_column="conditioning_image")
    cached = ConditionedIndexDataset(torch.ones(len(live), dtype=torch.bool), live)
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        batch = collate_fn([live[i] for i in range(len(live))])
        cached_batch = ConditionedIndexDataset.collate_fn([cached[i] for i in range(len(live))])
        assert batch["num_skipped"] == cached_batch["num_skipped"] == 2
        assert torch.equal(batch["indices"], cached_batch["indices"])
        assert torch.equal(batch["conditioning_pixel_values"], cached_batch["conditioning_pixel_values"])
        assert batch["conditioning_pixel_values"].shape == (10, 3, 16, 16)
    assert "conditioning image is 8x8 but its image is 24x24" in caplog.text
