"""Inference: noise schedules and scheduler steps (diffusion.py), the jitted sampler
(sampling.py), working sizes (sizes.py) and the editor (edit.py; its job is jobs/edit.py)."""
