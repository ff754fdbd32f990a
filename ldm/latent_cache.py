"""Turning a training batch into (latents, text embeddings): live through the frozen encoders, or from a cache.

Both encoders give the same result for the same batch and generator. The VAE's posterior moments (mean, log
variance) are what is cached, not a latent sample, so each use still draws a fresh z ~ q(z | x) from the step's
generator exactly as the live path does. Caption dropout and the flip coin are drawn per (seed, epoch, index) by
`ldm.data` in both paths.

The cache holds each image's moments (and its flipped twin's, when random flip is on) and one text embedding per
distinct caption plus the empty prompt, in safetensors files under a folder named by a hash of everything that
determines them: VAE, text encoder and tokenizer weights/files, resolution, transforms and the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate.utils import broadcast_object_list
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm.data import (
    _DECODE_ERRORS,
    TrainDataset,
    _caption_list,
    caption_dropout_mask,
    draw_sample_randomness,
    open_image,
)
from ldm.pipeline import encode_text

logger = logging.getLogger(__name__)
CACHE_FORMAT_VERSION = 1
ENCODE_BATCH_SIZE = 32


def default_cache_dir() -> Path:
    """`$LDM_CACHE`, else ~/.cache/ldm/latents: shared by runs, so a second run reuses the first one's work."""
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm" / "latents"))


# ----------------------------------------------------------------------------- encoding, shared by both paths


def scale_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents to the diffusion model's unit-variance space: (z - shift) * scaling_factor."""
    shift = getattr(vae.config, "shift_factor", None)
    return ((z - shift) if shift is not None else z) * vae.config.scaling_factor


def sample_latents(moments: torch.Tensor, vae, generator: torch.Generator) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) from posterior moments (B, 2C, h, w), scaled: (B, C, h, w) in fp32."""
    z = DiagonalGaussianDistribution(moments.float()).sample(generator=generator)
    return scale_latents(z, vae)


class LiveBatchEncoder:
    """Encodes each batch through the frozen VAE and text encoder."""

    def __init__(self, vae, text_encoder, tokenizer, config, seed: int):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.caption_dropout, self.seed, self.epoch = config.caption_dropout, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def captions_after_dropout(self, batch: dict, drop_captions: bool) -> list[str]:
        """The batch's captions with the dropped ones replaced by the empty prompt."""
        if not drop_captions or self.caption_dropout == 0:
            return list(batch["captions"])
        dropped = caption_dropout_mask(self.seed, self.epoch, batch["indices"], self.caption_dropout)
        return ["" if d else c for c, d in zip(batch["captions"], dropped.tolist(), strict=True)]

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator, drop_captions: bool = True):
        """(latents (B, C, h, w) fp32, text embeddings (B, 77, D)) for a batch of pixels and captions."""
        pixels = batch["pixel_values"].to(self.vae.device, self.vae.dtype)  # (B, 3, H, W)
        moments = self.vae.encode(pixels).latent_dist.parameters  # (B, 2C, h, w)
        latents = sample_latents(moments, self.vae, generator)
        text = encode_text(
            self.tokenizer, self.text_encoder, self.captions_after_dropout(batch, drop_captions)
        )
        return latents, text


class CachedBatchEncoder:
    """Looks each batch up in a `LatentCache`; batches carry only sample indices."""

    def __init__(self, cache: LatentCache, vae, config, seed: int):
        self.cache, self.vae = cache, vae
        self.caption_dropout, self.random_flip, self.seed, self.epoch = (
            config.caption_dropout, config.random_flip, seed, 0
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: dict, generator: torch.Generator, drop_captions: bool = True):
        """(latents, text embeddings) for the indices of `batch`, with the same draws as the live path."""
        indices = batch["indices"].tolist()
        flips, caption_ids = [], []
        for index in indices:
            options = self.cache.sample_captions[index]
            draws = draw_sample_randomness(
                self.seed,
                self.epoch,
                index,
                len(options),
                8,
                (8, 8),
                center_crop=True,
                random_flip=self.random_flip,
            )
            flips.append(int(draws["flip"]))
            caption_ids.append(options[draws["caption_index"]])
        if drop_captions and self.caption_dropout > 0:
            dropped = caption_dropout_mask(self.seed, self.epoch, indices, self.caption_dropout).tolist()
            caption_ids = [
                self.cache.empty_caption_id if d else c for c, d in zip(caption_ids, dropped, strict=True)
            ]
        moments = self.cache.moments[torch.tensor(indices), torch.tensor(flips)]  # (B, 2C, h, w)
        latents = sample_latents(moments.to(self.vae.device), self.vae, generator)
        text = self.cache.text_embeds[torch.tensor(caption_ids)].to(self.vae.device)
        return latents, text


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


def cache_key(dataset: datasets.Dataset, captions: list, vae, text_encoder, tokenizer, config) -> str:
    """Hash of everything the cached tensors depend on; any change gives a new key, so a stale cache is never read."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {
        "version": CACHE_FORMAT_VERSION,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "random_flip": config.random_flip,
        "image_column": config.image_column,
        "num_rows": len(dataset),
        "data_fingerprint": getattr(dataset, "_fingerprint", None),
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
    transform = dataset.transform
    image_column = dataset.columns[0]
    moments, valid = [], []
    for start in tqdm(range(0, len(indices), ENCODE_BATCH_SIZE), desc=desc, disable=not show):
        pixels, ok = [], []
        for index in indices[start : start + ENCODE_BATCH_SIZE]:
            try:
                image = open_image(dataset.dataset[index][image_column])
            except _DECODE_ERRORS as error:
                logger.warning("Skipping sample %d: cannot decode image: %s", index, error)
                ok.append(False)
                pixels.append(torch.zeros(3, transform.resolution, transform.resolution))
                continue
            # The crop is the centre one: the cache is only used where crops do not vary (see build_cache).
            pixel_values, _ = (
                transform(image, "", epoch=0, index=index)
                if not random_flip
                else _unflipped(transform, image, index)
            )
            pixels.append(pixel_values)
            ok.append(True)
        x = torch.stack(pixels).to(vae.device, vae.dtype)  # (b, 3, H, W)
        twins = [vae.encode(x).latent_dist.parameters]
        twins.append(vae.encode(torch.flip(x, dims=[-1])).latent_dist.parameters if random_flip else twins[0])
        moments.append(torch.stack(twins, dim=1).cpu())  # (b, 2, 2C, h, w)
        valid += ok
    return torch.cat(moments), torch.tensor(valid, dtype=torch.bool)


def _unflipped(transform, image, index):
    """The transform's output for `image` with flipping off (the twin is made by flipping the tensor)."""
    flip = transform.random_flip
    transform.random_flip = False
    try:
        return transform(image, "", epoch=0, index=index)
    finally:
        transform.random_flip = flip


def build_cache(
    accelerator, dataset: TrainDataset, vae, text_encoder, tokenizer, config
) -> LatentCache | None:
    """Load the cache for this data and these models, building it first (sharded over processes) on a miss.

    Returns None, after a log line saying why, when caching cannot reproduce the live transforms (random crops of
    non-square images).
    """
    rows = dataset.dataset
    captions_per_row = [_caption_list(c, i) for i, c in enumerate(rows[dataset.columns[1]])]
    key = cache_key(rows, captions_per_row, vae, text_encoder, tokenizer, config)
    folder = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    folder = folder / key
    main = accelerator.is_main_process
    # The main process decides hit or miss for everyone: ranks must agree, or some would wait forever below.
    hit = broadcast_object_list([(folder / "complete.json").exists()])[0]
    if hit:
        logger.info("Latent cache hit: %s", folder)
        return _load(folder)

    if not config.center_crop and not _all_square(rows, dataset.columns[0], accelerator):
        logger.warning(
            "Latent cache off: random crops of non-square images differ every epoch. Pass --center_crop true to "
            "cache, or --cache_latents false to silence this."
        )
        return None

    logger.info("Latent cache miss: encoding %d images into %s", len(rows), folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(rows), world))
    moments, valid = _encode_shard(
        indices, dataset, vae, config.random_flip, "cache latents", accelerator.is_local_main_process
    )
    save_file(
        {"indices": torch.tensor(indices, dtype=torch.long), "moments": moments.contiguous(), "valid": valid},
        folder / f"latents-{rank:05d}-of-{world:05d}.safetensors",
    )
    if main:
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
    accelerator.wait_for_everyone()
    if main:
        shards = sorted(p.name for p in folder.glob(f"latents-*-of-{world:05d}.safetensors"))
        (folder / "complete.json").write_text(json.dumps({"shards": shards, "num_rows": len(rows)}))
    accelerator.wait_for_everyone()
    return _load(folder)


def _all_square(rows: datasets.Dataset, image_column: str, accelerator) -> bool:
    """Whether every readable image is square (then a random crop after the resize is the whole image)."""
    square = True
    for index in range(accelerator.process_index, len(rows), accelerator.num_processes):
        try:
            width, height = open_image(rows[index][image_column]).size
        except _DECODE_ERRORS:
            continue
        if width != height:
            square = False
            break
    flag = torch.tensor(float(square), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def _load(folder: Path) -> LatentCache:
    """Assemble a complete cache folder's shards into one LatentCache."""
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
