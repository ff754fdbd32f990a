"""`ldm-export`: write a pipeline folder as one original-layout Stable Diffusion .safetensors file.

    ldm-export PIPELINE_DIR OUT.safetensors [--half]

The file holds the UNet, VAE and CLIP text encoder under the names AUTOMATIC1111 and ComfyUI load (and diffusers'
`from_single_file`, given the folder as `config=`); see `ldm.single_file`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.single_file import write_single_file


def main(argv: list[str] | None = None) -> None:
    """Check the arguments, load the folder, write the file; a problem exits 2 with one line naming the argument."""
    parser = argparse.ArgumentParser(prog="ldm-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "pipeline_dir", help="a pipeline folder (LatentPipeline or StableDiffusionPipeline layout)"
    )
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--half", action="store_true", help="store fp16 weights (half the size)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        parser.error(f"OUT {out}: must end in .safetensors (the only format written).")
    if out.exists() and not args.overwrite:
        parser.error(f"OUT {out} exists; pass --overwrite to replace it, or choose another name.")
    if not Path(args.pipeline_dir).is_dir():
        parser.error(f"PIPELINE_DIR {args.pipeline_dir}: no such folder.")
    try:  # the folder's structure is checked from its configs before any weights load
        write_single_file(args.pipeline_dir, out, half=args.half)
    except (OSError, ValueError) as err:
        parser.error(f"{args.pipeline_dir}: {str(err).strip().splitlines()[0]}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB{', fp16' if args.half else ''})")


if __name__ == "__main__":
    main()
