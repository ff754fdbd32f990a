"""What `ldm-ui` runs, without the web page: one pipeline loaded at a time, every mode's generation, the files.

The app (ldm/ui/app.py) only lays out controls and turns the exceptions raised here into messages in the page, so
everything below is testable as plain Python. Paths come from the folders the app was started with and never from
outside them: a name typed into a box is resolved under those folders and refused if it lands elsewhere.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import PIL.Image
import torch
from diffusers import ControlNetModel
from safetensors import SafetensorError, safe_open

from ldm.control import canny_edges
from ldm.pipelines.controlnet import LatentControlNetPipeline
from ldm.pipelines.img2img import LatentImg2ImgPipeline
from ldm.pipelines.inpaint import LatentInpaintPipeline
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.pipelines.upscale import LatentUpscalePipeline
from ldm.schedulers import SCHEDULERS, scheduler_from_name
from ldm.ui.infotext import Settings, save_png

MODES = ("txt2img", "img2img", "inpaint", "controlnet", "upscale", "lcm")
# model_index.json class names of the two kinds of pipeline folder the app loads.
UPSCALER_CLASSES = {"StableDiffusionUpscalePipeline", "LatentUpscalePipeline"}
MAX_SEED = 2**32 - 1
MAX_IMAGES = 16
# A LoRA file is any .safetensors file in the model's folder (outside its component folders) or in a folder under
# --models_dir; diffusers' own name for the file train_ldm.py writes.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class UIError(ValueError):
    """A request the app refuses; its message is shown in the page as it is."""


def inside(root: Path, candidate: str | Path) -> Path:
    """`candidate` (relative to `root`, or absolute) resolved, if it lies under `root`; else UIError."""
    root = root.resolve()
    path = (root / candidate).resolve()
    if path != root and root not in path.parents:
        raise UIError(
            f"{candidate}: not under {root}; the app reads files only under the folders it was given."
        )
    return path


def pipeline_kind(folder: Path) -> str | None:
    """'upscale' or 'text' for a pipeline folder (by its model_index.json), None for anything else."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        return None
    return "upscale" if name in UPSCALER_CLASSES else "text"


def _looks_like_lora(path: Path) -> bool:
    """Whether a .safetensors file holds LoRA weights (diffusers' `lora_A`/`lora.down` or kohya's `lora_down` names);
    reads the header only."""
    try:
        with safe_open(path, framework="pt") as f:
            return any("lora" in key.lower() for key in f.keys())
    except (OSError, SafetensorError):
        return False


def _is_controlnet(folder: Path) -> bool:
    try:
        return (
            json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
            == "ControlNetModel"
        )
    except (OSError, ValueError):
        return False


class Engine:
    """The app's state: the folders it may read, the loaded pipeline, the outputs it wrote.

    Args:
        model: a pipeline folder to offer (and load first), or None.
        models_dir: a folder whose sub-folders (two levels deep) are offered: pipelines, ControlNets and LoRAs.
        runs_dir: a folder of training runs (train_ldm.py output folders) for the Training tab, or None.
        outputs_dir: where generated PNGs are written (created).
        device: the torch device the pipelines run on.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        models_dir: str | Path | None = None,
        runs_dir: str | Path | None = None,
        outputs_dir: str | Path = "outputs/ui",
        device: str = "cpu",
    ):
        self.model_root = None if model is None else Path(model).resolve()
        self.models_dir = None if models_dir is None else Path(models_dir).resolve()
        self.runs_dir = None if runs_dir is None else Path(runs_dir).resolve()
        for flag, folder in (
            ("--model", self.model_root),
            ("--models_dir", self.models_dir),
            ("--runs_dir", self.runs_dir),
        ):
            if folder is not None and not folder.is_dir():
                raise UIError(f"{flag} {folder}: no such folder.")
        if self.model_root is not None and pipeline_kind(self.model_root) is None:
            raise UIError(f"--model {self.model_root}: not a pipeline folder (it has no model_index.json).")
        if self.model_root is None and self.models_dir is None:
            raise UIError(
                "Give --model DIR (a pipeline folder) or --models_dir DIR (a folder of them), or both."
            )
        self.outputs_dir = Path(outputs_dir).resolve()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.pipe: LatentPipeline | None = None
        self.model_name: str | None = None
        self.lora: Path | None = None
        self.controlnet: tuple[Path, ControlNetModel] | None = None
        self._lock = threading.Lock()  # one generation at a time: the pipeline's state is per call
        self._stop = threading.Event()
        self._count = len(list(self.outputs_dir.glob("*.png")))

    # ------------------------------------------------------------------ what can be chosen

    def _roots(self) -> list[Path]:
        return [root for root in (self.model_root, self.models_dir) if root is not None]

    def _candidates(self) -> list[Path]:
        """Every folder the app offers things from: --model, and --models_dir and two levels below it."""
        found = [] if self.model_root is None else [self.model_root]
        if self.models_dir is not None:
            for depth in ("*", "*/*"):
                found += sorted(
                    p for p in self.models_dir.glob(depth) if p.is_dir() and not p.name.startswith(".")
                )
        return list(dict.fromkeys(p.resolve() for p in found))  # --model may lie under --models_dir too

    def _label(self, path: Path) -> str:
        if self.models_dir is not None and self.models_dir in path.parents:
            return str(path.relative_to(self.models_dir))
        return path.name

    def model_choices(self) -> list[str]:
        """Labels of the pipeline folders on offer (text-to-image and upscalers)."""
        return [self._label(p) for p in self._candidates() if pipeline_kind(p) is not None]

    def controlnet_choices(self) -> list[str]:
        return [self._label(p) for p in self._candidates() if _is_controlnet(p)]

    def lora_choices(self) -> list[str]:
        """LoRA files: in the loaded model's folder (top level) and anywhere two levels under --models_dir; a
        .safetensors file counts when its tensor names say LoRA (a model's own weights do not)."""
        files = []
        if self.pipe is not None:
            files += sorted(self._path_of(self.model_name).glob("*.safetensors"))
        for folder in self._candidates():
            files += sorted(folder.glob("*.safetensors"))
        return list(dict.fromkeys(self._lora_label(f) for f in files if _looks_like_lora(f)))

    def _lora_label(self, path: Path) -> str:
        """A LoRA file's path relative to the first of the app's folders that holds it."""
        for root in self._roots():
            if root in path.parents:
                return str(path.relative_to(root))
        return path.name

    def _path_of(self, label: str) -> Path:
        """The folder a model or ControlNet label names, checked to lie under the app's folders."""
        if self.model_root is not None and label == self.model_root.name:
            return self.model_root
        if self.models_dir is None:
            raise UIError(f"{label!r}: unknown; the models on offer are {self.model_choices()}.")
        return inside(self.models_dir, label)

    def _lora_path(self, label: str) -> Path:
        """A LoRA label or typed path, relative to --model or --models_dir: a .safetensors file, or a folder holding
        LORA_WEIGHT_NAME, under one of them."""
        escapes = []
        for root in self._roots():
            try:
                path = inside(root, label)
            except UIError as err:
                escapes.append(err)
                continue
            if (path.is_file() and path.suffix == ".safetensors") or (path / LORA_WEIGHT_NAME).is_file():
                return path
        if len(escapes) == len(self._roots()):
            raise escapes[0]
        raise UIError(f"LoRA {label!r}: no .safetensors file (or folder with {LORA_WEIGHT_NAME}) there.")

    # ------------------------------------------------------------------ loading

    def load(self, label: str) -> str:
        """Load the pipeline folder `label` (dropping the one loaded before); returns a one-line description."""
        folder = self._path_of(label)
        kind = pipeline_kind(folder)
        if kind is None:
            raise UIError(f"{label}: not a pipeline folder (no model_index.json).")
        cls = LatentUpscalePipeline if kind == "upscale" else LatentPipeline
        try:
            pipe = cls.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise UIError(f"{label}: {str(err).strip().splitlines()[0]}") from err
        pipe.set_progress_bar_config(disable=True)
        if self.device != "cpu":  # from_pretrained loads on the CPU; a no-op .to() there only warns
            pipe = pipe.to(self.device)
        self.pipe, self.model_name, self.lora, self.controlnet = pipe, label, None, None
        return self.describe()

    def describe(self) -> str:
        if self.pipe is None:
            return "No model loaded."
        kind = "x4 upscaler" if isinstance(self.pipe, LatentUpscalePipeline) else "text-to-image"
        size = self.default_size()
        distilled = " (consistency-distilled: use the Few-step tab)" if self.is_distilled() else ""
        return f"Loaded {self.model_name}: {kind}, {size}x{size} px by default{distilled}."

    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def is_distilled(self) -> bool:
        return self.pipe is not None and self.pipe.unet.config.time_cond_proj_dim is not None

    def _pipe_for(self, mode: str) -> LatentPipeline:
        if self.pipe is None:
            raise UIError("No model loaded: choose one in the Model list and press Load.")
        if isinstance(self.pipe, LatentUpscalePipeline) != (mode == "upscale"):
            want = "an x4 upscaler" if mode == "upscale" else "a text-to-image model"
            raise UIError(
                f"The {mode} tab needs {want}; {self.model_name} is not one. Load another in the Model list."
            )
        return self.pipe

    def _set_lora(self, label: str | None) -> None:
        path = None if not label else self._lora_path(label)
        if path == self.lora:
            return
        if self.lora is not None:
            self.pipe.unload_lora_weights()
            self.lora = None
        if path is not None:
            try:
                if path.is_dir():
                    self.pipe.load_lora_weights(path)
                else:
                    self.pipe.load_lora_weights(path.parent, weight_name=path.name)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                self.pipe.unload_lora_weights()
                raise UIError(f"LoRA {label}: {str(err).strip().splitlines()[0]}") from err
            self.lora = path

    def _controlnet(self, label: str) -> ControlNetModel:
        if not label:
            raise UIError("Choose a ControlNet (a ControlNetModel folder under --models_dir).")
        folder = self._path_of(label)
        if not _is_controlnet(folder):
            raise UIError(f"{label}: not a ControlNetModel folder.")
        if self.controlnet is None or self.controlnet[0] != folder:
            try:
                net = ControlNetModel.from_pretrained(folder, use_safetensors=True)
            except (OSError, ValueError) as err:
                raise UIError(f"ControlNet {label}: {str(err).strip().splitlines()[0]}") from err
            self.controlnet = (folder, net if self.device == "cpu" else net.to(self.device))
        return self.controlnet[1]

    # ------------------------------------------------------------------ generating

    def stop(self) -> None:
        """Ask the running generation to stop after its current step (the pipeline's `interrupt`)."""
        self._stop.set()

    def generate(
        self,
        settings: Settings,
        num_images: int = 1,
        image: PIL.Image.Image | None = None,
        mask: PIL.Image.Image | None = None,
        control_image: PIL.Image.Image | None = None,
        canny: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[tuple[Path, Settings]]:
        """Generate `num_images` images as `settings` say, save each as a PNG carrying its settings.

        `settings.seed` < 0 draws a random seed; image k gets seed + k. Returns (png path, the image's settings).
        Every refusal (no model, the wrong kind of model, a prompt missing, a size or mask the pipeline refuses, a
        LoRA that does not fit) raises UIError with the pipeline's own message.
        """
        mode = settings.mode
        if mode not in MODES:
            raise UIError(f"Unknown mode {mode!r}; one of {MODES}.")
        if not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
            raise UIError(f"Number of images must be 1-{MAX_IMAGES}, got {num_images}.")
        if not settings.prompt.strip() and mode != "upscale":
            raise UIError("Enter a prompt: this model draws what the prompt describes.")
        if settings.sampler not in SCHEDULERS:
            raise UIError(f"Unknown sampler {settings.sampler!r}; one of {sorted(SCHEDULERS)}.")
        for name, needed in (
            ("image", mode in ("img2img", "inpaint", "upscale")),
            ("mask", mode == "inpaint"),
        ):
            if needed and {"image": image, "mask": mask}[name] is None:
                raise UIError(f"The {mode} tab needs an input {name}.")
        if mode == "inpaint" and mask.convert("L").getextrema()[1] == 0:
            raise UIError("The mask is empty: paint over the part of the image to repaint.")
        if mode == "controlnet" and control_image is None:
            raise UIError("The ControlNet tab needs a control image (or a photo with 'Canny edges' ticked).")
        with self._lock:
            pipe = self._pipe_for(mode)
            seed = random.randint(0, MAX_SEED - MAX_IMAGES) if settings.seed < 0 else settings.seed
            settings = replace(settings, seed=seed, model=self.model_name)
            self._set_lora(settings.lora if mode != "upscale" else None)
            settings = replace(settings, lora="" if self.lora is None else self.lora.stem)
            call, kwargs = self._mode_call(pipe, settings, image, mask, control_image, canny)
            self._stop.clear()

            def step_end(pipeline, i, t, tensors):
                if on_step is not None:
                    on_step(i + 1, pipeline.num_timesteps)
                if (
                    self._stop.is_set()
                ):  # diffusers' interrupt: the remaining steps are skipped, the latents decoded
                    pipeline._interrupt = True
                return tensors

            generators = [torch.Generator(self.device).manual_seed(seed + k) for k in range(num_images)]
            try:
                images = call(
                    settings.prompt,
                    negative_prompt=settings.negative_prompt or None,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    num_images_per_prompt=num_images,
                    generator=generators,
                    callback_on_step_end=step_end,
                    **kwargs,
                ).images
            except (ValueError, TypeError) as err:
                raise UIError(str(err).strip()) from err
            results = []
            for k, picture in enumerate(images):
                own = replace(settings, seed=seed + k, width=picture.width, height=picture.height)
                self._count += 1
                path = save_png(picture, self.outputs_dir / f"{self._count:05d}-{own.seed}.png", own)
                results.append((path, own))
            return results

    def _mode_call(self, pipe, settings: Settings, image, mask, control_image, canny: bool):
        """The pipeline to call for `settings.mode` (sharing the loaded one's modules) and its mode arguments."""
        mode = settings.mode
        sampler = "lcm" if mode == "lcm" else settings.sampler
        kwargs: dict = {}
        if self.lora is not None:
            kwargs["cross_attention_kwargs"] = {"scale": settings.lora_scale}
        if mode in ("txt2img", "lcm", "controlnet"):
            kwargs |= {"height": settings.height, "width": settings.width}
        if mode == "txt2img" or mode == "lcm":
            call = LatentPipeline.from_pipe(pipe)
        elif mode == "img2img":
            call = LatentImg2ImgPipeline.from_pipe(pipe)
            kwargs |= {"image": image.convert("RGB"), "strength": settings.strength}
        elif mode == "inpaint":
            call = LatentInpaintPipeline.from_pipe(pipe)
            kwargs |= {
                "image": image.convert("RGB"),
                "mask_image": mask.convert("L"),
                "strength": settings.strength,
                "height": image.height,
                "width": image.width,
            }
        elif mode == "controlnet":
            control = canny_edges(control_image.convert("RGB")) if canny else control_image.convert("RGB")
            call = LatentControlNetPipeline.from_pipe(pipe, controlnet=self._controlnet(settings.controlnet))
            kwargs |= {"image": control, "controlnet_conditioning_scale": settings.control_scale}
        else:  # upscale
            call = pipe
            kwargs |= {
                "image": image.convert("RGB"),
                "noise_level": settings.noise_level,
                "back_projection_steps": settings.back_projection or 0,
            }
        call.scheduler = scheduler_from_name(sampler, pipe.scheduler.config)
        call.set_progress_bar_config(disable=True)
        return call, kwargs
