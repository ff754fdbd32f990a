"""Everything about checkpoints: save, resume position, prune, background Hub upload, and the final save.

A checkpoint is written to `checkpoint-N.partial` and renamed to `checkpoint-N` only once complete, so a crash
mid-save leaves the previous checkpoint as the newest loadable one and `latest` never picks a broken folder.
Each `checkpoint-N/` holds the Accelerate state, `pipeline/` (a loadable `LatentPipeline`, EMA weights when EMA is
on), `unet/` (the raw trained UNet), `config.yaml` and `trainer_state.json` (the position to resume from).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.hub import model_card_text, push_folder
from ldm.pipelines.text_to_image import LatentPipeline
from ldm.single_file import write_single_file
from ldm.training.config import TrainConfig, save_config
from ldm.training.distributed import full_model
from ldm.training.integrity import verify_manifest, write_manifest
from ldm.training.lora import lora_model_card, save_lora, trainable_parameters

logger = get_logger(__name__)
# What a checkpoint holds to sample from: a whole pipeline, or only the adapter of a LoRA run.
EXPORT_FOLDER = {False: "pipeline", True: "lora"}
# For what may run outside an accelerate run too (resolving `latest` in a script or a test).
warnings_logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema_unet.safetensors"  # the EMA of what trains (a UNet, its adapter, a ControlNet)
RUN_FILE = "run.json"  # the run fingerprint (ldm.training.guards)

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
    """The checkpoint to resume from: a path, or `latest` (None when there is none yet).

    `latest` is the newest checkpoint that verifies against its manifest; each damaged one passed over is logged
    with the reason. A checkpoint named explicitly must verify.

    Raises:
        ValueError: the named checkpoint is not a folder, or is damaged (naming the bad file); or `latest` finds
            checkpoints but none intact.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        problems = []
        for path in reversed(complete_checkpoints(output_dir)):
            problem = verify_manifest(path)
            if problem is None:
                return path
            warnings_logger.warning("Passing over %s: %s", path, problem)
            problems.append(f"  {path.name}: {problem}")
        if problems:  # never a silent fresh start over checkpoints that are there
            raise ValueError(
                f"resume_from_checkpoint=latest found no intact checkpoint in {output_dir}:\n"
                + "\n".join(problems)
                + "\nResume from one by its path only if you trust it, or start a new run with --overwrite_output_dir."
            )
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        available = [p.name for p in complete_checkpoints(output_dir)]
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder; use 'latest' or one of {available}."
        )
    checkpoint_step(path)
    problem = verify_manifest(path)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {path}: {problem}. Pass --resume_from_checkpoint latest to take the newest intact "
            "checkpoint instead."
        )
    return path


# ----------------------------------------------------------------------------- EMA weights, without pickle


def save_ema(ema, path: Path) -> None:
    """The EMA shadow weights as safetensors, its counters in the file's metadata (accelerate would pickle it)."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {f"shadow.{i:05d}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)}
    save_file(tensors, path, metadata={"ema_state": json.dumps(state)})


def load_ema(ema, path: Path, device: torch.device) -> None:
    """Restore what `save_ema` wrote into `ema`."""
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["ema_state"])
        state["shadow_params"] = [f.get_tensor(name).to(device) for name in sorted(f.keys())]
    ema.load_state_dict(state)


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


# ----------------------------------------------------------------------------- the position in training and data


@dataclass
class TrainingPosition:
    """Where a run stands: what `trainer_state.json` records and a resumed run starts from.

    `global_batches_into_epoch` counts batches over all processes (batches are dealt to processes in turn);
    `micro_step` counts micro-batches, each one's noise seed: not global_step x accumulation, since accelerate
    forces an optimizer step at the end of each epoch.
    """

    global_step: int = 0
    epoch: int = 0
    global_batches_into_epoch: int = 0
    micro_step: int = 0

    @classmethod
    def after(
        cls,
        global_step: int,
        epoch: int,
        batches_done: int,
        epoch_over: bool,
        micro_step: int,
        num_processes: int,
    ) -> TrainingPosition:
        """The position after this process's `batches_done` batches of `epoch` (the next epoch if it is over)."""
        if epoch_over:
            epoch, batches_done = epoch + 1, 0
        return cls(global_step, epoch, batches_done * num_processes, micro_step)

    def skip_batches(self, num_processes: int) -> int:
        """This process's share of the batches already trained in `epoch`."""
        return self.global_batches_into_epoch // num_processes

    def save(self, folder: Path) -> None:
        """Write `trainer_state.json` into a checkpoint folder."""
        (Path(folder) / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TrainingPosition:
        """The position a checkpoint folder recorded."""
        path = Path(folder) / TRAINER_STATE
        if not path.exists():
            raise ValueError(
                f"{folder} has no {TRAINER_STATE}; it is not a complete train_ldm.py checkpoint."
            )
        state = json.loads(path.read_text())
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def resume(accelerator: Accelerator, path: Path | None, ema=None) -> TrainingPosition:
    """Load checkpoint `path` (optimizer, LR schedule, RNG, EMA) and return its position; a new run without one.

    accelerate loads its files with `weights_only=True`, and the EMA weights are safetensors: nothing a
    checkpoint holds can run code when it is resumed.
    """
    if path is None:
        return TrainingPosition()
    accelerator.load_state(str(path))
    if ema is not None:
        load_ema(ema, path / EMA_FILE, accelerator.device)
    position = TrainingPosition.load(path)
    logger.info(f"Resumed from {path}: {dataclasses.asdict(position)}")
    return position


# ----------------------------------------------------------------------------- pipelines from trained weights


def ema_weights(ema, trained: torch.nn.Module) -> torch.nn.Module:
    """A new module of the trained one's class and config holding the EMA weights (the trained one is untouched)."""
    module = type(trained).from_config(trained.config).to(trained.device)
    ema.copy_to(module.parameters())
    return module


@dataclass
class PipelineExport:
    """The frozen parts and the EMA shadow, to turn trained UNet weights into a `LatentPipeline`.

    With `lora` the EMA shadow holds only the adapter's weights; they go into a copy of the trained UNet.
    """

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    ema: object | None = None
    lora: bool = False

    def pipeline(self, trained_unet: UNet2DConditionModel) -> LatentPipeline:
        """A LatentPipeline on the trained weights (EMA weights when EMA is on), with DDIM sampling."""
        unet = trained_unet
        if self.ema is not None and self.lora:
            unet = copy.deepcopy(trained_unet)
            self.ema.copy_to(trainable_parameters(unet))
        elif self.ema is not None:
            unet = ema_weights(self.ema, trained_unet)
        pipe = LatentPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, trained_unet: UNet2DConditionModel, config: TrainConfig, folder: Path) -> str:
        """Write what a checkpoint holds to sample from into `folder`; returns the subfolder the Hub gets.

        A whole pipeline (EMA weights when EMA is on) and the raw UNet; in a LoRA run only the adapter, since the
        base UNet never changes.
        """
        if self.lora:
            save_lora(self.pipeline(trained_unet).unet, config, folder / EXPORT_FOLDER[True])
        else:
            save_pipeline(self.pipeline(trained_unet), folder / EXPORT_FOLDER[False])
            trained_unet.save_pretrained(folder / "unet")
        return EXPORT_FOLDER[self.lora]


def save_pipeline(pipe: LatentPipeline, path: Path) -> None:
    """Save a pipeline folder with its frozen parts in fp32, as stock diffusers expects to load them."""
    half = [(m, m.dtype) for m in (pipe.vae, pipe.text_encoder) if m.dtype != torch.float32]
    for module, _ in half:
        module.to(torch.float32)
    pipe.save_pretrained(path)
    for module, dtype in half:
        module.to(dtype)


# ----------------------------------------------------------------------------- saving


class CheckpointUploader:
    """Pushes each checkpoint's pipeline weights to the Hub in a background thread; never the optimizer state."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.futures: dict[str, object] = {}

    def submit(self, pipeline_dir: Path, name: str) -> None:
        """Start uploading `pipeline_dir` to `name/` in the repository."""
        self.futures[name] = push_folder(
            pipeline_dir, self.repo_id, path_in_repo=name, commit_message=f"Upload {name}", run_as_future=True
        )

    def wait(self, name: str | None = None) -> None:
        """Wait for one upload (before its folder is pruned) or all; failures are logged, never fatal."""
        for key in [name] if name else list(self.futures):
            future = self.futures.pop(key, None)
            if future is None:
                continue
            try:
                future.result()
            except Exception as err:  # a failed upload must not cost the user the run
                logger.warning(f"Hub upload of {key} failed: {err}", main_process_only=True)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, a file-size limit); the message says where and how to go on."""


@contextmanager
def writing(partial: Path, output_dir: Path) -> Iterator[None]:
    """Turn a failed write into a `CheckpointWriteError` naming the folder and its free space, with the partial
    folder removed (a crash mid-save leaves it for the next save to clear; an error need not)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        last = complete_checkpoints(output_dir)
        raise CheckpointWriteError(
            f"Could not write {partial.name.removesuffix(PARTIAL_SUFFIX)} in {output_dir} ({reason}); "
            f"{free / 2**30:.2f} GiB are free there. The partial folder was removed. Free some space (or lower "
            f"--checkpoints_total_limit), then resume with --resume_from_checkpoint latest (the newest complete "
            f"checkpoint is {last[-1].name if last else 'none yet: the run starts over'})."
        ) from None


def save_checkpoint(
    accelerator: Accelerator,
    config: TrainConfig,
    position: TrainingPosition,
    model,
    export,
    uploader: CheckpointUploader | None,
    fingerprint: dict,
) -> None:
    """accelerate state + what `export.save` writes (a pipeline, an adapter, a ControlNet) + the config + the run's
    fingerprint in `checkpoint-N`, written atomically (its manifest last), then pruned."""
    save_all = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    partial = partial_path(config.output_dir, position.global_step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    partial = partial or Path(config.output_dir) / f"checkpoint-{position.global_step}{PARTIAL_SUFFIX}"
    if save_all or accelerator.is_main_process:
        with writing(partial, Path(config.output_dir)):
            accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's part of the state is on disk before the folder is renamed
    trained = full_model(accelerator, model)
    if accelerator.is_main_process:
        with writing(partial, Path(config.output_dir)):
            upload_folder = export.save(trained, config, partial)
            save_config(config, partial / "config.yaml")
            position.save(partial)
            (partial / RUN_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            if export.ema is not None:
                save_ema(export.ema, partial / EMA_FILE)
            write_manifest(partial)  # last: a folder with a manifest that verifies is complete
        final = finalize(partial)
        logger.info(f"Saved {final}")
        if uploader is not None:
            uploader.submit(final / upload_folder, final.name)
            for old in stale_checkpoints(config.output_dir, config.checkpoints_total_limit):
                uploader.wait(old.name)  # do not delete files an upload is still reading
        prune(config.output_dir, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def save_final(
    accelerator: Accelerator,
    config: TrainConfig,
    pipe: LatentPipeline,
    grid_path: Path | None,
    trainer_state: dict[str, float],
) -> None:
    """The final pipeline folder (or a LoRA run's adapter) with config, model card and `trainer_state.json` (steps
    done, throughput); pushed to the Hub when asked."""
    out = Path(config.output_dir)
    if config.lora_rank is None:
        save_pipeline(pipe, out)
    else:
        save_lora(pipe.unet, config, out)
    repo_id = config.hub_model_id or out.name

    def card(grid_name: str | None) -> str:
        if config.lora_rank is None:
            return _model_card(config, accelerator.num_processes, grid_name)
        return lora_model_card(config, repo_id, grid_name)

    write_run_files(config, grid_path, trainer_state, card)
    # Once the folder is complete: a structure refused only now (a Hub base, not checkable at start-up) costs
    # nothing already saved. Pushed with the folder when it is written.
    if config.export_single_file:
        path = write_single_file(pipe, out / f"{out.resolve().name}.safetensors")
        logger.info(f"Wrote the single-file checkpoint {path}")
    push_output_folder(config)


def write_run_files(
    config: TrainConfig, grid_path: Path | None, trainer_state: dict, model_card: Callable[[str | None], str]
) -> None:
    """Beside the trained weights in the output folder: config.yaml, trainer_state.json, the last sample grid
    (samples.png) and the model card (`model_card(grid file name or None)`)."""
    out = Path(config.output_dir)
    save_config(config, out / "config.yaml")
    (out / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    grid_name = None
    if grid_path is not None:
        grid_name = "samples.png"
        shutil.copy(grid_path, out / grid_name)
    (out / "README.md").write_text(model_card(grid_name))


def push_output_folder(config: TrainConfig) -> None:
    """Upload the finished output folder to `hub_model_id` when --push_to_hub asks (never checkpoints or logs)."""
    if config.push_to_hub:
        push_folder(
            config.output_dir,
            config.hub_model_id,
            commit_message="End of training",
            ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.partial/*", ".ldm-run.lock"],
        )


def _model_card(config: TrainConfig, num_processes: int, grid_name: str | None) -> str:
    """The model card of a finished run: base, data, key hyperparameters, sample grid."""
    hyperparameters = {
        k: getattr(config, k)
        for k in (
            "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "max_train_steps", "caption_dropout", "mixed_precision", "use_ema", "snr_gamma", "prediction_type",
        )
    }  # fmt: skip
    hyperparameters["num_processes"] = num_processes
    return model_card_text(
        repo_id=config.hub_model_id or Path(config.output_dir).name,
        base_model=None if config.unet_preset else config.pretrained_model_name_or_path,
        base_description=config.unet_preset
        and f"UNet trained from scratch (preset {config.unet_preset!r}) on the VAE and text encoder of "
        f"{config.pretrained_model_name_or_path}",
        dataset=config.dataset_name or config.train_data_dir,
        hyperparameters=hyperparameters,
        grid_image=grid_name,
        validation_prompts=config.validation_prompts,
    )
