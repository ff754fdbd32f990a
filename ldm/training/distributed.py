"""What running on several processes needs: one gloo group on CPU, FSDP gathering, a replica check, a clean exit."""

from __future__ import annotations

import logging
import os

import datasets
import torch
import transformers
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger

logger = get_logger(__name__)


def use_gloo_without_cuda() -> None:
    """Processes started by `accelerate launch --multi_gpu` on a machine without CUDA train together on the CPU.

    Accelerate otherwise gives each of them a world of its own (DistributedType.NO), so they would silently
    train separate models; with ACCELERATE_USE_CPU set they form one gloo process group. Call before creating
    the Accelerator.

    Raises:
        ValueError: an FSDP launch (e.g. `--config_file configs/accelerate/fsdp.yaml`) without CUDA. Accelerate
            shards only over GPU processes: on CPU it would silently train with DDP instead.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise ValueError(
            "FSDP needs CUDA GPUs: accelerate shards only over GPU processes, and on this machine without CUDA it "
            "would silently train with DDP (every process holding the whole UNet). Launch without the FSDP config "
            "(accelerate launch --multi_gpu --num_processes N trains with DDP over gloo on CPU), or on GPUs."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"


def setup_logging(accelerator: Accelerator) -> None:
    """INFO logging with timestamps; datasets and transformers speak on the local main process only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """The dtype the frozen models run in: half precision under fp16/bf16 mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def full_model(accelerator: Accelerator, model) -> torch.nn.Module | None:
    """The trained model (a UNet, a ControlNet) as one plain module on the main process (a collective call: run it
    on every process).

    Under FSDP the parameters are sharded, so they are gathered first; elsewhere this is just the unwrapped model.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return None
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        module = type(unwrapped).from_config(unwrapped.config)
        module.load_state_dict(state)
        return module.to(accelerator.device)
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def check_replicas_in_sync(accelerator: Accelerator, model) -> None:
    """Every process must end with the same trained weights; a mismatch means data-parallel training went wrong."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return  # each process holds a different shard by design
    module = accelerator.unwrap_model(model, keep_torch_compile=False)
    name = type(module).__name__.removesuffix("2DConditionModel")  # "UNet", "ControlNetModel"
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().view(1)
    sums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if len(set(sums)) != 1:
        raise RuntimeError(f"{name} weights differ across processes (parameter sums {sums}).")
    logger.info(
        f"{name} weights identical on all {accelerator.num_processes} processes (checksum {sums[0]:.10e})."
    )


def total_over_processes(accelerator: Accelerator, count: int) -> int:
    """The sum of a per-process count over all processes (a collective call)."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))


def check_epoch_read(accelerator: Accelerator, kept: int, skipped: int, epoch: int) -> None:
    """Stop a run in which a whole epoch decoded no image on any process (a collective call): every further step would
    train on nothing. A run with some readable images goes on, skipping and counting the rest.

    Raises:
        ValueError: naming the epoch, how many samples were skipped and where to look.
    """
    if total_over_processes(accelerator, kept) == 0:
        skipped = total_over_processes(accelerator, skipped)
        raise ValueError(
            f"No image of epoch {epoch} could be read ({skipped} samples skipped; the warnings above name each with "
            "its error), so training would learn nothing. Check the image column (in an imagefolder's metadata.jsonl "
            "a column named 'image' replaces the decoded pixels) and that the files exist and open."
        )


def finish(accelerator: Accelerator) -> None:
    """End the run on every process: a barrier, then `end_training`.

    Every rank waits at the barrier with the GIL released, which gives gloo's worker threads time to drop the last
    collective's tensors before DDP's reducer and the process group are torn down: a worker still holding them at
    exit needs the GIL that the teardown holds, and the process hangs (seen once on CPU in CI; pytorch#56297).
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
