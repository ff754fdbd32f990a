"""Aspect-ratio buckets in training: the transform, the cache, the loader, resume and validation, on real launches.

The bucket math and the sampler are tested in test_buckets.py; here they meet the data, the latent cache and
train_ldm.py. The world is the tiny one at 32 px, stretched into a mix of 1:2, 1:1 and 2:1 images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from ldm.shapes.aspects import make_mixed_aspect
from ldm.training.bucketing import BucketedStream
from ldm.training.buckets import BucketBatchSampler, BucketSpec, assign_buckets
from ldm.training.config import load_config
from ldm.training.data import TrainLoader, build_train_and_heldout, collate_fn
from ldm.training.transforms import ImageCaptionTransform, upright_size
from tests.training_helpers import launch, make_world, same_tensors, tensors

# --resolution 32 with 8 px steps: 1:2 images go to 24x40, squares to 32x32, 2:1 images to 40x24.
BUCKET_ARGS = ("--resolution", "32", "--aspect_buckets", "--bucket_step", "8")
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def mixed_world(tmp_path_factory):
    """make_world's base, with its data replaced by 40 images of 32 px stretched to 1:2, 1:1 and 2:1 in turn."""
    root = tmp_path_factory.mktemp("mixed")
    make_world(root / "square", resolution=32)
    make_mixed_aspect(root / "square" / "data", root / "data", [(1, 2), (1, 1), (2, 1)])
    (root / "base").symlink_to(root / "square" / "base")
    return root


def test_upright_size_swaps_the_sides_of_a_photo_stored_sideways(tmp_path):
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to view
    image.save(tmp_path / "sideways.jpg", exif=exif)
    image.save(tmp_path / "plain.png")
    assert upright_size(str(tmp_path / "sideways.jpg")) == (20, 40)
    assert upright_size(str(tmp_path / "plain.png")) == (40, 20)


def test_a_square_bucket_gives_the_square_crop_and_a_bucket_its_own_shape():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 61, 3), dtype=np.uint8))
    for center in (True, False):
        transform = ImageCaptionTransform(32, center_crop=center, random_flip=True, seed=5)
        for index in range(4):
            square, _ = transform(image, "a cat", epoch=1, index=index)
            bucketed, _ = transform(image, "a cat", epoch=1, index=index, bucket=(32, 32))
            assert torch.equal(square, bucketed)
        wide, _ = transform(image, "a cat", epoch=1, index=0, bucket=(40, 24))
        assert wide.shape == (3, 24, 40)


def mixed_config(world, tmp_path, *args):
    return load_config(
        ["--config", "configs/tiny.yaml", "--pretrained_model_name_or_path", str(world / "base"),
         "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache"), *BUCKET_ARGS, *args]
    )  # fmt: skip


def bucketed_dataset(world, tmp_path, *args):
    config = mixed_config(world, tmp_path, *args)
    train, _ = build_train_and_heldout(config, 0, 0)
    spec = BucketSpec(32, 16, 64, 8)
    train.set_buckets(list(assign_buckets(train.image_sizes(), spec).bucket_of))
    return config, train


def test_every_bucketed_batch_has_one_shape(mixed_world, tmp_path):
    config, train = bucketed_dataset(mixed_world, tmp_path)
    assert sorted({b for b in train.buckets if b}) == [(24, 40), (32, 32), (40, 24)]
    accelerator = Accelerator(cpu=True)
    sampler = BucketBatchSampler(train.buckets, 4, seed=0)
    loader = TrainLoader(train, collate_fn, config, 0, sampler)
    loader.prepare(accelerator, torch.nn.Linear(1, 1))
    seen = 0
    for batch in loader.batches(epoch=0):
        (shape,) = {train.bucket(int(i)) for i in batch["indices"]}
        assert batch["pixel_values"].shape[-2:] == (shape[1], shape[0])
        seen += 1
    assert seen == len(sampler)


def test_bucketed_resume_mid_epoch_with_accumulation_is_bitwise_identical_cached_or_not(
    mixed_world, tmp_path
):
    # 32 rows (31 readable) in buckets of 11, 11 and 9: 9 batches of 4 per epoch, 5 optimizer steps with
    # accumulation 2; step 3 is mid-epoch and step 8 is in the second epoch. The cached and the live path train
    # the same bits, so the run is cut in two on one path and finished on the other, and must equal a run that
    # never stopped.
    common = [*BUCKET_ARGS, "--gradient_accumulation_steps", "2", "--max_train_steps", "8", "--checkpointing_steps",
              "3", "--validation_steps", "100"]  # fmt: skip
    world = mixed_world
    launch(world, tmp_path / "full", *common, "--cache_latents", "false", "--validation_prompts", "a red circle",
           "--validation_steps", "8")  # fmt: skip
    half = launch(world, tmp_path / "half", *common, "--cache_latents", "true", "--max_train_steps", "3")
    resumed = launch(
        world, tmp_path / "half", *common, "--cache_latents", "false", "--resume_from_checkpoint", "latest"
    )
    assert same_tensors(tensors(tmp_path / "full" / UNET_FILE), tensors(tmp_path / "half" / UNET_FILE))
    assert "Latent cache miss" in half.stderr and "Latent cache" not in resumed.stderr
    log = resumed.stdout + resumed.stderr
    assert "bucket    24x40" in log and "31 images in 3 of" in log and "1 unreadable" in log
    # Validation samples at the square and at the fullest wide and tall buckets: one row each.
    grid = Image.open(tmp_path / "full" / "validation" / "step-000008.png")
    assert grid.size == (40, 3 * 40)
    state = json.loads((tmp_path / "half" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 6


def test_a_bucketed_stream_gives_every_process_the_same_shape_and_its_own_rows(mixed_world, tmp_path):
    config = mixed_config(mixed_world, tmp_path, "--streaming", "true", "--max_train_steps", "2")
    spec = BucketSpec(32, 16, 64, 8)
    streams = []
    for rank in (0, 1):
        train, _ = build_train_and_heldout(config, 0, 0, rank, 2)
        streams.append(BucketedStream(train, spec, "upscale", batch_size=2))
    per_process = [list(stream) for stream in streams]
    assert len(per_process[0]) == len(per_process[1]) > 3
    seen = []
    for a, b in zip(*per_process, strict=True):
        assert a["pixel_values"].shape == b["pixel_values"].shape  # one bucket per step on both processes
        assert a["pixel_values"].shape[-2:] in {(40, 24), (32, 32), (24, 40)}
        seen += a["indices"].tolist() + b["indices"].tolist()
    assert len(seen) == len(set(seen))  # each row trained on by one process
    # Resuming after 2 batches: the rest, unchanged, without decoding the first ones.
    streams[1].set_resume_position(2, 2)
    rest = list(streams[1])
    assert [r["indices"].tolist() for r in rest] == [b["indices"].tolist() for b in per_process[1][2:]]
    assert all(
        torch.equal(r["pixel_values"], b["pixel_values"])
        for r, b in zip(rest, per_process[1][2:], strict=True)
    )


def test_bucketed_streaming_resume_is_bitwise_identical(mixed_world, tmp_path):
    common = [*BUCKET_ARGS, "--streaming", "true", "--cache_latents", "false", "--max_train_steps", "6",
              "--checkpointing_steps", "3", "--validation_steps", "100"]  # fmt: skip
    launch(mixed_world, tmp_path / "full", *common)
    launch(mixed_world, tmp_path / "half", *common, "--max_train_steps", "3")
    launch(mixed_world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    assert same_tensors(tensors(tmp_path / "full" / UNET_FILE), tensors(tmp_path / "half" / UNET_FILE))
