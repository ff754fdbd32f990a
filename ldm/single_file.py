"""Single-file Stable Diffusion checkpoints (the original key layout A1111/ComfyUI load): export and load."""

from __future__ import annotations

from diffusers.loaders import FromSingleFileMixin


class LatentSingleFileMixin(FromSingleFileMixin):
    """`from_single_file` for the project's pipelines (diffusers' loader, with what it lacks for them)."""
