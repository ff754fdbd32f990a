"""Generation settings as the `parameters` text of a PNG, in AUTOMATIC1111's layout, and back.

The layout (what other Stable Diffusion tools read and write)::

    a red circle on the left <lora:cyan:0.8>
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: demo

The prompt comes first (a LoRA rides in it as a ``<lora:name:scale>`` tag), then an optional ``Negative prompt:``
line, then one line of ``Key: value`` pairs; a value holding a comma, colon, quote or line break is written as a JSON
string. Keys this project adds beside AUTOMATIC1111's (``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``,
``Model``, ``Denoising strength``): ``Mode``, ``Control scale``, ``ControlNet``, ``Noise level``,
``Back projection``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Our scheduler names and the sampler names AUTOMATIC1111 writes for the same samplers.
SAMPLER_NAMES = {"ddim": "DDIM", "dpm++": "DPM++ 2M", "euler": "Euler", "ddpm": "DDPM", "lcm": "LCM"}
_SCHEDULERS_BY_SAMPLER = {v.lower(): k for k, v in SAMPLER_NAMES.items()}

_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^:>]+)>")
# One `Key: value` pair of the settings line: a JSON string, or anything up to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt: "


@dataclass
class Settings:
    """What reproduces one image: the prompt, the sampler's settings and the mode's own inputs."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 25
    sampler: str = "ddim"  # our scheduler name (ldm.schedulers)
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 64
    height: int = 64
    model: str = ""
    mode: str = "txt2img"  # txt2img, img2img, inpaint, controlnet, upscale, lcm
    lora: str = ""  # the LoRA's name (a file or folder name), empty for none
    lora_scale: float = 1.0
    strength: float | None = None  # img2img and inpainting: the denoising strength
    control_scale: float | None = None
    controlnet: str = ""
    noise_level: int | None = None  # the upscaler's
    back_projection: int | None = None  # the upscaler's rounds of back-projection onto its input
    extra: dict[str, str] = field(default_factory=dict)  # keys another tool wrote, kept as text


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def _number(value: float) -> str:
    """7.5 -> '7.5', 7.0 -> '7' (as AUTOMATIC1111 writes CFG scale)."""
    return f"{value:g}"


def format_parameters(settings: Settings) -> str:
    """The `parameters` text of an image made with `settings`."""
    prompt = settings.prompt
    if settings.lora:
        prompt = f"{prompt} <lora:{settings.lora}:{_number(settings.lora_scale)}>".strip()
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(_NEGATIVE + settings.negative_prompt)
    pairs = {
        "Steps": settings.steps,
        "Sampler": SAMPLER_NAMES.get(settings.sampler, settings.sampler),
        "CFG scale": _number(settings.guidance_scale),
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": settings.model,
        "Mode": settings.mode,
        "Denoising strength": None if settings.strength is None else _number(settings.strength),
        "ControlNet": settings.controlnet or None,
        "Control scale": None if settings.control_scale is None else _number(settings.control_scale),
        "Noise level": settings.noise_level,
        "Back projection": settings.back_projection,
        **settings.extra,
    }
    lines.append(
        ", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value not in (None, ""))
    )
    return "\n".join(lines)


def _settings_pairs(line: str) -> dict[str, str] | None:
    """The `Key: value` pairs of a settings line, or None when the line is not one (prompt text)."""
    pairs, position = {}, 0
    while position < len(line):
        match = _PAIR.match(line, position)
        if match is None or match.end() == position:
            return None
        key, value = match.group(1).strip(), match.group(2).strip()
        pairs[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs if len(pairs) >= 3 else None  # AUTOMATIC1111's own test for a settings line


def parse_parameters(text: str) -> Settings:
    """The settings a `parameters` text describes; keys it does not know land in `extra`.

    Raises:
        ValueError: If a known key's value cannot be read (``Steps: many``), naming the key.
    """
    lines = text.strip().split("\n")
    pairs = _settings_pairs(lines[-1]) if lines else None
    if pairs is not None:
        lines = lines[:-1]
    pairs = pairs or {}
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE) :]
        (negative_lines if in_negative else prompt_lines).append(line)
    settings = Settings(
        prompt="\n".join(prompt_lines).strip(), negative_prompt="\n".join(negative_lines).strip()
    )
    tag = _LORA_TAG.search(settings.prompt)
    if tag:
        settings.lora = tag.group(1)
        settings.lora_scale = _read(float, "Lora scale", tag.group(2))
        settings.prompt = _LORA_TAG.sub("", settings.prompt).strip()

    readers = {
        "Steps": ("steps", int),
        "CFG scale": ("guidance_scale", float),
        "Seed": ("seed", int),
        "Model": ("model", str),
        "Mode": ("mode", str),
        "Denoising strength": ("strength", float),
        "ControlNet": ("controlnet", str),
        "Control scale": ("control_scale", float),
        "Noise level": ("noise_level", int),
        "Back projection": ("back_projection", int),
    }
    for key, value in pairs.items():
        if key in readers:
            name, kind = readers[key]
            setattr(settings, name, _read(kind, key, value))
        elif key == "Sampler":
            settings.sampler = _SCHEDULERS_BY_SAMPLER.get(value.lower(), value)
        elif key == "Size":
            width, _, height = value.partition("x")
            settings.width, settings.height = _read(int, key, width), _read(int, key, height)
        else:
            settings.extra[key] = value
    return settings


def _read(kind, key: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not a valid {kind.__name__}.") from None


def save_png(image: Image.Image, path: str | Path, settings: Settings) -> Path:
    """Write `image` as a PNG whose `parameters` text chunk holds `settings`."""
    info = PngInfo()
    info.add_text("parameters", format_parameters(settings))
    image.save(path, format="PNG", pnginfo=info)
    return Path(path)


def read_png_parameters(path: str | Path) -> str | None:
    """The `parameters` text of a PNG file, or None when it has none (or is not a PNG)."""
    with Image.open(path) as image:
        return image.info.get("parameters") if image.format == "PNG" else None
