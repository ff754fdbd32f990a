"""Determinism, save/load with stock diffusers, the Hub upload, xformers, input errors, and ldm-generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from huggingface_hub import HfApi
from transformers import CLIPConfig, CLIPImageProcessor

from ldm import LatentPipeline, build_unet


def sample(pipe, seed=0, **kwargs):
    """A 2-step guided sample as a numpy array."""
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    a, b, c = sample(tiny_pipe, 0), sample(tiny_pipe, 0), sample(tiny_pipe, 1)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_output_types(tiny_pipe):
    pil = sample(tiny_pipe, output_type="pil")
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    pt = sample(tiny_pipe, output_type="pt")
    assert pt.shape == (1, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    latent = sample(tiny_pipe, output_type="latent")
    assert latent.shape == (1, 4, 8, 8)
    images, nsfw = tiny_pipe("a cat", num_inference_steps=1, output_type="np", return_dict=False)
    assert nsfw is None  # StableDiffusionPipeline's tuple: no safety checker runs here
    assert images.shape == (1, 16, 16, 3)


def test_callback_on_step_end_sees_and_replaces_tensors(tiny_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = tiny_pipe(
        "a cat", num_inference_steps=3, output_type="latent", callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    ).images  # fmt: skip
    assert seen == [(i, ["latents", "prompt_embeds"]) for i in range(3)]
    assert torch.count_nonzero(out) == 0


def test_round_trip_through_stock_diffusers(tiny_pipe, tmp_path):
    expected = sample(tiny_pipe)
    tiny_pipe.save_pretrained(tmp_path / "ours")
    weights = sorted(p.name for p in (tmp_path / "ours").rglob("*") if p.suffix in {".safetensors", ".bin"})
    assert weights and all(w.endswith(".safetensors") for w in weights)

    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "ours")
    sd.set_progress_bar_config(disable=True)
    assert np.abs(sample(sd) - expected).max() <= 1e-5
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "ours")) is StableDiffusionPipeline

    sd.save_pretrained(tmp_path / "theirs")
    back = LatentPipeline.from_pretrained(tmp_path / "theirs")
    back.set_progress_bar_config(disable=True)
    assert np.abs(sample(back) - expected).max() <= 1e-5


def tiny_safety_checker() -> StableDiffusionSafetyChecker:
    """A randomly initialised safety checker, so a saved folder has SD 1.x's full model_index.json."""
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 4,
        },
        projection_dim=32,
    )  # fmt: skip
    return StableDiffusionSafetyChecker(config)


def test_loads_stable_diffusion_layout_with_safety_checker(tiny_pipe, tmp_path, caplog):
    expected = sample(tiny_pipe)
    sd = StableDiffusionPipeline(
        **{k: v for k, v in tiny_pipe.components.items() if k not in ("safety_checker", "feature_extractor")},
        safety_checker=tiny_safety_checker(),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    sd.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"][1] == "StableDiffusionSafetyChecker"
    assert (tmp_path / "safety_checker").is_dir() and (tmp_path / "feature_extractor").is_dir()

    pipe = LatentPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None  # skipped: never loaded, never run
    assert isinstance(pipe.feature_extractor, CLIPImageProcessor)  # kept, for IP-Adapters
    assert np.abs(sample(pipe) - expected).max() <= 1e-5
    assert "not expected" not in caplog.text


def test_push_to_hub_uploads_a_loadable_folder(tiny_pipe, monkeypatch, tmp_path):
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploads.append(("create", repo_id)))

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        LatentPipeline.from_pretrained(folder_path)  # what would land on the Hub loads back
        uploads.append(("upload", repo_id, files, kwargs["commit_message"]))
        return "commit-url"

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert tiny_pipe.push_to_hub("me/tiny-ldm") == "commit-url"
    assert uploads[0] == ("create", "me/tiny-ldm")
    _, repo, files, message = uploads[1]
    assert repo == "me/tiny-ldm" and message == "Upload LatentPipeline"
    for expected in [
        "README.md",
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ]:
        assert expected in files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt"))]


def test_xformers_on_cpu_is_a_clear_error(tiny_pipe):
    with pytest.raises((ImportError, RuntimeError), match="xformers"):
        tiny_pipe.enable_xformers_memory_efficient_attention()


BAD_INPUTS = {
    "height not divisible": (dict(height=17), ValueError, "height=17"),
    "width not divisible": (dict(width=15), ValueError, "width=15"),
    "empty prompt list": (dict(prompt=[]), ValueError, "empty"),
    "prompt not str": (dict(prompt=3), TypeError, "prompt must be a str"),
    "prompt list of non-str": (dict(prompt=["a", 3]), TypeError, "must be a str"),
    "both prompt and embeds": (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "both"),
    "neither prompt nor embeds": (dict(prompt=None), ValueError, "neither"),
    "negative prompt type": (dict(negative_prompt=["x"]), TypeError, "negative_prompt is a list"),
    "negative prompt batch": (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "1 entries for 2"),
    "steps < 1": (dict(num_inference_steps=0), ValueError, "num_inference_steps=0"),
    "images per prompt < 1": (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0"),
    "generator list length": (
        dict(num_images_per_prompt=2, generator=[torch.Generator()] * 3),
        ValueError,
        "3 generators for 2 images",
    ),
    "output type": (dict(output_type="jpeg"), ValueError, "output_type='jpeg'"),
    "latents shape": (dict(latents=torch.zeros(1, 4, 4, 4)), ValueError, r"\(1, 4, 8, 8\)"),
    "guidance negative": (dict(guidance_scale=-1.0), ValueError, "guidance_scale=-1.0"),
    "guidance nan": (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan"),
    "guidance rescale": (dict(guidance_rescale=1.5), ValueError, "guidance_rescale=1.5"),
    "guidance inf": (
        dict(guidance_scale=float("inf")),
        ValueError,
        r"guidance_scale=inf.*finite.*\[0, 100\]",
    ),
    "guidance huge": (dict(guidance_scale=1e30), ValueError, "guidance_scale=1e\\+30.*saturate"),
    "eta negative": (dict(eta=-0.5), ValueError, "eta=-0.5"),
    "eta nan": (dict(eta=float("nan")), ValueError, "eta=nan.*finite"),
    "eta above one": (dict(eta=1.5), ValueError, r"eta=1.5.*\[0, 1\]"),
    "height zero": (dict(height=0), ValueError, "height=0 must be a positive multiple"),
    "width zero": (dict(width=0), ValueError, "width=0 must be a positive multiple"),
    "callback inputs": (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "noise"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_any_model_call(tiny_pipe, case):
    kwargs, error, message = BAD_INPUTS[case]

    def forbidden(*args, **kw):
        raise AssertionError("a model ran before the input check")

    for module in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder):
        module.forward = forbidden
    with pytest.raises(error, match=message):
        tiny_pipe(**{"prompt": "a cat", "num_inference_steps": 2, **kwargs})


def test_eta_with_a_scheduler_that_has_none(tiny_pipe):
    from ldm.schedulers import scheduler_from_name

    tiny_pipe.scheduler = scheduler_from_name("euler", tiny_pipe.scheduler.config)
    with pytest.raises(ValueError, match="only used by DDIM"):
        tiny_pipe("a cat", eta=0.5, num_inference_steps=2)


@pytest.mark.parametrize("name", ["dpm++", "euler", "ddpm"])
def test_other_schedulers_sample(tiny_pipe, name):
    from ldm.schedulers import scheduler_from_name

    tiny_pipe.scheduler = scheduler_from_name(name, tiny_pipe.scheduler.config)
    images = sample(tiny_pipe, num_inference_steps=3)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_ldm_generate_writes_png(saved_tiny_pipe, tmp_path):
    script = Path(sys.executable).parent / "ldm-generate"
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [str(script), "a red circle", "a blue square", "--model", str(saved_tiny_pipe), "--steps", "2",
         "--num", "2", "--seed", "3", "--scheduler", "dpm++", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert PIL.Image.open(out).size == (32, 32)  # 2 prompts x 2 images of 16 px


def test_ldm_generate_errors_name_its_own_flags_and_exit_2(saved_tiny_pipe, tmp_path, capsys):
    # In-process (the script's entry point runs this same `main`; test_ldm_generate_writes_png runs the script).
    from ldm.cli import main

    cases = [
        (["--steps", "0"], "--steps=0 must be an integer >= 1"),
        (["--num", "0"], "--num=0"),
        (["--guidance", "inf"], "--guidance=inf must be a finite number"),
        (["--height", "21"], "--height=21 must be a positive multiple of the VAE scale factor 2"),
        (["--model", str(tmp_path / "nowhere" / "pipe")], "--model"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["a red circle", "--model", str(saved_tiny_pipe), "--out", str(tmp_path / "x.png"), *args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, stderr[-2000:])
        assert message in stderr and "Traceback" not in stderr, (args, stderr[-2000:])
        lines = stderr.strip().splitlines()  # argparse's usage, then one error line
        assert lines[-1].startswith("ldm-generate: error: ") and not lines[0].startswith(
            "ldm-generate: error"
        )


def test_from_pretrained_names_a_missing_subfolder_and_components_that_do_not_fit(saved_tiny_pipe, tmp_path):
    import shutil

    broken = tmp_path / "no-unet"
    shutil.copytree(saved_tiny_pipe, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match="has no unet/ subfolder"):
        LatentPipeline.from_pretrained(broken)
    with pytest.raises(ValueError, match="is not a folder"):
        LatentPipeline.from_pretrained(tmp_path / "missing" / "pipeline")

    # A UNet built for a 48-wide text encoder, saved next to the 32-wide one: it loads, so the check must catch it.
    pipe = LatentPipeline.from_pretrained(saved_tiny_pipe)
    pipe.register_modules(unet=build_unet("tiny", cross_attention_dim=48))
    pipe.save_pretrained(tmp_path / "mismatched")
    with pytest.raises(
        ValueError, match="cross_attention_dim=48 does not match the text encoder's hidden_size=32"
    ):
        LatentPipeline.from_pretrained(tmp_path / "mismatched")


def test_a_vae_sized_for_other_images_is_warned_about(saved_tiny_pipe, tmp_path, caplog):
    import logging
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(saved_tiny_pipe, folder)
    config_path = folder / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": 64}))
    with caplog.at_level(logging.WARNING):
        LatentPipeline.from_pretrained(folder)
    assert "sample_size gives 16 px images by default, but the VAE was configured for 64 px" in caplog.text
