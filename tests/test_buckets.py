"""Aspect-ratio bucketing: the bucket list, nearest bucket, cover-and-crop math, small images, the batch sampler."""

import itertools
from collections import Counter
from fractions import Fraction

import pytest

from ldm.training.buckets import (
    AREA_TOLERANCE,
    BucketBatchSampler,
    BucketSpec,
    assign_buckets,
    cover_size,
    crop_box,
    cropped_fraction,
    default_bucket_step,
    is_too_small,
    nearest_bucket,
)
from ldm.training.transforms import draw_sample, resized_size

SPEC_512 = BucketSpec(resolution=512, min_side=256, max_side=1024, step=64)
SPEC_64 = BucketSpec(resolution=64, min_side=32, max_side=128, step=8)  # the tiny demo scale
SPECS = [SPEC_512, SPEC_64]
RATIOS = [(1, 2), (1, 1), (2, 1)]
SEED = 1234

# ----------------------------------------------------------------------------- the bucket list


@pytest.mark.parametrize("spec", SPECS, ids=["512", "64"])
def test_bucket_list_follows_the_rule(spec):
    buckets = spec.buckets()
    target = spec.resolution**2
    assert (spec.resolution, spec.resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}  # symmetric under transpose
    assert [Fraction(w, h) for w, h in buckets] == sorted(Fraction(w, h) for w, h in buckets)
    for w, h in buckets:
        assert w % spec.step == 0 and h % spec.step == 0
        assert spec.min_side <= min(w, h) and max(w, h) <= spec.max_side
        assert target - spec.step * max(w, h) < w * h <= target * (1 + AREA_TOLERANCE)
    # Extreme shapes reach the bounds: 1:4 here, since min_side * max_side == resolution**2.
    assert buckets[0] == (spec.min_side, spec.max_side) and buckets[-1] == (spec.max_side, spec.min_side)


def test_each_width_takes_the_height_nearest_the_target_area():
    buckets = SPEC_512.buckets()
    assert (704, 384) in buckets  # +3.1% beats 704x320 at -14%
    assert (768, 320) in buckets  # 768x384 would be +12.5%, beyond the tolerance
    assert (768, 384) not in buckets


def test_square_is_left_out_only_when_resolution_is_off_the_step_grid():
    buckets = BucketSpec(resolution=96, min_side=64, max_side=128, step=64).buckets()
    assert (96, 96) not in buckets and buckets == [(64, 128), (128, 64)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=512, min_side=250, max_side=1024, step=64), "bucket_min_side"),
        (dict(resolution=512, min_side=256, max_side=1000, step=64), "bucket_max_side"),
        (dict(resolution=512, min_side=576, max_side=1024, step=64), "must lie within"),
        (dict(resolution=2048, min_side=256, max_side=1024, step=64), "must lie within"),
        (dict(resolution=512, min_side=256, max_side=1024, step=0), "step must be a positive integer"),
        (
            dict(resolution=True, min_side=256, max_side=1024, step=64),
            "resolution must be a positive integer",
        ),
    ],
)
def test_bad_spec_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketSpec(**kwargs)


def test_default_step_is_eight_latent_pixels():
    assert default_bucket_step(8) == 64 and default_bucket_step(2) == 16
    with pytest.raises(ValueError, match="vae_scale_factor"):
        default_bucket_step(0)


# ----------------------------------------------------------------------------- one image


@pytest.mark.parametrize("spec", SPECS, ids=["512", "64"])
def test_nearest_bucket_by_aspect_ratio(spec):
    buckets, r = spec.buckets(), spec.resolution
    for k in (r // 2, r, 3 * r):
        assert nearest_bucket((k + 7, k + 7), buckets) == (r, r)
        wide = nearest_bucket((2 * k, k), buckets)
        assert Fraction(*wide) == Fraction(11, 6)  # 1.83: the nearest to 2 on this grid (then 1.67 and 2.4)
        assert nearest_bucket((k, 2 * k), buckets) == wide[::-1]
    assert nearest_bucket((10, 1000), buckets) == buckets[0]  # extreme ratios go to the extreme buckets
    assert nearest_bucket((1000, 10), buckets) == buckets[-1]


def test_nearest_bucket_ties_go_to_the_squarer_then_the_narrower():
    # 2:1 is exactly halfway (in log) between 1:1 and 4:1.
    assert nearest_bucket((200, 100), [(128, 32), (64, 64)]) == (64, 64)
    assert nearest_bucket((200, 100), [(64, 32), (32, 16)]) == (32, 16)
    with pytest.raises(ValueError, match="No buckets"):
        nearest_bucket((10, 10), [])
    with pytest.raises(ValueError, match="image size"):
        nearest_bucket((0, 10), [(8, 8)])


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (100, 30), (1000, 999), (511, 1023)])
@pytest.mark.parametrize("bucket", [(48, 88), (64, 64), (104, 40)])
def test_cover_size_is_the_minimal_cover(size, bucket):
    width, height = cover_size(size, bucket)
    assert width >= bucket[0] and height >= bucket[1]
    assert width == bucket[0] or height == bucket[1]
    assert abs(width / height - size[0] / size[1]) <= 1 / min(width, height)  # aspect kept up to rounding


@pytest.mark.parametrize("size", [(40, 48), (48, 40), (33, 97), (512, 512), (1001, 333), (7, 5)])
def test_square_bucket_reproduces_the_square_crop(size):
    """With the bucket (R, R), resize and crop offsets are today's `resized_size` and `SampleDraws.crop_offsets`."""
    resolution = 32
    assert cover_size(size, (resolution, resolution)) == resized_size(size, resolution)
    for index, center in itertools.product(range(5), (False, True)):
        draws = draw_sample(SEED, 3, index, 1, random_flip=False)
        left, top, *_ = crop_box(
            resized_size(size, resolution),
            (resolution, resolution),
            draws.crop_top_u,
            draws.crop_left_u,
            center,
        )
        assert (top, left) == draws.crop_offsets(size, resolution, center)


def test_crop_box_edges_and_centre():
    resized, bucket = (100, 60), (64, 48)  # slack 36 horizontally, 12 vertically
    assert crop_box(resized, bucket, 0.0, 0.0, center=False) == (0, 0, 64, 48)
    assert crop_box(resized, bucket, 1.0, 1.0, center=False) == (36, 12, 100, 60)
    assert crop_box(resized, bucket, 0.0, 1.0, center=True) == (18, 6, 82, 54)
    for top_u, left_u in [(0.3, 0.7), (0.999, 0.001)]:
        left, top, right, bottom = crop_box(resized, bucket, top_u, left_u, center=False)
        assert 0 <= left and right <= 100 and 0 <= top and bottom <= 60
        assert (right - left, bottom - top) == bucket
    with pytest.raises(ValueError, match="cover_size"):
        crop_box((60, 60), bucket, 0.5, 0.5, center=False)
    with pytest.raises(ValueError, match="top_u"):
        crop_box(resized, bucket, 1.5, 0.5, center=False)


@pytest.mark.parametrize("spec", SPECS, ids=["512", "64"])
@pytest.mark.parametrize("ratio", RATIOS, ids=["1:2", "1:1", "2:1"])
def test_no_sample_loses_more_than_an_eighth_to_cropping(spec, ratio):
    buckets, r = spec.buckets(), spec.resolution
    sizes = [(ratio[0] * k, ratio[1] * k) for k in (r // 4, r // 2 + 3, r, 3 * r // 2 + 1, 4 * r, 777)]
    sizes += [(ratio[0] * k + 1, ratio[1] * k) for k in (r // 2, 2 * r)]  # a pixel off the exact ratio
    for size in sizes:
        assert cropped_fraction(size, nearest_bucket(size, buckets)) <= 1 / 8, size


# ----------------------------------------------------------------------------- the dataset


def test_small_images_are_upscaled_or_skipped_and_counted():
    sizes = [(64, 64), (63, 64), (100, 200), (40, 80), (200, 100), None, (16, 16)]
    buckets = SPEC_64.buckets()
    assert [is_too_small(s, buckets) for s in sizes if s] == [False, True, False, True, False, True]

    upscale = assign_buckets(sizes, SPEC_64)  # the default policy
    assert upscale.bucket_of == ((64, 64), (64, 64), (48, 88), (48, 88), (88, 48), None, (64, 64))
    assert (upscale.num_upscaled, upscale.num_skipped, upscale.num_unreadable) == (3, 0, 1)

    skip = assign_buckets(sizes, SPEC_64, small_images="skip")
    assert skip.bucket_of == ((64, 64), None, (48, 88), None, (88, 48), None, None)
    assert (skip.num_upscaled, skip.num_skipped, skip.num_unreadable) == (0, 3, 1)

    with pytest.raises(ValueError, match="bucket_small_images"):
        assign_buckets(sizes, SPEC_64, small_images="pad")
    with pytest.raises(ValueError, match="image 1"):
        assign_buckets([(64, 64), (64, -1)], SPEC_64)


def test_histogram_counts_every_assigned_image():
    assignment = assign_buckets(
        [(64, 64), (70, 70), (100, 200), None, (10, 10)], SPEC_64, small_images="skip"
    )
    assert assignment.histogram() == {(48, 88): 1, (64, 64): 2}
    lines = assignment.format_histogram().splitlines()
    assert len(lines) == 3 and "48x88" in lines[0] and "64x64" in lines[1]
    assert (
        "3 images in 2 of 17 buckets" in lines[2] and "1 skipped" in lines[2] and "1 unreadable" in lines[2]
    )


# ----------------------------------------------------------------------------- the batch sampler

# Three buckets of 7, 12 and 5 images, interleaved, and two left out.
BUCKET_OF = [(64, 64), (48, 88), (88, 48), None] * 5 + [(48, 88)] * 7 + [(64, 64), (64, 64), None]


def batches(epoch, skip=0, **kwargs):
    """This process's batches of ``epoch`` from a fresh sampler over ``BUCKET_OF``."""
    sampler = BucketBatchSampler(BUCKET_OF, seed=SEED, **{"batch_size": 2, **kwargs})
    sampler.set_epoch(epoch)
    sampler.set_skip(skip)
    return list(sampler)


@pytest.mark.parametrize("batch_size, num_processes", [(2, 1), (3, 1), (2, 2), (4, 3)])
def test_every_batch_is_one_bucket_and_every_image_is_seen(batch_size, num_processes):
    kwargs = dict(batch_size=batch_size, num_processes=num_processes)
    per_process = [batches(0, process_index=p, **kwargs) for p in range(num_processes)]
    sizes = Counter(b for b in BUCKET_OF if b is not None)
    global_size = batch_size * num_processes
    expected_len = sum(-(-n // global_size) for n in sizes.values())
    seen = Counter()
    for step_batches in zip(*per_process, strict=True):
        buckets = {BUCKET_OF[i] for batch in step_batches for i in batch}
        assert len(buckets) == 1  # one shape for the whole step, on every process
        assert all(len(batch) == batch_size for batch in step_batches)
        seen.update(i for batch in step_batches for i in batch)
    assert all(len(p) == expected_len for p in per_process)
    assert set(seen) == {i for i, b in enumerate(BUCKET_OF) if b is not None}
    # Only the wrap-around fill repeats images: each bucket's extra views complete its last global batch.
    for bucket, n in sizes.items():
        extra = sum(seen[i] - 1 for i, b in enumerate(BUCKET_OF) if b == bucket)
        assert extra == -n % global_size


def test_processes_take_disjoint_slices_of_the_same_global_batch():
    sampler = BucketBatchSampler(BUCKET_OF, batch_size=2, seed=SEED, num_processes=2)
    plan = sampler.global_batches(0)
    p0, p1 = batches(0, num_processes=2), batches(0, num_processes=2, process_index=1)
    for global_batch, a, b in zip(plan, p0, p1, strict=True):
        assert a + b == global_batch and not set(a) & set(b)


def test_order_is_a_function_of_seed_and_epoch():
    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    sampler = BucketBatchSampler(BUCKET_OF, batch_size=2, seed=SEED + 1)
    assert list(sampler) != batches(0)
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler)  # the skip and epoch stay set across iterations


def test_skip_batches_resumes_the_exact_remaining_sequence():
    full = batches(2, num_processes=2, process_index=1)
    for skip in (0, 1, 5, len(full)):
        assert batches(2, skip=skip, num_processes=2, process_index=1) == full[skip:]
    resumed = BucketBatchSampler(
        BUCKET_OF, batch_size=2, seed=SEED, num_processes=2, process_index=1, skip_batches=3
    )
    resumed.set_epoch(2)
    assert list(resumed) == full[3:] and len(resumed) == len(full)
    with pytest.raises(ValueError, match="skip_batches"):
        resumed.set_skip(len(full) + 1)


def test_drop_last_drops_partial_global_batches():
    kept = batches(0, batch_size=4, drop_last=True)
    assert len(kept) == 1 + 3 + 1  # buckets of 7, 12 and 5 images in batches of 4
    assert all(len(set(batch)) == 4 for batch in kept)
    with pytest.raises(ValueError, match="No bucket holds a global batch"):
        BucketBatchSampler(BUCKET_OF, batch_size=13, seed=SEED, drop_last=True)


def test_a_bucket_smaller_than_a_global_batch_wraps_around_several_times():
    plan = BucketBatchSampler(BUCKET_OF, batch_size=4, seed=SEED, num_processes=2).global_batches(0)
    small = [batch for batch in plan if BUCKET_OF[batch[0]] == (88, 48)]  # 5 images, global batches of 8
    members = [i for i, b in enumerate(BUCKET_OF) if b == (88, 48)]
    assert len(small) == 1 and len(small[0]) == 8 and sorted(set(small[0])) == members
    assert small[0][5:] == small[0][:3]  # the fill is the start of the same shuffled list


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match="process_index"):
        BucketBatchSampler(BUCKET_OF, batch_size=2, seed=SEED, num_processes=2, process_index=2)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(BUCKET_OF, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="No dataset index has a bucket"):
        BucketBatchSampler([None, None], batch_size=2, seed=SEED)
