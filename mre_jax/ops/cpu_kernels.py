"""Float32 kernels for XLA:CPU as XLA FFI custom calls (csrc/cpu_kernels.cc): attention, GroupNorm.

- `attention`: XLA:CPU runs attention as separate matmul, exp and reduction ops; even blocked so
  that the scores stay in cache (attention.py), a 1024-token self-attention layer took ~1.7x
  PyTorch's fused CPU kernel. This kernel does scores, softmax and the value product per block of
  query rows in one pass, forward and backward (probabilities recomputed from the row
  logsumexp, as flash attention).
- `group_norm`: XLA's GroupNorm (flax's, with autodiff) took 3-4x PyTorch's time; this one reads
  the input twice for the statistics and once to normalise, and its backward three times.

The C++ source is compiled on first use with the system C++ compiler ($CXX, else g++ or c++) for
this machine (-O3 -march=native) into a cache folder ($MRE_JAX_CACHE, else
~/.cache/mre_jax), keyed by the source, compiler, flags, jaxlib and CPU; a compile goes to a
temporary folder and into the cache through the atomic file writer (mre_jax.io.files), so
concurrent processes never load a partial library. Where no compiler is found or the build fails,
`available()` is False (with a warning naming the reason) and callers keep the XLA kernels.
Nothing here runs on GPU or TPU.

Under SPMD sharding XLA does not know how to split a custom call, so it gathers the operands
and runs the whole op on each device: correct, not faster. Training on one CPU device (the case
these kernels are for) is unaffected.
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

from mre_jax.io import files

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast")
MAX_HEAD_DIM = 160  # widest head the kernel's register tiles take in one pass (SD 1.5: 40-160)
# FFI target name -> symbol in the library
_TARGETS = {"mre_cpu_attention_forward": "MreAttentionForward", "mre_cpu_attention_backward": "MreAttentionBackward",
            "mre_cpu_group_norm_forward": "MreGroupNormForward", "mre_cpu_group_norm_backward": "MreGroupNormBackward"}


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
  target = cache_dir() / f"cpu_kernels-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as build_dir:
    library = Path(build_dir) / target.name
    cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    files.write_atomic(target, library.read_bytes())  # another process sees the whole library or none
  return target


@functools.cache
def available() -> bool:
  """True once the kernel library is built and registered with XLA:CPU (built on first call)."""
  if jax.default_backend() != "cpu":
    return False
  compiler = _compiler()
  if compiler is None:
    log.warning("no C++ compiler ($CXX, g++, c++): the CPU kernels are off (XLA's ops run instead)")
    return False
  try:
    library = ctypes.CDLL(str(build(compiler)))
  except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
    log.warning("the CPU kernels are off (XLA's ops run instead): %s", e)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def supports_attention(width: int, heads: int) -> bool:
  """Whether the kernel takes `heads` heads over `width` channels (head dim <= MAX_HEAD_DIM)."""
  return width % heads == 0 and width // heads <= MAX_HEAD_DIM


def _attention_attrs(width: int, heads: int) -> dict:
  """The kernels' attributes: heads, and the softmax scale 1/sqrt(head dim)."""
  return {"heads": np.int64(heads), "scale": np.float32((width // heads) ** -0.5)}


def _forward(q, k, v, heads):
  b, t, width = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, heads, t), jnp.float32))
  call = jax.ffi.ffi_call("mre_cpu_attention_forward", out_types, vmap_method="sequential")
  return call(q, k, v, **_attention_attrs(width, heads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head: q [B, T, heads*d], k and v [B, S, heads*d] float32.

  Call only where `available()` and `supports_attention(width, heads)` are true.
  """
  return _forward(q, k, v, heads)[0]


def _attention_fwd(q, k, v, heads):
  out, lse = _forward(q, k, v, heads)
  return out, (q, k, v, out, lse)


def _attention_bwd(heads, res, d_out):
  q, k, v, out, lse = res
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  call = jax.ffi.ffi_call("mre_cpu_attention_backward", out_types, vmap_method="sequential")
  return call(q, k, v, out, lse, d_out.astype(jnp.float32), **_attention_attrs(q.shape[-1], heads))


attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- GroupNorm


def _norm_forward(x, scale, bias, groups, epsilon):
  b, n, c = x.shape
  stats = jax.ShapeDtypeStruct((b, groups), jnp.float32)
  call = jax.ffi.ffi_call("mre_cpu_group_norm_forward", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
                          vmap_method="sequential")
  return call(x, scale, bias, groups=np.int64(groups), epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, groups, epsilon):
  return _norm_forward(x, scale, bias, groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon):
  y, mean, rstd = _norm_forward(x, scale, bias, groups, epsilon)
  return y, (x, scale, mean, rstd)


def _group_norm_bwd(groups, epsilon, res, dy):
  del epsilon  # in rstd
  x, scale, mean, rstd = res
  b, _, c = x.shape
  out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((b, c), jnp.float32),
               jax.ShapeDtypeStruct((b, c), jnp.float32))
  call = jax.ffi.ffi_call("mre_cpu_group_norm_backward", out_types, vmap_method="sequential")
  dx, dscale, dbias = call(x, dy, scale, mean, rstd, groups=np.int64(groups))
  return dx, jnp.sum(dscale, axis=0), jnp.sum(dbias, axis=0)  # per-example partial sums


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float) -> jax.Array:
  """GroupNorm over all axes but the first (batch) and last (channels): x [B, ..., C] float32.

  Statistics per (example, group of C / groups channels); biased variance, like PyTorch and flax.
  Call only where `available()` is true.
  """
  shape = x.shape
  flat = x.reshape(shape[0], -1, shape[-1])
  return _group_norm(flat, scale, bias, groups, epsilon).reshape(shape)
