"""ldm: Stable-Diffusion-style latent text-to-image models on the Hugging Face stack."""

from ldm.pipeline import LatentPipeline, LatentPipelineOutput, classifier_free_guidance, rescale_guidance
from ldm.presets import PRESETS, build_pipeline, build_unet
from ldm.tokenizer import write_clip_tokenizer

__all__ = [
    "PRESETS",
    "LatentPipeline",
    "LatentPipelineOutput",
    "build_pipeline",
    "build_unet",
    "classifier_free_guidance",
    "rescale_guidance",
    "write_clip_tokenizer",
]
__version__ = "0.1.0"
