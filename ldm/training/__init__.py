"""Training: config -> data -> batch encoders (live or cached) -> loss -> optimizer, and checkpoints.

`config` the run's typed options; `data` datasets, transforms, every per-sample random draw and the epoch loader;
`latent_cache` the latent/text cache; `encoders` batches to (latents, text embeddings); `loss` the objective;
`checkpoint` saving, resuming, pruning, uploading; `distributed` what multi-process runs need; `vae` the
autoencoder's losses and metrics.
"""
