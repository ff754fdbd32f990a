"""Latent consistency distillation (LCM, Luo et al. 2023): its options, its ODE solver and boundary conditions, the
student it trains, its loss, and what its checkpoints and output folder hold.

Notation (LCM paper, Algorithm 1; consistency models, Song et al. 2023):
    z_{t_{n+k}}   x_0 noised to the solver timestep t_{n+k} (forward process)
    w             the guidance scale of the augmented PF-ODE; the teacher's CFG estimate is
                  eps_cond + w (eps_cond - eps_uncond), i.e. classifier-free guidance at scale s = w + 1
    z_hat_{t_n}   one DDIM step of the guided teacher from t_{n+k} to t_n (the ODE solver, eq. 8)
    f(z, w, c, t) = c_skip(t) z + c_out(t) x0_pred(z, t): the consistency function (eq. 9), f(., t=0) = identity
The student f_theta at (z_{t_{n+k}}, t_{n+k}) regresses the target network f_theta- at (z_hat_{t_n}, t_n) (eq. 10).

Two modes, as diffusers' two example scripts: full distillation trains a student UNet with a guidance-scale embedding
(`time_cond_proj_dim`, initialised from the teacher) and an EMA target network; `--lora_rank R` trains an LCM-LoRA
on the frozen teacher UNet, whose own prediction without the adapter is the teacher and with it (no gradient) the
target.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from ldm.pipelines.text_to_image import LatentPipeline
from ldm.training.checkpoint import EXPORT_FOLDER, save_pipeline
from ldm.training.config import TrainConfig, require
from ldm.training.lora import save_lora

# Consistency models' data standard deviation in the boundary scalings (Song et al. 2023, appendix C).
SIGMA_DATA = 0.5
# The validation grid's rows: what users sample an LCM with.
VALIDATION_STEPS = (1, 2, 4, 8)


@dataclass
class LCMTrainConfig(TrainConfig):
    """`train/train_lcm.py`'s options: `TrainConfig`'s, with the names of diffusers' LCM distillation scripts
    (`train_lcm_distill_sd_wds.py`, `train_lcm_distill_lora_sd_wds.py`) for what distillation adds.

    `pretrained_teacher_model` is diffusers' name for the teacher pipeline; it sets `pretrained_model_name_or_path`
    (one of the two may be given, or both with the same value).
    """

    pretrained_teacher_model: str | None = None
    # The DDIM solver's grid: timesteps (n + 1) T / N - 1 for n < N; each distillation step crosses one interval.
    num_ddim_timesteps: int = 50
    # The guidance scale w of the teacher's CFG estimate eps_c + w (eps_c - eps_u), drawn uniformly per sample.
    # The student samples at guidance_scale = w + 1 (what LatentPipeline's guidance_scale means).
    w_min: float = 5.0
    w_max: float = 15.0
    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.001
    # The target network theta- <- ema_decay theta- + (1 - ema_decay) theta after each step (full mode only).
    ema_decay: float = 0.95
    # The width of the student's guidance-scale embedding (full mode; the teacher's own if it has one).
    unet_time_cond_proj_dim: int = 256
    # c_skip and c_out are taken at t * timestep_scaling_factor, so that they reach (1, 0) only near t = 0.
    timestep_scaling_factor: float = 10.0
    # The teacher's data, not its samples: every caption's text embedding and x_0 latent come from the latent cache
    # the teacher trained on; the loss needs no x_0 of the teacher's own.
    caption_dropout: float = 0.0
    validation_guidance_scale: float = 7.5
    tracker_project_name: str = "ldm-lcm"
    output_dir: str = "ldm-lcm"

    def validate(self) -> None:
        """`TrainConfig.validate`, then what distillation adds.

        Raises:
            ValueError: naming the first field or rule that is violated and how to fix it.
        """
        if self.pretrained_teacher_model is not None:
            require(
                self.pretrained_model_name_or_path in (None, self.pretrained_teacher_model),
                f"pretrained_teacher_model={self.pretrained_teacher_model!r} and pretrained_model_name_or_path="
                f"{self.pretrained_model_name_or_path!r} are the same setting (diffusers' name and ldm's); give one.",
            )
            self.pretrained_model_name_or_path = self.pretrained_teacher_model
        super().validate()
        require(
            self.unet_preset is None,
            "unet_preset is not a distillation option: the student starts from the teacher's UNet; drop "
            "--unet_preset (pass none).",
        )
        require(
            not self.use_ema,
            "use_ema is not a distillation option: the target network is the student's EMA (its rate is "
            "--ema_decay), and the final folder holds it; drop --use_ema.",
        )
        require(
            not self.export_single_file,
            "export_single_file is not a distillation option yet: save the pipeline folder and use ldm-export.",
        )
        require(
            self.timestep_sampling == "uniform",
            f"timestep_sampling={self.timestep_sampling!r} is not a distillation option: the timesteps are drawn "
            "uniformly from the DDIM solver's grid (--num_ddim_timesteps); drop --timestep_sampling.",
        )
        require(
            self.num_ddim_timesteps >= 1,
            f"num_ddim_timesteps must be at least 1 (50 is usual); got {self.num_ddim_timesteps}.",
        )
        require(
            0.0 <= self.w_min <= self.w_max,
            f"w_min={self.w_min} and w_max={self.w_max} must satisfy 0 <= w_min <= w_max (the student then samples "
            f"at guidance_scale from w_min + 1 to w_max + 1).",
        )
        require(self.huber_c > 0, f"huber_c must be positive (0.001 is usual); got {self.huber_c}.")
        require(
            self.unet_time_cond_proj_dim >= 2 and self.unet_time_cond_proj_dim % 2 == 0,
            f"unet_time_cond_proj_dim must be an even number >= 2 (256 is usual); got {self.unet_time_cond_proj_dim}.",
        )
        require(
            self.timestep_scaling_factor > 0,
            f"timestep_scaling_factor must be positive (10 is usual); got {self.timestep_scaling_factor}.",
        )


# ----------------------------------------------------------------------------- the ODE solver and the boundary


@dataclass
class DDIMSolver:
    """The teacher's DDIM solver on the grid t_n = (n + 1) T / N - 1 (n = 0..N-1), one interval k = T / N apart."""

    timesteps: torch.Tensor  # (N,) t_{n+k} for each index n
    alpha_bar_prev: (
        torch.Tensor
    )  # (N,) alpha_bar at the timestep one interval earlier (alpha_bar_0 for n = 0)
    interval: int

    @classmethod
    def for_schedule(cls, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int) -> DDIMSolver:
        """The solver over a training schedule's alpha_bar (T,)."""
        k = len(alphas_cumprod) // num_ddim_timesteps
        timesteps = torch.arange(1, num_ddim_timesteps + 1) * k - 1
        previous = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
        return cls(timesteps, previous, k)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """z_hat_{t_n} = sqrt(alpha_bar_{t_n}) x0 + sqrt(1 - alpha_bar_{t_n}) eps (DDIM with eta = 0)."""
        alpha_bar = append_dims(self.alpha_bar_prev.to(x0.device)[index], x0.ndim)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions, to broadcast over a batch of latents."""
    return x.reshape(-1, *([1] * (ndim - 1)))


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at t: sigma_d^2 / ((s t)^2 + sigma_d^2) and s t / sqrt((s t)^2 + sigma_d^2), so that
    f(z, t=0) = z (LCM eq. 9). `LCMScheduler` uses the same with `timestep_scaling`."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def x0_and_eps(
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a UNet output of `kind` ("epsilon" or "v_prediction") at x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    alpha_bar = append_dims(alphas_cumprod.to(x_t.device)[timesteps], x_t.ndim)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return (x_t - s * prediction) / a, prediction
    if kind == "v_prediction":
        return a * x_t - s * prediction, s * x_t + a * prediction
    raise ValueError(f"prediction_type={kind!r} cannot be distilled here; use epsilon or v_prediction.")


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The embedding of w (B,) that a guidance-distilled UNet takes as `timestep_cond` (B, dim): the pipelines'
    `get_guidance_scale_embedding`, so training and sampling embed the same way."""
    # diffusers defines it as a pipeline method that never reads `self`; called unbound rather than rewritten.
    return LatentPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


# ----------------------------------------------------------------------------- the student


def build_student(teacher: UNet2DConditionModel, config: LCMTrainConfig) -> UNet2DConditionModel:
    """The full-mode student: the teacher's UNet with a guidance-scale embedding, every shared weight copied.

    diffusers' script leaves the new `cond_proj` at its random initialisation, which shifts every time embedding
    from the first step; here it starts at zero, so the student starts as exactly the teacher (tested) and learns
    how w should move it.
    """
    dim = teacher.config.time_cond_proj_dim or config.unet_time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    require(
        not unexpected and set(missing) <= {"time_embedding.cond_proj.weight"},
        f"The teacher's UNet did not fit its student: missing {missing}, unexpected {unexpected}.",
    )
    if missing:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy that never trains: the target network's module, which holds the EMA weights for its forward pass."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def target_network(student: UNet2DConditionModel, config: LCMTrainConfig, device) -> EMAModel:
    """The target network theta- as an EMA of the student at a constant rate `ema_decay` from the first step (the
    LCM paper's; `update_after_step=-1` and `min_decay` switch off EMAModel's warm-up). Held as an EMAModel so that
    the checkpoint code saves it as safetensors and restores it on resume, as any run's EMA."""
    ema = EMAModel(
        student.parameters(),
        decay=config.ema_decay,
        min_decay=config.ema_decay,
        update_after_step=-1,
        model_cls=type(student),
        model_config=student.config,
    )
    ema.to(device)
    return ema


@contextmanager
def adapters_off(unet) -> Iterator[None]:
    """The LoRA run's teacher: its UNet with the adapter switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


# ----------------------------------------------------------------------------- the loss


@dataclass
class Distillation:
    """What one LCM loss needs besides the batch: the teacher, the target, the solver and the options.

    `target` is None in a LoRA run (the student without gradient is its own target, as diffusers' LCM-LoRA script
    does); there `teacher` is the student's module, called with its adapter off.
    """

    student: torch.nn.Module  # what trains (as prepared by accelerate)
    teacher: UNet2DConditionModel
    target: UNet2DConditionModel | None
    ema: EMAModel | None
    solver: DDIMSolver
    scheduler: DDPMScheduler  # the teacher's training schedule (alpha_bar, prediction type, add_noise)
    uncond_embeds: torch.Tensor  # (1, L, D): the empty prompt
    config: LCMTrainConfig

    def loss(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The consistency distillation loss of a batch of x_0 latents (B, C, h, w) and their captions' embeddings
        (LCM Algorithm 1), every draw (solver index n, eps, w) from `generator` on the CPU."""
        config, solver, b = self.config, self.solver, len(latents)
        index = torch.randint(0, len(solver.timesteps), (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        w = config.w_min + (config.w_max - config.w_min) * torch.rand((b,), generator=generator)
        device = latents.device
        index, w = index.to(device), w.to(device)
        start = solver.timesteps.to(device)[index]  # t_{n+k}
        end = (start - solver.interval).clamp(min=0)  # t_n
        z = self.scheduler.add_noise(latents, noise, start)  # z_{t_{n+k}}  (B, C, h, w)
        w_embedding = None
        if self.target is not None:  # the full student takes w as its guidance-scale embedding
            w_embedding = guidance_scale_embedding(w, self.target.config.time_cond_proj_dim).to(device)

        # The student's consistency function at (z_{t_{n+k}}, t_{n+k}).
        prediction = self.student(z, start, text_embeds, timestep_cond=w_embedding, return_dict=False)[0]
        x0, _ = self.x0_and_eps(prediction, start, z)
        c_skip, c_out = (
            append_dims(c, z.ndim) for c in boundary_scalings(start, config.timestep_scaling_factor)
        )
        student_f = c_skip * z + c_out * x0

        with torch.no_grad():
            z_prev = self.solver_step(z, start, text_embeds, w, index)  # z_hat_{t_n}
            target_f = self.target_f(z_prev, end, text_embeds, w_embedding)
        if config.loss_type == "l2":
            return F.mse_loss(student_f.float(), target_f.float())
        return (
            ((student_f.float() - target_f.float()) ** 2 + config.huber_c**2).sqrt() - config.huber_c
        ).mean()

    def solver_step(self, z, start, text_embeds, w, index) -> torch.Tensor:
        """One DDIM step of the teacher, guided at w (LCM's CFG: eps_c + w (eps_c - eps_u)), from t_{n+k} to t_n."""
        context = torch.cat([self.uncond_embeds.expand(len(z), -1, -1).to(text_embeds), text_embeds])
        with self.teacher_mode():
            out = self.teacher(torch.cat([z, z]), torch.cat([start, start]), context, return_dict=False)[0]
        x0, eps = self.x0_and_eps(out, torch.cat([start, start]), torch.cat([z, z]))
        w = append_dims(w, z.ndim)
        (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
        return self.solver.step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), index)

    def target_f(self, z_prev, end, text_embeds, w_embedding) -> torch.Tensor:
        """f_theta-(z_hat_{t_n}, w, c, t_n): the target network (the EMA), or the student itself in a LoRA run."""
        if self.target is not None:
            self.ema.copy_to(self.target.parameters())  # theta- as of the last optimizer step
            out = self.target(z_prev, end, text_embeds, timestep_cond=w_embedding, return_dict=False)[0]
        else:
            out = self.student(z_prev, end, text_embeds, return_dict=False)[0]
        x0, _ = self.x0_and_eps(out, end, z_prev)
        c_skip, c_out = (
            append_dims(c, z_prev.ndim) for c in boundary_scalings(end, self.config.timestep_scaling_factor)
        )
        return c_skip * z_prev + c_out * x0

    def x0_and_eps(self, prediction, t, x_t) -> tuple[torch.Tensor, torch.Tensor]:
        """`x0_and_eps` on the teacher's schedule and prediction type."""
        schedule = self.scheduler
        return x0_and_eps(prediction, t, x_t, schedule.alphas_cumprod, schedule.config.prediction_type)

    @contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """The teacher as it is: its own frozen UNet, or the LoRA run's UNet with the adapter off."""
        if self.target is not None:
            yield
            return
        with adapters_off(self.teacher):
            yield


# ----------------------------------------------------------------------------- what a run saves


def lcm_scheduler(noise_scheduler, config: LCMTrainConfig) -> LCMScheduler:
    """The sampler of a distilled model: LCM on the teacher's schedule, with the run's solver grid and scaling."""
    return LCMScheduler.from_config(
        noise_scheduler.config,
        original_inference_steps=config.num_ddim_timesteps,
        timestep_scaling=config.timestep_scaling_factor,
    )


@dataclass
class LCMExport:
    """The frozen parts, the teacher's schedule and the target network, to turn the trained student into an LCM
    pipeline (full mode: the target network's weights) or an LCM-LoRA (the adapter)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    config: LCMTrainConfig
    ema: EMAModel | None = None

    @property
    def lora(self) -> bool:
        return self.config.lora_rank is not None

    def pipeline(self, trained: UNet2DConditionModel) -> LatentPipeline:
        """A LatentPipeline with the LCM scheduler on the distilled UNet (the EMA target's weights in full mode)."""
        unet = trained
        if self.ema is not None:
            unet = type(trained).from_config(trained.config).to(trained.device)
            self.ema.copy_to(unet.parameters())
        pipe = LatentPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=lcm_scheduler(self.noise_scheduler, self.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, trained: UNet2DConditionModel, config: TrainConfig, folder: Path) -> str:
        """Write a checkpoint's samplable part into `folder`: the pipeline (full) or the adapter's two files (LoRA);
        returns the subfolder the Hub gets."""
        if self.lora:
            save_lora(trained, config, folder / EXPORT_FOLDER[True])
        else:
            save_pipeline(self.pipeline(trained), folder / EXPORT_FOLDER[False])
        return EXPORT_FOLDER[self.lora]


def lcm_model_card(config: LCMTrainConfig, repo_id: str, grid_name: str | None) -> str:
    """README.md of a distilled model or LCM-LoRA: its teacher, its settings and how to sample it."""
    teacher = config.pretrained_model_name_or_path
    settings = {
        k: getattr(config, k)
        for k in (
            "num_ddim_timesteps", "w_min", "w_max", "loss_type", "ema_decay", "timestep_scaling_factor",
            "train_batch_size", "learning_rate", "max_train_steps", "lora_rank",
        )
    }  # fmt: skip
    if config.lora_rank is None:
        load = [
            "from ldm import LatentPipeline",
            "",
            f'pipe = LatentPipeline.from_pretrained("{repo_id}")  # its scheduler is LCMScheduler',
            f'image = pipe("a prompt", num_inference_steps=4, guidance_scale={config.validation_guidance_scale:g}).images[0]',
        ]
    else:
        load = [
            "from diffusers import LCMScheduler",
            "from ldm import LatentPipeline",
            "",
            f'pipe = LatentPipeline.from_pretrained("{teacher}")',
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
            f'pipe.load_lora_weights("{repo_id}")',
            'image = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0).images[0]',
        ]
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {teacher}",
        f"tags: [lcm, {'lcm-lora, lora, ' if config.lora_rank else ''}text-to-image, diffusers, ldm]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"{'An LCM-LoRA for' if config.lora_rank else 'A latent consistency model distilled from'} `{teacher}` with "
        f"`ldm`'s `train/train_lcm.py` on {config.dataset_name or config.train_data_dir}: 1 to 8 sampling steps, "
        "one UNet call each (guidance is distilled into the model).",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "```python",
        *load,
        "```",
    ]
    if grid_name:
        lines += ["", f"![validation: rows at {', '.join(map(str, VALIDATION_STEPS))} steps]({grid_name})"]
    return "\n".join(lines) + "\n"
