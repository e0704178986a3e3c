"""Helpers of the parity tests against PyTorch (test_models, test_vae, test_clip)."""

import numpy as np
import torch

# bfloat16: ours may be off from the float32 reference by at most this multiple of PyTorch's own
# bfloat16 (autocast) error on the same weights and inputs, and never by more than BF16_CAP.
# Both round activations to 8 bits of mantissa (~0.4%) at every layer; a wrong block is off by
# tens of percent.
BF16_RATIO = 2.0
BF16_CAP = 0.05


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Redraws every layer's PyTorch default init from `seed`, then perturbs every parameter (norm
  scales and biases too), so no weight is left at a trivial value. The redraw makes the weights a
  function of the seed alone: from_config draws them from the global RNG, whose state depends on
  the tests that ran before in the same process (bfloat16 error ratios then varied run to run)."""
  with torch.random.fork_rng(), torch.no_grad():
    torch.manual_seed(seed)
    for layer in module.modules():
      if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)
  return module.eval()


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def rel_err(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  b = np.asarray(b, np.float64)
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def autocast_bf16():
  """PyTorch's mixed precision on a CPU: matmuls and convolutions in bfloat16, norms and softmax in float32."""
  return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_bf16_close(ours, torch_bf16, reference, what: str = "") -> tuple[float, float]:
  """Checks our bfloat16 output against the float32 `reference`, given PyTorch's bfloat16 output.

  Returns (our error, PyTorch's error), both relative to the reference's largest magnitude.
  """
  ours_err, torch_err = rel_err(ours, reference), rel_err(torch_bf16, reference)
  assert ours_err < min(BF16_RATIO * torch_err + 1e-3, BF16_CAP), f"{what}: bfloat16 error {ours_err:.4f}, PyTorch's {torch_err:.4f}"
  return ours_err, torch_err

