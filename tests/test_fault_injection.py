"""Hostile-user probes: each ends in a clear error that names the value and the fix, or in correct behaviour, and
never in lost work, a silently wrong result or code run from a checkpoint.

The first rounds launch the real train/train_ldm.py (probes of sampling and of the config alone live next to their
code: tests/test_pipeline_io.py, tests/test_config.py). "Round two" at the end holds one test per item of the
second hostile-user pass (issue 19), sampling and command-line probes included, in-process where they can be.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import constants as hf_constants
from peft import LoraConfig
from PIL import Image

from ldm import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentPipeline
from ldm.cli import main as generate
from ldm.encoding import tile_count
from ldm.export import main as export
from ldm.hub import check_hub_access
from ldm.images import convert_mode
from ldm.presets import build_pipeline
from ldm.training.config import TrainConfig
from ldm.training.data import build_train_and_heldout
from ldm.training.integrity import check_state_files, write_manifest
from ldm.training.lora import check_lora_rank, save_lora
from ldm.training.sources import check_data_files
from tests.conftest import LORA_UNET_TARGETS
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


@pytest.fixture(scope="module")
def three_steps(world, tmp_path_factory) -> Path:
    """A finished 3-step run with EMA (its checkpoint-3 included), to copy and damage; never changed itself."""
    out = tmp_path_factory.mktemp("three-steps") / "run"
    launch(world, out, "--use_ema", "--max_train_steps", "3", "--validation_steps", "100")
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of a run folder (its lock file too: it is not held)."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_malicious_pickles_in_a_checkpoint_never_run(world, three_steps, tmp_path):
    out = copy_run(three_steps, tmp_path)
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
    # Even with a manifest forged to match, each file loads weights-only first: refused by name, nothing runs, and
    # torch's advice to retry with weights_only=False (which would run the code) is never shown.
    write_manifest(checkpoint)
    result = launch(world, out, *resume, str(checkpoint), check=False)
    assert result.returncode != 0 and "is not a file accelerate wrote" in result.stderr
    assert "never needs code to load" in result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
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


def test_a_run_whose_whole_epoch_is_unreadable_stops_at_its_end_naming_the_cause(world, tmp_path):
    mine = copy_world(world, tmp_path)
    for png in (mine / "data" / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    out = tmp_path / "run"
    # 40 rows of 16 px, 8 held out: one epoch is 8 steps of 4; without the check the run would train for 50 on nothing.
    result = launch(mine, out, "--cache_latents", "false", "--max_train_steps", "50", "--checkpointing_steps", "100",
                    check=False)  # fmt: skip
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "No image of epoch 0 could be read (32 samples skipped" in log and "'image' replaces" in log
    assert "| 8/50 " in log and "| 9/50 " not in log  # stopped at the end of the first epoch


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


# ============================================================================= round two (issue 19)
# Each test names its item: silent (1-4), confusing (5-13), slower than asked (14), overwrites (15).

NAN = float("nan")


def one_error_line(stderr: str, prog: str = "ldm-generate: error: ") -> str:
    """The one line of a command's stderr that starts with `prog` (its error), asserting there was no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith(prog)]
    return line


# ----------------------------------------------------------------------------- 1, 5: what accelerate unpickles


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage", "random_states_0.pkl is not a file accelerate wrote"),
        ("other dict", "random_states_0.pkl does not hold the random states accelerate saves"),
        ("missing", "random_states_0.pkl is missing"),
    ],
)
def test_1_unreadable_random_states_refuse_the_resume_naming_the_file(three_steps, tmp_path, damage, message):
    # accelerate only logs "Could not load random states" at INFO and resumes, no longer exactly.
    checkpoint = copy_run(three_steps, tmp_path) / "checkpoint-3"
    states = checkpoint / "random_states_0.pkl"
    if damage == "garbage":
        states.write_bytes(b"not a pickle")
    elif damage == "other dict":
        torch.save({"step": 3}, states)
    else:
        states.unlink()
    write_manifest(checkpoint)  # the manifest agrees: only the contents are wrong
    with pytest.raises(ValueError, match=message):
        check_state_files(checkpoint, process_index=0)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "pytorch_model.bin"])
def test_5_a_replaced_checkpoint_file_is_named_without_torchs_weights_only_advice(
    three_steps, tmp_path, name
):
    checkpoint = copy_run(three_steps, tmp_path) / "checkpoint-3"
    torch.save(
        {"state": MarkerPickle(tmp_path / "marker")}, checkpoint / name
    )  # torch's zip format, a code pickle
    with pytest.raises(ValueError) as error:
        check_state_files(checkpoint, process_index=0)
    text = str(error.value)
    assert f"{name} is not a file accelerate wrote (its pickle asks to run" in text
    assert "never needs code to load" in text and "weights_only" not in text
    assert not (tmp_path / "marker").exists()
    check_state_files(three_steps / "checkpoint-3", process_index=0)  # an intact checkpoint passes


# ----------------------------------------------------------------------------- 2, 3, 9, 13: sampling inputs


@pytest.mark.parametrize(
    ("call", "name"),
    [
        ({"latents": torch.full((1, 4, 8, 8), NAN)}, "latents"),
        ({"prompt": None, "prompt_embeds": torch.full((1, 77, 32), float("inf"))}, "prompt_embeds"),
        ({"mode": "img2img", "image": torch.full((1, 3, 16, 16), NAN)}, "image"),
        ({"mode": "inpaint", "mask_image": np.full((16, 16), NAN)}, "mask_image"),
        ({"mode": "inpaint", "image": np.full((16, 16, 3), NAN)}, "image"),
    ],
)
def test_2_non_finite_inputs_are_refused_naming_the_argument(tiny_pipe, call, name):
    pipes = {"txt2img": tiny_pipe, "img2img": LatentImg2ImgPipeline.from_pipe(tiny_pipe)}
    pipes["inpaint"] = LatentInpaintPipeline.from_pipe(tiny_pipe)
    call = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "np", **call}
    mode = call.pop("mode", "txt2img")
    if mode == "img2img":
        call.setdefault("image", np.zeros((16, 16, 3)))
    if mode == "inpaint":
        call = {"image": np.zeros((16, 16, 3)), "mask_image": np.ones((16, 16)), **call}
    with pytest.raises(ValueError, match=rf"^{name} has \d+ NaN or infinite values"):
        pipes[mode](**call)


def pil_in_mode(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """`image` in a PIL mode: 16-bit greyscale as a PNG of it would open."""
    if mode == "I;16":
        return PIL.Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "I;16", "P"])
def test_3_pil_images_of_every_mode_are_pixels(tiny_pipe, mode):
    # RGBA and CMYK were taken as 4-channel latents (an output twice the size); L, I;16, P failed in a convolution.
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    as_rgb = convert_mode(pil_in_mode(rgb, mode), "RGB")
    if mode == "I;16":  # scaled to 8 bits, not clipped at 255
        assert np.array_equal(np.asarray(as_rgb)[..., 0], np.asarray(rgb.convert("L")))
    call = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "np", "strength": 0.5}
    img2img, inpaint = LatentImg2ImgPipeline.from_pipe(tiny_pipe), LatentInpaintPipeline.from_pipe(tiny_pipe)
    mask = pil_in_mode(PIL.Image.new("L", (16, 16), 255), mode)

    def run(pipe, **images):
        return pipe(**call, **images, generator=torch.Generator().manual_seed(0)).images

    got = run(img2img, image=pil_in_mode(rgb, mode))
    assert got.shape == (1, 16, 16, 3)
    assert np.array_equal(got, run(img2img, image=as_rgb))
    assert np.array_equal(
        run(inpaint, image=pil_in_mode(rgb, mode), mask_image=mask),
        run(inpaint, image=as_rgb, mask_image=mask.convert("L")),
    )


@pytest.mark.parametrize(
    ("size", "message"),
    [((0, 0), "image is 0x0 (height x width); rounded down"), ((1000, 1), "image is 1x1000 (height x width); "
     "rounded down to a multiple of the VAE scale factor 2 that is 0x1000")],
)  # fmt: skip
def test_9_images_too_small_for_the_vae_name_their_size_and_rounding(tiny_pipe, size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LatentImg2ImgPipeline.from_pipe(tiny_pipe)("a red circle", image=PIL.Image.new("RGB", size))


def test_13_large_images_go_through_the_vae_in_tiles_with_progress(tiny_pipe, capsys, caplog):
    # 272 px on the 2x VAE: 136x136 latents, past the 128x128 that the VAE's mid-block attention handles in one pass.
    tiny_pipe.set_progress_bar_config(disable=False)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (272, 272, 3), dtype=np.uint8))
    out = LatentImg2ImgPipeline.from_pipe(tiny_pipe)(
        "a red circle", image=image, num_inference_steps=2, strength=0.5, output_type="np"
    ).images
    assert out.shape == (1, 272, 272, 3) and np.isfinite(out).all()
    progress = capsys.readouterr().err
    # Tiles of 64 latents, every 48 (diffusers' 0.25 overlap): 3 x 3 along 136 latents (272 px, every 96 px).
    assert "VAE encode tiles: 100%" in progress and "9/9" in progress and "VAE decode tiles: 100%" in progress
    assert "too large to encode in one pass" in caplog.text
    assert not tiny_pipe.vae.use_tiling and tiny_pipe.vae.tile_sample_min_size == 16  # restored
    assert tile_count(136, 64, 0.25) == 3


# ----------------------------------------------------------------------------- 4: data


def test_4_all_empty_captions_are_refused_and_some_are_counted(world, tmp_path, caplog):
    mine = copy_world(world, tmp_path)
    metadata = mine / "data" / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]

    def build(empty_rows: range):
        lines = [
            json.dumps({**row, "text": "" if i in empty_rows else row["text"]}) for i, row in enumerate(rows)
        ]
        metadata.write_text("\n".join(lines) + "\n")
        config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(mine / "data"))
        return build_train_and_heldout(config, seed=0, num_heldout=0)[0]

    assert len(build(range(3))) == len(rows)  # kept, as unconditional examples, but reported
    assert f"3 of {len(rows)} rows have an empty caption in column 'text'" in caplog.text
    with pytest.raises(
        ValueError, match=r"Every caption in column 'text' is empty .* check --caption_column"
    ):
        build(range(len(rows)))


# ----------------------------------------------------------------------------- 6: disk full mid-checkpoint


def test_6_14_a_checkpoint_that_cannot_be_written_is_removed_and_named(world, tmp_path):
    # (Item 14 rides on this launch: bf16 on a CPU is warned about at start-up.)
    out = tmp_path / "run"

    def file_size_limit():  # 2 MB: the data and logs fit, the 4 MB UNet in checkpoint-1 does not (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    result = subprocess.run(
        launch_command(world, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps",
                       "100", "--mixed_precision", "bf16"),
        capture_output=True, text=True, env=launch_env(), timeout=300, preexec_fn=file_size_limit,
    )  # fmt: skip
    assert result.returncode != 0
    line = one_error_line(result.stderr, "train_ldm.py: ")
    assert line.startswith(f"train_ldm.py: Could not write checkpoint-1 in {out} (")
    assert "GiB are free there" in line and "--resume_from_checkpoint latest" in line
    assert not list(out.glob("checkpoint-*")), "a partial checkpoint was left behind"
    assert "--mixed_precision bf16 without a CUDA GPU: on CPUs it trains slower than fp32" in result.stderr


# ----------------------------------------------------------------------------- 7, 8: loading other people's files


def test_7_a_missing_lora_and_a_lora_for_another_unet_get_one_line_each(tiny_pipe, saved_tiny_pipe, tokenizer_dir,
                                                                        tmp_path, capsys):  # fmt: skip
    for missing in (tmp_path / "nope", tmp_path / "nope.safetensors"):
        with pytest.raises(ValueError, match=f"LoRA {missing}: no such file or folder"):
            tiny_pipe.load_lora_weights(str(missing))
    other = build_pipeline("small", tokenizer_dir, seed=0).unet  # wider layers than `tiny`
    other.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=LORA_UNET_TARGETS, init_lora_weights=False)
    )
    config = TrainConfig(
        pretrained_model_name_or_path="owner/small-base", output_dir=str(tmp_path), lora_rank=4
    )
    save_lora(other, config, tmp_path / "lora")
    for path in (tmp_path / "lora", tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors"):
        capsys.readouterr()
        with pytest.raises(ValueError) as error:
            tiny_pipe.load_lora_weights(str(path))
        text = str(error.value)
        assert "\n" not in text and "size mismatch" not in capsys.readouterr().err
        assert (
            "do not fit this UNet (block_out_channels=[32, 64]" in text and "is (4, 128) in the LoRA" in text
        )
        if path.suffix:  # the kohya file names its base (ss_sd_model_name)
            assert "was trained for owner/small-base" in text
        assert not tiny_pipe.get_list_adapters()["unet"]  # a failed load leaves no adapter behind
    # ldm-generate: exit 2 with one line, where it exited 1 with the whole list.
    with pytest.raises(SystemExit) as exit_info:
        generate([*GENERATE, "--model", str(saved_tiny_pipe), "--out", str(tmp_path / "x.png"), "--lora",
                  str(tmp_path / "lora")])  # fmt: skip
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "size mismatch" not in stderr
    assert one_error_line(stderr).startswith(f"ldm-generate: error: --lora {tmp_path / 'lora'}: LoRA")


def test_8_from_single_file_with_a_config_that_does_not_fit_names_the_component(tokenizer_dir, tmp_path):
    build_pipeline("tiny-sd", tokenizer_dir, seed=0).save_single_file(tmp_path / "model.safetensors")
    build_pipeline("tiny", tokenizer_dir, seed=0).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError) as error:
        LatentPipeline.from_single_file(tmp_path / "model.safetensors", config=str(tmp_path / "tiny"),
                                        local_files_only=True)  # fmt: skip
    text = str(error.value)
    assert text.startswith(f"The file's unet does not fit {tmp_path / 'tiny'}/unet/config.json: ")
    assert re.search(r"time_embedding\.linear_1\.weight is \(\d+, \d+\) in the file but \(\d+, \d+\)", text)


# ----------------------------------------------------------------------------- 10, 15: ldm-generate and ldm-export

GENERATE = ["a red circle", "--steps", "1"]


@pytest.mark.parametrize(
    ("out", "extra", "message"),
    [
        ("result.txt", [], "--out {out}: .txt is not an image format; use .png (or .jpg, .webp)."),
        ("existing.png", [], "--out {out} exists; pass --overwrite to replace it, or choose another name."),
    ],
)
def test_10_15_ldm_generate_checks_out_before_loading_a_model(tmp_path, capsys, out, extra, message):
    out = tmp_path / out
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "existing.png")
    before = (tmp_path / "existing.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # a model folder that does not exist: never reached
        generate([*GENERATE, "--model", str(tmp_path / "no-model"), "--out", str(out), *extra])
    assert exit_info.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"ldm-generate: error: {message.format(out=out)}"
    assert (tmp_path / "existing.png").read_bytes() == before


def test_15_overwrite_replaces_and_ldm_export_refuses_an_existing_file(saved_tiny_pipe, tmp_path, capsys):
    out = tmp_path / "existing.png"
    PIL.Image.new("RGB", (4, 4)).save(out)
    generate([*GENERATE, "--model", str(saved_tiny_pipe), "--out", str(out), "--overwrite"])
    assert PIL.Image.open(out).size == (16, 16)
    target = tmp_path / "existing.safetensors"
    target.write_bytes(b"someone's file")
    with pytest.raises(SystemExit) as exit_info:
        export([str(saved_tiny_pipe), str(target)])
    assert exit_info.value.code == 2 and target.read_bytes() == b"someone's file"
    assert one_error_line(capsys.readouterr().err, "ldm-export: error: ").endswith(f"OUT {target} exists; pass --overwrite to replace it, "
                                                            "or choose another name.")  # fmt: skip


# ----------------------------------------------------------------------------- 11, 12: training settings


def test_11_push_to_hub_offline_fails_at_start_up(world, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        launch_command(world, out, "--push_to_hub", "--hub_model_id", "me/tiny-ldm"),
        capture_output=True, text=True, env=launch_env({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert one_error_line(result.stderr, "train_ldm.py: ").startswith(
        "train_ldm.py: --push_to_hub, but HF_HUB_OFFLINE is set"
    )
    assert not list(out.glob("checkpoint-*"))


def test_11_push_to_hub_without_a_token_or_the_hub_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(
        ValueError, match="--push_to_hub needs a Hub token with write access: run `hf auth login`"
    ):
        check_hub_access("me/tiny-ldm")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_0123")
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    with pytest.raises(ValueError) as error:
        check_hub_access("me/tiny-ldm")
    assert str(error.value).startswith("--push_to_hub: cannot create or reach me/tiny-ldm on the Hub (")
    assert "hf_fake_token_0123" not in str(error.value)


def test_12_a_lora_rank_above_the_narrowest_adapted_layer_is_refused(world):
    config = TrainConfig(pretrained_model_name_or_path=str(world / "base"), lora_rank=100000)
    with pytest.raises(ValueError, match=r"lora_rank=100000 is above the width of the narrowest layer it adapts "
                                         r"\(.*to_k: 32\)"):  # fmt: skip
        check_lora_rank(config)
    config.lora_rank = 32
    check_lora_rank(config)
    config.lora_target_modules = ["to_nothing"]
    with pytest.raises(ValueError, match="match no linear layer"):
        check_lora_rank(config)
