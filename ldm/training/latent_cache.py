"""The latent/text cache: build it once (sharded over processes), key it by what it depends on, load it.

The cache holds each image's VAE posterior moments (and its flipped twin's, when random flip is on) and one text
embedding per distinct caption plus the empty prompt, in safetensors files under a folder named by a hash of
everything that determines them: VAE, text encoder and tokenizer weights/files, resolution, transforms and the data.
`ldm.training.encoders.CachedBatchEncoder` turns its entries into training batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm.encoding import encode_moments, encode_text
from ldm.training.buckets import cover_size
from ldm.training.data import TrainDataset, stack_pixels
from ldm.training.integrity import verify_manifest, write_manifest
from ldm.training.transforms import DECODE_ERRORS

logger = logging.getLogger(__name__)
CACHE_FORMAT_VERSION = 2  # 2: moments grouped by shape (aspect-ratio buckets)
ENCODE_BATCH_SIZE = 32


def default_cache_dir() -> Path:
    """`$LDM_CACHE`, else ~/.cache/ldm/latents: shared by runs, so a second run reuses the first one's work."""
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm" / "latents"))


# ----------------------------------------------------------------------------- the cache itself


class LatentCache:
    """Cached posterior moments and caption embeddings (K, 77, D).

    The moments are grouped by image shape: one group for square crops, one per aspect-ratio bucket otherwise.
    ``moments[g]`` is (n_g, 2, 2C, h_g, w_g) [row, flip]; sample ``i`` is row ``rows[i]`` of group ``groups[i]``
    (-1: not cached, as for an image left out of every bucket).
    """

    def __init__(self, moments, groups, rows, valid, text_embeds, captions: list[str], sample_captions):
        self.moments, self.groups, self.rows, self.valid = moments, groups, rows, valid
        self.text_embeds, self.captions, self.sample_captions = text_embeds, captions, sample_captions
        self.empty_caption_id = captions.index("")

    @property
    def num_skipped(self) -> int:
        """Samples whose image could not be decoded when the cache was built."""
        return int((~self.valid).sum())

    def index_dataset(self) -> CachedIndexDataset:
        """The dataset of sample indices to train on from this cache (same length and order as the images)."""
        return CachedIndexDataset(self.valid)

    def lookup(self, indices: list[int], flips: list[int]) -> torch.Tensor:
        """The moments (B, 2C, h, w) of samples of one shape, each flipped or not."""
        index = torch.tensor(indices, dtype=torch.long)
        groups = self.groups[index].unique()
        if len(groups) != 1 or groups[0] < 0:
            raise ValueError(
                f"A cached batch must hold samples of one cached shape; got groups {groups.tolist()}."
            )
        return self.moments[int(groups[0])][self.rows[index], torch.tensor(flips, dtype=torch.long)]


class CachedIndexDataset(torch.utils.data.Dataset):
    """Sample indices for training from the cache: no image is opened; unreadable ones come back as None."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, index: int) -> int | None:
        return index if bool(self.valid[index]) else None

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the per-epoch draws happen in `CachedBatchEncoder`."""

    @staticmethod
    def collate_fn(batch: list[int | None]) -> dict[str, Any]:
        kept = [i for i in batch if i is not None]
        return {"indices": torch.tensor(kept, dtype=torch.long), "num_skipped": len(batch) - len(kept)}


class ConditionedIndexDataset(torch.utils.data.Dataset):
    """Sample indices for training from the cache, each with its conditioning image (a ControlNet's control).

    The control is not VAE-encoded, so the cache does not hold it: it is decoded here (in the dataloader's workers)
    with the sample's own crop and flip, as the live path makes them. A sample whose image or control is unusable
    comes back as None and is counted.
    """

    def __init__(self, valid: torch.Tensor, dataset: TrainDataset):
        self.valid, self.dataset = valid, dataset

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, index: int) -> dict | None:
        if not bool(self.valid[index]):
            return None
        control = self.dataset.conditioning(index)  # (3, H, W) in [0, 1]
        return None if control is None else {"index": index, "conditioning_pixel_values": control}

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crop and flip draws apply."""
        self.dataset.set_epoch(epoch)

    @staticmethod
    def collate_fn(batch: list[dict | None]) -> dict[str, Any]:
        kept = [sample for sample in batch if sample is not None]
        return {
            "indices": torch.tensor([sample["index"] for sample in kept], dtype=torch.long),
            "conditioning_pixel_values": stack_pixels(kept, "conditioning_pixel_values"),  # (B, 3, H, W)
            "num_skipped": len(batch) - len(kept),
        }


def _hash_module(module: torch.nn.Module, digest) -> None:
    """Feed a module's config and weights into `digest`."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's vocabulary, merges and normalisation, without the padding/truncation state calls leave."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return json.dumps(spec, sort_keys=True)


def cache_key(
    dataset: TrainDataset, data_hash: str, captions: list, vae, text_encoder, tokenizer, config
) -> str:
    """Hash of everything the cached tensors depend on; any change gives a new key, so a stale cache is never read."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {
        "version": CACHE_FORMAT_VERSION,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "random_flip": config.random_flip,
        "image_column": config.image_column,
        "num_rows": len(dataset),
        "buckets": dataset.buckets,  # per row (width, height), or None for square crops
        # The images' contents, not their paths or mtimes: an image edited in place must miss.
        "data_hash": data_hash,
        "vae_dtype": str(vae.dtype),
        "text_dtype": str(text_encoder.dtype),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "model_max_length": tokenizer.model_max_length,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(captions).encode())
    _hash_module(vae, digest)
    _hash_module(text_encoder, digest)
    return digest.hexdigest()


def shapes_of(dataset: TrainDataset) -> list[tuple[int, int]]:
    """The distinct (width, height) crops the cache holds, sorted: the square, or every bucket in use."""
    if dataset.buckets is None:
        return [(dataset.transform.resolution,) * 2]
    return sorted({bucket for bucket in dataset.buckets if bucket is not None})


@torch.no_grad()
def _encode_shard(indices, dataset: TrainDataset, vae, random_flip: bool, desc: str, show: bool):
    """The given samples' moments and their flipped twins', grouped by shape, as the tensors of a shard file.

    Returns {"indices", "valid", "groups" (n,), and per shape group g "moments_g" (n_g, 2, 2C, h, w)}, rows of a
    group in the order of `indices`. A sample without a bucket is not encoded (group -1, invalid).
    """
    shapes = shapes_of(dataset)
    group_of = {shape: g for g, shape in enumerate(shapes)}
    if dataset.buckets is None:
        groups = [0] * len(indices)
    else:  # an image in no bucket (too small and skipped, or unreadable) is not cached
        groups = [group_of.get(dataset.bucket(i), -1) for i in indices]
    valid = [group >= 0 for group in groups]
    shard = {}
    for g, (width, height) in enumerate(shapes):
        members = [k for k, group in enumerate(groups) if group == g]
        moments = []
        for start in tqdm(
            range(0, len(members), ENCODE_BATCH_SIZE), desc=desc, disable=not show or not members
        ):
            pixels = []
            for k in members[start : start + ENCODE_BATCH_SIZE]:
                try:
                    # The centre crop: the cache is only used where crops do not vary (see build_cache).
                    pixels.append(dataset.center_pixels(indices[k]))
                except DECODE_ERRORS as error:
                    logger.warning("Skipping sample %d: cannot decode image: %s", indices[k], error)
                    pixels.append(torch.zeros(3, height, width))
                    valid[k] = False
            x = torch.stack(pixels)  # (b, 3, H, W)
            twins = [encode_moments(vae, x)]
            twins.append(encode_moments(vae, torch.flip(x, dims=[-1])) if random_flip else twins[0])
            moments.append(torch.stack(twins, dim=1).cpu())  # (b, 2, 2C, h, w)
        if moments:
            shard[f"moments_{g}"] = torch.cat(moments).contiguous()
    shard.update(
        indices=torch.tensor(indices, dtype=torch.long),
        valid=torch.tensor(valid, dtype=torch.bool),
        groups=torch.tensor(groups, dtype=torch.long),
    )
    return shard


def _write_text(folder: Path, captions_per_row: list[list[str]], text_encoder, tokenizer) -> None:
    """One embedding per distinct caption, the empty prompt first, and each row's caption ids."""
    unique = [""] + sorted({c for options in captions_per_row for c in options} - {""})
    embeds = torch.cat(
        [
            encode_text(tokenizer, text_encoder, unique[i : i + ENCODE_BATCH_SIZE]).cpu()
            for i in range(0, len(unique), ENCODE_BATCH_SIZE)
        ]
    )
    save_file({"text_embeds": embeds.contiguous()}, folder / "text.safetensors")
    ids = {c: i for i, c in enumerate(unique)}
    meta = {
        "captions": unique,
        "sample_captions": [[ids[c] for c in options] for options in captions_per_row],
    }
    (folder / "captions.json").write_text(json.dumps(meta))


def build_cache(
    accelerator, dataset, vae, text_encoder, tokenizer, config, data_hash: str | None = None
) -> LatentCache | None:
    """Load the cache for this data and these models, building it first (sharded over processes) on a miss.

    `data_hash` is the dataset's content hash when the caller has it (computed once on the main process); by
    default it is computed here. A cache is built in a temporary folder and renamed under its key when complete, so
    a folder under a key is always whole and two runs building the same key never write into one folder.

    Returns None when the run trains from live batches instead: `cache_latents` is off, the data is streamed, or
    (after a log line saying why) caching cannot reproduce the live transforms (random crops of non-square images).
    """
    if not config.cache_latents or not isinstance(dataset, TrainDataset):
        return None
    captions_per_row = dataset.captions()
    key = cache_key(
        dataset, data_hash or dataset.content_hash, captions_per_row, vae, text_encoder, tokenizer, config
    )
    folder = (Path(config.cache_dir) if config.cache_dir else default_cache_dir()) / key
    # The main process decides hit or miss for everyone: ranks must agree, or some would wait forever below.
    if broadcast_object_list([accelerator.is_main_process and _verified(folder)])[0]:
        logger.info("Latent cache hit: %s", folder)
        return _load(folder)
    if not config.center_crop and not _crops_fixed(dataset, accelerator):
        logger.warning(
            "Latent cache off: random crops differ every epoch where an image does not exactly fit its crop. Pass "
            "--center_crop true to cache, or --cache_latents false to silence this."
        )
        return None

    logger.info("Latent cache miss: encoding %d images into %s", len(dataset), folder)
    building = Path(broadcast_object_list([f"{folder}.tmp-{uuid.uuid4().hex}"])[0])
    building.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(dataset), world))
    shard = _encode_shard(
        indices, dataset, vae, config.random_flip, "cache latents", accelerator.is_local_main_process
    )
    save_file(shard, building / f"latents-{rank:05d}-of-{world:05d}.safetensors")
    if accelerator.is_main_process:
        _write_text(building, captions_per_row, text_encoder, tokenizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(building, folder, world, len(dataset), len(shapes_of(dataset)))
    accelerator.wait_for_everyone()
    return _load(folder)


def _finish(building: Path, folder: Path, world: int, num_rows: int, num_groups: int) -> None:
    """Mark a built cache complete, checksum it, and move it under its key (unless another run got there first)."""
    shards = sorted(p.name for p in building.glob(f"latents-*-of-{world:05d}.safetensors"))
    complete = {"shards": shards, "num_rows": num_rows, "num_groups": num_groups}
    (building / "complete.json").write_text(json.dumps(complete))
    write_manifest(building)
    try:
        building.rename(folder)
    except OSError:  # the same cache was completed by a concurrent run
        shutil.rmtree(building, ignore_errors=True)


def _crops_fixed(dataset: TrainDataset, accelerator) -> bool:
    """Whether every readable image exactly covers its crop (the square, or its bucket) once resized: then a
    random crop is the whole image, the same every epoch."""
    fixed = True
    for index in range(accelerator.process_index, len(dataset), accelerator.num_processes):
        crop = dataset.bucket(index) or (dataset.transform.resolution,) * 2
        size = dataset.image_size(index)  # the header alone
        if size is not None and cover_size(size, crop) != crop:
            fixed = False
            break
    flag = torch.tensor(float(fixed), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def _verified(folder: Path) -> bool:
    """Whether the cache folder exists and verifies against its manifest; a damaged one is removed to be rebuilt."""
    if not folder.exists():
        return False
    problem = verify_manifest(folder)
    if problem is None:
        return True
    logger.warning("The latent cache in %s is damaged (%s); rebuilding it.", folder, problem)
    shutil.rmtree(folder, ignore_errors=True)
    return False


def _load(folder: Path) -> LatentCache:
    """Assemble a complete cache folder's shards into one LatentCache."""
    if not (folder / "complete.json").exists():
        raise ValueError(
            f"The latent cache {folder} is not there on this machine: it was built on one that does not share this "
            "folder. Point --cache_dir at a folder every node sees, or pass --cache_latents false."
        )
    complete = json.loads((folder / "complete.json").read_text())
    parts = [load_file(folder / name) for name in complete["shards"]]
    n = complete["num_rows"]
    groups, rows = torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    valid, covered = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    moments = []
    for g in range(complete["num_groups"]):
        pieces = []
        for part in parts:
            members = part["indices"][part["groups"] == g]
            rows[members] = torch.arange(len(members)) + sum(len(p) for p in pieces)
            if len(members):
                pieces.append(part[f"moments_{g}"])
        moments.append(torch.cat(pieces) if pieces else torch.empty(0))
    for part in parts:
        groups[part["indices"]], valid[part["indices"]] = part["groups"], part["valid"]
        covered[part["indices"]] = True
    if not covered.all():
        raise ValueError(
            f"The latent cache in {folder} lacks {int((~covered).sum())} of {n} samples: its shards were written "
            "on machines that do not share this folder. Point --cache_dir at a folder every node sees, or pass "
            "--cache_latents false."
        )
    excluded = int((~valid).sum())
    if excluded:
        logger.warning("%d unreadable images are excluded from the latent cache in %s", excluded, folder)
    meta = json.loads((folder / "captions.json").read_text())
    text = load_file(folder / "text.safetensors")["text_embeds"]
    return LatentCache(moments, groups, rows, valid, text, meta["captions"], meta["sample_captions"])
