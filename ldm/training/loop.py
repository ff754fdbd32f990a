"""The one step loop that every trainer in `train/` runs.

accumulate -> loss of a micro-batch -> backward -> clip -> optimizer and LR step -> EMA -> log -> finite-loss check
-> checkpoint (before validation, which may fail) -> validation; with progress and throughput. A trainer hands
`train_loop` what differs between trainers, as plain arguments: the module that trains, the loss of a micro-batch,
how a checkpoint is saved, what validation draws (as DiT's loop calls one `training_losses`). There is no trainer
class and no callback registry: what differs is a function argument, and the loop reads top to bottom.

Every micro-batch's randomness comes from `keyed_generator(seed, micro_step, process)`, so a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ldm.seeding import keyed_generator
from ldm.training.checkpoint import TrainingPosition, complete_checkpoints
from ldm.training.data import TrainLoader
from ldm.training.distributed import check_epoch_read
from ldm.training.lora import trainable_parameters

# (batch, epoch, generator) -> the micro-batch's scalar loss; every random draw from `generator`.
MicroBatchLoss = Callable[[dict, int, torch.Generator], torch.Tensor]


@dataclass
class LoopResult:
    """What a finished loop reports: steps done, training throughput (steps alone, no validation or saving), the
    unreadable samples this process met (each use counted) and the last validation grid."""

    global_step: int
    train_samples: int
    train_seconds: float
    skipped_images: int
    grid_path: Path | None

    def stats(self) -> dict:
        """The final folder's `trainer_state.json` entries (samples per second added when saving)."""
        return {
            "global_step": self.global_step,
            "train_samples": self.train_samples,
            "train_seconds": self.train_seconds,
        }


class MetricsFile:
    """`output_dir/metrics.jsonl`: one JSON line per optimizer step, for `ldm-ui`'s Training tab and any script.

    Each line holds the step, the wall-clock time, the run's step count, this process's training throughput so far
    and every number the step logged (loss, lr, epoch, validation scores). A resumed run appends: a reader keeps
    the last line of each step. Tensorboard's event files hold the same curves, but need tensorboard to read.
    """

    NAME = "metrics.jsonl"

    def __init__(self, output_dir: Path, max_train_steps: int):
        self.path, self.max_train_steps = output_dir / self.NAME, max_train_steps

    def write(self, step: int, logs: dict, samples_per_second: float) -> None:
        row = {"step": step, "time": round(time.time(), 3), "max_train_steps": self.max_train_steps}
        row["samples_per_second"] = round(samples_per_second, 3)
        row |= {k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def check_finite(loss: float, step: int, epoch: int, output_dir: Path) -> None:
    """Stop the run on a NaN/inf loss, naming the step and the last good checkpoint."""
    if math.isfinite(loss):
        return
    last = complete_checkpoints(output_dir)
    raise FloatingPointError(
        f"The loss became {loss} at step {step} (epoch {epoch}); training stopped. "
        f"The last good checkpoint is {last[-1] if last else 'none (no checkpoint was saved yet)'}. "
        "Lower learning_rate, use bf16 instead of fp16, or check the data."
    )


def train_loop(
    accelerator: Accelerator,
    config,
    loader: TrainLoader,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    start: TrainingPosition,
    micro_batch_loss: MicroBatchLoss,
    save_checkpoint: Callable[[TrainingPosition], None],
    validate: Callable[[int], tuple[dict, Path | None]],
    ema=None,
) -> LoopResult:
    """Train `model` from `start` to `config.max_train_steps` optimizer steps.

    Args:
        accelerator: the run's Accelerator; `model`, `optimizer` and `lr_scheduler` went through its `prepare`
            (with the loader's, see `TrainLoader.prepare`).
        config: reads seed, max_train_steps, num_train_epochs, max_grad_norm, checkpointing_steps,
            validation_steps and output_dir.
        loader: the epoch loader; its batches carry "indices" and "num_skipped".
        model: the module that trains (the UNet, a ControlNet, ...); gradients are accumulated on it.
        optimizer, lr_scheduler: over `model`'s trainable parameters; the LR schedule steps once per optimizer step.
        start: where to start (a fresh run's is step 0); from `ldm.training.checkpoint.resume`.
        micro_batch_loss: (batch, epoch, generator) -> scalar loss of one micro-batch.
        save_checkpoint: writes `checkpoint-N` for a `TrainingPosition` (a collective call).
        validate: step -> (logs, grid path or None), a collective call; its failures are its own to catch.
        ema: an `EMAModel` over `model`'s trainable parameters, stepped after each optimizer step; or None.

    Returns:
        The `LoopResult`.

    Raises:
        FloatingPointError: the loss became NaN or infinite (naming the step and the last good checkpoint).
    """
    global_step, micro_step = start.global_step, start.micro_step
    show = accelerator.is_local_main_process
    progress = tqdm(range(config.max_train_steps), initial=global_step, desc="train", disable=not show)
    grid_path, window_losses, skipped_images = None, [], 0
    train_seconds, train_samples = 0.0, 0
    metrics = MetricsFile(Path(config.output_dir), config.max_train_steps)
    for epoch in loader.epochs(start.epoch, config.num_train_epochs):
        if global_step >= config.max_train_steps:
            break  # resumed from the last checkpoint of a finished run: nothing left to train
        batches_done = start.skip_batches(accelerator.num_processes) if epoch == start.epoch else 0
        whole_epoch, kept, skipped = batches_done == 0, 0, 0
        clock = time.perf_counter()  # step time includes loading the batch (decoding, in the uncached path)
        for batch in loader.batches(epoch, skip_batches=batches_done):
            batches_done += 1
            skipped_images += batch["num_skipped"]
            kept, skipped = kept + len(batch["indices"]), skipped + batch["num_skipped"]
            with accelerator.accumulate(model):
                generator = keyed_generator(config.seed, micro_step, accelerator.process_index)
                loss = micro_batch_loss(batch, epoch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()  # once per optimizer step, whatever the process count
                optimizer.zero_grad()
            micro_step += 1
            window_losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            train_seconds += time.perf_counter() - clock
            train_samples += len(batch["indices"]) * accelerator.num_processes
            check_finite(window_losses[-1], global_step + 1, epoch, Path(config.output_dir))

            if accelerator.sync_gradients:  # one optimizer step done
                if ema is not None:
                    ema.step(trainable_parameters(model))
                global_step += 1
                progress.update(1)
                # The logged loss is the mean over the accumulated micro-batches.
                logs = {"loss": sum(window_losses) / len(window_losses), "lr": lr_scheduler.get_last_lr()[0]}
                logs["epoch"], window_losses = epoch, []
                if skipped_images:  # this process's count; the total over processes is logged at the end
                    logs["skipped_images"] = skipped_images
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", skipped=skipped_images
                )
                if global_step % config.checkpointing_steps == 0:  # before validation, which may fail
                    save_checkpoint(
                        TrainingPosition.after(
                            global_step, epoch, batches_done, loader.epoch_over(batches_done), micro_step,
                            accelerator.num_processes,
                        )
                    )  # fmt: skip
                if global_step % config.validation_steps == 0 or global_step == config.max_train_steps:
                    val_logs, grid = validate(global_step)
                    logs, grid_path = {**logs, **val_logs}, grid or grid_path
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    metrics.write(global_step, logs, train_samples / max(train_seconds, 1e-9))
            if global_step >= config.max_train_steps:
                break
            clock = time.perf_counter()  # validation and checkpoints are not training throughput
        else:  # the epoch ran to its end (on every process alike)
            if whole_epoch:
                check_epoch_read(accelerator, kept, skipped, epoch)
    progress.close()
    return LoopResult(global_step, train_samples, train_seconds, skipped_images, grid_path)
