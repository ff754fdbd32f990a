"""What the Training tab shows of a run folder: its curves, latest validation grid, checkpoints and pace.

Read from the files every trainer writes: `metrics.jsonl` (ldm.training.loop.MetricsFile), `validation/step-N.png`
(ldm.training.validation.save_grid) and the finished `checkpoint-N` folders (ldm.training.checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ldm.training.checkpoint import checkpoint_step, complete_checkpoints
from ldm.training.loop import MetricsFile


@dataclass
class RunStatus:
    """One look at a run folder."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    max_train_steps: int | None = None
    samples_per_second: float | None = None
    seconds_left: float | None = None
    grid: Path | None = None
    checkpoints: list[tuple[str, int]] = field(default_factory=list)
    finished: bool = False

    def summary(self) -> str:
        """One line: step x of y, throughput, time left (or finished)."""
        if not self.steps:
            return "No steps logged yet (metrics.jsonl is written from the first optimizer step)."
        parts = [f"step {self.steps[-1]}" + (f" of {self.max_train_steps}" if self.max_train_steps else "")]
        parts.append(f"loss {self.loss[-1]:.4f}" if self.loss else "")
        if self.samples_per_second:
            parts.append(f"{self.samples_per_second:.1f} samples/s")
        if self.finished:
            parts.append("finished")
        elif self.seconds_left is not None:
            minutes, seconds = divmod(round(self.seconds_left), 60)
            parts.append(f"about {minutes} min {seconds:02d} s left")
        return ", ".join(p for p in parts if p)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, the last one of each step kept (a resumed run repeats steps); a line cut short
    by a crash or a write in progress is ignored."""
    rows: dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def run_status(folder: Path) -> RunStatus:
    """Everything the Training tab shows of `folder`."""
    rows = read_metrics(folder / MetricsFile.NAME)
    status = RunStatus()
    for row in rows:
        status.steps.append(row["step"])
        status.loss.append(row.get("loss", float("nan")))
        status.lr.append(row.get("lr", float("nan")))
    if rows:
        last = rows[-1]
        status.max_train_steps = last.get("max_train_steps")
        status.samples_per_second = last.get("samples_per_second")
        status.finished = status.max_train_steps is not None and last["step"] >= status.max_train_steps
        # Time left from the wall-clock pace of the last stretch (validation and checkpoints included).
        recent = [row for row in rows if row["step"] > last["step"] - 50]
        if status.max_train_steps and len(recent) >= 2 and not status.finished:
            pace = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
            status.seconds_left = pace * (status.max_train_steps - last["step"])
    grids = sorted((folder / "validation").glob("step-*.png"))
    status.grid = grids[-1] if grids else None
    status.checkpoints = [(path.name, checkpoint_step(path)) for path in complete_checkpoints(folder)]
    return status


def run_choices(runs_dir: Path) -> list[str]:
    """Run folders under `runs_dir` (two levels deep): those with a metrics.jsonl or a checkpoint."""
    found = []
    for depth in ("*", "*/*"):
        for folder in sorted(runs_dir.glob(depth)):
            if folder.is_dir() and (
                (folder / MetricsFile.NAME).is_file() or any(folder.glob("checkpoint-*"))
            ):
                found.append(str(folder.relative_to(runs_dir)))
    return found
