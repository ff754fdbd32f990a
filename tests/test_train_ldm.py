"""train/train_ldm.py launched for real through `accelerate launch`, on tiny models and synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from ldm import LatentPipeline
from tests.training_helpers import HUB_TOKEN, ROOT, launch, same_tensors, tensors


def test_finetune_writes_loadable_pipeline_checkpoints_and_card(world, tmp_path):
    out = tmp_path / "run"
    result = launch(
        world, out, "--unet_preset", "none", "--use_ema", "--ema_decay", "0.5", "--checkpoints_total_limit", "1",
        "--validation_prompts", "a red circle on the left", "a blue square at the top", "--report_to", "tensorboard",
        launcher=True,  # the one-process path through `accelerate launch --cpu`, as the README runs it
    )  # fmt: skip
    log = result.stdout + result.stderr

    # Pruned to the newest checkpoint, which holds the state, the pipeline, the raw UNet, config and position.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    ckpt = out / "checkpoint-6"
    for name in [
        "optimizer.bin",
        "pipeline/model_index.json",
        "unet/config.json",
        "config.yaml",
        "trainer_state.json",
    ]:
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 6
    # The final folder records the steps done and the throughput (what benchmarks/ read).
    final_state = json.loads((out / "trainer_state.json").read_text())
    assert final_state["global_step"] == 6 and final_state["latent_cache"] is True
    assert (
        final_state["samples_per_second"] == final_state["train_samples"] / final_state["train_seconds"] > 0
    )
    assert LatentPipeline.from_pretrained(ckpt / "pipeline").unet is not None

    # The final folder loads in both pipelines; the frozen parts are byte-for-byte the base model's.
    from diffusers import StableDiffusionPipeline

    ours = LatentPipeline.from_pretrained(out)
    StableDiffusionPipeline.from_pretrained(out)
    for part, name in [("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        assert same_tensors(
            tensors(out / part / f"{name}.safetensors"),
            tensors(world / "base" / part / f"{name}.safetensors"),
        ), part
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert not same_tensors(tensors(out / unet_file), tensors(world / "base" / unet_file))
    ours.set_progress_bar_config(disable=True)
    assert ours("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)

    # Config, model card with sample grid, validation images, tensorboard events.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["use_ema"] is True and saved["max_train_steps"] == 6 and saved["seed"] == 0
    card = (out / "README.md").read_text()
    assert "samples.png" in card and "| learning_rate | 0.001 |" in card
    assert (out / "samples.png").exists() and len(list((out / "validation").glob("*.png"))) == 2
    assert list((out / "logs").rglob("events.out.tfevents*"))

    # The corrupt image was skipped and counted (when the cache was built), not fatal.
    assert "1 unreadable images are excluded from the latent cache" in log


def test_resume_halfway_is_bitwise_identical(world, tmp_path):
    # 32 training images in batches of 5 are 7 micro-batches an epoch; with accumulation 2 accelerate forces a
    # step at each epoch's end, so step 5 lies in the second epoch, past that uneven boundary.
    common = ["--unet_preset", "tiny", "--use_ema", "--caption_dropout", "0.5", "--random_flip", "true",
              "--cache_latents", "false", "--validation_steps", "100", "--train_batch_size", "5",
              "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]  # fmt: skip
    full = launch(world, tmp_path / "full", *common, "--max_train_steps", "8", "--checkpointing_steps", "4")
    assert "Skipped" in full.stdout + full.stderr  # 80 draws of 32 images: the corrupt one is met and skipped
    launch(world, tmp_path / "half", *common, "--max_train_steps", "8", "--checkpointing_steps", "5")
    # A crash after checkpoint-5: drop what came after it and resume.
    import shutil

    for name in ["unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"]:
        path = tmp_path / "half" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert [p.name for p in (tmp_path / "half").glob("checkpoint-*")] == ["checkpoint-5"]
    resumed = launch(
        world, tmp_path / "half", *common, "--max_train_steps", "8", "--checkpointing_steps", "4",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "half" / "checkpoint-5" / "trainer_state.json").read_text())["epoch"] == 1
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    for path in [unet_file, f"checkpoint-8/{unet_file}"]:  # final (EMA) weights and the raw trained UNet
        assert same_tensors(tensors(tmp_path / "full" / path), tensors(tmp_path / "half" / path)), path
    # The weights did move after the halfway checkpoint, so the comparison above is not trivial.
    assert not same_tensors(
        tensors(tmp_path / "half" / f"checkpoint-5/{unet_file}"),
        tensors(tmp_path / "full" / f"checkpoint-8/{unet_file}"),
    )


def test_streaming_resume_is_bitwise_identical(world, tmp_path):
    # A stream has no length: the resumed run skips the batches it trained on by reading, not decoding, them.
    common = ["--cache_latents", "false", "--streaming", "true", "--validation_steps", "100"]
    launch(world, tmp_path / "full", *common)
    launch(world, tmp_path / "half", *common, "--max_train_steps", "3")
    launch(world, tmp_path / "half", *common, "--resume_from_checkpoint", "latest")
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert same_tensors(tensors(tmp_path / "full" / unet_file), tensors(tmp_path / "half" / unet_file))
    assert not same_tensors(
        tensors(tmp_path / "half" / f"checkpoint-3/{unet_file}"), tensors(tmp_path / "full" / unet_file)
    )


def test_two_processes_agree_and_their_checkpoint_resumes_on_one(world, tmp_path):
    out = tmp_path / "ddp"
    result = launch(world, out, "--validation_steps", "100", processes=2)
    assert "UNet weights identical on all 2 processes" in result.stdout + result.stderr
    assert (out / "checkpoint-3").is_dir() and (out / "model_index.json").exists()
    resumed = launch(
        world, out, "--validation_steps", "100", "--resume_from_checkpoint", str(out / "checkpoint-3"),
        "--max_train_steps", "8",
    )  # fmt: skip
    assert "UNet weights identical on all 1 processes" in resumed.stdout + resumed.stderr
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_hub_push_sends_weights_only_and_never_the_token(world, tmp_path):
    out = tmp_path / "hub"
    record = tmp_path / "hub_calls.jsonl"
    env = {
        "PYTHONPATH": str(ROOT / "tests" / "hub_stub"),
        "LDM_TEST_HUB_RECORD": str(record),
        "HF_TOKEN": HUB_TOKEN,
    }
    result = launch(
        world, out, "--push_to_hub", "--hub_model_id", "me/tiny-ldm", "--hub_push_checkpoints", "--validation_steps",
        "100", env=env,
    )  # fmt: skip
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    uploads = [c for c in calls if c["call"] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoint-3", "checkpoint-6", None]
    for upload in uploads[:2]:
        assert upload["run_as_future"] and "unet/diffusion_pytorch_model.safetensors" in upload["files"]
        assert "model_index.json" in upload["files"]
        assert not [
            f
            for f in upload["files"]
            if f.endswith((".bin", ".pkl")) or f.startswith(("optimizer", "random"))
        ]
    final = uploads[2]["files"]
    assert {
        "README.md",
        "model_index.json",
        "config.yaml",
        "unet/diffusion_pytorch_model.safetensors",
    } <= set(final)
    assert not [f for f in final if f.startswith("checkpoint-") or f.endswith(".pkl")]
    assert all(c["repo_id"] == "me/tiny-ldm" for c in calls)

    # The token reaches huggingface_hub through the environment only: it is in no file and no log line.
    assert HUB_TOKEN not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert HUB_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning_rat", "1e-4"], "learning_rate"),
        (["--train_batch_size", "four"], "train_batch_size"),
        (["--hub_token", "abc"], "HF_TOKEN"),
        # From the VAE's and UNet's configs, before any weights load: latents of 6 px / 2 cannot halve.
        (["--aspect_buckets", "--bucket_step", "6"], "--bucket_step (6) must be a multiple of 4 pixels"),
    ],
)
def test_bad_config_fails_at_startup(world, tmp_path, args, message):
    # In-process: these fail before the Accelerator or any model exists (the script exits with this message).
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ldm_script", ROOT / "train" / "train_ldm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(world / "base"),
            "--train_data_dir", str(world / "data"), "--output_dir", str(tmp_path / "out"), *args]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert message in str(exit_info.value.code) and str(exit_info.value.code).startswith("train_ldm.py: ")
    assert not (tmp_path / "out").exists()


def test_shipped_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from ldm.training.config import TrainConfig, load_config
    from ldm.training.controlnet import ControlNetTrainConfig
    from ldm.training.lcm import LCMTrainConfig
    from ldm.training.tiny_vae import TinyVaeTrainConfig
    from ldm.training.upscaler import UpscalerTrainConfig

    kinds = {
        p.name: load_config_from_file(str(p)).distributed_type
        for p in (ROOT / "configs" / "accelerate").glob("*.yaml")
    }
    assert set(map(str, kinds.values())) >= {
        "DistributedType.FSDP",
        "DistributedType.DEEPSPEED",
        "DistributedType.MULTI_GPU",
    }
    assert load_config_from_file(str(ROOT / "configs" / "accelerate" / "two_nodes.yaml")).num_machines == 2
    for path in (ROOT / "configs").glob("*.yaml"):
        given = yaml.safe_load(path.read_text())
        missing = {"pretrained_model_name_or_path": "x", "train_data_dir": "y"}
        if "dataset_name" in given:
            missing.pop("train_data_dir")
        if "pretrained_teacher_model" in given:  # diffusers' name for it, in the distillation config
            missing.pop("pretrained_model_name_or_path")
        extra = [arg for key, value in missing.items() if key not in given for arg in (f"--{key}", value)]
        trainer_config = {
            "controlnet": ControlNetTrainConfig,
            "lcm": LCMTrainConfig,
            "upscale": UpscalerTrainConfig,
            "tiny": TinyVaeTrainConfig,
        }.get(path.name.split("_")[0], TrainConfig)
        config = load_config(["--config", str(path), *extra], trainer_config)
        assert type(config) is trainer_config


def test_mixed_precision_and_objective_options_run(world, tmp_path):
    launch(
        world, tmp_path / "opts", "--mixed_precision", "bf16", "--use_ema", "--gradient_checkpointing", "--snr_gamma", "5",
        "--prediction_type", "v_prediction", "--rescale_betas_zero_snr", "--noise_offset", "0.05",
        "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--validation_prompts", "a red circle on the left",
    )  # fmt: skip
    scheduler = json.loads((tmp_path / "opts" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "DDIMScheduler"
    # Zero terminal SNR travels with the pipeline: it samples from t = T on the rescaled schedule.
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"
    pipe = LatentPipeline.from_pretrained(tmp_path / "opts")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, guidance_rescale=0.7, output_type="np").images
    assert pipe.scheduler.timesteps[0] == 999 and np.isfinite(images).all()


def test_missing_tracker_is_a_startup_error(monkeypatch):
    import importlib.util

    from ldm.training.run import check_trackers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"--report_to tensorboard needs tensorboard.*ldm\[tracking\]"):
        check_trackers("tensorboard")
    check_trackers("none")
