"""PIL/numpy versions of the torchvision transforms diffusers' train_text_to_image.py uses (see __init__.py)."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.Resampling.NEAREST
    BILINEAR = Image.Resampling.BILINEAR
    BICUBIC = Image.Resampling.BICUBIC
    BOX = Image.Resampling.BOX
    HAMMING = Image.Resampling.HAMMING
    LANCZOS = Image.Resampling.LANCZOS


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


class Resize:
    """Shorter side to `size` (an int), keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size, self.resample = size, interpolation.value

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.size / min(width, height)
        return image.resize(
            (max(self.size, round(width * scale)), max(self.size, round(height * scale))), self.resample
        )


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = random.randint(0, width - self.size), random.randint(0, height - self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image


class Lambda:
    def __init__(self, function):
        self.function = function

    def __call__(self, x):
        return self.function(x)


class ToTensor:
    """(H, W, C) uint8 image -> (C, H, W) float tensor in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
