"""Training: config -> sources -> data -> batch encoders (live or cached) -> loss -> optimizer, and checkpoints.

`config` the run's typed options and their checks; `sources` where images and captions come from (checked before
any model loads); `transforms` the per-sample transform and every random draw; `data` datasets, batching and the
epoch loader; `latent_cache` the latent/text cache; `encoders` batches to (latents, text embeddings); `loss` the
objective; `checkpoint` saving, resuming, pruning, uploading; `guards` one run per output folder and resume only of
the same run; `integrity` file manifests; `distributed` what multi-process runs need; `vae` the autoencoder's
options, losses and metrics.
"""
