"""A mixed-aspect copy of an imagefolder: what aspect-ratio buckets are for, from the square shapes world.

    python -m ldm.shapes.aspects --src data/shapes --dst data/shapes-mixed --ratios 1:2 1:1 2:1

Image ``i`` of the source is stretched to ``ratios[i % len(ratios)]`` (the longer side doubles for 1:2 and 2:1),
so a shape "on the left" stays on the left and every image keeps its caption; circles become ellipses. The
metadata (``train/metadata.jsonl``) and the folder's other files are copied unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image


def parse_ratio(text: str) -> tuple[int, int]:
    """'W:H' -> (W, H), two positive integers."""
    try:
        width, height = (int(part) for part in text.split(":"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise ValueError(f"An aspect ratio is W:H with two positive integers, e.g. 1:2; got {text!r}.")
    return width, height


def stretched_size(size: tuple[int, int], ratio: tuple[int, int]) -> tuple[int, int]:
    """The size of a ``size`` image stretched to ``ratio``: the shorter side is kept, the other grows to fit."""
    side = min(size)
    width, height = ratio
    return (round(side * width / min(ratio)), round(side * height / min(ratio)))


def make_mixed_aspect(src: str | Path, dst: str | Path, ratios: list[tuple[int, int]]) -> dict:
    """Copy the imagefolder ``src`` to ``dst`` with image ``i`` stretched to ``ratios[i % len(ratios)]``.

    Returns:
        How many images went to each ratio, as ``{"W:H": count}``, and ``"unreadable"`` (copied unchanged).

    Raises:
        ValueError: ``src`` has no ``train/metadata.jsonl``, ``ratios`` is empty, or ``dst`` exists.
    """
    src, dst = Path(src), Path(dst)
    metadata = src / "train" / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(f"{src} is not an imagefolder with train/metadata.jsonl; generate one first.")
    if not ratios:
        raise ValueError("Give at least one aspect ratio, e.g. 1:2 1:1 2:1.")
    if dst.exists():
        raise ValueError(f"{dst} exists; remove it or choose another --dst.")
    shutil.copytree(src, dst)
    counts = {f"{w}:{h}": 0 for w, h in ratios}
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        ratio = ratios[i % len(ratios)]
        path = dst / "train" / row["file_name"]
        try:
            with Image.open(path) as image:
                image.load()
        except OSError:  # left as it is: the training data's own checks count it
            counts["unreadable"] = counts.get("unreadable", 0) + 1
            continue
        size = stretched_size(image.size, ratio)
        if size != image.size:
            image.resize(size, resample=Image.Resampling.BICUBIC).save(path)
        counts[f"{ratio[0]}:{ratio[1]}"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make a mixed-aspect copy of an imagefolder.")
    parser.add_argument("--src", required=True, help="an imagefolder with train/metadata.jsonl")
    parser.add_argument("--dst", required=True, help="where to write the copy (must not exist)")
    parser.add_argument("--ratios", nargs="+", default=["1:2", "1:1", "2:1"], help="W:H ratios, in turn")
    args = parser.parse_args(argv)
    try:
        counts = make_mixed_aspect(args.src, args.dst, [parse_ratio(r) for r in args.ratios])
    except ValueError as err:
        raise SystemExit(f"ldm.shapes.aspects: {err}") from None
    print(f"Wrote {args.dst}: " + ", ".join(f"{n} images at {ratio}" for ratio, n in counts.items()))


if __name__ == "__main__":
    main()
