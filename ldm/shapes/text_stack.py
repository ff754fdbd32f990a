"""An offline text stack: a CLIP tokenizer built from a dataset's captions and a small frozen CLIPTextModel.

Saved in the pipeline layout (`tokenizer/`, `text_encoder/`) next to a VAE and a scheduler, it forms the base
folder `train_ldm.py` loads with `--pretrained_model_name_or_path`, exactly as it would load Stable Diffusion.

    python -m ldm.shapes.text_stack --captions DATA/train/metadata.jsonl --vae VAE_DIR --out_dir BASE_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from ldm.presets import sd_scheduler, text_encoder_config
from ldm.tokenizer import write_clip_tokenizer


def caption_words(captions: list[str]) -> list[str]:
    """The distinct lower-case words of the captions, in order of first use (CLIP splits on non-letters)."""
    words: list[str] = []
    for text in captions:
        for word in re.findall(r"[a-z]+", text.lower()):
            if word not in words:
                words.append(word)
    return words


def read_captions(metadata_path: str | Path, caption_column: str = "text") -> list[str]:
    """Every caption in an imagefolder's metadata.jsonl (a list of captions per image counts each)."""
    captions: list[str] = []
    for line_number, line in enumerate(Path(metadata_path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if caption_column not in row:
            raise ValueError(
                f"{metadata_path}:{line_number} has no {caption_column!r} column; found {sorted(row)}."
            )
        value = row[caption_column]
        captions += value if isinstance(value, list) else [value]
    return captions


def build_text_stack(
    captions: list[str], out_dir: str | Path, preset: str = "small", seed: int = 0, max_length: int = 77
) -> None:
    """Write `out_dir/tokenizer` (every caption word one token) and a random, frozen `out_dir/text_encoder`.

    The encoder is never trained: like a pretrained CLIP it only has to give each prompt a distinct, fixed
    embedding for the UNet's cross-attention to read.
    """
    out_dir = Path(out_dir)
    tokenizer = write_clip_tokenizer(
        caption_words(captions), out_dir / "tokenizer", model_max_length=max_length
    )
    longest = max(len(tokenizer(c).input_ids) for c in captions)
    if longest > max_length:
        raise ValueError(
            f"A caption takes {longest} tokens (with start/end) but max_length={max_length}; raise --max_length."
        )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(preset, tokenizer)).eval().requires_grad_(False)
    text_encoder.save_pretrained(out_dir / "text_encoder")


def assemble_base(out_dir: str | Path, vae_dir: str | Path) -> None:
    """Add the trained VAE and Stable Diffusion's noise schedule beside the text stack: a full base folder."""
    out_dir = Path(out_dir)
    AutoencoderKL.from_pretrained(vae_dir).save_pretrained(out_dir / "vae")
    sd_scheduler().save_pretrained(out_dir / "scheduler")


def file_digest(*paths: Path) -> str:
    """SHA-256 over the bytes of the given files."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Build the text stack from a dataset's captions and assemble a base folder with the given VAE."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--captions",
        required=True,
        nargs="+",
        help="metadata.jsonl of the training imagefolder (several: their words in order, e.g. for later fine-tunes)",
    )
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--vae", required=True, help="folder of a trained AutoencoderKL (train/train_vae.py)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--preset", default="small", help="text encoder size, from ldm.presets.PRESETS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_length",
        type=int,
        default=77,
        help="tokens per prompt (77 as in CLIP; short captions need fewer)",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    # The inputs' contents, not just their paths: a regenerated dataset or retrained VAE must rebuild the base.
    stamp = {k: str(v) for k, v in vars(args).items()}
    stamp["captions"] = " ".join(args.captions)  # one file: the same stamp as before several were allowed
    stamp["captions_sha256"] = file_digest(*map(Path, args.captions))
    stamp["vae_sha256"] = file_digest(
        *sorted(Path(args.vae).glob("*.safetensors")), Path(args.vae) / "config.json"
    )
    stamp_path = out_dir / "text_stack.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        print(f"Reusing the text stack in {out_dir}")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        if not stamp_path.exists():
            raise ValueError(
                f"--out_dir {out_dir} is not empty and was not written by ldm.shapes.text_stack; choose another."
            )
        shutil.rmtree(out_dir)
    captions = [c for path in args.captions for c in read_captions(path, args.caption_column)]
    build_text_stack(captions, out_dir, args.preset, args.seed, args.max_length)
    assemble_base(out_dir, args.vae)
    stamp_path.write_text(json.dumps(stamp, indent=2))
    print(
        f"Wrote tokenizer ({len(caption_words(captions))} words), text encoder, VAE and scheduler to {out_dir}"
    )


if __name__ == "__main__":
    main()
