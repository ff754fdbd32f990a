"""A real image set with names as captions: Twemoji's 64 px PNGs from the npm package `emoji-datasource-twitter`.

    python -m ldm.emoji.data --out_dir outputs/emoji/data            # downloads the package once (61 MB)
    python -m ldm.emoji.data --out_dir DIR --package_tgz FILE.tgz    # or builds from a tarball already on disk

Why this set: the package ships every emoji as a 64x64 PNG (the demo's resolution: no rasteriser, no resizing)
beside `emoji.json`, whose names ("HOT DOG", "DOG FACE") are the captions; it installs from a registry (npm), and
its Twitter images are under CC-BY 4.0 (jdecked/twemoji's LICENSE-GRAPHICS). OpenMoji's npm package ships SVGs
only, which would need a rasteriser first. By default the set is the "Animals & Nature" and "Food & Drink"
categories: 290 distinct objects, a few hundred pictures as small as the shapes world.

Writes DIR/train/NNNN.png (RGB: the transparent background composited onto white, where a plain RGB conversion would
keep whatever colour the transparent pixels hold) and DIR/train/metadata.jsonl (`file_name`, `text`, `category`,
`emoji_file`), the layout `train_ldm.py --train_data_dir DIR` and diffusers' `train_text_to_image.py` read, and
DIR/source.json (package, version, categories, counts). An entry whose PNG is missing or unreadable is skipped and
counted there.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

import PIL.Image

PACKAGE = "emoji-datasource-twitter"
VERSION = "16.0.0"
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
# npm's dist.integrity for that version: the download is checked against it before anything is read.
INTEGRITY = "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="
DEFAULT_CATEGORIES = ("Animals & Nature", "Food & Drink")
RESOLUTION = 64


def integrity_of(data: bytes) -> str:
    """npm's Subresource Integrity string of `data` (sha512, base64)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def download_package(cache_dir: Path) -> Path:
    """The package tarball in `cache_dir`, downloaded from the npm registry once and checked against `INTEGRITY`."""
    path = cache_dir / f"{PACKAGE}-{VERSION}.tgz"
    if path.is_file() and integrity_of(path.read_bytes()) == INTEGRITY:
        return path
    with urllib.request.urlopen(TARBALL_URL, timeout=120) as response:
        data = response.read()
    if integrity_of(data) != INTEGRITY:
        raise ValueError(
            f"{TARBALL_URL} does not match npm's integrity {INTEGRITY}; the download is corrupt."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def caption(entry: dict) -> str:
    """An entry's caption: its Unicode name in lower case ("HOT DOG" -> "hot dog"), else its short name."""
    name = entry.get("name") or entry["short_name"].replace("_", " ").replace("-", " ")
    return " ".join(name.lower().split())


def on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB image of `image` composited onto white (its alpha, where it has one, weighs each pixel)."""
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def build_dataset(package_tgz: Path, out_dir: Path, categories: tuple[str, ...] = DEFAULT_CATEGORIES) -> dict:
    """Write the image folder of `categories` from the package tarball; returns what source.json records."""
    with tarfile.open(package_tgz, "r:gz") as tar:
        members = {member.name: member for member in tar.getmembers() if member.isfile()}
        entries = json.loads(tar.extractfile(members["package/emoji.json"]).read())
        known = sorted({entry["category"] for entry in entries})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; the package has {known}.")
        chosen = sorted((e for e in entries if e["category"] in categories), key=lambda e: e["sort_order"])
        train_dir = out_dir / "train"
        train_dir.mkdir(parents=True, exist_ok=True)
        rows, skipped = [], []
        for entry in chosen:
            member = members.get(f"package/img/twitter/{RESOLUTION}/{entry['image']}")
            try:
                if member is None or not entry.get("has_img_twitter", True):
                    raise FileNotFoundError("no Twitter image in the package")
                image = on_white(PIL.Image.open(io.BytesIO(tar.extractfile(member).read())))
            except (OSError, FileNotFoundError) as error:
                skipped.append({"image": entry["image"], "reason": str(error)})
                continue
            file_name = f"{len(rows):04d}.png"
            image.save(train_dir / file_name)
            rows.append(
                {
                    "file_name": file_name,
                    "text": caption(entry),
                    "category": entry["category"],
                    "emoji_file": entry["image"],  # not "image": that column would replace the decoded pixels
                }
            )
    with open(train_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    source = {
        "package": PACKAGE,
        "version": VERSION,
        "license": "images CC-BY 4.0 (Twemoji)",
        "categories": list(categories),
        "num_images": len(rows),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    (out_dir / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return source


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="Folder for train/ and source.json.")
    parser.add_argument("--package_tgz", help=f"A {PACKAGE}-{VERSION}.tgz on disk (default: download it).")
    parser.add_argument(
        "--cache_dir", default=str(Path.home() / ".cache" / "ldm" / "npm"), help="Download cache."
    )
    parser.add_argument(
        "--categories", nargs="+", default=list(DEFAULT_CATEGORIES), help="emoji.json categories."
    )
    args = parser.parse_args(argv)
    tgz = Path(args.package_tgz) if args.package_tgz else download_package(Path(args.cache_dir))
    source = build_dataset(tgz, Path(args.out_dir), tuple(args.categories))
    print(f"wrote {source['num_images']} images to {args.out_dir}/train ({source['num_skipped']} skipped)")
    return source


if __name__ == "__main__":
    main()
