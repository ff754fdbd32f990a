"""One run per output folder, and a resume only of the same run.

- A lock on a file in the output folder (`flock`, recording the PID and host of the run that holds it) is taken at
  start-up and held until the process ends: a second run into the same folder fails at once, naming the first.
- A new run into a folder that holds another run's checkpoints is refused unless it resumes them
  (`--resume_from_checkpoint`) or replaces them (`--overwrite_output_dir`).
- Each checkpoint records the run's fingerprint (`run.json`): every setting that defines what is trained, and a
  hash of the data's contents. Resuming with any of them changed is refused with the list of differences; only
  the settings in `MAY_CHANGE_ON_RESUME` may differ.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
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
    "validation_image",
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


# The open lock file of this process's run: the kernel holds the flock while it is open, and drops it when the
# process ends in any way (exit, exception, SIGTERM, SIGKILL, OOM), so a dead run never leaves a lock behind.
_held_lock = None


def lock_output_dir(output_dir: Path) -> None:
    """Take the output folder's lock for this process's life (call on the main process only).

    An exclusive `flock` on `.ldm-run.lock`, which also records the holder's PID, host and start time for the
    message a second run gets. The file stays after the run; only the lock on it goes.

    Raises:
        RuntimeError: another live run holds the folder, naming its PID, host and start time.
    """
    global _held_lock
    path = output_dir / LOCK_FILE
    f = open(path, "a+")  # noqa: SIM115 (held open for the process's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read())
        except json.JSONDecodeError:
            holder = {}
        f.close()
        raise RuntimeError(
            f"{output_dir} is in use by another training run (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Wait for it to finish, or choose "
            "another --output_dir."
        ) from None
    f.seek(0)
    f.truncate()
    json.dump(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f
    )
    f.flush()
    _held_lock = f


def claim_output_dir(config: TrainConfig) -> None:
    """Refuse to start a new run over another run's checkpoints; with --overwrite_output_dir, remove them.

    Call once the data has loaded, so that a run that fails to start never costs the old checkpoints.
    """
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

    With a content hash the data may move (only its contents count); a stream has none, so its source names do.
    A stream's sample indices depend on the worker count, so there that may not change either.
    `config.mixed_precision` must be what trains (train_ldm.py records accelerate's choice there).
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in MAY_CHANGE_ON_RESUME}
    if data_hash is not None:
        settings.pop("train_data_dir")
    if config.streaming:
        settings["dataloader_num_workers"] = config.dataloader_num_workers
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
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    differences = [
        f"  {key}: the checkpoint's run had {recorded.get(key)!r}, this one has {fingerprint.get(key)!r}"
        for key in sorted(set(recorded) | set(fingerprint))
        if recorded.get(key) != fingerprint.get(key)
        # A setting added after the checkpoint was written, left at its default, trains as before.
        and not (key not in recorded and key in defaults and fingerprint.get(key) == defaults[key])
    ]
    if differences:
        raise ValueError(
            f"Cannot resume {checkpoint} with different settings or data; resuming continues the same run:\n"
            + "\n".join(differences)
            + "\nRestore them, or start a new run in another --output_dir. Only these may change on resume: "
            + ", ".join(MAY_CHANGE_ON_RESUME)
            + "."
        )
