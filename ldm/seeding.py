"""One seeded-generator helper for training steps and evaluation samples alike."""

from __future__ import annotations

import numpy as np
import torch


def keyed_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from a tuple of ints, e.g. (seed, step, rank) or (seed, prompt index).

    Independent of the global RNG state, so what it draws is a function of its key alone: the same after a resume
    and whatever else ran before. `numpy.random.SeedSequence` mixes the key, so nearby keys give unrelated streams.
    """
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
