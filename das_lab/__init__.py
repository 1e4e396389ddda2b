"""das-lab: train, evaluate, sweep and compare deformable-attention models."""

__version__ = "0.1.0"
