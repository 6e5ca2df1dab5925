"""Training: input pipeline, packing, losses, optimisers and freezing, trainer, checkpoints."""
