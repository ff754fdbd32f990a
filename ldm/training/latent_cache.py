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
from ldm.training.data import TrainDataset
from ldm.training.integrity import verify_manifest, write_manifest
from ldm.training.transforms import DECODE_ERRORS

logger = logging.getLogger(__name__)
CACHE_FORMAT_VERSION = 1
ENCODE_BATCH_SIZE = 32


def default_cache_dir() -> Path:
    """`$LDM_CACHE`, else ~/.cache/ldm/latents: shared by runs, so a second run reuses the first one's work."""
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm" / "latents"))


# ----------------------------------------------------------------------------- the cache itself


class LatentCache:
    """Cached posterior moments (N, 2, 2C, h, w) [index, flip] and caption embeddings (K, 77, D)."""

    def __init__(self, moments, valid, text_embeds, captions: list[str], sample_captions: list[list[int]]):
        self.moments, self.valid, self.text_embeds = moments, valid, text_embeds
        self.captions, self.sample_captions = captions, sample_captions
        self.empty_caption_id = captions.index("")

    @property
    def num_skipped(self) -> int:
        """Samples whose image could not be decoded when the cache was built."""
        return int((~self.valid).sum())

    def index_dataset(self) -> CachedIndexDataset:
        """The dataset of sample indices to train on from this cache (same length and order as the images)."""
        return CachedIndexDataset(self.valid)


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


@torch.no_grad()
def _encode_shard(indices, dataset: TrainDataset, vae, random_flip: bool, desc: str, show: bool):
    """Posterior moments (n, 2, 2C, h, w) of the given samples and their flipped twins, plus a validity mask."""
    side = dataset.transform.resolution
    moments, valid = [], []
    for start in tqdm(range(0, len(indices), ENCODE_BATCH_SIZE), desc=desc, disable=not show):
        pixels, ok = [], []
        for index in indices[start : start + ENCODE_BATCH_SIZE]:
            try:
                # The centre crop: the cache is only used where crops do not vary (see build_cache).
                pixels.append(dataset.center_pixels(index))
                ok.append(True)
            except DECODE_ERRORS as error:
                logger.warning("Skipping sample %d: cannot decode image: %s", index, error)
                pixels.append(torch.zeros(3, side, side))
                ok.append(False)
        x = torch.stack(pixels)  # (b, 3, H, W)
        twins = [encode_moments(vae, x)]
        twins.append(encode_moments(vae, torch.flip(x, dims=[-1])) if random_flip else twins[0])
        moments.append(torch.stack(twins, dim=1).cpu())  # (b, 2, 2C, h, w)
        valid += ok
    return torch.cat(moments), torch.tensor(valid, dtype=torch.bool)


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
    if not config.center_crop and not _all_square(dataset, accelerator):
        logger.warning(
            "Latent cache off: random crops of non-square images differ every epoch. Pass --center_crop true to "
            "cache, or --cache_latents false to silence this."
        )
        return None

    logger.info("Latent cache miss: encoding %d images into %s", len(dataset), folder)
    building = Path(broadcast_object_list([f"{folder}.tmp-{uuid.uuid4().hex}"])[0])
    building.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(dataset), world))
    moments, valid = _encode_shard(
        indices, dataset, vae, config.random_flip, "cache latents", accelerator.is_local_main_process
    )
    save_file(
        {"indices": torch.tensor(indices, dtype=torch.long), "moments": moments.contiguous(), "valid": valid},
        building / f"latents-{rank:05d}-of-{world:05d}.safetensors",
    )
    if accelerator.is_main_process:
        _write_text(building, captions_per_row, text_encoder, tokenizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(building, folder, world, len(dataset))
    accelerator.wait_for_everyone()
    return _load(folder)


def _finish(building: Path, folder: Path, world: int, num_rows: int) -> None:
    """Mark a built cache complete, checksum it, and move it under its key (unless another run got there first)."""
    shards = sorted(p.name for p in building.glob(f"latents-*-of-{world:05d}.safetensors"))
    (building / "complete.json").write_text(json.dumps({"shards": shards, "num_rows": num_rows}))
    write_manifest(building)
    try:
        building.rename(folder)
    except OSError:  # the same cache was completed by a concurrent run
        shutil.rmtree(building, ignore_errors=True)


def _all_square(dataset: TrainDataset, accelerator) -> bool:
    """Whether every readable image is square (then a random crop after the resize is the whole image)."""
    square = True
    for index in range(accelerator.process_index, len(dataset), accelerator.num_processes):
        try:
            width, height = dataset.open(index).size
        except DECODE_ERRORS:
            continue
        if width != height:
            square = False
            break
    flag = torch.tensor(float(square), device=accelerator.device)
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
    moments = torch.empty((n, *parts[0]["moments"].shape[1:]), dtype=parts[0]["moments"].dtype)
    valid = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        moments[part["indices"]] = part["moments"]
        valid[part["indices"]] = part["valid"]
    covered = torch.zeros(n, dtype=torch.bool)
    for part in parts:
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
    return LatentCache(moments, valid, text, meta["captions"], meta["sample_captions"])
