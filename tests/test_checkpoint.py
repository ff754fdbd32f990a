"""Checkpoint folders and the saved position: one definition, round-tripped; `latest` and pruning."""

from __future__ import annotations

import pytest

from ldm.training.checkpoint import (
    TrainingPosition,
    complete_checkpoints,
    finalize,
    partial_path,
    prune,
    resolve_resume_path,
)
from ldm.training.integrity import write_manifest


def test_position_after_a_step_mid_epoch_and_at_its_end():
    mid = TrainingPosition.after(7, epoch=2, batches_done=3, epoch_over=False, micro_step=14, num_processes=2)
    assert mid == TrainingPosition(global_step=7, epoch=2, global_batches_into_epoch=6, micro_step=14)
    assert mid.skip_batches(num_processes=2) == 3
    end = TrainingPosition.after(8, epoch=2, batches_done=4, epoch_over=True, micro_step=16, num_processes=2)
    assert end == TrainingPosition(global_step=8, epoch=3, global_batches_into_epoch=0, micro_step=16)


def test_position_round_trips_through_its_file(tmp_path):
    position = TrainingPosition(global_step=5, epoch=1, global_batches_into_epoch=4, micro_step=10)
    position.save(tmp_path)
    assert TrainingPosition.load(tmp_path) == position
    with pytest.raises(ValueError, match="no trainer_state.json"):
        TrainingPosition.load(tmp_path / "elsewhere")


def test_latest_skips_partial_and_unverified_folders_and_prune_keeps_the_newest(tmp_path):
    for step in (3, 6, 9):
        partial = partial_path(tmp_path, step)
        partial.mkdir()
        (partial / "weights.bin").write_bytes(bytes(range(step)))
        write_manifest(partial)
        assert finalize(partial).name == f"checkpoint-{step}"
    (tmp_path / "checkpoint-12.partial").mkdir()  # a save that crashed
    (tmp_path / "checkpoint-99").mkdir()  # an empty folder someone made
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-9"
    with pytest.raises(ValueError, match="checkpoint-99: it has no manifest.json"):
        resolve_resume_path("checkpoint-99", tmp_path)
    (tmp_path / "checkpoint-99").rmdir()
    assert [p.name for p in prune(tmp_path, 1)] == ["checkpoint-3", "checkpoint-6"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-9"]
    with pytest.raises(ValueError, match="checkpoint-9"):
        resolve_resume_path("checkpoint-4", tmp_path)
