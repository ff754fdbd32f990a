"""The sampling pipelines, one file each: `text_to_image` (`LatentPipeline`, whose numbered steps the others reuse),
`img2img`, `inpaint`, `controlnet` (and its `controlnet_img2img`, `controlnet_inpaint`), `upscale` (x4 super-resolution); `loading` holds what they share for loading, saving and uploading."""

from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.pipelines.controlnet_img2img import LatentControlNetImg2ImgPipeline
from ldm.pipelines.controlnet_inpaint import LatentControlNetInpaintPipeline
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.inpaint import LatentInpaintPipeline
from ldm.pipelines.text_to_image import LatentPipeline, LatentPipelineOutput
from ldm.pipelines.upscale import Cascade, LatentUpscalePipeline

__all__ = [
    "Cascade",
    "LatentControlNetImg2ImgPipeline",
    "LatentControlNetInpaintPipeline",
    "LatentControlNetPipeline",
    "LatentImg2ImgPipeline",
    "LatentInpaintPipeline",
    "LatentPipeline",
    "LatentPipelineOutput",
    "LatentUpscalePipeline",
]
