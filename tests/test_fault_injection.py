"""Hostile-user probes of train/train_ldm.py: each ends in a clear error that names the value and the fix, or in a
run that survives, and never in lost work or code run from a checkpoint.

Probes of sampling and of the config alone live next to their code (tests/test_pipeline_io.py,
tests/test_config.py); these launch the real script.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ldm.training.config import TrainConfig
from ldm.training.integrity import write_manifest
from ldm.training.sources import check_data_files
from tests.training_helpers import ROOT, launch, launch_command, launch_env, same_tensors, tensors

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def copy_world(world: Path, tmp_path: Path) -> Path:
    """A private copy of the shared world, to damage at will (its own cache folder)."""
    mine = tmp_path / "world"
    shutil.copytree(world / "base", mine / "base")
    shutil.copytree(world / "data", mine / "data")
    return mine


class MarkerPickle:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


# ----------------------------------------------------------------------------- nothing runs on resume


def test_malicious_pickles_in_a_checkpoint_never_run(world, tmp_path):
    out = tmp_path / "run"
    launch(world, out, "--use_ema", "--max_train_steps", "3", "--validation_steps", "100")
    checkpoint = out / "checkpoint-3"
    marker = tmp_path / "marker"
    poisoned = [p for p in checkpoint.rglob("*") if p.suffix in (".pkl", ".bin")]
    assert poisoned and not list(checkpoint.rglob("custom_checkpoint_*"))  # EMA is safetensors now
    for path in poisoned:
        path.write_bytes(pickle.dumps(MarkerPickle(marker)))
    resume = ["--use_ema", "--max_train_steps", "6", "--validation_steps", "100", "--resume_from_checkpoint"]
    result = launch(world, out, *resume, str(checkpoint), check=False)
    # The files no longer match the manifest, so the checkpoint is refused, naming a bad file.
    assert result.returncode != 0 and f"Cannot resume from {checkpoint}" in result.stderr
    assert not marker.exists(), "a pickle in the checkpoint ran code on resume"
    # Even with a manifest forged to match, accelerate unpickles with weights_only=True: refused, nothing runs.
    write_manifest(checkpoint)
    result = launch(world, out, *resume, str(checkpoint), check=False)
    assert result.returncode != 0 and "weights_only" in result.stderr
    assert not marker.exists(), "a pickle in the checkpoint ran code on resume"


# ----------------------------------------------------------------------------- one run per output folder


def test_a_new_run_over_another_runs_checkpoints_is_refused_unless_asked(world, tmp_path):
    out = tmp_path / "run"
    launch(world, out, "--max_train_steps", "3", "--validation_steps", "100")
    before = tensors(out / "checkpoint-3" / UNET_FILE)
    again = launch(world, out, "--max_train_steps", "3", "--validation_steps", "100", check=False)
    assert again.returncode != 0 and "already holds another run's checkpoints (checkpoint-3)" in again.stderr
    assert "--overwrite_output_dir" in again.stderr
    assert same_tensors(tensors(out / "checkpoint-3" / UNET_FILE), before)
    launch(
        world,
        out,
        "--max_train_steps",
        "3",
        "--validation_steps",
        "100",
        "--overwrite_output_dir",
        "--seed",
        "1",
    )
    assert not same_tensors(tensors(out / "checkpoint-3" / UNET_FILE), before)


def test_a_second_concurrent_run_fails_at_once_naming_the_first(world, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        launch_command(world, out, "--max_train_steps", "100000", "--checkpointing_steps", "100000",
                       "--validation_steps", "100000"),
        env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    lock = out / ".ldm-run.lock"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        second = launch(world, out, "--resume_from_checkpoint", "latest", check=False)
        assert second.returncode != 0
        assert f"pid {holder['pid']} on host {socket.gethostname()}" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=300)
    # The lock went with the process (the file stays): the folder can be locked again.
    free = subprocess.run(
        [sys.executable, "-c", f"from pathlib import Path; from ldm.training.guards import lock_output_dir; "
         f"lock_output_dir(Path({str(out)!r}))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert free.returncode == 0, free.stderr[-2000:]


# ----------------------------------------------------------------------------- crashes and damaged checkpoints


def test_kill_9_during_a_checkpoint_save_then_resume_is_bitwise_identical(world, tmp_path):
    args = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--validation_steps", "100", "--use_ema"]
    launch(world, tmp_path / "full", *args)
    out = tmp_path / "killed"
    run = subprocess.Popen(
        launch_command(world, out, *args), env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-6.partial").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-6").exists(), "not killed mid-save"
    resumed = launch(world, out, *args, "--resume_from_checkpoint", "latest")
    log = resumed.stdout + resumed.stderr
    assert (out / ".ldm-run.lock").exists()  # left by the killed run, but not held: it does not block
    assert "Resumed from" in log and "checkpoint-3" in log
    for path in [UNET_FILE, f"checkpoint-6/{UNET_FILE}"]:
        assert same_tensors(tensors(tmp_path / "full" / path), tensors(out / path)), path


def test_a_checkpoint_cut_short_is_passed_over_by_latest_and_refused_by_name(world, tmp_path):
    out = tmp_path / "run"
    args = ["--max_train_steps", "6", "--validation_steps", "100"]
    launch(world, out, *args)
    damaged = out / "checkpoint-6" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    named = launch(world, out, *args, "--resume_from_checkpoint", str(out / "checkpoint-6"), check=False)
    assert named.returncode != 0 and f"{damaged} has 100 bytes" in named.stderr
    (out / "checkpoint-99").mkdir()  # an empty folder that sorts last
    latest = launch(world, out, *args, "--resume_from_checkpoint", "latest")
    log = latest.stdout + latest.stderr
    assert "Passing over" in log and "checkpoint-99" in log and "optimizer.bin has 100 bytes" in log
    assert "Resumed from" in log and "checkpoint-3" in log
    # With no intact checkpoint left, `latest` refuses rather than silently start over.
    shutil.rmtree(out / "checkpoint-99")
    for name in ("checkpoint-3", "checkpoint-6"):
        (out / name / "trainer_state.json").write_text("{}")
    none_left = launch(world, out, *args, "--resume_from_checkpoint", "latest", check=False)
    assert none_left.returncode != 0 and "found no intact checkpoint" in none_left.stderr
    assert "checkpoint-3:" in none_left.stderr and "checkpoint-6:" in none_left.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    # A finite learning rate so large that the first update blows the weights up: the second step's loss is not.
    result = launch(
        world,
        out,
        "--learning_rate",
        "1e30",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
        check=False,
    )
    assert result.returncode != 0
    assert "The loss became" in result.stderr and "checkpoint-1" in result.stderr
    assert (out / "checkpoint-1" / "manifest.json").is_file()


# ----------------------------------------------------------------------------- resume continues the same run


def test_resume_with_changed_settings_lists_every_difference(world, tmp_path):
    mine = copy_world(world, tmp_path)
    out = tmp_path / "run"
    launch(mine, out, "--max_train_steps", "3", "--validation_steps", "100")
    result = launch(
        mine, out, "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4", "--train_batch_size", "2",
        "--resolution", "32", "--use_ema", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    for key in ("learning_rate", "train_batch_size", "resolution", "use_ema"):
        assert f"  {key}: the checkpoint's run had" in result.stderr, key
    assert "max_train_steps" in result.stderr.split("Only these may change on resume:")[1]
    # Changed data is a different run too, even with the file's name and mtime kept.
    image = mine / "data" / "train" / "000001.png"
    stat = image.stat()
    Image.new("RGB", (16, 16), "red").save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = launch(mine, out, "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode != 0 and "  data_hash: the checkpoint's run had" in result.stderr
    assert "  learning_rate" not in result.stderr  # only what differs is listed


def test_fp16_without_cuda_is_refused_naming_bf16(world, tmp_path):
    result = launch(world, tmp_path / "run", "--mixed_precision", "fp16", check=False)
    assert result.returncode != 0 and "--mixed_precision bf16" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-3").exists()


# ----------------------------------------------------------------------------- bad data


def test_rows_without_captions_and_unreadable_held_out_images_cost_nothing(world, tmp_path):
    mine = copy_world(world, tmp_path)
    metadata = mine / "data" / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[2]["text"] = None
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows[-8:]:  # the held-out images of the validation loss
        (mine / "data" / "train" / row["file_name"]).write_bytes(b"")
    out = tmp_path / "run"
    result = launch(mine, out, "--cache_latents", "false", "--max_train_steps", "3", "--validation_steps", "3",
                    "--checkpointing_steps", "3")  # fmt: skip
    log = result.stdout + result.stderr
    assert "Skipping 1 of 40 rows without a usable caption" in log
    assert (out / "checkpoint-3" / "manifest.json").is_file() and (out / "model_index.json").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "metadata.jsonl is empty"),
        ('{"file_name": "a.png", "text": "a cat"}\nnot json\n', "metadata.jsonl, line 2: not valid JSON"),
        ('["a.png", "a cat"]\n', "metadata.jsonl, line 1: expected a JSON object with file_name"),
    ],
)
def test_bad_metadata_is_named_with_file_and_line(tmp_path, content, message):
    (tmp_path / "metadata.jsonl").write_text(content)
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        check_data_files(config)
    with pytest.raises(ValueError, match="is not a folder"):
        check_data_files(TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path / "no")))


def test_missing_base_folder_is_named_before_any_model_loads(world, tmp_path):
    result = subprocess.run(
        [*launch_command(world, tmp_path / "run"), "--pretrained_model_name_or_path", str(tmp_path / "a/b/base")],
        capture_output=True, text=True, env=launch_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"pretrained_model_name_or_path '{tmp_path / 'a/b/base'}' is not a folder" in result.stderr


# ----------------------------------------------------------------------------- the latent cache


def test_a_damaged_cache_shard_is_rebuilt_and_an_edited_image_misses(world, tmp_path):
    mine = copy_world(world, tmp_path)
    args = ["--max_train_steps", "1", "--validation_steps", "100", "--checkpointing_steps", "100"]
    launch(mine, tmp_path / "a", *args)
    (folder,) = [p for p in (mine / "cache").iterdir() if p.is_dir()]
    (shard,) = folder.glob("latents-*.safetensors")
    shard.write_bytes(bytes(shard.stat().st_size))  # zeroed, same size
    rebuilt = launch(mine, tmp_path / "b", *args)
    assert "is damaged" in rebuilt.stderr and "rebuilding" in rebuilt.stderr
    image = mine / "data" / "train" / "000001.png"
    stat = image.stat()
    Image.new("RGB", (16, 16), "red").save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = launch(mine, tmp_path / "c", *args)
    assert "Latent cache miss" in edited.stderr
    assert len([p for p in (mine / "cache").iterdir() if p.is_dir()]) == 2


def test_fsdp_without_cuda_is_refused_before_it_silently_becomes_ddp(world, tmp_path):
    # Accelerate selects FSDP only over GPU processes: on CPU the shipped FSDP config would train with DDP.
    cmd = launch_command(world, tmp_path / "run", processes=2)
    at = cmd.index("--multi_gpu")
    cmd[at : at + 1] = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=300)
    assert result.returncode != 0
    assert "train_ldm.py: FSDP needs CUDA GPUs" in result.stderr and "--multi_gpu" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-3").exists()
