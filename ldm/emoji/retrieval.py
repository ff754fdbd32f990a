"""A nearest-neighbour judge for a model trained on a captioned image set: is the asked image among the k training
images nearest to the sample?

Each caption of the set is a prompt (the names are unique); its sample and every training image go to a small pixel
space (16x16 RGB, each value an average of a 4x4 block of a 64 px image, in [0, 1]), and the asked image's rank among
the training images by L2 distance to the sample decides top-1 and top-k. The judge's ceiling is the same score of
the VAE's own reconstructions of the training images: what a model that drew each asked image exactly, through this
VAE, would get.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ldm.shapes.adherence import generate_images

FEATURE_SIZE = 16
TOP_K = (1, 10)


def load_captioned_set(data_dir: str | Path) -> tuple[list[str], list[PIL.Image.Image]]:
    """The captions and RGB images of `data_dir`/train/metadata.jsonl, in file order."""
    train_dir = Path(data_dir) / "train"
    rows = [
        json.loads(line) for line in (train_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    return [row["text"] for row in rows], [
        PIL.Image.open(train_dir / row["file_name"]).convert("RGB") for row in rows
    ]


def features(images: Sequence[PIL.Image.Image]) -> np.ndarray:
    """(N, 16*16*3) float32 in [0, 1]: each image box-averaged to 16x16."""
    small = [np.asarray(image.convert("RGB").resize((FEATURE_SIZE,) * 2, PIL.Image.BOX)) for image in images]
    return np.stack(small).reshape(len(images), -1).astype(np.float32) / 255.0


def ranks(queries: np.ndarray, references: np.ndarray, asked: Sequence[int]) -> np.ndarray:
    """(Q,) the rank (0 = nearest) of reference `asked[q]` among all references by L2 distance to query q; ties
    count against the asked image."""
    distances = ((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1)  # (Q, N)
    own = distances[np.arange(len(queries)), np.asarray(asked)]
    return (distances < own[:, None]).sum(1) + (distances == own[:, None]).sum(1) - 1


def top_k(rank: np.ndarray, ks: Sequence[int] = TOP_K) -> dict[str, float]:
    """{"top1": ..., "top10": ...}: the fraction of queries whose asked image ranks within k."""
    return {f"top{k}": float((rank < k).mean()) for k in ks}


def prompt_indices(num_captions: int, num_prompts: int | None) -> list[int]:
    """`num_prompts` caption indices spread evenly over the set (all of them when None)."""
    if num_prompts is None or num_prompts >= num_captions:
        return list(range(num_captions))
    return np.linspace(0, num_captions - 1, num_prompts).round().astype(int).tolist()


def judge_pipeline(
    pipe,
    data_dir: str | Path,
    seeds: Sequence[int] = (0,),
    guidance_scale: float = 7.5,
    num_inference_steps: int = 25,
    num_prompts: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Top-1 and top-10 retrieval of the pipeline's samples, one per (caption, seed)."""
    captions, images = load_captioned_set(data_dir)
    chosen = prompt_indices(len(captions), num_prompts)
    prompts = [{"prompt": captions[i]} for i in chosen]
    samples = [(j, seed) for seed in seeds for j in range(len(chosen))]
    drawn = generate_images(pipe, prompts, samples, guidance_scale, num_inference_steps, batch_size)
    return top_k(ranks(features(drawn), features(images), [chosen[j] for j, _ in samples]))


@torch.no_grad()
def judge_ceiling(vae, data_dir: str | Path, batch_size: int = 32) -> dict[str, float]:
    """The judge's score of the VAE's reconstructions (posterior mode, decoded) of every training image."""
    _, images = load_captioned_set(data_dir)
    recon = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(image) for image in images[start : start + batch_size]])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample  # (B, 3, H, W) in [-1, 1]
        pixels = ((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        recon += [PIL.Image.fromarray(p) for p in pixels]
    return top_k(ranks(features(recon), features(images), range(len(images))))


def main(argv: list[str] | None = None) -> dict:
    """`python -m ldm.emoji.retrieval --model DIR --data_dir DIR`: print the judge's scores (JSON) of a pipeline
    folder's samples and of its VAE's reconstructions (the ceiling)."""
    import argparse

    from ldm.pipelines.text_to_image import LatentPipeline

    parser = argparse.ArgumentParser(
        description="Top-1 / top-10 retrieval of a model's samples among its training set."
    )
    parser.add_argument(
        "--model", required=True, help="A pipeline folder (train_ldm.py's output, or a checkpoint's)."
    )
    parser.add_argument(
        "--data_dir", required=True, help="The image folder it trained on (train/metadata.jsonl)."
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="Samples per caption, by seed (default 0)."
    )
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25).")
    parser.add_argument("--num_prompts", type=int, help="Captions judged, spread over the set (default all).")
    args = parser.parse_args(argv)
    pipe = LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    scores = {
        "samples": judge_pipeline(
            pipe, args.data_dir, args.seeds, args.guidance_scale, args.steps, num_prompts=args.num_prompts
        ),
        "ceiling": judge_ceiling(pipe.vae, args.data_dir),
    }
    print(json.dumps(scores))
    return scores


if __name__ == "__main__":
    main()
