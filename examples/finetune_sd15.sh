#!/usr/bin/env bash
# Fine-tune Stable Diffusion 1.5 from the Hub with train_ldm.py (needs a GPU and Hub access; `hf auth login`).
set -euo pipefail
cd "$(dirname "$0")/.."

# One GPU, bf16, EMA, gradient checkpointing (configs/sd15_finetune.yaml holds the rest):
accelerate launch --config_file configs/accelerate/single_gpu.yaml train/train_ldm.py \
  --config configs/sd15_finetune.yaml

# Eight GPUs with DDP (the effective batch is 8 processes x 8 x 4 accumulation), pushing checkpoints as they land:
#   accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml train/train_ldm.py \
#     --config configs/sd15_finetune.yaml --gradient_accumulation_steps 1 \
#     --push_to_hub --hub_model_id YOUR_NAME/sd15-naruto --hub_push_checkpoints
#
# DeepSpeed ZeRO-2 (pip install deepspeed):
#   accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train/train_ldm.py \
#     --config configs/sd15_finetune.yaml --gradient_accumulation_steps 1
#
# Resume after an interruption, exactly where it stopped:
#   accelerate launch --config_file configs/accelerate/single_gpu.yaml train/train_ldm.py \
#     --config configs/sd15_finetune.yaml --resume_from_checkpoint latest
#
# Sample from the result (or from any checkpoint-N/pipeline folder):
#   ldm-generate "a ninja with blue eyes" --model outputs/sd15-naruto --steps 50 --guidance 7.5 --out ninja.png
