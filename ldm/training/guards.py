"""One run per output folder, and a resume only of the same run.

- A lock file in the output folder, holding the PID and host of the run that owns it, is taken at start-up and
  released at exit: a second run into the same folder fails at once, naming the first.
- A new run into a folder that holds another run's checkpoints is refused unless it resumes them
  (`--resume_from_checkpoint`) or replaces them (`--overwrite_output_dir`).
- Each checkpoint records the run's fingerprint (`run.json`): every setting that defines what is trained, and a
  hash of the data's contents. Resuming with any of them changed is refused with the list of differences; only
  the settings in `MAY_CHANGE_ON_RESUME` may differ.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from ldm.training.checkpoint import PARTIAL_SUFFIX, RUN_FILE, complete_checkpoints
from ldm.training.config import TrainConfig

LOCK_FILE = ".ldm-run.lock"
# Settings that say how long to train, where to write and what to log, not what is trained.
MAY_CHANGE_ON_RESUME = (
    "max_train_steps",
    "num_train_epochs",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "output_dir",
    "validation_prompts",
    "validation_steps",
    "validation_guidance_scale",
    "validation_inference_steps",
    "report_to",
    "logging_dir",
    "tracker_project_name",
    "push_to_hub",
    "hub_model_id",
    "hub_push_checkpoints",
    "dataloader_num_workers",
    "cache_latents",
    "cache_dir",
    "gradient_checkpointing",
    "enable_xformers_memory_efficient_attention",
)


def _process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_output_dir(output_dir: Path) -> None:
    """Take the output folder's lock for this process's life (call on the main process only).

    A lock left by a run that died on this host (its PID is gone) is taken over with a warning.

    Raises:
        RuntimeError: another live run holds the folder, naming its PID, host and start time.
    """
    path = output_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not _process_alive(int(holder.get("pid", -1))):
                print(f"Taking over {path}: its run (pid {holder.get('pid')}) is no longer running.")
                path.unlink(missing_ok=True)
                continue
            raise RuntimeError(
                f"{output_dir} is in use by another training run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Wait for it to finish or "
                f"choose another --output_dir; if that run is gone, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_release, path, me["pid"])
        # `kill`, a scheduler's preemption: end through SystemExit, so that atexit releases the lock (Python's
        # default for SIGTERM exits at once, and a lock left behind would need the stale-lock check).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return


def _exit_on_sigterm(signum, frame) -> None:
    """Turn SIGTERM into SystemExit(128 + SIGTERM)."""
    raise SystemExit(128 + signum)


def _release(path: Path, pid: int) -> None:
    """Remove the lock if this process still owns it."""
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass


def claim_output_dir(config: TrainConfig) -> None:
    """Refuse to start a new run over another run's checkpoints; with --overwrite_output_dir, remove them."""
    output_dir = Path(config.output_dir)
    found = complete_checkpoints(output_dir) + sorted(output_dir.glob(f"checkpoint-*{PARTIAL_SUFFIX}"))
    if not found or config.resume_from_checkpoint:
        return
    if not config.overwrite_output_dir:
        raise RuntimeError(
            f"{output_dir} already holds another run's checkpoints ({', '.join(p.name for p in found)}). Resume it "
            "with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another "
            "--output_dir."
        )
    for path in found:
        shutil.rmtree(path)


def run_fingerprint(config: TrainConfig, data_hash: str | None) -> dict:
    """What defines the run: every setting but those that may change on resume, and the data's content hash.

    `config.mixed_precision` must be what trains (train_ldm.py records accelerate's choice there).
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in MAY_CHANGE_ON_RESUME}
    settings["data_hash"] = data_hash
    return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from the file


def check_same_run(checkpoint: Path, fingerprint: dict) -> None:
    """Refuse to resume `checkpoint` with settings or data that differ from the run that wrote it.

    Raises:
        ValueError: listing each difference, and what may change on resume.
    """
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise ValueError(
            f"{checkpoint} has no {RUN_FILE}; it was not written by this version of train_ldm.py."
        )
    recorded = json.loads(path.read_text())
    differences = [
        f"  {key}: the checkpoint's run had {recorded.get(key)!r}, this one has {fingerprint.get(key)!r}"
        for key in sorted(set(recorded) | set(fingerprint))
        if recorded.get(key) != fingerprint.get(key)
    ]
    if differences:
        raise ValueError(
            f"Cannot resume {checkpoint} with different settings or data; resuming continues the same run:\n"
            + "\n".join(differences)
            + "\nRestore them, or start a new run in another --output_dir. Only these may change on resume: "
            + ", ".join(MAY_CHANGE_ON_RESUME)
            + "."
        )
