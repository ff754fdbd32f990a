"""FSDP's code paths of the trainers (ldm.training.run, train_ldm.py) on two CPU processes, run by tests/test_fsdp.py under torchrun.

Accelerate selects FSDP only over GPU processes (a CPU world is always MULTI_CPU, so train_ldm.py refuses an FSDP
launch without CUDA). torch's own FSDP2 (`fully_shard`) does shard over gloo on the CPU, so here the UNet is really
sharded over the two processes, trains one step, and accelerate's state is then marked FSDP (version 2): the
project's FSDP-specific code runs for real on it. Prints one "OK ..." line per check on rank 0.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.presets import build_unet  # noqa: E402
from ldm.training.config import TrainConfig  # noqa: E402
from ldm.training.distributed import check_replicas_in_sync, full_model  # noqa: E402
from ldm.training.run import prepare_trained_model  # noqa: E402


def step(unet, latents, timesteps, text) -> None:
    """One SGD step on the mean squared UNet output (a stand-in loss). SGD is linear in the gradient, so the
    sharded and the whole-batch step agree to float rounding (Adam's first step is sign(g), which rounding flips
    where g is near 0)."""
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.1)
    unet(latents, timesteps, text).sample.pow(2).mean().backward()
    optimizer.step()


def main() -> None:
    os.environ["ACCELERATE_USE_CPU"] = "true"  # what train_ldm.py's use_gloo_without_cuda sets
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=32, sample_size=8)
    reference = copy.deepcopy(unet)  # unsharded, trained on the whole batch
    initial = copy.deepcopy(unet.state_dict())
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    text = torch.randn(4, 7, 32, generator=generator)

    for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        fully_shard(block)
    fully_shard(unet)
    shard = slice(rank * 2, rank * 2 + 2)  # each process its half of the batch; FSDP averages the gradients
    step(unet, latents[shard], timesteps[shard], text[shard])
    step(reference, latents, timesteps, text)
    local = next(p for p in unet.parameters() if p.numel() > 1000)
    assert local.to_local().numel() < local.numel(), "the parameters are not sharded"

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert accelerator.is_fsdp2

    # The gathered UNet (checkpoints, validation and the final save take it) is the one trained unsharded.
    gathered = full_model(accelerator, unet)
    if rank == 0:
        expected = reference.state_dict()
        state = gathered.state_dict()
        assert state.keys() == expected.keys()
        worst = max((state[k] - expected[k]).abs().max().item() for k in state)
        assert worst < 1e-5, worst
        moved = max((state[k] - initial[k]).abs().max().item() for k in state)
        assert moved > 1e-3, moved  # it trained
        print(
            f"OK full_model gathers {len(state)} tensors sharded over {world} processes; max diff {worst:.1e}"
        )
    else:
        assert gathered is None
    check_replicas_in_sync(accelerator, unet)  # shards differ by design: no checksum comparison
    print(f"OK replica check skipped under FSDP on rank {rank}")

    for refused, message in (({"use_ema": True}, "use_ema is not supported with FSDP"),
                             ({"lora_rank": 4}, "LoRA training is not supported with FSDP")):  # fmt: skip
        config = TrainConfig(pretrained_model_name_or_path="unused", train_data_dir="unused", **refused)
        try:
            prepare_trained_model(copy.deepcopy(reference), config, accelerator)
        except ValueError as err:
            assert message in str(err), err
            print(f"OK refused under FSDP: {message}")
        else:
            raise AssertionError(f"{refused} was not refused under FSDP")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
