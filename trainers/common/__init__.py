"""Machinery shared by every trainer: LoRA, checkpoints, metric logging, prompt sources, EMA."""
