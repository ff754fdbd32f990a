"""train/train_vae.py launched for real (through `accelerate launch` once, else as `python train/train_vae.py`, forked
by tests/fork_launcher.py), on the `tiny` VAE and 16 px synthetic shapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from ldm.shapes.synthetic import generate_dataset
from ldm.training.vae import evaluate_vae, kl_loss, psnr_db
from tests.training_helpers import launch_env, run_launch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
SCRIPT = ROOT / "train" / "train_vae.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 40-image 16 px synthetic imagefolder with one corrupt training image."""
    root = tmp_path_factory.mktemp("vae-data")
    generate_dataset(root, 40, resolution=16)
    (root / "train" / "000003.png").write_bytes(b"not a png at all")
    return root


def base_args(data_dir: Path, out: Path) -> list[str]:
    """A few steps of the tiny VAE, with the discriminator switched on half-way so its step runs too."""
    return [
        "--train_data_dir", str(data_dir), "--vae_preset", "tiny", "--resolution", "16", "--train_batch_size", "8",
        "--max_train_steps", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "1", "--num_heldout", "8",
        "--use_discriminator", "--disc_start_step", "2", "--output_dir", str(out),
    ]  # fmt: skip


def launch(*args: str, launcher: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """`python train/train_vae.py ARGS`, or with `launcher` `accelerate launch --cpu ... train/train_vae.py ARGS`;
    with `check`, asserted to succeed."""
    cmd = [
        str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *args,
    ] if launcher else [sys.executable, str(SCRIPT), *args]  # fmt: skip
    result = run_launch(cmd, timeout=300, env=launch_env(), cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_trains_saves_scaling_factor_and_reuses(data_dir, tmp_path):
    out = tmp_path / "vae"
    result = launch(*base_args(data_dir, out), launcher=True)
    metrics = json.loads((out / "vae_metrics.json").read_text())
    assert "PSNR" in result.stdout and f"{metrics['psnr_db']:.2f} dB" in result.stdout
    assert 0 < metrics["psnr_db"] < 100
    assert metrics["steps"] == 4 and metrics["num_heldout"] == 8 and metrics["seconds"] >= 0
    assert metrics["skipped_images"] == 1  # 4 steps of 8 are one pass over the 32 training images
    assert metrics["settings"]["vae_preset"] == "tiny" and metrics["settings"]["use_discriminator"]

    # A diffusers-layout folder whose config carries the measured scaling factor.
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.scaling_factor != 1.0
    assert metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
    assert vae.config.sample_size == 16

    # Same settings again: the finished VAE is reused, not retrained.
    weights = (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = launch(*base_args(data_dir, out), "--report_to", "none")
    assert "Reusing the VAE" in again.stdout
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights


def test_an_epoch_of_unreadable_images_stops_the_run_before_it_trains_on_nothing(data_dir, tmp_path):
    broken = tmp_path / "data"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "metadata.jsonl").write_text((data_dir / "train" / "metadata.jsonl").read_text())
    for row in (data_dir / "train" / "metadata.jsonl").read_text().splitlines():
        (broken / "train" / json.loads(row)["file_name"]).write_bytes(b"not a png")
    args = base_args(broken, tmp_path / "vae")
    args[args.index("--max_train_steps") + 1] = "400"  # 4 steps make an epoch here
    result = launch(*args, check=False)
    assert result.returncode != 0
    assert "No image of epoch 0 could be read (32 samples skipped" in result.stderr
    assert not (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()


def test_trains_on_random_windows_and_measures_whole_images(data_dir, tmp_path):
    out = tmp_path / "vae"
    argv = base_args(data_dir, out)
    del argv[argv.index("--use_discriminator") : argv.index("--use_discriminator") + 3]
    launch(*argv, "--crop_resolution", "8", "--max_train_steps", "2")
    metrics = json.loads((out / "vae_metrics.json").read_text())
    assert metrics["settings"]["crop_resolution"] == 8 and metrics["steps"] == 2
    assert 0 < metrics["psnr_db"] < 100 and AutoencoderKL.from_pretrained(out).config.sample_size == 16


def load_script():
    """train/train_vae.py as a module, to check its flags in-process without launching."""
    spec = importlib.util.spec_from_file_location("train_vae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--vae_preset": None}, "exactly one of --vae_preset"),
        ({"--pretrained_vae": "some/vae"}, "exactly one of --vae_preset"),
        ({"--vae_preset": "huge"}, "not a model preset"),
        ({"--resolution": "15"}, "not divisible by the downsampling factor 2"),
        ({"--num_heldout": "0"}, "--num_heldout must be >= 1"),
        ({"--disc_start_step": "4"}, "never trains"),
        ({"--use_discriminator": None, "--disc_weight": "0.1"}, "only apply with --use_discriminator"),
        ({"--lr_scheduler": "constant"}, "has no warm-up"),
        ({"--crop_resolution": "32"}, r"--crop_resolution 32 must be in \(0, --resolution 16\]"),
        ({"--crop_resolution": "7"}, "--crop_resolution 7 is not divisible by the downsampling factor 2"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(data_dir, tmp_path, change, message):
    argv = base_args(data_dir, tmp_path / "vae")
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + (1 if flag == "--use_discriminator" else 2)]
        if value is not None:
            argv += [flag, value]
    with pytest.raises(SystemExit, match=message):
        load_script().main(argv)
    assert not (tmp_path / "vae" / "vae_metrics.json").exists()


def test_too_few_images_for_the_heldout_set_fails_before_training(data_dir, tmp_path):
    argv = [*base_args(data_dir, tmp_path / "vae"), "--num_heldout", "40"]
    result = launch(*argv, check=False)
    assert result.returncode != 0
    assert "The dataset has 40 images; --num_heldout 40 leaves none to train on" in result.stderr


def test_metrics_against_their_definitions():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    noisy = x + 0.02 * torch.randn_like(x)
    mse01 = ((noisy.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr_db(noisy, x), 10 * torch.log10(1 / mse01))

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    posterior = vae.encode(x).latent_dist
    by_formula = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum((1, 2, 3)).mean()
    torch.testing.assert_close(kl_loss(posterior, 3 * 8 * 8), by_formula / (3 * 8 * 8))
    metrics = evaluate_vae(vae, x, torch.Generator().manual_seed(0))
    assert metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
