"""Few-step sampling and latent consistency distillation: the LCM scheduler on LatentPipeline against diffusers'
LCM pipelines, the distillation's math against its formulas and diffusers' LCMScheduler, and train/train_lcm.py
launched for real on tiny models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file

from ldm import LatentPipeline
from ldm.schedulers import scheduler_from_name
from ldm.training.lcm import (
    DDIMSolver,
    Distillation,
    LCMTrainConfig,
    boundary_scalings,
    build_student,
    x0_and_eps,
)
from tests.training_helpers import HUB_TOKEN, ROOT, launch, load_script, same_tensors, tensors

SCRIPT = "train_lcm.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def with_guidance_embedding(pipe: LatentPipeline, dim: int = 32) -> LatentPipeline:
    """The tiny pipeline with a fully distilled LCM's UNet: a random guidance-scale embedding, LCM scheduler."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=dim)
    return LatentPipeline.from_pipe(
        pipe, unet=unet, scheduler=scheduler_from_name("lcm", pipe.scheduler.config)
    )


# ----------------------------------------------------------------------------- sampling against diffusers


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt="a red circle", num_inference_steps=4, guidance_scale=8.5),
        dict(
            prompt=["a blue square", "a cat"],
            num_inference_steps=2,
            guidance_scale=3.0,
            num_images_per_prompt=2,
        ),
        dict(prompt="a green dog", num_inference_steps=1, guidance_scale=1.0),
    ],
)
def test_a_distilled_unet_samples_as_latent_consistency_model_pipeline(tiny_pipe, kwargs):
    ours = with_guidance_embedding(tiny_pipe)
    theirs = LatentConsistencyModelPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=LCMScheduler.from_config(ours.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    calls = []
    ours.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    a = ours(**kwargs, output_type="np", generator=torch.Generator().manual_seed(3)).images
    total = len(a)
    # One UNet call per step, on the conditional batch alone: guidance is in the embedding, not a second branch.
    assert calls == [total] * kwargs["num_inference_steps"]
    b = theirs(**kwargs, output_type="np", generator=torch.Generator().manual_seed(3)).images
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
def test_an_lcm_lora_samples_as_stable_diffusion_with_lcm_scheduler_and_load_lora_weights(
    saved_tiny_pipe, lora_dir, guidance_scale
):
    ours = LatentPipeline.from_pretrained(saved_tiny_pipe)
    ours.scheduler = scheduler_from_name("lcm", ours.scheduler.config)
    theirs = StableDiffusionPipeline.from_pretrained(saved_tiny_pipe, safety_checker=None)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora_dir)
        kwargs = dict(num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
        images.append(pipe("a red cat", **kwargs, generator=torch.Generator().manual_seed(2)).images)
    assert np.abs(images[0] - images[1]).max() <= 1e-4


# ----------------------------------------------------------------------------- the distillation's math


def test_solver_grid_and_boundary_scalings_are_lcm_schedulers():
    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    solver = DDIMSolver.for_schedule(schedule.alphas_cumprod, 50)
    lcm = LCMScheduler.from_config(schedule.config, original_inference_steps=50)
    lcm.set_timesteps(50)
    # The solver's grid is the one the LCM scheduler samples on (its "original" 50-step schedule).
    assert solver.timesteps.tolist() == sorted(lcm.timesteps.tolist()) and solver.interval == 20
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    for i, step in enumerate(t.tolist()):
        theirs = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert torch.allclose(torch.stack([c_skip[i], c_out[i]]), torch.tensor(theirs, dtype=torch.float32))
    assert (c_skip[0], c_out[0]) == (1.0, 0.0)  # f(z, 0) = z: the boundary condition


def test_x0_and_eps_invert_the_forward_process_and_the_solver_step_is_ddim():
    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ab = schedule.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, eps, t = (
        torch.randn(3, 4, 2, 2, generator=g),
        torch.randn(3, 4, 2, 2, generator=g),
        torch.tensor([5, 400, 990]),
    )
    x_t = schedule.add_noise(x0, eps, t)
    for kind, prediction in (("epsilon", eps), ("v_prediction", schedule.get_velocity(x0, eps, t))):
        got_x0, got_eps = x0_and_eps(prediction, t, x_t, ab, kind)
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)
    # From the exact (x0, eps), one solver step lands on the forward process one interval earlier.
    solver = DDIMSolver.for_schedule(ab, 50)
    index = torch.tensor([0, 10, 49])
    previous = (solver.timesteps[index] - solver.interval).clamp(min=0)
    assert torch.allclose(solver.step(x0, eps, index), schedule.add_noise(x0, eps, previous), atol=1e-5)


def test_the_student_starts_as_the_teacher_and_learns_from_w(tiny_pipe):
    teacher = tiny_pipe.unet
    config = LCMTrainConfig(
        pretrained_model_name_or_path="base", train_data_dir="data", unet_time_cond_proj_dim=32
    )
    student = build_student(teacher, config)
    g = torch.Generator().manual_seed(0)
    z, text = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 7, teacher.config.cross_attention_dim, generator=g),
    )
    t = torch.tensor([20, 700])
    w_embedding = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(student(z, t, text, timestep_cond=w_embedding).sample, teacher(z, t, text).sample)
    # The loss reaches the guidance embedding (zero at the start, so only its gradient shows w is used).
    target = build_student(teacher, config).requires_grad_(False)
    schedule = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    distillation = Distillation(
        student, teacher.requires_grad_(False), target, EMAModel(student.parameters()),
        DDIMSolver.for_schedule(schedule.alphas_cumprod, 10), schedule,
        torch.zeros(1, 7, teacher.config.cross_attention_dim), dataclasses.replace(config, w_min=2.0, w_max=8.0),
    )  # fmt: skip
    loss = distillation.loss(z, text, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert student.time_embedding.cond_proj.weight.grad.abs().max() > 0
    again = distillation.loss(z, text, torch.Generator().manual_seed(1))
    assert torch.equal(loss.detach(), again.detach())  # every draw from the step's generator


# ----------------------------------------------------------------------------- train/train_lcm.py, for real


def distil(world, out, *args, **kwargs):
    """An LCM run on the tiny base pipeline (its UNet is the teacher) with the tiny config's data and steps."""
    return launch(
        world, out, "--unet_preset", "none", "--learning_rate", "1e-4", "--num_ddim_timesteps", "10",
        "--unet_time_cond_proj_dim", "32", "--validation_prompts", "a red circle", *args, script_name=SCRIPT,
        **kwargs,
    )  # fmt: skip


def test_full_distillation_saves_an_lcm_pipeline_and_resumes_bitwise(world, tmp_path):
    common = ["--gradient_accumulation_steps", "2"]
    distil(world, tmp_path / "full", *common)
    distil(world, tmp_path / "half", *common, "--max_train_steps", "3")
    resumed = distil(world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    full = tmp_path / "full"
    final = tensors(full / "unet" / WEIGHTS)
    assert same_tensors(final, tensors(tmp_path / "half" / "unet" / WEIGHTS))
    # The target network (saved, as its EMA, with every checkpoint as safetensors) moved away from the teacher.
    teacher = tensors(world / "base" / "unet" / WEIGHTS)
    assert not torch.equal(final["conv_in.weight"], teacher["conv_in.weight"])
    assert (full / "checkpoint-6" / "ema_unet.safetensors").exists()
    assert same_tensors(tensors(full / "checkpoint-6" / "pipeline" / "unet" / WEIGHTS), final)

    # The folder is an LCM: LCMScheduler, a guidance-scale embedding; stock diffusers' LCM pipeline loads it.
    pipe = LatentPipeline.from_pretrained(full)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 32
    assert pipe.scheduler.config.original_inference_steps == 10
    LatentConsistencyModelPipeline.from_pretrained(full, safety_checker=None)
    # The validation grid: one row per step count (1, 2, 4, 8) of the one prompt.
    assert Image.open(full / "samples.png").size == (16, 4 * 16)
    card = (full / "README.md").read_text()
    assert "latent consistency model distilled from" in card and "num_ddim_timesteps | 10" in card
    state = json.loads((full / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["latent_cache"] is True


def test_lcm_lora_on_two_processes_saves_diffusers_and_kohya_files(world, tmp_path):
    out, record = tmp_path / "lora", tmp_path / "hub_calls.jsonl"
    env = {
        "PYTHONPATH": str(ROOT / "tests" / "hub_stub"),
        "LDM_TEST_HUB_RECORD": str(record),
        "HF_TOKEN": HUB_TOKEN,
    }
    result = distil(
        world, out, "--lora_rank", "4", "--w_min", "3", "--w_max", "3", "--push_to_hub", "--hub_model_id",
        "me/tiny-lcm-lora", "--hub_push_checkpoints", processes=2, env=env,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "UNet weights identical on all 2 processes" in log
    # Hub: each checkpoint's adapter in the background, then the final folder; never optimizer state or the token.
    uploads = [c for c in map(json.loads, record.read_text().splitlines()) if c["call"] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoint-3", "checkpoint-6", None]
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"} <= set(
        uploads[2]["files"]
    )
    assert not [f for f in uploads[2]["files"] if f.startswith("checkpoint-") or f.endswith((".pkl", ".bin"))]
    assert HUB_TOKEN not in log
    assert not [p for p in out.rglob("*") if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()]
    diffusers_file, kohya_file = (
        out / "pytorch_lora_weights.safetensors",
        out / "pytorch_lora_weights_kohya.safetensors",
    )
    assert any(k.startswith("lora_unet_") for k in load_file(kohya_file))
    assert (out / "checkpoint-6" / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe = LatentPipeline.from_pretrained(world / "base")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    pipe.load_lora_weights(diffusers_file)
    after = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert np.isfinite(after).all() and np.abs(after - before).max() > 0
    assert "An LCM-LoRA for" in (out / "README.md").read_text()


def start(world, tmp_path, *args):
    """train_lcm.main in-process on the tiny world; returns its SystemExit message."""
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--unet_preset", "none",
        "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "out"), *args,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_lcm").main(argv)
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--w_min", "9", "--w_max", "3"], "w_min=9.0 and w_max=3.0"),
        (["--loss_type", "l1"], "loss_type"),
        (["--ema_decay", "1.0"], "ema_decay must be a finite number in (0, 1)"),
        (["--use_ema"], "use_ema is not a distillation option"),
        (["--unet_preset", "tiny"], "unet_preset is not a distillation option"),
        (["--num_ddim_timesteps", "0"], "num_ddim_timesteps must be at least 1"),
        (["--timestep_sampling", "cubic"], "timestep_sampling='cubic' is not a distillation option"),
        (["--unet_time_cond_proj_dim", "3"], "unet_time_cond_proj_dim must be an even number"),
        (["--pretrained_model_name_or_path", "elsewhere"], "are the same setting"),
        (["--lora_rank", "100000"], "lora_rank=100000 is above the width"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(world, tmp_path, monkeypatch, args, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the start-up checks ended")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_model)
    text = start(world, tmp_path, "--pretrained_teacher_model", str(world / "base"), *args)
    assert text.startswith(f"{SCRIPT}: ") and message in text, text


def test_evaluate_fewstep_times_and_scores_every_sampler_at_every_step_count(
    world, lora_dir, tmp_path, monkeypatch
):
    from ldm.presets import build_pipeline

    # Read for the report only (OpenMP read its own at start-up).
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    lcm = with_guidance_embedding(build_pipeline("tiny", world / "tokenizer", seed=0))
    lcm.save_pretrained(tmp_path / "lcm")
    levels = len(lcm.vae.config.block_out_channels)
    AutoencoderTiny(
        decoder_block_out_channels=(8,) * levels, num_decoder_blocks=(1,) * levels,
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,
    ).save_pretrained(tmp_path / "tiny-vae")  # fmt: skip
    rows = load_script("evaluate_fewstep").main(
        ["--teacher", str(world / "base"), "--lcm", str(tmp_path / "lcm"), "--lcm_lora", str(lora_dir),
         "--tiny_vae", str(tmp_path / "tiny-vae"), "--prompts", str(world / "data" / "heldout_prompts.jsonl"),
         "--seeds", "0", "--out_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    samplers = [("DDIM", 25)] + [
        (sampler, n) for sampler in ("DDIM", "LCM", "LCM-LoRA") for n in (1, 2, 4, 8)
    ]
    # Every sampler with the VAE, then every one again with the tiny autoencoder.
    assert [(r["sampler"], r["steps"], r["decoder"]) for r in rows] == [
        (*row, decoder) for decoder in ("VAE", "tiny") for row in samplers
    ]
    # Guided DDIM runs two UNet branches a step; the LCMs one (LCM-LoRA samples at guidance 1).
    assert [r["unet_calls"] for r in rows[:13]] == [50, 2, 4, 8, 16] + [1, 2, 4, 8] * 2
    assert [r["unet_calls"] for r in rows[13:]] == [r["unet_calls"] for r in rows[:13]]
    assert all(0 < r["denoise_seconds_per_image"] < r["seconds_per_image"] for r in rows)
    assert all(0 <= r["accuracy"]["all"] <= 1 for r in rows)
    report = json.loads((tmp_path / "eval" / "fewstep.json").read_text())
    assert report["omp_wait_policy"] == "PASSIVE"
    table = (tmp_path / "eval" / "fewstep.txt").read_text().splitlines()
    assert len(table) == len(rows) + 2 and "| LCM-LoRA | 4 | 1 | 4 | VAE |" in table[13]
    # Each decoder's speed-ups are over its own 25-step DDIM row.
    assert table[2].split(" | ")[10] == "1.0x" and table[15].startswith("| DDIM | 25 |")
    assert table[15].split(" | ")[4] == "tiny" and table[15].split(" | ")[10] == "1.0x"
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (4 * 16, len(rows) * 16)  # 4 held-out prompts a row, one row per setting


def test_ldm_generate_samples_a_distilled_model_with_lcm_unless_told_otherwise(tiny_pipe, tmp_path):
    from ldm.cli import main

    with_guidance_embedding(tiny_pipe).save_pretrained(tmp_path / "lcm")
    images = {}
    for name, flags in {
        "default": [],
        "lcm": ["--scheduler", "lcm"],
        "ddim": ["--scheduler", "ddim"],
    }.items():
        out = tmp_path / f"{name}.png"
        main(["a red cat", "--model", str(tmp_path / "lcm"), "--steps", "4", "--out", str(out), *flags])
        images[name] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.array_equal(images["default"], images["lcm"])
    assert np.abs(images["default"] - images["ddim"]).max() > 0
