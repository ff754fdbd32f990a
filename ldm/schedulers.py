"""Sampler choice by name, built from a pipeline's scheduler config so the training schedule carries over."""

from __future__ import annotations

from typing import Literal

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SchedulerName = Literal["ddim", "dpm++", "euler", "ddpm", "lcm"]
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    # For consistency-distilled UNets (train/train_lcm.py, LCM-LoRA): 1-8 steps, one UNet call each.
    "lcm": (LCMScheduler, {}),
}


def scheduler_from_name(name: SchedulerName, config: dict) -> SchedulerMixin:
    """A scheduler of kind `name` over the same noise schedule (betas, timestep count) as `config`."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
