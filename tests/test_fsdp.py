"""FSDP on a machine without CUDA: refused at start-up (see test_fault_injection.py), and its code paths proven
on torch's own FSDP2 over two CPU processes (tests/fsdp_stand_in.py says how)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.training_helpers import ROOT, free_port, launch_env, run_with_stack_dump

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_fsdp_code_paths_on_a_really_sharded_unet():
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "fsdp_stand_in.py")]  # fmt: skip
    result = run_with_stack_dump(cmd, timeout=300, env=launch_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = result.stdout
    assert "OK full_model gathers 208 tensors sharded over 2 processes" in out
    assert out.count("OK replica check skipped under FSDP") == 2
    assert out.count("OK refused under FSDP: use_ema") == 2 and out.count("OK refused under FSDP: LoRA") == 2
