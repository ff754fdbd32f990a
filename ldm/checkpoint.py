"""Checkpoint folders: atomic saves, `latest` lookup and pruning that never loses the newest complete one.

A checkpoint is written to `checkpoint-N.partial` and renamed to `checkpoint-N` only once complete, so a crash
mid-save leaves the previous checkpoint as the newest loadable one and `latest` never picks a broken folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-N` folders in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The global step N of a `checkpoint-N` folder."""
    match = CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder; expected a name like checkpoint-500.")
    return int(match.group(1))


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a path, or `latest` (None when there is none yet)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        available = [p.name for p in complete_checkpoints(output_dir)]
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder; use 'latest' or one of {available}."
        )
    checkpoint_step(path)
    return path


def partial_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is complete (cleared first if a crash left one)."""
    path = Path(output_dir) / f"checkpoint-{step}{PARTIAL_SUFFIX}"
    if path.exists():
        shutil.rmtree(path)
    return path


def finalize(partial: Path) -> Path:
    """Rename a fully written `checkpoint-N.partial` to `checkpoint-N`, replacing an older one of that step."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def stale_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """The oldest complete checkpoints beyond `total_limit` (at least the newest one is always kept)."""
    if total_limit is None:
        return []
    found = complete_checkpoints(output_dir)
    return found[: max(len(found) - max(total_limit, 1), 0)]


def prune(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the checkpoints `stale_checkpoints` names; returns them."""
    removed = stale_checkpoints(output_dir, total_limit)
    for path in removed:
        shutil.rmtree(path)
    return removed


TRAINER_STATE = "trainer_state.json"


def write_position(
    folder: Path, global_step: int, epoch: int, global_batches_into_epoch: int, micro_step: int
) -> None:
    """Record where in training and in the data a checkpoint was taken (batches counted over all processes)."""
    state = {
        "global_step": global_step,
        "epoch": epoch,
        "global_batches_into_epoch": global_batches_into_epoch,
        "micro_step": micro_step,
    }
    (Path(folder) / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")


def read_position(folder: Path) -> dict[str, int]:
    """The position `write_position` recorded in a checkpoint."""
    path = Path(folder) / TRAINER_STATE
    if not path.exists():
        raise ValueError(f"{folder} has no {TRAINER_STATE}; it is not a complete train_ldm.py checkpoint.")
    return json.loads(path.read_text())
