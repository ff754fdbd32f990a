"""Run configurations: typed dataclasses loaded from YAML with ``--key value`` overrides.

A run is described by a YAML file whose keys are the fields of its dataclass (:class:`TrainConfig` for
``train/train_ldm.py``, ``ldm.training.vae.VaeTrainConfig`` for ``train/train_vae.py``); any field can be
overridden on the command line::

    python train/train_ldm.py --config configs/run.yaml --learning_rate 5e-5 --use_ema --validation_prompts "a cat" "a dog"

The command line is parsed by transformers' ``HfArgumentParser`` (argparse built from the dataclass): bare
boolean flags (``--use_ema``), several values for list fields, choices for ``Literal`` fields. Field names are the
flag names of diffusers' ``examples/text_to_image/train_text_to_image.py`` wherever the feature is shared, so its
command lines keep working. Every key must name a field and every value must match the field's annotation;
anything else fails at start-up with a ``ValueError`` that names the key. The resolved config is written next to
each checkpoint with :func:`save_config`.
"""

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

import yaml
from transformers import HfArgumentParser

from ldm.presets import PRESETS

# The names diffusers.optimization.get_scheduler accepts (its SchedulerType enum), minus
# "piecewise_constant": that one needs a `step_rules` string this config does not carry.
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
MixedPrecision = Literal["no", "fp16", "bf16"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSampling = Literal["uniform", "cubic"]
ReportTo = Literal["tensorboard", "wandb", "all", "none"]
SmallImages = Literal["upscale", "skip"]

_NONE_WORDS = ("none", "null")
_HUB_TOKEN_MESSAGE = (
    "hub_token is not a config option: a token must never be saved with the run's config. "
    "Log in once with `hf auth login` (formerly `huggingface-cli login`) or set the HF_TOKEN "
    "environment variable instead."
)


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


# Each numeric field's allowed range: (low, high, low inclusive, high inclusive); None is always allowed for
# optional fields, and every float must be finite (a NaN passes no comparison, so it fails here too).
INF = float("inf")
TRAIN_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "max_train_samples": (1, INF, True, False),
    "dataloader_num_workers": (0, INF, True, False),
    "train_batch_size": (1, INF, True, False),
    "num_train_epochs": (1, INF, True, False),
    "max_train_steps": (1, INF, True, False),
    "gradient_accumulation_steps": (1, INF, True, False),
    "learning_rate": (0, INF, False, False),
    "lr_warmup_steps": (0, INF, True, False),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_weight_decay": (0, INF, True, False),
    "adam_epsilon": (0, INF, False, False),
    "max_grad_norm": (0, INF, False, False),
    "ema_decay": (0, 1, False, False),
    "snr_gamma": (0, INF, False, False),
    "noise_offset": (0, INF, True, False),
    "checkpointing_steps": (1, INF, True, False),
    "checkpoints_total_limit": (1, INF, True, False),
    "validation_steps": (1, INF, True, False),
    "validation_guidance_scale": (0, 100, True, True),
    "validation_inference_steps": (1, INF, True, False),
    "lora_rank": (1, INF, True, False),
    "lora_alpha": (0, INF, False, False),
    "bucket_min_side": (1, INF, True, False),
    "bucket_max_side": (1, INF, True, False),
    "bucket_step": (1, INF, True, False),
}


def check_ranges(config, ranges: dict[str, tuple[float, float, bool, bool]], prefix: str = "") -> None:
    """Every listed field is None or a finite number within its range; the message names field (after `prefix`,
    e.g. "--"), range and value."""
    for name, (low, high, low_closed, high_closed) in ranges.items():
        value = getattr(config, name)
        if value is None:
            continue
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (math.isfinite(value) and above and below):
            if high == INF:
                bound = f"{'>=' if low_closed else '>'} {low:g}"
            else:
                bound = f"in {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
            kind = "a finite number " if isinstance(value, float) else ""
            raise ValueError(f"{prefix}{name} must be {kind}{bound}; got {value}.")


def check_preset(field: str, name: str | None) -> None:
    """A preset field holds None or the name of a model preset."""
    require(
        name is None or name in PRESETS,
        f"{field} {name!r} is not a model preset; choose one of {sorted(PRESETS)}.",
    )


def check_data_source(dataset_name: str | None, train_data_dir: str | None) -> None:
    """Exactly one data source: a Hub dataset or a local folder."""
    require(
        (dataset_name is None) != (train_data_dir is None),
        "Give exactly one of dataset_name (a Hub dataset) or train_data_dir (a local folder); got "
        f"dataset_name={dataset_name!r}, train_data_dir={train_data_dir!r}.",
    )


@dataclass
class TrainConfig:
    """Every option of a training run; see the module docstring for how it is loaded."""

    # --- Models ---
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    revision: str | None = None
    # Train the UNet from scratch from a named preset ("tiny", "small", "sd15"), reusing the VAE,
    # text encoder and tokenizer of pretrained_model_name_or_path.
    unet_preset: str | None = None
    # LoRA: train only rank-r adapters on the pretrained UNet's target modules (None: train every weight).
    lora_rank: int | None = None
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"]
    )

    # --- Data ---
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    streaming: bool = False
    max_train_samples: int | None = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.1
    # Processes decoding images while the model steps; None: one less than this process's share of the CPU cores,
    # at most 4 (0 on one core). Recorded as resolved at start-up (a stream's sample indices depend on it).
    dataloader_num_workers: int | None = None
    cache_latents: bool = True
    cache_dir: str | None = None
    # Aspect-ratio buckets: each image trains at the bucket (about resolution**2 pixels, sides multiples of
    # bucket_step) nearest its aspect ratio, cropped minimally; every batch comes from one bucket.
    aspect_buckets: bool = False
    bucket_min_side: int | None = None  # None: resolution / 2, down to a multiple of bucket_step
    bucket_max_side: int | None = None  # None: resolution x 2, down to a multiple of bucket_step
    bucket_step: int | None = None  # None: the VAE's downsampling factor x 8 (latent sides multiples of 8)
    bucket_small_images: SmallImages = (
        "upscale"  # images smaller than their bucket: upscale, or skip (counted)
    )

    # --- Optimisation ---
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision | None = None  # None: take accelerate's setting
    use_ema: bool = False
    ema_decay: float = 0.9999
    enable_xformers_memory_efficient_attention: bool = False
    # Compile the UNet with torch.compile (inductor, through accelerate's dynamo plugin): the first steps pay the
    # compilation (README: measured cost and gain); off by default, as on CPU it rarely pays for short runs.
    torch_compile: bool = False
    seed: int | None = None

    # --- Diffusion objective ---
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    # How t is drawn: "uniform" (DDPM), or "cubic" (most draws at high noise, as T2I-Adapter trains its adapters).
    timestep_sampling: TimestepSampling = "uniform"
    prediction_type: PredictionType | None = None  # None: the noise scheduler's own
    # Zero terminal SNR with trailing timesteps (Lin et al. 2023); needs prediction_type v_prediction.
    rescale_betas_zero_snr: bool = False

    # --- Checkpoints, validation, logging ---
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] | None = None
    validation_steps: int = 500
    validation_guidance_scale: float = 7.5
    validation_inference_steps: int = 25
    report_to: ReportTo = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "ldm"
    output_dir: str = "ldm-model"
    overwrite_output_dir: bool = False  # start a new run over another run's checkpoints (removing them)
    # Also write the final pipeline as one original-layout SD 1.x .safetensors file (A1111/ComfyUI), named for the
    # output folder: <output_dir>/<its name>.safetensors. Needs SD 1.x's UNet and VAE structure (e.g. tiny-sd, sd15).
    export_single_file: bool = False

    # --- Hub ---
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_push_checkpoints: bool = False

    def validate(self) -> None:
        """Check every field's type and the rules that tie fields together.

        Int values of float fields are converted to float in place; nothing else is changed.

        Raises:
            ValueError: naming the first field or rule that is violated and how to fix it.
        """
        check_fields(self)

        require(
            self.pretrained_model_name_or_path is not None,
            "pretrained_model_name_or_path is required: the VAE, text encoder and tokenizer (and the UNet "
            "unless unet_preset is set) are loaded from it.",
        )
        check_preset("unet_preset", self.unet_preset)
        check_data_source(self.dataset_name, self.train_data_dir)
        require(
            not self.streaming or self.max_train_steps is not None,
            "With streaming=true the dataset has no length, so the run cannot know when to stop; set max_train_steps.",
        )
        require(
            self.resolution > 0 and self.resolution % 8 == 0,
            f"resolution must be a positive multiple of 8 (the VAE downsamples by 8); got {self.resolution}.",
        )
        require(
            0.0 <= self.caption_dropout < 1.0,
            f"caption_dropout is a probability in [0, 1); got {self.caption_dropout}.",
        )
        check_ranges(self, TRAIN_RANGES)
        require(
            not self.rescale_betas_zero_snr or self.prediction_type == "v_prediction",
            "rescale_betas_zero_snr needs --prediction_type v_prediction: with zero terminal SNR the last timestep "
            "is pure noise, so predicting the noise there is trivial and gives no x_0 (x_0 = (x_T - eps) / 0). "
            f"Got prediction_type={self.prediction_type!r}.",
        )
        if self.lora_rank is not None:
            require(
                self.unet_preset is None,
                f"lora_rank adapts the pretrained UNet of {self.pretrained_model_name_or_path}, but unet_preset="
                f"{self.unet_preset!r} builds a new one from scratch; drop --unet_preset (pass none) for LoRA.",
            )
            require(
                bool(self.lora_target_modules)
                and all(isinstance(m, str) and m for m in self.lora_target_modules),
                f"lora_target_modules={self.lora_target_modules!r} must name at least one module, e.g. to_q to_k "
                "to_v to_out.0 (the attention projections).",
            )
        require(
            not (self.export_single_file and self.lora_rank is not None),
            "export_single_file writes a whole pipeline, but a LoRA run saves only its adapter; load the adapter "
            "with load_lora_weights, fuse it (pipe.fuse_lora()) and save that pipeline with ldm-export instead.",
        )
        # numpy (and so accelerate.set_seed) only takes seeds in [0, 2**32).
        require(
            self.seed is None or 0 <= self.seed < 2**32,
            f"seed must be in [0, 2**32); got {self.seed}.",
        )
        require(
            not self.push_to_hub or self.hub_model_id is not None,
            "push_to_hub needs hub_model_id (e.g. --hub_model_id your-name/your-model).",
        )
        require(
            not self.hub_push_checkpoints or self.push_to_hub,
            "hub_push_checkpoints needs push_to_hub (add --push_to_hub and --hub_model_id).",
        )


# ----------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------

Config = TypeVar("Config")


def load_config(argv: list[str] | None = None, config_class: type[Config] = TrainConfig) -> Config:
    """Build a validated config from an optional YAML file and command-line overrides.

    Args:
        argv: command-line tokens without the program name; ``None`` reads ``sys.argv[1:]``.
            ``--config path.yaml`` is read first, then every ``--key value`` / ``--key=value``
            overrides it. A bare ``--flag`` sets a bool field to True; list fields take several
            values; optional fields accept ``none``/``null``. ``--help`` prints every option and exits.
        config_class: the dataclass to fill (``TrainConfig``, or ``ldm.training.vae.VaeTrainConfig``), which has
            a ``validate()`` method.

    Returns:
        The resolved config, already checked by its ``validate``.

    Raises:
        ValueError: for an unknown key, a value of the wrong type, a ``hub_token``, or a broken rule.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = _ConfigParser(config_class)
    if known.config is not None:
        parser.set_defaults(**_read_yaml(known.config, config_class))
    try:
        config, _, remaining = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except argparse.ArgumentError as err:
        key = (err.argument_name or "").split("/")[0].lstrip("-")
        raise ValueError(f"Config key {key!r} on the command line: {err.message}") from None
    if remaining:
        _refuse_unparsed(remaining, config_class)
    for name in _list_fields(config_class):
        if getattr(config, name) == [None]:  # `--validation_prompts none`
            setattr(config, name, None)
    config.validate()
    return config


def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config.

    Args:
        config: the config to write.
        path: destination file; missing parent folders are created.
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False, allow_unicode=True)


class _ConfigParser(HfArgumentParser):
    """HfArgumentParser over one config dataclass, where ``X | None`` fields also take ``none``/``null``.

    HfArgumentParser types an ``int | None`` field as plain ``int``, so ``--seed none`` could not clear a value
    that the YAML file set; this wraps the converter of each optional field as argparse registers it.
    """

    def __init__(self, config_class: type):
        self.optional_fields = {
            name for name, hint in _field_types(config_class).items() if _unwrap_optional(hint)[1]
        }
        # allow_abbrev=False: `--learning_rat` must be an unknown key, not a prefix of learning_rate.
        super().__init__(config_class, allow_abbrev=False, exit_on_error=False)
        self.add_argument("--config", help="a YAML file of key: value, read before the other flags")

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument, with a none/null-accepting converter for optional fields."""
        if names and names[0].removeprefix("--") in self.optional_fields and "type" in kwargs:
            kwargs["type"] = _none_or(kwargs["type"])
            if "choices" in kwargs:
                kwargs["choices"] = (*kwargs["choices"], None)
        return super().add_argument(*names, **kwargs)


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter that reads none/null (any case) as None and anything else with `convert`."""

    def parse(text: str) -> Any:
        return None if text.lower() in _NONE_WORDS else convert(text)

    parse.__name__ = f"{getattr(convert, '__name__', 'value')} or none"
    return parse


def _refuse_unparsed(remaining: list[str], config_class: type) -> None:
    """Raise for the first command-line token argparse could not place: an unknown key or an extra value."""
    token = remaining[0]
    if token.startswith("--"):
        _check_key(token[2:].partition("=")[0], "the command line", config_class)
    lists = ", ".join(f"--{name}" for name in _list_fields(config_class))
    raise ValueError(
        f"Unexpected value {token!r} on the command line: an option takes exactly one value, except the list "
        f"options ({lists}), which take several."
    )


def _read_yaml(path: str, config_class: type) -> dict[str, Any]:
    """Read a YAML mapping and type-check each of its keys against the config class."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of key: value; got {type(data).__name__}.")
    hints = _field_types(config_class)
    checked = {}
    for key, value in data.items():
        _check_key(str(key), f"config file {path}", config_class)
        checked[key] = _check_type(key, value, hints[key], source=f"config file {path}")
    return checked


# ----------------------------------------------------------------------------------------------------
# Keys and types
# ----------------------------------------------------------------------------------------------------


def _field_types(config_class: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass's fields."""
    return typing.get_type_hints(config_class)


def _list_fields(config_class: type) -> list[str]:
    """The fields that take several values."""
    hints = _field_types(config_class)
    return [name for name in hints if typing.get_origin(_unwrap_optional(hints[name])[0]) is list]


def check_fields(config: Any) -> None:
    """Type-check every field of a config in place (ints widened to float), naming the first bad one."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _check_type(f.name, getattr(config, f.name), hints[f.name]))


def _check_key(key: str, source: str, config_class: type) -> None:
    """Fail unless ``key`` names a field of the config class, suggesting the closest one."""
    if key == "hub_token":
        raise ValueError(_HUB_TOKEN_MESSAGE)
    valid = [f.name for f in dataclasses.fields(config_class)]
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown config key {key!r} in {source}.{hint} Valid keys: {', '.join(valid)}.")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into (X, True); anything else into (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _check_type(key: str, value: Any, annotation: Any, source: str = "the config") -> Any:
    """Return ``value`` if it matches ``annotation`` (ints widened to float), else raise ValueError."""
    base, optional = _unwrap_optional(annotation)
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    # bool is a subclass of int: `resolution: true` must not pass as 1.
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    if base is str and isinstance(value, str):
        return value
    if origin is Literal and value in typing.get_args(base) and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list) and value:
        (item,) = typing.get_args(base)
        try:
            return [_check_type(key, v, item, source) for v in value]
        except ValueError:
            pass
    raise ValueError(_type_error(key, value, annotation, source))


def _describe(annotation: Any) -> str:
    """A readable name for a field's type, e.g. 'int or none', "one of 'no', 'fp16', 'bf16'"."""
    base, optional = _unwrap_optional(annotation)
    if typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(repr(choice) for choice in typing.get_args(base))
    elif typing.get_origin(base) is list:
        name = f"a non-empty list of {typing.get_args(base)[0].__name__}"
    elif base is bool:
        name = "bool (true/false/1/0)"
    else:
        name = base.__name__
    return f"{name} or none" if optional else name


def _type_error(key: str, value: Any, annotation: Any, source: str) -> str:
    """The message for a value that does not match its field's type."""
    return f"Config key {key!r} expects {_describe(annotation)}, but {source} gives {value!r}."
