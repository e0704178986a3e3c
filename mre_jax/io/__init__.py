"""Files in and out: diffusers folders <-> params (pretrained.py, export.py), weight names and
formats (weights.py), project checkpoints (checkpointing.py), the PyTorch twin (torch_twin.py) and
the one atomic file writer (files.py)."""
