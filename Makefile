# Everything a fresh machine needs, in two targets: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned and installed before the package: an unpinned torch makes pip pull the CUDA build (several GB).
TORCH_VERSION := 2.13.0

.PHONY: setup test demo bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

# ---------------------------------------------------------------------------------------------------------------
# The offline demo: synthetic data -> VAE -> text stack -> LDM -> grid + adherence table, on 2 CPU cores.
# Every step reuses what an earlier run finished, so re-running is cheap.
# Another CAPTION_NOISE needs its own folder (make demo CAPTION_NOISE=0.1 DEMO=outputs/demo-0.1): the LDM step
# resumes the last checkpoint it finds in $(DEMO)/ldm.
DEMO := outputs/demo
# Like web alt-text, 5 % of the demo's training captions misname one attribute of their image. Unguided samples of
# the held-out compositions then miss an attribute far more often; classifier-free guidance corrects them (README).
CAPTION_NOISE := 0.05
LAUNCH := $(BIN)/accelerate launch --cpu --num_cpu_threads_per_process $(shell nproc) --num_machines 1 \
	--mixed_precision no --dynamo_backend no

demo: setup
	$(BIN)/python -m ldm.shapes.synthetic --out_dir $(DEMO)/data --num_images 4000 --resolution 64 --seed 0 --num_heldout 30 \
		--exclude_heldout_from_train --caption_noise $(CAPTION_NOISE)
	$(LAUNCH) train/train_vae.py --train_data_dir $(DEMO)/data --vae_preset small --resolution 64 \
		--train_batch_size 8 --max_train_steps 700 --learning_rate 1e-3 --lr_scheduler cosine \
		--lr_warmup_steps 50 --recon_loss l2 --seed 0 \
		--report_to none --output_dir $(DEMO)/vae
	$(BIN)/python -m ldm.shapes.text_stack --captions $(DEMO)/data/train/metadata.jsonl --vae $(DEMO)/vae \
		--out_dir $(DEMO)/base --max_length 16
	$(LAUNCH) train/train_ldm.py --config configs/demo.yaml --resume_from_checkpoint latest \
		--pretrained_model_name_or_path $(DEMO)/base --train_data_dir $(DEMO)/data --output_dir $(DEMO)/ldm \
		--cache_dir $(DEMO)/cache
	$(BIN)/python train/evaluate.py --model $(DEMO)/ldm --prompts $(DEMO)/data/heldout_prompts.jsonl \
		--guidance_scales 1 3 7.5 --seeds 0 1 --steps 25 --out_dir $(DEMO)/eval
	@echo "Grid: $(DEMO)/eval/grid.png   Table: $(DEMO)/eval/adherence.txt"

bench: demo
	$(BIN)/python benchmarks/cache_speed.py --steps 100 --demo_dir $(DEMO)
