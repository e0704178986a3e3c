"""Prints s/step and images/s of the U-Net training step in JAX and in PyTorch, and their ratio.

  PYTHONPATH=. python benchmarks/train_step.py [--steps=N] [--batch=4] [--size=32] \
      [--configs=tiny,320ch-768ctx] [--seconds=15]

What is timed is the U-Net + optimiser part of a training step, on precomputed inputs (no VAE,
no CLIP): noisy latents and image latents concatenated to [B, 8, size, size], timesteps,
instruction context [B, 77, D], reward scores [B, 3] and reward embeddings [B, D]; loss = MSE of
the predicted noise against the true noise; backward; global-norm clipping to 1.0; AdamW (lr 5e-5,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-2); float32 throughout, train mode (the MRC block's
dropout on) in both frameworks.

- JAX: `models.RewardUNet`, `value_and_grad`, the optimiser of `train.make_optimizer`
  (optax clip_by_global_norm + adamw), one `jax.jit` program with the state (params, optimiser
  state) donated. Compile time is printed separately (ahead-of-time `lower().compile()`); the
  matmul precision is JAX's default (float32 on CPU), nothing lower.
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
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from mre_jax import export, models, tiny, torch_twin, train  # noqa: E402

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
  tx = train.make_optimizer(ml_collections.ConfigDict(OPTIM))
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
  sample = torch.cat([nchw(x["noisy"]), nchw(x["cond"])], 1)  # concatenated inside the step below
  noisy, cond, noise = nchw(x["noisy"]), nchw(x["cond"]), nchw(x["noise"])
  t = torch.from_numpy(x["timesteps"].astype(np.int64))
  context, scores, embeds = (torch.from_numpy(x[k]) for k in ("context", "scores", "reward_embeds"))
  with torch.no_grad():
    check = float(torch.nn.functional.mse_loss(twin.eval()(sample, t, context, scores, embeds).sample, noise))

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per run (default: as many as fit in --seconds)")
  parser.add_argument("--batch", type=int, default=4, help="images per step")
  parser.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
  parser.add_argument("--seconds", type=float, default=15.0, help="target length of each timed run")
  parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
  args = parser.parse_args()

  torch.set_num_threads(os.cpu_count())
  print(f"machine: {os.cpu_count()} cpus, {_cpu_model()}; load average {os.getloadavg()[0]:.2f}")
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device, default matmul "
        f"precision, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch {torch.__version__} "
        f"(torch.set_num_threads(os.cpu_count()) -> {torch.get_num_threads()} threads)")
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
    torch_s, torch_n, torch_check, torch_loss = bench_torch(cfg, host_params, x, args)
    ratio = torch_s / jax_s
    print(f"{name}: {count / 1e6:.1f}M params; JAX compile {compile_s:.1f} s; forward check (dropout off) loss "
          f"jax {jax_check:.6f} torch {torch_check:.6f}; timed steps jax {jax_n} torch {torch_n}; "
          f"last training loss jax {jax_loss:.4f} torch {torch_loss:.4f}", flush=True)
    rows.append((name, "jax", jax_s, args.batch / jax_s, ""))
    rows.append((name, "pytorch", torch_s, args.batch / torch_s, f"{ratio:.2f}x"))
    if name == "320ch-768ctx":
      speedup = ratio

  print(f"{'config':14s} {'framework':9s} {'s/step':>9s} {'images/s':>9s} {'speedup (torch/jax)':>20s}")
  for name, framework, s, ips, ratio in rows:
    print(f"{name:14s} {framework:9s} {s:9.4f} {ips:9.2f} {ratio:>20s}")
  print(f"speedup_vs_pytorch={speedup:.2f}" if speedup is not None else "speedup_vs_pytorch=nan")


if __name__ == "__main__":
  main()
