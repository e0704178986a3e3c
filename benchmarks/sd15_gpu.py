"""Full-size SD 1.5 figures on one accelerator: training images/s and MFU, seconds per edit.

  PYTHONPATH=. python benchmarks/sd15_gpu.py [--runs=RUN,RUN,...] [--budget=SECONDS] [--out=FILE]
  PYTHONPATH=. python benchmarks/sd15_gpu.py --tiny    # dry run of every code path on a CPU

Models: the InstructPix2Pix SD 1.5 reward U-Net (860M parameters + reward modules), the SD 1.5
VAE and the CLIP ViT-L/14 text encoder, at their real sizes with random weights (PyTorch-style
init, `weights.init_like_torch`): speed does not depend on the values, and no weights are
downloaded. `--tiny` swaps in the tiny models of `mre_jax.models.tiny`.

Runs (each in its own child process, so one that fails or runs out of memory costs only itself):
- `train:B:remat|noremat:ATTN`: `trainer.train_step` exactly as the train job jits it, on a
  latent-cache batch (precomputed VAE latents and CLIP outputs, `config.data.latent_cache`):
  256 px (32x32 latents), batch B, bfloat16 compute, float32 params / AdamW state / EMA,
  conditioning dropout, state donated. Before running, the compiled program's memory estimate
  is checked against the device's limit ("does not fit" instead of an out-of-memory crash).
  Timed like the train loop (metrics fetched every step), after 2 warm-up steps. B = `max`: the
  largest multiple of 8 that the memory estimate of the last fitting run with the same settings
  allows (the largest batch that fits, without a search).
  MFU = 3 x (U-Net forward FLOPs, XLA's count of the unoptimised program with XLA attention)
  per step / step time / the chip's dense bf16 peak; remat's recomputation is not counted.
- `edit:B:ATTN`: the editor's jitted sampler (`edit.sampler`: VAE encode, 30 Euler ancestral
  steps with 3-way guidance, one batched U-Net call per step, VAE decode) at 512x512, batch B,
  U-Net in bfloat16 (VAE and text encoder float32), compiled ahead of time (compile time
  printed separately), then timed with text encoding and the host transfer included.
ATTN is the attention kernel family of the U-Net, VAE and text encoder (`ops.Kernels.attention`,
`config.model.attention`): auto (cuDNN flash attention for bfloat16 self-attention on a GPU), xla
(XLA's ops: [B, heads, T, S] score matrices) or cudnn (every layer). `attention_resolved` is
what the first level's self-attention layer runs.

`--report=FILE` prints a results file as tables, filling in MFU where the device gave no FLOP count
(counting FLOPs needs only the program, so any machine can do it).

Runs go in the order given, and a run is not started once --budget seconds have passed. If an
`auto` run fails, it is run again with xla attention, and so are the `auto` runs after it.
One JSON line per run goes to --out.
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_RUNS = ("train:32:noremat:auto,edit:1:auto,edit:8:auto,train:max:noremat:auto,"
                "train:32:noremat:xla,edit:8:xla")
TINY_RUNS = "train:4:noremat:auto,train:max:noremat:auto,train:4:remat:xla,edit:1:auto,edit:2:xla"
# Dense bfloat16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

SD15_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "sample_size": 512, "scaling_factor": 0.18215,
}
CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default=None, help=f"comma-separated runs (default: {DEFAULT_RUNS})")
  parser.add_argument("--budget", type=float, default=420.0, help="no run starts after this many seconds")
  parser.add_argument("--seconds", type=float, default=8.0, help="least timed seconds per run")
  parser.add_argument("--size", type=int, default=0, help="edit image side (default 512; tiny 64)")
  parser.add_argument("--train_size", type=int, default=0, help="training image side (default 256; tiny 64)")
  parser.add_argument("--steps", type=int, default=30, help="denoising steps per edit")
  parser.add_argument("--out", default="", help="append one JSON line per run here")
  parser.add_argument("--tiny", action="store_true", help="tiny models (a CPU dry run)")
  parser.add_argument("--limit_gib", type=float, default=0.0, help="memory limit (default: the device's)")
  parser.add_argument("--report", default="", help="print a table of a results file (adds missing MFU)")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ----------------------------------------------------------------------------- models


def _configs(tiny_models: bool):
  """(U-Net config, VAE config, text encoder config): SD 1.5 InstructPix2Pix, or the tiny ones."""
  from mre_jax import models
  from mre_jax.models import tiny
  unet_cfg = tiny.UNET if tiny_models else models.UNetConfig()  # the defaults are SD 1.5 InstructPix2Pix
  vae_cfg = tiny.VAE if tiny_models else SD15_VAE
  text_cfg = tiny.text_config(49408) if tiny_models else CLIP_L
  return unet_cfg, vae_cfg, text_cfg


def _tokenizer(tmp):
  from pathlib import Path

  from mre_jax.io import pretrained
  from mre_jax.models import tiny
  tiny.write_tokenizer(Path(tmp) / "tokenizer")
  return pretrained.load_tokenizer(tmp)


def _mean_seconds(fn, least_calls, least_seconds):
  start, calls = time.perf_counter(), 0
  while calls < least_calls or time.perf_counter() - start < least_seconds:
    fn()
    calls += 1
  return (time.perf_counter() - start) / calls, calls


def unet_forward_flops(unet, params, batch: int, latent: int) -> float:
  """XLA's FLOP count of one U-Net forward at [batch, latent, latent, 8] (NaN if unavailable).

  Counted on the unoptimised program lowered for the CPU (the GPU backend gives no count for a
  lowered program), with XLA attention, so that no FLOPs hide in a cuDNN custom call.
  """
  import dataclasses

  import jax
  import jax.numpy as jnp
  d = unet.config.cross_attention_dim
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  unet = unet.clone(kernels=dataclasses.replace(unet.kernels, attention="xla"))
  try:
    fn = jax.jit(lambda p, x, t, c, s, e: unet.apply({"params": p}, x, t, c, s, e))
    traced = fn.trace(jax.tree_util.tree_map(lambda x: spec(*x.shape), params), spec(batch, latent, latent, 8),
                      jax.ShapeDtypeStruct((batch,), jnp.int32), spec(batch, 77, d), spec(batch, 3), spec(batch, d))
    cost = traced.lower(lowering_platforms=("cpu",)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
  except Exception:  # the cost API differs across JAX versions
    return float("nan")


def _resolved(attention: str, unet_cfg, latent: int) -> str:
  """The kernel the first level's self-attention layer runs (bfloat16, latent x latent tokens)."""
  import jax.numpy as jnp

  from mre_jax.ops import attention as attention_ops
  width, heads = unet_cfg.block_out_channels[0], unet_cfg.attention_head_dim
  heads = heads[0] if isinstance(heads, (list, tuple)) else heads
  return attention_ops.resolve(attention, jnp.bfloat16, t=latent**2, s=latent**2, head_dim=width // heads)


def _peak(device) -> float | None:
  return next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)


LIMIT_GIB = [0.0]  # --limit_gib


def _memory(compiled, device) -> dict:
  """XLA's memory estimate of a compiled program and the device's limit, in GiB (NaN: unknown)."""
  gib = lambda x: round(x / 2**30, 2)
  try:
    mem = compiled.memory_analysis()
    need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    out = dict(need_gib=gib(need), temp_gib=gib(mem.temp_size_in_bytes), arg_gib=gib(mem.argument_size_in_bytes))
  except Exception:  # not every backend reports memory
    return dict(need_gib=float("nan"), fits=True)
  limit = LIMIT_GIB[0] * 2**30 or (device.memory_stats() or {}).get("bytes_limit")
  return dict(out, limit_gib=gib(limit) if limit else float("nan"), fits=not limit or need <= 0.97 * limit)


def _largest_batch(result: dict) -> int | None:
  """The largest multiple of 8 whose estimate fits, scaling the temporaries of a measured run.

  Temporaries (activations, gradients, optimiser scratch) are taken as proportional to the batch,
  which overestimates them (gradients do not grow), so the answer errs on the small side.
  """
  try:
    room = 0.95 * result["limit_gib"] - result["arg_gib"]
    per_example = result["temp_gib"] / result["batch"]
    return int(room / per_example) // 8 * 8 or None
  except (KeyError, TypeError, ZeroDivisionError, ValueError):
    return None


# ----------------------------------------------------------------------------- runs


def run_train(batch: int, remat: bool, attention: str, args) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import train as train_config
  from mre_jax import models, ops
  from mre_jax.infer import diffusion
  from mre_jax.io import pretrained, weights
  from mre_jax.train import trainer
  size = (args.train_size or (64 if args.tiny else 256)) // 8
  unet_cfg, _, text_cfg = _configs(args.tiny)
  config = train_config.get_config("sd15")
  config.batch_size, config.grad_accum_steps, config.model.remat = batch, 1, remat
  config.model.attention = attention
  kernels = ops.Kernels.from_config(config.model, "config.model")
  unet = models.RewardUNet(unet_cfg, reward=True, dtype=jnp.bfloat16, remat=remat, kernels=kernels)
  text = pretrained.make_text_encoder(text_cfg, jnp.bfloat16, kernels)
  frozen = trainer.Frozen(vae=None, text_encoder=text, tokenizer=None, scaling_factor=0.18215)
  t0 = time.perf_counter()
  host = models.init_unet_params(unet, 0)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(host))
  tx = trainer.make_optimizer(config.optim)
  params, ema = jax.device_put(host), jax.device_put(host)
  del host
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, ema, jax.jit(tx.init)(params))
  fparams = {"vae": {}, "text": jax.device_put(weights.init_like_torch(pretrained.text_encoder_param_shapes(text), 1)),
             "empty_ids": np.zeros((1, 77), np.int32)}
  init_s = time.perf_counter() - t0

  r = np.random.default_rng(0)
  f32 = lambda *shape: jnp.asarray(r.standard_normal(shape).astype(np.float32))
  d = unet_cfg.cross_attention_dim
  batch_data = dict(latent_mean=f32(batch, size, size, 4), latent_logvar=f32(batch, size, size, 4) - 4,
                    cond=f32(batch, size, size, 4), context=f32(batch, 77, d), reward_embeds=f32(batch, d),
                    scores=jnp.asarray(r.uniform(0, 5, (batch, 3)).astype(np.float32)))
  rng = jax.random.PRNGKey(0)

  fwd_flops = unet_forward_flops(unet, params, batch, size)

  step_fn = jax.jit(functools.partial(trainer.train_step, unet=unet, frozen=frozen, tx=tx,
                                      schedule=diffusion.make_schedule(), config=config), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_data, fparams, rng).compile()
  compile_s = time.perf_counter() - t0
  device = jax.devices()[0]
  out = dict(run="train", batch=batch, remat=remat, attention=attention,
             attention_resolved=_resolved(attention, unet_cfg, size), latent=size,
             params_m=round(n_params / 1e6, 1), init_s=round(init_s, 1), compile_s=round(compile_s, 1),
             **_memory(compiled, device))
  if not out["fits"]:
    return out
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch_data, fparams, rng)
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"loss {loss}")
  for _ in range(2):
    step()
  step_s, steps = _mean_seconds(step, 5, args.seconds)
  peak = _peak(device)
  model_flops = 3 * fwd_flops
  out.update(step_s=round(step_s, 4), steps=steps, images_per_s=round(batch / step_s, 1),
             tflops_per_s=round(model_flops / step_s / 1e12, 1),
             mfu=None if peak is None else round(model_flops / step_s / peak, 3), peak_tflops=peak and peak / 1e12)
  return out


def run_edit(batch: int, attention: str, args) -> dict:
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mre_jax import models, ops
  from mre_jax.infer import edit
  from mre_jax.io import export, pretrained, weights
  size = args.size or (64 if args.tiny else 512)
  unet_cfg, vae_cfg, text_cfg = _configs(args.tiny)
  kernels = ops.Kernels(attention=attention)
  t0 = time.perf_counter()
  unet = models.RewardUNet(unet_cfg, reward=True, dtype=jnp.bfloat16, kernels=kernels)
  vae = pretrained.make_vae(vae_cfg, kernels=kernels)
  text = pretrained.make_text_encoder(text_cfg, kernels=kernels)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = _tokenizer(tmp)
  editor = edit.Editor(
      unet, jax.device_put(models.init_unet_params(unet, 0)), vae,
      jax.device_put(weights.init_like_torch(pretrained.vae_param_shapes(vae), 1)), 0.18215, text,
      jax.device_put(weights.init_like_torch(pretrained.text_encoder_param_shapes(text), 2)), tokenizer, export.SCHEDULER_CONFIG,
      "random SD 1.5")
  init_s = time.perf_counter() - t0
  r = np.random.default_rng(0)
  pixels = r.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  prompts = [("make it blue", "add snow", "turn the sky red", "make it a painting")[i % 4] for i in range(batch)]
  guidance = np.asarray([7.5, 1.5], np.float32)
  cond = edit.make_conditioning(editor, pixels, prompts, seeds=range(batch))
  t0 = time.perf_counter()
  compiled = edit.sampler(editor, args.steps, "euler_ancestral").lower(
      editor.unet_params, editor.vae_params, cond, guidance).compile()
  compile_s = time.perf_counter() - t0
  finite_all = [True]

  def call():
    c = edit.make_conditioning(editor, pixels, prompts, seeds=range(batch))
    images, finite = compiled(editor.unet_params, editor.vae_params, c, guidance)
    np.asarray(images)
    finite_all[0] &= bool(np.all(np.asarray(finite)))
  call()
  call_s, calls = _mean_seconds(call, 3, args.seconds)
  return dict(run="edit", batch=batch, attention=attention,
              attention_resolved=_resolved(attention, unet_cfg, size // 8), size=size, steps=args.steps,
              init_s=round(init_s, 1), compile_s=round(compile_s, 1), s_per_call=round(call_s, 3),
              s_per_edit=round(call_s / batch, 3), calls=calls, finite=finite_all[0])


def child(spec: str, args) -> dict:
  import jax
  kind, *fields = spec.split(":")
  if kind == "train":
    out = run_train(int(fields[0]), fields[1] == "remat", fields[2], args)
  elif kind == "edit":
    out = run_edit(int(fields[0]), fields[1], args)
  else:
    raise ValueError(f"run {spec!r}: expected train:B:remat|noremat:ATTN or edit:B:ATTN")
  return dict(spec=spec, device=jax.devices()[0].device_kind, jax=jax.__version__, **out)


def report(path: str, tiny_models: bool) -> None:
  """Markdown tables of a results file; MFU missing from a run is filled in from this machine's count."""
  import jax.numpy as jnp

  from mre_jax import models
  results = [json.loads(line) for line in open(path) if line.strip()]
  unet = models.RewardUNet(_configs(tiny_models)[0], reward=True, dtype=jnp.bfloat16)
  shapes = None
  print("| run | device | batch | remat | attention | compile s | s/step | images/s | model TFLOP/s | MFU |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in results:
    if r.get("run") != "train" or not r.get("fits"):
      continue
    if r.get("mfu") is None or r["mfu"] != r["mfu"]:  # missing or NaN
      shapes = shapes or models.unet_param_shapes(unet)
      flops = 3 * unet_forward_flops(unet, shapes, r["batch"], r["latent"])
      r["tflops_per_s"] = round(flops / r["step_s"] / 1e12, 1)
      r["mfu"] = round(flops / r["step_s"] / (r["peak_tflops"] * 1e12), 3) if r.get("peak_tflops") else None
    print(f"| {r['spec']} | {r['device']} | {r['batch']} | {r['remat']} | {r['attention_resolved']} | "
          f"{r['compile_s']} | {r['step_s']} | {r['images_per_s']} | {r['tflops_per_s']} | {r['mfu']} |")
  print("\n| run | device | batch | size | steps | attention | compile s | s/call | s/edit | finite |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in results:
    if r.get("run") == "edit":
      print(f"| {r['spec']} | {r['device']} | {r['batch']} | {r['size']} | {r['steps']} | {r['attention_resolved']} | "
            f"{r['compile_s']} | {r['s_per_call']} | {r['s_per_edit']} | {r['finite']} |")


def main(args) -> None:
  LIMIT_GIB[0] = args.limit_gib
  if args.report:
    report(args.report, args.tiny)
    return
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args)), flush=True)
    return
  runs = (args.runs or (TINY_RUNS if args.tiny else DEFAULT_RUNS)).split(",")
  start = time.perf_counter()
  passthrough = [a for a in sys.argv[1:] if not a.startswith(("--runs", "--out", "--budget"))]
  measured = {}  # (remat, attention) -> the last train result that fitted
  fallback = False  # set once an `auto` run failed: later ones run with xla attention
  queue = list(runs)
  while queue:
    spec = queue.pop(0)
    if fallback and spec.endswith(":auto"):
      spec = spec[:-len("auto")] + "xla"
    kind, *fields = spec.split(":")
    if kind == "train" and fields[0] == "max":  # train:max:...: the largest batch the last estimate allows
      batch = _largest_batch(measured.get(tuple(fields[1:]), {}))
      if batch is None:
        print(f"{spec}: skipped (no earlier fitting train run with {':'.join(fields[1:])})", flush=True)
        continue
      spec = ":".join([kind, str(batch), *fields[1:]])
    elapsed = time.perf_counter() - start
    if elapsed > args.budget:
      print(f"{spec}: not started ({elapsed:.0f} s > --budget {args.budget:.0f} s)", flush=True)
      continue
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={spec}", *passthrough],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
      result = json.loads(lines[-1][len("RESULT "):])
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
      result = dict(spec=spec, error=f"exit {proc.returncode}: " + " | ".join(tail)[-1500:])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if "error" in result and spec.endswith(":auto") and not fallback:
      fallback = True  # e.g. no cuDNN flash attention for these shapes: the same run with xla next
      queue.insert(0, spec)
    if kind == "train" and result.get("fits"):
      measured[tuple(spec.split(":")[2:])] = result
    print(json.dumps(result), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(_parse_args())
