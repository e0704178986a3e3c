"""Fused float32 attention for XLA:CPU, as an XLA FFI custom call (csrc/cpu_attention.cc).

XLA:CPU runs attention as separate matmul, exp and reduction ops; even blocked so that the scores
stay in cache (pretrained.py), a 1024-token self-attention layer takes ~1.8x PyTorch's fused CPU
kernel. This kernel does scores, softmax and the value product per block of query rows in one
pass, forward and backward (probabilities recomputed from the row logsumexp, as flash attention).

The C++ source is compiled on first use with the system C++ compiler ($CXX, else g++ or c++) for
this machine (-O3 -march=native) into a cache folder ($MRE_JAX_CACHE, else
~/.cache/mre_jax), keyed by the source, compiler, flags, jaxlib and CPU; a compile is written to
a temporary file and renamed, so concurrent processes never load a partial library. Where no
compiler is found or the build fails, `available()` is False (with a warning naming the reason)
and callers keep the XLA kernels. Nothing here runs on GPU or TPU.

Under SPMD sharding XLA does not know how to split the custom call, so it gathers the operands
and computes the whole attention on each device: correct, not faster. Training on one CPU
device (the case this kernel is for) is unaffected.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast")
MAX_HEAD_DIM = 160  # widest head the kernel's register tiles take in one pass (SD 1.5: 40-160)
_TARGETS = {"forward": "mre_cpu_attention_forward", "backward": "mre_cpu_attention_backward"}


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_signature() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def cache_dir() -> Path:
  return Path(os.environ.get("MRE_JAX_CACHE") or Path.home() / ".cache" / "mre_jax")


def build(compiler: str) -> Path:
  """Compiles the kernel library (or finds it in the cache); returns its path."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, jaxlib.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"cpu_attention-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, target)  # atomic: another process sees the whole library or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


@functools.cache
def available() -> bool:
  """True once the kernel library is built and registered with XLA:CPU (built on first call)."""
  if jax.default_backend() != "cpu":
    return False
  compiler = _compiler()
  if compiler is None:
    log.warning("no C++ compiler ($CXX, g++, c++): the fused CPU attention kernel is off")
    return False
  try:
    library = ctypes.CDLL(str(build(compiler)))
  except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
    log.warning("fused CPU attention kernel is off: %s", e)
    return False
  jax.ffi.register_ffi_target(_TARGETS["forward"], jax.ffi.pycapsule(library.MreAttentionForward), platform="cpu")
  jax.ffi.register_ffi_target(_TARGETS["backward"], jax.ffi.pycapsule(library.MreAttentionBackward), platform="cpu")
  return True


def supports(width: int, heads: int) -> bool:
  """Whether the kernel takes `heads` heads over `width` channels (head dim <= MAX_HEAD_DIM)."""
  return width % heads == 0 and width // heads <= MAX_HEAD_DIM


def _forward(q, k, v, heads):
  b, t, width = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, heads, t), jnp.float32))
  call = jax.ffi.ffi_call(_TARGETS["forward"], out_types, vmap_method="sequential")
  return call(q, k, v, heads=np.int64(heads), scale=np.float32((width // heads) ** -0.5))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head: q [B, T, heads*d], k and v [B, S, heads*d] float32.

  Call only where `available()` and `supports(width, heads)` are true.
  """
  return _forward(q, k, v, heads)[0]


def _attention_fwd(q, k, v, heads):
  out, lse = _forward(q, k, v, heads)
  return out, (q, k, v, out, lse)


def _attention_bwd(heads, res, d_out):
  q, k, v, out, lse = res
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  call = jax.ffi.ffi_call(_TARGETS["backward"], out_types, vmap_method="sequential")
  return call(q, k, v, out, lse, d_out.astype(jnp.float32), heads=np.int64(heads),
              scale=np.float32((q.shape[-1] // heads) ** -0.5))


attention.defvjp(_attention_fwd, _attention_bwd)
