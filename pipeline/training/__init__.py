"""Training: the trainer and what it calls (the decoder path's precision and checkpointing, groups,
losses and metrics on shared spectral blocks, discriminators, checkpoints, preflight), the memory
estimate and the demo codec's training."""
