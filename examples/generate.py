"""Generate images from Python, the same as `ldm-generate`.

python examples/generate.py --model path/or/hub-id "a red circle on the left"
"""

import argparse

import torch

from ldm import LatentPipeline
from ldm.images import image_grid
from ldm.schedulers import scheduler_from_name

parser = argparse.ArgumentParser()
parser.add_argument("prompts", nargs="+")
parser.add_argument("--model", required=True)
parser.add_argument("--out", default="example.png")
args = parser.parse_args()

pipe = LatentPipeline.from_pretrained(args.model)
pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
generators = [torch.Generator().manual_seed(k) for k in range(len(args.prompts))]
images = pipe(args.prompts, guidance_scale=7.5, num_inference_steps=50, generator=generators).images
image_grid(images).save(args.out)
print(f"wrote {args.out}")
