"""Inference: noise schedules and scheduler steps (diffusion.py), the jitted sampler
(sampling.py), working sizes (sizes.py) and the editor with its job (edit.py)."""
