"""8-bit state on a device mesh: the layout keeps the params' sharding, no collectives.

conftest.py gives 8 simulated CPU devices.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import dualoptax
from dualoptax import QuantizedArray

_COLLECTIVE = re.compile(
    r"=\s*([^=]+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\(")

LAYOUTS = {
    "fsdp_rows": ((8,), ("data",), P("data", None)),
    "fsdp_cols": ((8,), ("model",), P(None, "model")),
    "mesh_2d": ((2, 4), ("data", "model"), P("data", "model")),
}


def _mesh(layout):
  shape, names, spec = LAYOUTS[layout]
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices; run under tests/conftest.py")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), names)
  return mesh, NamedSharding(mesh, spec)


def _params(sharding, shape=(64, 2048)):
  ps = {"a": jnp.linspace(-1, 1, shape[0] * shape[1]).reshape(shape),
        "b": jnp.cos(jnp.arange(shape[0] * shape[1], dtype=jnp.float32)).reshape(shape)}
  return jax.device_put(ps, sharding)


def _compiled_step(tx, params, state, multi):
  def step(p, s, g):
    u, s = tx.update({"forget": g} if multi else g, s, p)
    return optax.apply_updates(p, u), s
  lowered = jax.jit(step).lower(params, state, params)
  return lowered.compile()


def _collectives(compiled):
  """``[(result type, op)]`` of every collective in the compiled HLO."""
  return [(m.group(1), m.group(2)) for m in _COLLECTIVE.finditer(compiled.as_text())]


def _check_state_sharding(state, param_sharding):
  qs = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray))
        if isinstance(x, QuantizedArray)]
  assert qs
  spec = tuple(param_sharding.spec)
  for q in qs:
    # Codes keep the parameter's shape and sharding; absmax [..., n / b] is split
    # the same way (each shard holds the absmax of its own blocks).
    assert q.codes.sharding.is_equivalent_to(param_sharding, q.codes.ndim)
    assert q.absmax.sharding.is_equivalent_to(
        NamedSharding(param_sharding.mesh, P(*spec)), q.absmax.ndim)
  return qs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adam_8bit_update_has_no_collectives(layout):
  _, sharding = _mesh(layout)
  params = _params(sharding)
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  state = tx.init(params)
  qs = _check_state_sharding(state, sharding)
  assert qs[0].codes.shape == (64, 2048) and qs[0].absmax.shape == (64, 8)
  assert qs[0].block_size == 256
  compiled = _compiled_step(tx, params, state, multi=False)
  assert _collectives(compiled) == []
  # Control: bitsandbytes' layout (flatten the tensor, then cut blocks) does need
  # collectives on a column-sharded array, and the checker sees them.
  if layout == "fsdp_cols":
    flat = jax.jit(lambda x: jnp.max(jnp.abs(x.reshape(-1, 256 * 64)), -1))
    assert _collectives(flat.lower(params["a"]).compile())
  # The updated state comes back with the same sharding (no resharding later).
  new_p, new_s = compiled(params, state, params)
  _check_state_sharding(new_s, sharding)
  assert new_p["a"].sharding.is_equivalent_to(sharding, 2)
  # And it computes what the unsharded wrapper computes.
  host = jax.tree.map(np.asarray, params)
  p1, s1 = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))(host, tx.init(host), host)
  for x, y in zip(jax.tree.leaves((new_p, new_s)), jax.tree.leaves((p1, s1))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dual_optim_plus_8bit_sharded(layout):
  _, sharding = _mesh(layout)
  params = _params(sharding)
  # Without the finiteness check: no collective at all.
  tx = dualoptax.dual_optim_plus_8bit(1e-3, skip_nonfinite=False)
  state = tx.init(params)
  _check_state_sharding(state, sharding)
  assert _collectives(_compiled_step(tx, params, state, multi=True)) == []
  # Default (skip_nonfinite=True): only scalar all-reduces of the finiteness flag.
  tx = dualoptax.dual_optim_plus_8bit(1e-3)
  state = tx.init(params)
  colls = _collectives(_compiled_step(tx, params, state, multi=True))
  assert colls, "the finiteness flag of a sharded gradient needs one reduction"
  for result_type, op in colls:
    assert op == "all-reduce", colls
    # Tuples of scalars such as (f32[], f32[]) or pred[]: no array is moved.
    assert re.fullmatch(r"\(?((f32|pred|s32)\[\](\{\})?,?\s*)+\)?", result_type), colls


def test_shards_smaller_than_a_block_use_a_shard_sized_block():
  # 1024 columns over 8 devices: 128 per shard < 256, so blocks of 128.
  _, sharding = _mesh("fsdp_cols")
  params = _params(sharding, shape=(64, 1024))
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  state = tx.init(params)
  qs = _check_state_sharding(state, sharding)
  assert qs[0].block_size == 128 and qs[0].absmax.shape == (64, 8)
  assert _collectives(_compiled_step(tx, params, state, multi=False)) == []


def test_shards_without_a_whole_block_stay_float32_with_a_warning():
  # 8 * 526 columns: a 526-wide shard has no divisor in [32, 256] and a sharded axis
  # cannot be padded locally, so the leaf stays float32 (documented fallback).
  _, sharding = _mesh("fsdp_cols")
  params = _params(sharding, shape=(8, 8 * 526))
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  with pytest.warns(UserWarning, match="cannot hold whole blocks"):
    state = tx.init(params)
  assert not any(isinstance(x, QuantizedArray) for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, QuantizedArray)))
  assert _collectives(_compiled_step(tx, params, state, multi=False)) == []
  # Unsharded, the same shape is padded locally to whole blocks instead.
  host = jax.tree.map(np.asarray, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    q = tx.init(host)[0].mu["a"]
  assert isinstance(q, QuantizedArray)
  assert q.pad == 144 and q.codes.shape == (8, 4352)  # 4208 -> 4352 = 17 * 256
  assert q.absmax.shape == (8, 17) and q.block_size == 256
