"""Dense layer (models/layers.py over ops/dense.py) against flax's own Dense, and where the models use it."""

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from mre_jax import models
from mre_jax.io import pretrained
from mre_jax.models import layers, tiny
from mre_jax.ops import dense


def _dots(jaxpr):
  """Every dot_general equation in `jaxpr` and its sub-jaxprs (scan, while, remat, custom_vjp...)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jex.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


def _operand_ranks(fn, *args):
  """(lhs rank, rhs rank, has batch dims) of every dot_general `fn` traces to."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [(e.invars[0].aval.ndim, e.invars[1].aval.ndim, bool(e.params["dimension_numbers"][1][0]))
          for e in _dots(jaxpr)]


def test_dense_matches_linen_dense_value_and_gradients_with_2d_matmuls(rng):
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 7)), jnp.float32)
  ours, ref = layers.Dense(4), nn.Dense(4)
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  for got, want in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
                       jax.tree.leaves(jax.grad(loss(ref), argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # forward and both gradients are 2-D matmuls; linen's own Dense contracts a rank-4 operand
  assert set(_operand_ranks(jax.grad(loss(ours), argnums=(0, 1)), params, x)) == {(2, 2, False)}
  assert (4, 2, False) in _operand_ranks(loss(ref), params, x)


def test_dense_leaves_batched_and_other_products_to_lax():
  a, b = jnp.zeros((3, 4, 5)), jnp.zeros((3, 5, 6))
  batched = lambda a, b: dense.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))
  assert _operand_ranks(batched, a, b) == [(3, 3, True)]
  first_axis = lambda a, w: dense.dot_general(a, w, (((0,), (0,)), ((), ())))  # contracts lhs axis 0
  assert _operand_ranks(first_axis, a, jnp.zeros((3, 2))) == [(3, 2, False)]


def test_unet_vae_and_text_encoder_dense_layers_are_2d_matmuls():
  """Attention and feed-forward layers and the reward modules all go through layers.Dense."""
  model = models.RewardUNet(tiny.UNET)
  params = models.unet_param_shapes(model)
  args = (jnp.zeros((2, 8, 8, 8)), jnp.zeros((2,)), jnp.zeros((2, 77, 32)), jnp.zeros((2, 3)), jnp.zeros((2, 32)))
  loss = lambda p: jnp.sum(model.apply({"params": p}, *args))
  ranks = _operand_ranks(jax.grad(loss), params)
  weights = [(lhs, rhs) for lhs, rhs, batched in ranks if rhs == 2 and not batched]
  # q/k/v/out of 2 self- + 2 cross-attention layers, 2 GEGLU layers, reward modules... forward and backward
  assert len(weights) > 50
  assert all(lhs == 2 for lhs, _ in weights), sorted(set(weights))
  vae = pretrained.make_vae(tiny.VAE)
  image = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  vae_ranks = _operand_ranks(lambda p, x: vae.apply({"params": p}, x), pretrained.vae_param_shapes(vae), image)
  vae_weights = [lhs for lhs, rhs, batched in vae_ranks if rhs == 2 and not batched]
  assert vae_weights and set(vae_weights) == {2}  # the mid-block attention's query/key/value/proj
  text = pretrained.make_text_encoder(tiny.text_config(100))
  ids = jax.ShapeDtypeStruct((2, 77), jnp.int32)
  text_ranks = _operand_ranks(lambda p, x: text.apply({"params": p}, x), pretrained.text_encoder_param_shapes(text), ids)
  text_weights = [lhs for lhs, rhs, batched in text_ranks if rhs == 2 and not batched]
  assert len(text_weights) == 2 * 6 and set(text_weights) == {2}  # q, k, v, out, fc1, fc2 of 2 layers
