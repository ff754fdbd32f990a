"""ldm: Stable-Diffusion-style latent text-to-image models on the Hugging Face stack.

The package map (README's Layout section has the same table):

- `pipelines/`, one file per pipeline: `text_to_image` (`LatentPipeline`, its numbered steps; the sampler step is
  the diffusers scheduler's, called in `LatentPipeline.denoise`), `img2img` and `inpaint` (their own steps only),
  `controlnet`, `controlnet_img2img`, `controlnet_inpaint`, `upscale` (x4 super-resolution), `loading` (load, save,
  upload).
- what sampling and training share: `call_state` and `guidance`, `checks` (argument and component checks),
  `encoding` (text embeddings, latent scaling), `presets` (model shapes), `schedulers` (samplers by name),
  `tokenizer`, `hub`, `cli` (`ldm-generate`), `control` (Canny control images), `single_file` and `export`
  (`ldm-export`), `images`, `seeding`.
- `training/`: `config` -> `sources` -> `data` (+ `transforms`: every per-sample random draw; `buckets`: aspect-ratio
  buckets and their sampler, `bucketing`: in a run) -> `latent_cache` ->
  `encoders` (batch -> latents, text embeddings) -> `loss` -> optimizer; `loop` (the one step loop every trainer
  runs), `run` (what every trainer does around it: start-up, accelerator, data, frozen models, optimizer, loader,
  end of run), `checkpoint` (save, resume, prune, upload, final save), `lora` (adapters and their files),
  `controlnet` (a ControlNet run's options, initialisation, files), `lcm` (consistency distillation), `upscaler`
  (x4 upscaler training), `validation`, `guards` (lock, run fingerprint),
  `integrity` (manifests), `distributed`, `vae`.
- `shapes/`: the offline demo world: `synthetic` data, `detector`, `adherence` evaluation, `text_stack`, `aspects`
  (mixed-aspect copies).
"""

from ldm.guidance import classifier_free_guidance, rescale_guidance
from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.pipelines.controlnet_img2img import LatentControlNetImg2ImgPipeline
from ldm.pipelines.controlnet_inpaint import LatentControlNetInpaintPipeline
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.inpaint import LatentInpaintPipeline
from ldm.pipelines.text_to_image import LatentPipeline, LatentPipelineOutput
from ldm.pipelines.upscale import Cascade, LatentUpscalePipeline
from ldm.presets import PRESETS, build_pipeline, build_unet
from ldm.tokenizer import write_clip_tokenizer

__all__ = [
    "Cascade",
    "PRESETS",
    "LatentControlNetImg2ImgPipeline",
    "LatentControlNetInpaintPipeline",
    "LatentControlNetPipeline",
    "LatentImg2ImgPipeline",
    "LatentInpaintPipeline",
    "LatentPipeline",
    "LatentPipelineOutput",
    "LatentUpscalePipeline",
    "build_pipeline",
    "build_unet",
    "classifier_free_guidance",
    "rescale_guidance",
    "write_clip_tokenizer",
]
__version__ = "0.1.0"
