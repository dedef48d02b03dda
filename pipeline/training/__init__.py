"""Training: the trainer and what it calls (losses, checkpoints, preflight)."""
