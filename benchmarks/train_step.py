"""Prints s/step and images/s of the U-Net training step in JAX and in PyTorch, and their ratio.

  PYTHONPATH=. python benchmarks/train_step.py [--steps=N] [--batch=4] [--size=32] \
      [--configs=tiny,320ch-768ctx] [--seconds=15] [--xla_flags=...] [--no-compare_xla_defaults]

What is timed is the U-Net + optimiser part of a training step, on precomputed inputs (no VAE,
no CLIP): noisy latents and image latents concatenated to [B, 8, size, size], timesteps,
instruction context [B, 77, D], reward scores [B, 3] and reward embeddings [B, D]; loss = MSE of
the predicted noise against the true noise; backward; global-norm clipping to 1.0; AdamW (lr 5e-5,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-2); float32 throughout, train mode (the MRC block's
dropout on) in both frameworks.

- JAX: `models.RewardUNet`, `value_and_grad`, the optimiser of `trainer.make_optimizer`
  (optax clip_by_global_norm + adamw), one `jax.jit` program with the state (params, optimiser
  state) donated. Compile time is printed separately (ahead-of-time `lower().compile()`); the
  matmul precision is JAX's default (float32 on CPU), nothing lower.
- Kernels: the U-Net's defaults (`ops.Kernels()`, all "auto"; `config.model.attention / conv /
  norm` in training).
- Convolutions: on a CPU, conv="auto" runs the wide float32 3x3 convolutions as Winograd
  F(4x4, 3x3) matmuls and 1x1 convolutions as matmuls (mre_jax/ops/conv.py). This took the 320ch
  step from 0.83x to 0.95x PyTorch's speed, and computing the Winograd tile transforms in two
  materialised passes to 1.01x; conv="xla" is XLA's own convolutions.
- Dense layers: token matmuls run as 2-D GEMMs on a CPU (ops/dense.py; 1.01x -> 1.09x), and the
  exact GELU uses PyTorch's erf form (1.10x).
- Attention and GroupNorm: on a CPU, `ops/cpu_kernels` (C++ through the XLA FFI, built on first use)
  runs every attention layer as one fused kernel (a 1024-token layer, forward + backward:
  ~100 ms, XLA's blocked kernel ~180 ms, PyTorch's SDPA ~110 ms) and every GroupNorm
  (1.10x -> 1.19x, then 1.22-1.27x in four runs with both kernels tuned). Adding XNNPACK dots
  (`-individual_dot` and `--xla_cpu_experimental_xnn_fusion_type=dot`, faster on some GEMMs
  alone) gave the same 3.41 s/step as the default flag in back-to-back runs.
- XLA flags: by default the JAX step runs with `--xla_cpu_experimental_ynn_fusion_type=
  -individual_convolution` added to $XLA_FLAGS (a user-settable flag, same float32 math). It
  routes the convolutions left to XLA to its Eigen kernels instead of YNNPACK, whose convolution
  gradients are ~2x slower here (a 640-channel 3x3 conv at 4x32x32, forward + both gradients:
  0.94 s with YNNPACK, 0.44 s with Eigen, 0.39 s in PyTorch/oneDNN). With Winograd doing the wide
  3x3 convolutions, the flag no longer changes the 320ch step. The row `jax[xla defaults]` times
  the same step with $XLA_FLAGS alone, in a child process (XLA reads its flags once per process).
  Flags tried that gave no consistent gain on the 2-core Xeon this was written on:
  --xla_cpu_use_onednn=true and --xla_cpu_experimental_onednn_custom_call=true (no effect: this
  jaxlib has no oneDNN convolutions), --xla_cpu_use_xnnpack=false,
  --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY,
  --xla_cpu_experimental_ynn_fusion_type=...,+eltwise (slower), --xla_cpu_use_fusion_emitters=false,
  --xla_cpu_prefer_vector_width=512; oneDNN dot fusions (--xla_cpu_experimental_onednn_fusion_type=
  dot) fail to compile. Fast-math flags are not used.
  Attention: the plain math materialises the [B*heads, 1024, 1024] scores (~0.5 s per
  32x32 self-attention layer, forward + backward); with attention="xla",
  `ops.attention.multi_head_attention` runs a blocked custom-VJP kernel in XLA ops for such layers
  (~0.18 s), which took this benchmark from 0.74x to 0.85x; the fused kernel above replaces it
  by default ("auto"). There are three such layers; they dominate the tiny config's step (its scores
  are as large as the 320-channel config's: 8 heads over 1024 tokens).
- PyTorch: `torch_twin.MRERewardUNet` (diffusers' UNet2DConditionModel + reward modules) holding
  the SAME weights (`export.unet_state_dict` of the JAX params, loaded strictly),
  `torch.optim.AdamW` (its default CPU implementation), `clip_grad_norm_(1.0)`, with
  `torch.set_num_threads(os.cpu_count())`.

Both run on the same machine, one after the other, after two warm-up steps; each timed run takes
about --seconds seconds unless --steps fixes the number of steps. Configs: `tiny` (`tiny.UNET`,
32-d context) and `320ch-768ctx` (SD 1.5's first two levels, 320/640 channels, 768-d context).
Before timing, a forward pass with dropout off checks that both frameworks compute the same loss.
The last line is `speedup_vs_pytorch=<PyTorch s/step / JAX s/step>` for 320ch-768ctx.
"""
import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

# XLA:CPU flag set by default (see the module docstring); --xla_flags="" runs with XLA's defaults.
TUNED_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per run (default: as many as fit in --seconds)")
  parser.add_argument("--batch", type=int, default=4, help="images per step")
  parser.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
  parser.add_argument("--seconds", type=float, default=15.0, help="target length of each timed run")
  parser.add_argument("--configs", default="tiny,320ch-768ctx", help="comma-separated: tiny, 320ch-768ctx")
  parser.add_argument("--xla_flags", default=TUNED_XLA_FLAGS,
                      help="XLA flags added to $XLA_FLAGS for the JAX step ('' = XLA's defaults)")
  parser.add_argument("--compare_xla_defaults", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the JAX step with $XLA_FLAGS alone, in a child process")
  parser.add_argument("--jax_only", action="store_true", help=argparse.SUPPRESS)  # the child process
  return parser.parse_args(argv)


if __name__ == "__main__":  # XLA reads its flags once, when jax starts its CPU backend
  ARGS = _parse_args()
  ENV_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join(f for f in (ENV_XLA_FLAGS, ARGS.xla_flags) if f)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from mre_jax import models  # noqa: E402
from mre_jax.io import export, torch_twin
from mre_jax.models import tiny
from mre_jax.train import trainer

CONFIGS = {
    "tiny": tiny.UNET,
    "320ch-768ctx": models.UNetConfig(
        block_out_channels=(320, 640), layers_per_block=1, attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=32),
}
OPTIM = dict(lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip_norm=1.0, warmup_steps=0)
WARMUP_STEPS = 2


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _inputs(cfg: models.UNetConfig, batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Precomputed step inputs (NHWC latents), float32."""
  r = np.random.default_rng(seed)
  f32 = lambda *shape: r.standard_normal(shape).astype(np.float32)
  return dict(
      noisy=f32(batch, size, size, 4), cond=f32(batch, size, size, 4), noise=f32(batch, size, size, 4),
      timesteps=r.integers(0, 1000, batch).astype(np.int32), context=f32(batch, 77, cfg.cross_attention_dim),
      scores=r.uniform(0, 5, (batch, 3)).astype(np.float32), reward_embeds=f32(batch, cfg.cross_attention_dim))


def _steps_for(seconds_per_step: float, args) -> int:
  return args.steps or max(3, math.ceil(args.seconds / max(seconds_per_step, 1e-6)))


# ----------------------------------------------------------------------------- JAX


def _jax_loss(params, x, rng, *, unet, train_mode):
  sample = jnp.concatenate([x["noisy"], x["cond"]], -1)
  eps = unet.apply({"params": params}, sample, x["timesteps"], x["context"], x["scores"], x["reward_embeds"],
                   train=train_mode, rngs={"dropout": rng} if train_mode else None)
  return jnp.mean((eps.astype(jnp.float32) - x["noise"]) ** 2)


def _jax_step(state, x, rng, *, unet, tx):
  params, opt_state, step = state
  loss, grads = jax.value_and_grad(functools.partial(_jax_loss, unet=unet, train_mode=True))(
      params, x, jax.random.fold_in(rng, step))
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state, step + 1), loss


def bench_jax(cfg, host_params, x, args):
  """(s/step, compile s, steps timed, loss of the forward check, last training loss)."""
  unet = models.RewardUNet(cfg, reward=True)
  tx = trainer.make_optimizer(ml_collections.ConfigDict(OPTIM))
  params = jax.device_put(host_params)
  state = (params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32))
  x = jax.device_put(x)
  rng = jax.random.PRNGKey(0)
  check = float(jax.jit(functools.partial(_jax_loss, unet=unet, train_mode=False))(params, x, rng))

  start = time.perf_counter()
  step = jax.jit(functools.partial(_jax_step, unet=unet, tx=tx), donate_argnums=0).lower(state, x, rng).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  for _ in range(WARMUP_STEPS):
    state, loss = step(state, x, rng)
  jax.block_until_ready((state, loss))
  n = _steps_for((time.perf_counter() - start) / WARMUP_STEPS, args)
  start = time.perf_counter()
  for _ in range(n):
    state, loss = step(state, x, rng)
  jax.block_until_ready((state, loss))
  return (time.perf_counter() - start) / n, compile_s, n, check, float(loss)


# ----------------------------------------------------------------------------- PyTorch


def bench_torch(cfg, host_params, x, args):
  """(s/step, steps timed, loss of the forward check, last training loss)."""
  twin = torch_twin.MRERewardUNet.from_config(cfg.to_diffusers())
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in export.unet_state_dict(host_params).items()}, strict=True)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  noisy, cond, noise = nchw(x["noisy"]), nchw(x["cond"]), nchw(x["noise"])
  t = torch.from_numpy(x["timesteps"].astype(np.int64))
  context, scores, embeds = (torch.from_numpy(x[k]) for k in ("context", "scores", "reward_embeds"))
  with torch.no_grad():
    out = twin.eval()(torch.cat([noisy, cond], 1), t, context, scores, embeds).sample
    check = float(torch.nn.functional.mse_loss(out, noise))

  twin.train()
  opt = torch.optim.AdamW(twin.parameters(), lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                          weight_decay=OPTIM["weight_decay"])

  def step():
    opt.zero_grad(set_to_none=True)
    out = twin(torch.cat([noisy, cond], 1), t, context, scores, embeds).sample
    loss = torch.nn.functional.mse_loss(out, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), OPTIM["clip_norm"])
    opt.step()
    return loss.detach()

  start = time.perf_counter()
  for _ in range(WARMUP_STEPS):
    step()
  n = _steps_for((time.perf_counter() - start) / WARMUP_STEPS, args)
  start = time.perf_counter()
  for _ in range(n):
    loss = step()
  return (time.perf_counter() - start) / n, n, check, float(loss)


# ----------------------------------------------------------------------------- main


def _jax_in_child(name, args):
  """JAX s/step of config `name` with $XLA_FLAGS as it was given (no --xla_flags), in a new process."""
  env = {**os.environ, "XLA_FLAGS": ENV_XLA_FLAGS}
  cmd = [sys.executable, os.path.abspath(__file__), "--jax_only", f"--configs={name}", f"--batch={args.batch}",
         f"--size={args.size}", f"--seconds={args.seconds}", f"--steps={args.steps}", "--xla_flags="]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(args):
  if args.jax_only:
    cfg = CONFIGS[args.configs]
    host_params = models.init_unet_params(models.RewardUNet(cfg, reward=True), seed=0)
    jax_s, compile_s, n, _, _ = bench_jax(cfg, host_params, _inputs(cfg, args.batch, args.size), args)
    print(json.dumps({"s": jax_s, "compile_s": compile_s, "steps": n}))
    return

  torch.set_num_threads(os.cpu_count())
  print(f"machine: {os.cpu_count()} cpus, {_cpu_model()}; load average {os.getloadavg()[0]:.2f}")
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device, default matmul "
        f"precision); torch {torch.__version__} (torch.set_num_threads(os.cpu_count()) -> "
        f"{torch.get_num_threads()} threads)")
  print(f"XLA_FLAGS: jax={os.environ['XLA_FLAGS']!r}" + (f", jax[xla defaults]={ENV_XLA_FLAGS!r}"
                                                         if args.compare_xla_defaults else ""))
  print(f"U-Net training step: batch {args.batch}, {args.size}x{args.size} latents, float32, "
        f"MSE + clip 1.0 + AdamW, {WARMUP_STEPS} warm-up steps", flush=True)

  rows, speedup = [], None
  for name in args.configs.split(","):
    cfg = CONFIGS[name]
    model = models.RewardUNet(cfg, reward=True)
    host_params = models.init_unet_params(model, seed=0)
    count = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(host_params))
    x = _inputs(cfg, args.batch, args.size)
    jax_s, compile_s, jax_n, jax_check, jax_loss = bench_jax(cfg, host_params, x, args)
    default = _jax_in_child(name, args) if args.compare_xla_defaults else None
    torch_s, torch_n, torch_check, torch_loss = bench_torch(cfg, host_params, x, args)
    ratio = torch_s / jax_s
    print(f"{name}: {count / 1e6:.1f}M params; JAX compile {compile_s:.1f} s"
          + (f" ({default['compile_s']:.1f} s with XLA defaults)" if default else "")
          + f"; forward check (dropout off) loss jax {jax_check:.6f} torch {torch_check:.6f}; timed steps jax "
          f"{jax_n}{'/' + str(default['steps']) if default else ''} torch {torch_n}; last training loss "
          f"jax {jax_loss:.4f} torch {torch_loss:.4f}", flush=True)
    rows.append((name, "jax", jax_s, f"{ratio:.2f}x"))
    if default:
      rows.append((name, "jax[xla defaults]", default["s"], f"{torch_s / default['s']:.2f}x"))
    rows.append((name, "pytorch", torch_s, ""))
    if name == "320ch-768ctx":
      speedup = ratio

  print(f"load average at the end: {os.getloadavg()[0]:.2f}")
  print(f"{'config':14s} {'framework':17s} {'s/step':>9s} {'images/s':>9s} {'speedup vs pytorch':>19s}")
  for name, framework, s, ratio in rows:
    print(f"{name:14s} {framework:17s} {s:9.4f} {args.batch / s:9.2f} {ratio:>19s}")
  print(f"speedup_vs_pytorch={speedup:.2f}" if speedup is not None else "speedup_vs_pytorch=nan")


if __name__ == "__main__":
  main(ARGS)
