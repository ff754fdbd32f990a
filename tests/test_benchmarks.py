"""The benchmarks' own pieces: the bare UNet step and its FLOP count, the torchvision stand-ins, and the time-to-quality
benchmark end to end on a stand-in trainer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, path: Path):
    """A module from a file, without putting its folder on sys.path (the stub must not pose as torchvision)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


unet_step = load("unet_step", ROOT / "benchmarks" / "unet_step.py")
transforms = load("torchvision_stub_transforms", ROOT / "benchmarks" / "torchvision_stub" / "transforms.py")
time_to_quality = load("time_to_quality", ROOT / "benchmarks" / "time_to_quality.py")


@pytest.fixture
def flush_denormals():
    """AdamW on a random tiny UNet leaves denormal floats that make CPU steps ~30x slower; flush them here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_bare_step_runs_and_its_flops_scale_with_the_batch(flush_denormals):
    unet = unet_step.load_unet("tiny", None, cross_attention_dim=32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    flops = {}
    for batch in (2, 4):
        inputs = unet_step.step_inputs(unet, batch, latent_side=8, text_tokens=16, device=torch.device("cpu"))
        flops[batch] = unet_step.step_flops(unet_step.make_step(unet, optimizer, inputs, None))
    assert flops[2] > 0 and abs(flops[4] / flops[2] - 2) < 0.01
    assert (
        unet_step.time_unet_step("tiny", None, 2, 8, cross_attention_dim=32, warmup=1, steps=2, repeats=1) > 0
    )
    assert unet_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and unet_step.peak_tflops("Quadro") is None


def test_preset_report_times_each_preset_every_round(flush_denormals, capsys):
    rates = unet_step.preset_report(["tiny", "tiny-sd"], batch_size=2, rounds=2, warmup=1, steps=1)
    assert list(rates) == ["tiny", "tiny-sd"] and all(len(r) == 2 and min(r) > 0 for r in rates.values())
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["tiny", "tiny-sd"]
    assert rows[0][-2:] == ["1.00x", "1.00x"]  # the first preset is the reference
    assert rows[1][-1] != "1.00x"  # the two UNets differ in FLOPs


def test_torchvision_stand_ins_do_what_train_text_to_image_asks():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    interpolation = transforms.InterpolationMode.BILINEAR
    pipeline = transforms.Compose(
        [
            transforms.Resize(16, interpolation=interpolation),
            transforms.CenterCrop(16),
            transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    out = pipeline(image)
    assert out.shape == (3, 16, 16) and -1 <= out.min() and out.max() <= 1
    resized = transforms.Resize(16)(image)
    assert resized.size == (27, 16)  # shorter side 16, aspect kept
    assert transforms.RandomCrop(16)(resized).size == (16, 16)


# A stand-in for `accelerate launch train_ldm.py ...`: it notes its flags, then saves the base's UNet as checkpoints
# 1 and 2, a moment apart, and (with --max_train_steps 99) hangs until it is stopped.
FAKE_TRAINER = """
import json, shutil, sys, time
from pathlib import Path
args = sys.argv[2:]  # after the training script's path
flag = lambda name: args[args.index(name) + 1]
out = Path(flag("--output_dir"))
out.mkdir(parents=True, exist_ok=True)
(out / "argv.json").write_text(json.dumps(args))
for step in (1, 2):
    for folder in ("pipeline/unet", "unet_ema"):  # train_ldm.py's layout, diffusers' script's
        shutil.copytree(Path(flag("--pretrained_model_name_or_path")) / "unet", out / f"checkpoint-{step}" / folder)
    time.sleep(0.3)
if flag("--max_train_steps") == "99":
    time.sleep(600)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(time_to_quality, "launcher", lambda: [sys.executable, str(script)])
    return script


def test_a_run_is_stopped_at_its_budget_and_keeps_the_time_of_each_checkpoint(
    fake_trainer, saved_tiny_pipe, tmp_path
):
    command = [sys.executable, str(fake_trainer), "train_ldm.py", "--output_dir", str(tmp_path / "run")]
    command += ["--pretrained_model_name_or_path", str(saved_tiny_pipe), "--max_train_steps", "99"]
    timeline = time_to_quality.run_with_budget(command, tmp_path / "run", budget_s=4, env={}, poll_s=0.1)
    assert timeline["stopped_at_budget"] and 4 <= timeline["wall_s"] < 30
    assert sorted(timeline["checkpoints"]) == [1, 2]
    assert 0 < timeline["checkpoints"][1] <= timeline["checkpoints"][2] < 4


def test_a_launch_that_fails_before_any_checkpoint_raises_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('bad flag --x'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exit 3(.|\\n)*bad flag --x"):
        time_to_quality.run_with_budget(command, tmp_path / "run", budget_s=60, env={}, poll_s=0.1)


def test_the_benchmark_scores_every_checkpoint_prints_the_table_and_plots(
    fake_trainer, saved_tiny_pipe, tmp_path, capsys
):
    emoji = tmp_path / "emoji"
    (emoji / "data" / "train").mkdir(parents=True)
    rows = []
    for i, (caption, color) in enumerate(
        [("red cat", (255, 0, 0)), ("blue dog", (0, 0, 255)), ("green", (0, 255, 0))]
    ):
        PIL.Image.new("RGB", (16, 16), color).save(emoji / "data" / "train" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (emoji / "data" / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copytree(saved_tiny_pipe, emoji / "base")
    out = tmp_path / "ttq"
    shutil.copytree(saved_tiny_pipe, out / "emoji" / "base")  # the shared base, saved once (a tiny one here)
    argv = ["--datasets", "emoji", "--emoji_dir", str(emoji), "--out_dir", str(out), "--budget_s", "120"]
    argv += ["--eval_every", "1", "--emoji_steps", "2", "--variant", "lr=--learning_rate 2e-3"]
    report = time_to_quality.main(argv)

    head, variant = report["emoji"][time_to_quality.HEAD], report["emoji"]["lr"]
    assert [row["step"] for row in head] == [1, 2] == [row["step"] for row in variant]
    assert all(0 <= row["top1"] <= row["top10"] <= 1 and row["wall_s"] > 0 for row in head + variant)
    flags = json.loads((out / "emoji" / "lr" / "argv.json").read_text())
    assert flags[-2:] == ["--cache_dir", str(out / "emoji" / "lr" / "cache")]
    last_rate = len(flags) - 1 - flags[::-1].index("--learning_rate")  # argparse: the last one given wins
    assert flags[last_rate + 1] == "2e-3"  # the variant's, after the recipe's 1e-3
    assert flags[flags.index("--unet_preset") + 1] == "none"  # both start from the base's random UNet
    printed = capsys.readouterr().out
    assert "| lr | 2 |" in printed and "judge's ceiling" in printed
    assert PIL.Image.open(out / "emoji.png").size == (600, 400)
    # A second run reuses the scores on disk and launches nothing.
    fake_trainer.write_text("raise SystemExit('launched again')")
    assert time_to_quality.main(argv) == report
    # --variants_only: the variants without the demo config (no other reference was named here).
    assert time_to_quality.main([*argv, "--variants_only"]) == {"emoji": {"lr": report["emoji"]["lr"]}}
    # ... and beside a reference the command names (diffusers' script, launched through the same fake trainer).
    fake_trainer.write_text(FAKE_TRAINER)  # the diffusers recipe is new: it trains
    (tmp_path / "train.py").write_text("")  # never run: the fake trainer stands in for every launch
    both = time_to_quality.main([*argv, "--variants_only", "--diffusers_script", str(tmp_path / "train.py")])
    assert (
        set(both["emoji"]) == {time_to_quality.DIFFUSERS, "lr"}
        and both["emoji"]["lr"] == report["emoji"]["lr"]
    )
    with pytest.raises(SystemExit):
        time_to_quality.main(["--variants_only", "--datasets", "emoji", "--emoji_dir", str(emoji)])


def test_a_recipe_trains_the_bases_random_unet_unless_its_config_names_another_preset(tmp_path):
    """The demo's config builds its own preset (small-narrow); b14f73c's named `small`, the base's random UNet."""
    base = tmp_path / "base"
    old = tmp_path / "old.yaml"
    old.write_text("unet_preset: small\ntrain_batch_size: 64\n")
    old_argv = time_to_quality.ldm_recipe("old", old, ["--seed", "0"]).command(tmp_path / "old")
    assert old_argv[old_argv.index("--unet_preset") + 1] == "none"
    assert old_argv.index("--seed") > old_argv.index(
        "--unet_preset"
    )  # the recipe's own flags come after: they win
    demo = ROOT / "configs" / "demo.yaml"
    assert "--unet_preset" not in time_to_quality.ldm_recipe("demo", demo, []).command(tmp_path / "demo")
    flags = time_to_quality.common_flags(
        time_to_quality.Dataset("emoji", tmp_path, base, None, "top10"), 100, 2000
    )
    emoji_argv = time_to_quality.ldm_recipe("emoji", demo, flags).command(tmp_path / "emoji")
    assert emoji_argv[emoji_argv.index("--unet_preset") + 1] == "none"  # the recipe on the real set
    assert emoji_argv[emoji_argv.index("--train_batch_size") + 1] == "64"
    assert emoji_argv[emoji_argv.index("--snr_gamma") + 1] == "none"


def test_a_v_prediction_zero_terminal_snr_run_is_sampled_with_its_own_schedule(saved_tiny_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    from ldm.pipelines.text_to_image import LatentPipeline
    from ldm.training.config import TrainConfig, save_config

    def scored_with(**run):
        run_dir = tmp_path / "_".join(map(str, run.values()))
        config = TrainConfig(
            pretrained_model_name_or_path=str(saved_tiny_pipe), train_data_dir=str(tmp_path), **run
        )
        save_config(config, run_dir / "config.yaml")
        return time_to_quality.with_run_schedule(LatentPipeline.from_pretrained(saved_tiny_pipe), run_dir)

    base = LatentPipeline.from_pretrained(saved_tiny_pipe).scheduler.config
    assert scored_with().scheduler.config == base  # an epsilon run: the base, as it is
    pipe = scored_with(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    schedule = pipe.scheduler.config
    assert (schedule.prediction_type, schedule.rescale_betas_zero_snr, schedule.timestep_spacing) == (
        "v_prediction", True, "trailing",
    )  # fmt: skip
    assert schedule.steps_offset == base.steps_offset and schedule.beta_end == base.beta_end
    # A checkpoint's UNet swapped in reaches the pipeline that samples.
    inner, unet = pipe.pipe, UNet2DConditionModel(**pipe.unet.config)
    pipe.unet = unet
    assert inner.unet is unet and pipe.unet is unet
    # Sampled with guidance rescaled as its validation grids are: 0.7 reaches the pipeline's call.
    calls = []
    pipe.pipe = lambda *args, **kwargs: calls.append(kwargs)
    pipe("a red circle", guidance_scale=7.5)
    assert calls == [{"guidance_scale": 7.5, "guidance_rescale": 0.7}]
    assert scored_with(prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"
