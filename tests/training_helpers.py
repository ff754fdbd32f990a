"""Launching train/train_ldm.py for real in tests, and comparing what it saved."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm import build_pipeline, write_clip_tokenizer
from ldm.shapes.synthetic import CAPTION_WORDS, generate_dataset
from tests.fork_launcher import ForkLauncher

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
HUB_TOKEN = "hf_test_token_that_must_never_be_written"


def make_world(root: Path, resolution: int = 16, conditioning: str = "none") -> Path:
    """A tiny base pipeline and a synthetic imagefolder (40 images, 16 px) with one corrupt image; with
    `conditioning` also control images, one of them corrupt and one the wrong size."""
    generate_dataset(
        root / "data", num_images=40, resolution=resolution, seed=0, num_heldout=4, conditioning=conditioning
    )
    (root / "data" / "train" / "000005.png").write_bytes(b"not a png at all")
    if conditioning != "none":
        (root / "data" / "train" / "conditioning" / "000007.png").write_bytes(b"not a png either")
        Image.new("RGB", (resolution // 2, resolution // 2)).save(root / "data/train/conditioning/000009.png")
    tokenizer = write_clip_tokenizer(CAPTION_WORDS, root / "tokenizer")
    build_pipeline("tiny", tokenizer, seed=0).save_pretrained(root / "base")
    return root


def launch_command(
    world: Path,
    out: Path,
    *args: str,
    processes: int = 1,
    launcher: bool = False,
    script_name: str = "train_ldm.py",
) -> list[str]:
    """`train/<script_name> --config configs/tiny.yaml` on the world's base and data: through `accelerate launch`
    for several processes or with `launcher`, else run by Python directly (as `python train/train_ldm.py` runs it;
    the launcher would only add its own start-up to every one-process test). `launch` forks such a command from a
    server that has done the imports (tests/fork_launcher.py) when the launch has the tests' own environment."""
    script = [
        str(ROOT / "train" / script_name), "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--pretrained_model_name_or_path", str(world / "base"), "--train_data_dir", str(world / "data"),
        "--output_dir", str(out), "--cache_dir", str(world / "cache"), *args,
    ]  # fmt: skip
    if processes == 1 and not launcher:
        return [sys.executable, *script]
    topology = ["--cpu"] if processes == 1 else [
        "--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [
        str(ACCELERATE), "launch", *topology, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", *script,
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port nothing listens on now: each multi-process launch gets its own rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launched run: one thread per process, plus `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def run_with_stack_dump(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)`; past `timeout` every process of the launch is sent
    SIGUSR1 first (train_ldm.py then prints every thread's stack) and killed, and TimeoutExpired carries that output.
    """
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The launcher's workers may run in process groups of their own: signal each one found under it
            # too, or a worker left alive keeps the pipes open and communicate() waits for it for ever.
            try:
                workers = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                workers = []
            for sig in (signal.SIGUSR1, signal.SIGKILL):
                os.killpg(process.pid, sig)
                for worker in workers:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        worker.send_signal(sig)
                time.sleep(3 if sig == signal.SIGUSR1 else 0)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


_fork_launcher: ForkLauncher | None = None


def run_launch(cmd: list[str], timeout: float, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`run_with_stack_dump(cmd, ...)`; a one-process launch in the tests' own environment is forked from a server
    that has done the imports already (tests/fork_launcher.py), which saves 15-20 s of every such launch."""
    global _fork_launcher
    if cmd[0] != sys.executable:  # `accelerate launch`: the launcher's processes are what it tests
        return run_with_stack_dump(cmd, timeout, env=env, cwd=cwd)
    if (_fork_launcher is None or not _fork_launcher.alive()) and env == launch_env():
        _fork_launcher = ForkLauncher(env)
    if _fork_launcher is None or not _fork_launcher.fits(env):  # an environment of its own: a real process
        return run_with_stack_dump(cmd, timeout, env=env, cwd=cwd)
    return _fork_launcher.run(cmd, timeout, env=env, cwd=cwd)


def launch(
    world: Path,
    out: Path,
    *args: str,
    processes: int = 1,
    check: bool = True,
    env: dict | None = None,
    launcher: bool = False,
    script_name: str = "train_ldm.py",
) -> subprocess.CompletedProcess:
    """Run a training launch to the end; with `check`, assert it succeeded.

    A multi-process launch that hangs is retried once, after its stacks are printed: gloo on CPU has hung a
    finished run now and then in CI (pytorch#56297), which no assertion here is about. A hang again fails the test.
    """
    cmd = launch_command(world, out, *args, processes=processes, launcher=launcher, script_name=script_name)
    attempts = 2 if processes > 1 else 1
    for attempt in range(attempts):
        before = set(out.iterdir()) if out.exists() else set()
        try:
            result = run_launch(cmd, timeout=300, env=launch_env(env), cwd=out.parent)
            break
        except subprocess.TimeoutExpired as hang:
            print(
                f"launch attempt {attempt + 1} hung; its output:\n{hang.stdout}\n{hang.stderr}",
                file=sys.stderr,
            )
            if attempt + 1 == attempts:
                raise AssertionError(f"{' '.join(cmd)} hung; stacks: {(hang.stderr or '')[-8000:]}") from None
            for path in (
                set(out.iterdir()) - before
            ):  # what the hung attempt added: the retry starts as it did
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            cmd = launch_command(  # a fresh port
                world, out, *args, processes=processes, launcher=launcher, script_name=script_name
            )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load_script(name: str):
    """train/<name>.py as a module, so that its main() runs in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_file(path)


def same_tensors(a: dict, b: dict) -> bool:
    """Same names and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
