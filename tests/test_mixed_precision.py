"""bf16 mixed precision on the CPU: the UNet really computes in bf16 under accelerate's autocast, and it learns."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from ldm import build_pipeline, write_clip_tokenizer
from ldm.seeding import keyed_generator
from ldm.shapes.synthetic import CAPTION_WORDS, generate_dataset
from ldm.training.config import TrainConfig
from ldm.training.data import build_train_and_heldout, collate_fn
from ldm.training.encoders import LiveBatchEncoder
from ldm.training.loss import training_loss
from tests.training_helpers import ROOT


def test_bf16_autocast_runs_the_unet_in_bf16_and_the_loss_decreases(tmp_path, request):
    generate_dataset(tmp_path / "data", num_images=8, resolution=16, seed=0, num_heldout=2)
    pipe = build_pipeline("tiny", write_clip_tokenizer(CAPTION_WORDS, tmp_path / "tok"), seed=0)
    config = TrainConfig(
        pretrained_model_name_or_path="unused", train_data_dir=str(tmp_path / "data"), resolution=16,
        center_crop=True, caption_dropout=0.0, mixed_precision="bf16",
    )  # fmt: skip
    # Accelerate's state is one per process, and other tests made it without mixed precision: start afresh, as
    # accelerate's own tests do, and leave it fresh for the tests after this one.
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    train, _ = build_train_and_heldout(config, seed=0, num_heldout=0)
    batch = collate_fn([train[i] for i in range(len(train))])
    encoder = LiveBatchEncoder(pipe.vae, pipe.text_encoder, pipe.tokenizer, config, seed=0)
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    dtypes = set()
    hook = accelerator.unwrap_model(unet).conv_in.register_forward_hook(
        lambda m, i, out: dtypes.add(out.dtype)
    )
    losses = []
    for _ in range(30):
        # The same noise every step: only the weights change, so the loss must fall.
        loss = training_loss(unet, encoder, batch, pipe.scheduler, config, keyed_generator(0, 0))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    hook.remove()
    assert dtypes == {torch.bfloat16}, dtypes  # the convolutions ran in bf16
    assert next(accelerator.unwrap_model(unet).parameters()).dtype == torch.float32  # fp32 master weights
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_torch_compile_compiles_the_unet_and_every_save_gets_the_plain_module(tmp_path, request):
    # Compilation itself runs at the first forward (88 s for the tiny UNet on 2 CPU cores): not here.
    import importlib.util

    from accelerate.utils import DynamoBackend, is_compiled_module

    from ldm.presets import build_unet
    from ldm.training.distributed import check_replicas_in_sync, full_model

    spec = importlib.util.spec_from_file_location("train_ldm_script", ROOT / "train" / "train_ldm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    config = TrainConfig(
        pretrained_model_name_or_path="unused", train_data_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
        torch_compile=True, report_to="none", mixed_precision="no",
    )  # fmt: skip
    accelerator = script.make_accelerator(config)
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.INDUCTOR
    unet = build_unet("tiny", cross_attention_dim=32)
    prepared = accelerator.prepare(unet)
    assert is_compiled_module(prepared)
    assert full_model(accelerator, prepared) is unet  # what checkpoints, validation and the final save get
    check_replicas_in_sync(accelerator, prepared)
