"""The per-call state of a diffusers-style pipeline, where its properties (and step callbacks) read it.

diffusers' pipelines keep a call's guidance scale, clip_skip, attention kwargs and interrupt flag on the pipeline, so
a `callback_on_step_end` can read or change them between steps; the project's pipelines do the same.
"""

from __future__ import annotations

import torch


class CallStateMixin:
    """`guidance_scale`, `do_classifier_free_guidance`, `num_timesteps`, `interrupt`, ... as in diffusers."""

    def start_call(
        self, guidance_scale: float, guidance_rescale: float, clip_skip: int | None, cross_attention_kwargs
    ) -> None:
        """Record the call's settings where the properties (and callbacks) read them."""
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._step_state = {}

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance runs the unconditional branch only above scale 1, and never for guidance-distilled UNets."""
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def guidance_embedding(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The guidance-scale embedding a guidance-distilled (LCM) UNet takes; None for other UNets."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(self.guidance_scale - 1).repeat(batch)
        return self.get_guidance_scale_embedding(scale, embedding_dim=dim).to(self._execution_device, dtype)
