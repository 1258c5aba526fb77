"""8-bit state on a device mesh: the layout keeps the params' sharding and the
update needs no collectives.

The checks need 8 devices, and the device count must be set before JAX starts:
``_check_*`` functions run together in one subprocess with 8 simulated CPU
devices (this process keeps its single device), and each test reports the
outcome of one check.
"""

import contextlib
import os
import re
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dualoptax
from benchmarks import memory
from dualoptax import QuantizedArray
from tests import multidevice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {
  "fsdp_rows": ((8,), ("data",), P("data", None)),
  "fsdp_cols": ((8,), ("model",), P(None, "model")),
  "mesh_2d": ((2, 4), ("data", "model"), P("data", "model")),
}


# Mesh axis types: ``Auto`` (``Mesh``'s default) and ``Explicit``
# (``jax.make_mesh``'s default), under which arrays carry their sharding in
# their traced types and every array the step creates must match it.
AXES = ("auto", "explicit")


def _mesh(layout, axes="auto"):
  shape, names, spec = LAYOUTS[layout]
  assert len(jax.devices()) == 8, "runs in the 8-device subprocess only"
  kind = AxisType.Explicit if axes == "explicit" else AxisType.Auto
  mesh = Mesh(
    np.array(jax.devices()[:8]).reshape(shape),
    names,
    axis_types=(kind,) * len(names),
  )
  return mesh, NamedSharding(mesh, spec)


def _within(mesh):
  """The mesh as the context mesh where its axes are explicit (the usual
  way to use one: arrays created in the step take it), else nothing."""
  explicit = AxisType.Explicit in tuple(mesh.axis_types)
  return jax.set_mesh(mesh) if explicit else contextlib.nullcontext()


def _params(sharding, shape=(64, 2048)):
  ps = {
    "a": jnp.linspace(-1, 1, shape[0] * shape[1]).reshape(shape),
    "b": jnp.cos(jnp.arange(shape[0] * shape[1], dtype=jnp.float32)).reshape(
      shape
    ),
  }
  return jax.device_put(ps, sharding)


def _compiled_step(tx, params, state, multi, fused=False):
  wrap = (lambda g: {"forget": g}) if multi else (lambda g: g)
  step = memory.train_step(tx, wrap, fused)
  return jax.jit(step).lower(params, state, params).compile()


def _collectives(compiled):
  return multidevice.collectives(compiled.as_text())


def _assert_only_scalar_all_reduces(compiled, dtypes="f32|pred|s32"):
  """Every collective is an all-reduce of scalars (or a tuple of them, such
  as (f32[], f32[]) or pred[]) of ``dtypes``: no array is moved."""
  colls = _collectives(compiled)
  for result_type, op in colls:
    assert op == "all-reduce", colls
    assert re.fullmatch(
      rf"\(?(({dtypes})\[\](\{{\}})?,?\s*)+\)?", result_type
    ), colls
  return colls


def _random_params(sharding, shapes, seed):
  """Normal values (as in test_chunked, whose tolerances are set for them)
  for the leaves of ``shapes``, placed with ``sharding``."""
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return jax.device_put(
    {n: jax.random.normal(k, shapes[n]) for n, k in zip(shapes, keys)},
    sharding,
  )


def _check_state_sharding(state, param_sharding):
  is_q = lambda x: isinstance(x, QuantizedArray)
  qs = [
    x
    for x in jax.tree.leaves(state, is_leaf=is_q)
    if isinstance(x, QuantizedArray)
  ]
  assert qs
  spec = tuple(param_sharding.spec)
  for q in qs:
    # Codes keep the parameter's shape and sharding; absmax [..., n / b] is
    # split the same way (each shard holds the absmax of its own blocks).
    assert q.codes.sharding.is_equivalent_to(param_sharding, q.codes.ndim)
    assert q.absmax.sharding.is_equivalent_to(
      NamedSharding(param_sharding.mesh, P(*spec)), q.absmax.ndim
    )
  return qs


def _check_adam_8bit_update_has_no_collectives(layout, axes="auto"):
  mesh, sharding = _mesh(layout, axes)
  params = _params(sharding)
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  with _within(mesh):
    state = tx.init(params)
    qs = _check_state_sharding(state, sharding)
    assert qs[0].codes.shape == (64, 2048) and qs[0].absmax.shape == (64, 8)
    assert qs[0].block_size == 256
    compiled = _compiled_step(tx, params, state, multi=False)
    assert _collectives(compiled) == []
    # Control: bitsandbytes' layout (flatten the tensor, then cut blocks)
    # does need collectives on a column-sharded array, and the checker sees
    # them. (Under explicit axes JAX refuses that reshape outright.)
    if layout == "fsdp_cols" and axes == "auto":
      flat = jax.jit(lambda x: jnp.max(jnp.abs(x.reshape(-1, 256 * 64)), -1))
      assert _collectives(flat.lower(params["a"]).compile())
    # The updated state comes back with the same sharding (no resharding).
    new_p, new_s = compiled(params, state, params)
    _check_state_sharding(new_s, sharding)
    assert new_p["a"].sharding.is_equivalent_to(sharding, 2)
  # And it computes what the unsharded wrapper computes.
  host = jax.tree.map(np.asarray, params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p1, s1 = jax.jit(step)(host, tx.init(host), host)
  for x, y in zip(jax.tree.leaves((new_p, new_s)), jax.tree.leaves((p1, s1))):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7
    )


def _check_dual_optim_plus_8bit_sharded(layout, axes="auto"):
  mesh, sharding = _mesh(layout, axes)
  with _within(mesh):
    _dual_optim_plus_8bit_sharded(sharding)


def _dual_optim_plus_8bit_sharded(sharding):
  params = _params(sharding)
  # Without the finiteness check: no collective at all.
  tx = dualoptax.dual_optim_plus_8bit(1e-3, skip_nonfinite=False)
  state = tx.init(params)
  _check_state_sharding(state, sharding)
  assert _collectives(_compiled_step(tx, params, state, multi=True)) == []
  # Default (skip_nonfinite=True): only scalar all-reduces of the
  # finiteness flag.
  tx = dualoptax.dual_optim_plus_8bit(1e-3)
  state = tx.init(params)
  colls = _assert_only_scalar_all_reduces(
    _compiled_step(tx, params, state, multi=True)
  )
  assert colls, "the finiteness flag of a sharded gradient needs one reduction"


def _check_shards_smaller_than_a_block_use_a_shard_sized_block():
  # 1024 columns over 8 devices: 128 per shard < 256, so blocks of 128.
  _, sharding = _mesh("fsdp_cols")
  params = _params(sharding, shape=(64, 1024))
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  state = tx.init(params)
  qs = _check_state_sharding(state, sharding)
  assert qs[0].block_size == 128 and qs[0].absmax.shape == (64, 8)
  assert _collectives(_compiled_step(tx, params, state, multi=False)) == []


def _check_shards_without_a_whole_block_stay_float32_with_a_warning():
  # 8 * 526 columns: a 526-wide shard has no divisor in [32, 256] and a
  # sharded axis cannot be padded locally, so the leaf stays float32
  # (documented fallback).
  _, sharding = _mesh("fsdp_cols")
  params = _params(sharding, shape=(8, 8 * 526))
  tx = dualoptax.quantize_state(optax.adam(1e-3))
  with pytest.warns(UserWarning, match="cannot hold whole blocks"):
    state = tx.init(params)
  assert not any(
    isinstance(x, QuantizedArray)
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
  )
  assert _collectives(_compiled_step(tx, params, state, multi=False)) == []
  # Unsharded, the same shape is padded locally to whole blocks instead.
  host = jax.tree.map(np.asarray, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    q = tx.init(host)[0].mu["a"]
  assert isinstance(q, QuantizedArray)
  assert q.pad == 144 and q.codes.shape == (8, 4352)  # 4208 -> 4352 = 17 * 256
  assert q.absmax.shape == (8, 17) and q.block_size == 256


def _check_blocks_spanning_unsharded_trailing_axes():
  # Attention-like kernels [d, heads, head_dim] with d sharded: blocks span
  # (heads, head_dim), never d; no collective in the (chunked) step.
  _, sharding = _mesh("fsdp_rows")
  params = jax.device_put(
    {
      "attn": jnp.cos(jnp.arange(64 * 12 * 64, dtype=jnp.float32)).reshape(
        64, 12, 64
      )
    },
    sharding,
  )
  tx = dualoptax.dual_optim_plus_8bit(1e-3, skip_nonfinite=False)
  state = tx.init(params)
  q = state.base_mu["attn"]
  assert q.block_size == 256 and q.rows == 4 and q.absmax.shape == (64, 3)
  assert q.codes.sharding.is_equivalent_to(sharding, 3)
  assert q.absmax.sharding.is_equivalent_to(
    NamedSharding(sharding.mesh, P("data", None)), 2
  )
  assert _collectives(_compiled_step(tx, params, state, multi=True)) == []
  # With the split axis (0) sharded, blocks stay on the last axis.
  params = jax.device_put({"attn": jnp.ones((64, 4, 16))}, sharding)
  q = tx.init(params).base_mu["attn"]
  assert q.rows == 1 and q.block_size == 16


STATE_TXS = {
  "dual_optim_plus": lambda: dualoptax.dual_optim_plus(1e-3),
  "dual_optim": lambda: dualoptax.dual_optim(1e-3),
  "quantize_state(adam)": lambda: dualoptax.quantize_state(optax.adam(1e-3)),
  "dual_optim_plus_8bit": lambda: dualoptax.dual_optim_plus_8bit(1e-3),
}


def _check_state_scalars_replicated_over_the_params_mesh(name, axes="auto"):
  # Counters (count, deltas[*].count, skipped) used to live on device 0, so
  # out_shardings taken from the state's .sharding failed ("incompatible
  # devices").
  mesh, sharding = _mesh("mesh_2d", axes)
  params = _params(sharding)
  tx = STATE_TXS[name]()
  with _within(mesh):
    state = tx.init(params)
    scalars = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    assert scalars
    for x in scalars:
      assert x.sharding.device_set == sharding.device_set, x.sharding
      assert x.sharding.is_fully_replicated
    multi = name != "quantize_state(adam)"
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)

    def step(p, s, g):
      u, s = tx.update({"forget": g} if multi else g, s, p)
      return optax.apply_updates(p, u), s

    step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    new_p, new_s = step(params, state, params)
    new_p, new_s = step(new_p, new_s, params)
  count = new_s[0].count if name == "quantize_state(adam)" else new_s.count
  assert int(count) == 2
  # Unsharded params: plain default-device scalars, as before.
  host = jax.tree.map(np.asarray, params)
  assert all(
    len(x.sharding.device_set) == 1
    for x in jax.tree.leaves(tx.init(host))
    if x.ndim == 0
  )


def _check_init_under_jit_on_an_explicit_mesh():
  # Inside jit the types carry the sharding under explicit axes: 128-column
  # shards get 128-value blocks, as init outside jit gives them.
  mesh, sharding = _mesh("fsdp_cols", "explicit")
  params = _params(sharding, shape=(64, 1024))
  tx = dualoptax.dual_optim_plus_8bit(1e-3)
  with _within(mesh):
    state = jax.jit(tx.init)(params)
  q = state.base_mu["a"]
  assert q.block_size == 128 and q.absmax.shape == (64, 8)
  _check_state_sharding(state, sharding)


def _check_accumulate_objectives_on_an_explicit_mesh():
  # The held call's zero update is created in the update's sharding.
  mesh, sharding = _mesh("fsdp_rows", "explicit")
  params = _params(sharding)
  tx = dualoptax.accumulate_objectives(dualoptax.dual_optim_plus(1e-3), 2)
  with _within(mesh):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(2):
      u, state = update({"forget": params}, state, params)
      assert jax.typeof(u["a"]).sharding.spec == sharding.spec
      assert bool(jnp.any(u["a"] != 0)) == (k == 1)


KERNEL_TXS = {
  "dual_optim_plus_8bit": lambda kernel: dualoptax.dual_optim_plus_8bit(
    1e-2, weight_decay=0.1, chunk_size=4096, kernel=kernel
  ),
  "quantize_state(adamw)": lambda kernel: dualoptax.quantize_state(
    optax.adamw(1e-2, weight_decay=0.1), chunk_size=4096, kernel=kernel
  ),
  # Float32 state: a kernel per leaf (its step's own, not quantize_state's).
  "dual_optim_plus": lambda kernel: dualoptax.dual_optim_plus(
    1e-2, weight_decay=0.1, kernel=kernel
  ),
}


def _check_kernel_per_shard(layout, name):
  # Under explicit axes each shard runs the fused kernel on its own blocks
  # (interpreted here): the loops' steps on the same mesh, and no collective
  # but the finiteness flag's scalar. "s" (below min_size) keeps float32
  # state, whose step is a whole-leaf kernel per shard.
  from tests import test_chunked

  mesh, sharding = _mesh(layout, "explicit")
  params = _random_params(
    sharding, {"a": (64, 2048), "b": (64, 2048), "s": (8, 256)}, 0
  )
  multi = name != "quantize_state(adamw)"
  loop, kernel = KERNEL_TXS[name]("xla"), KERNEL_TXS[name]("pallas")
  with _within(mesh):
    state = kernel.init(params)
    grads = {"forget": params} if multi else params
    jaxpr = str(jax.make_jaxpr(kernel.update)(grads, state, params))
    # One traced kernel for "a" and "b", called on each in a shard_map, and
    # "s"'s in a third (the float32 step's a shared one too); the
    # finiteness check's (DualOptim+) is one shard_map for every leaf.
    assert jaxpr.count("name=fused_step") == 2 + (name == "dual_optim_plus")
    assert jaxpr.count("shard_map") == 3 + multi
    assert jaxpr.count("name=_nonfinite_sum") == 2 * multi
    # Two steps (each objective once): the kernels' math is checked over
    # more in test_chunked; here, that each shard runs it.
    quantized = name != "dual_optim_plus"
    test_chunked._assert_steps_agree(
      jax.jit(loop.update),
      [jax.jit(kernel.update)],
      state,
      multi,
      params,
      2,
      quantized,
    )
    if layout == "mesh_2d":  # the kernels writing the params: the same
      test_chunked._assert_fused_steps_agree(
        jax.jit(loop.update),
        test_chunked._fused_step(kernel),
        state,
        multi,
        params,
        quantized,
      )
    for fused in (False, True):
      compiled = _compiled_step(kernel, params, state, multi, fused)
      _assert_only_scalar_all_reduces(compiled, "f32|pred")
      new_p, new_s = compiled(params, state, params)
      if quantized:
        _check_state_sharding(new_s, sharding)
      else:  # float32 moments sharded as their params
        assert new_s.base_mu["a"].sharding.is_equivalent_to(sharding, 2)
      assert new_p["a"].sharding.is_equivalent_to(sharding, 2)
    if multi:  # a NaN in one shard: nothing written on any shard
      bad = params["b"].at[3, 5].set(jnp.nan, out_sharding=sharding)
      u, skipped = jax.jit(kernel.update)(
        {"forget": {**params, "b": bad}}, state, params
      )
      assert int(skipped.skipped) == 1
      assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
      for x, y in zip(
        jax.tree.leaves(skipped.base_mu), jax.tree.leaves(state.base_mu)
      ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_kernel_per_shard_with_blocks_narrower_than_lanes():
  # Column shards 576 and 192 wide hold blocks of 192 (three and one per
  # row), which a kernel tile cannot hold alone: it spans the shard's row;
  # or, where TPU stores the shard column-major ("c"), the kernel takes it
  # transposed, the block along sublanes.
  from dualoptax import _kernel
  from tests import test_chunked

  mesh, sharding = _mesh("fsdp_cols", "explicit")
  shapes = {"a": (32, 8 * 576), "b": (32, 8 * 192), "c": (300, 8 * 192)}
  assert [_kernel.columns_major((r, c // 8)) for r, c in shapes.values()] == [
    False,
    False,
    True,
  ]
  params = _random_params(sharding, shapes, 1)
  loop, kernel = (
    KERNEL_TXS["dual_optim_plus_8bit"](k) for k in ("xla", "pallas")
  )
  with _within(mesh):
    state = kernel.init(params)
    assert {x.block_size for x in state.base_mu.values()} == {192}
    jaxpr = str(
      jax.make_jaxpr(kernel.update)({"forget": params}, state, params)
    )
    # The step's per leaf, and the check's for all three.
    assert jaxpr.count("shard_map") == 4 and "pallas_call" in jaxpr
    assert "u8[1,192,300]" in jaxpr  # "c"'s shard, transposed
    test_chunked._assert_steps_agree(
      jax.jit(loop.update), [jax.jit(kernel.update)], state, True, params, 2
    )


def _check_auto_kernels_when_traced_for_tpu(axes):
  # Traced for TPU (patched: this backend is the CPU), kernel="auto" under 8
  # devices: kernels per shard where the types carry the sharding (explicit
  # axes); with auto axes no kernel at all (it would gather), the loops and
  # XLA's finiteness check. The float32 guard's check alike.
  from unittest import mock

  from dualoptax import _kernel

  mesh, sharding = _mesh("fsdp_rows", axes)
  params = _params(sharding)

  def jaxpr(tx):
    with _within(mesh), mock.patch.object(_kernel, "on_tpu", lambda: True):
      state = tx.init(params)
      return str(jax.make_jaxpr(tx.update)({"forget": params}, state, params))

  for tx in (
    dualoptax.dual_optim_plus_8bit(1e-3),
    dualoptax.dual_optim_plus(1e-3),
  ):
    text = jaxpr(tx)
    kernels = "pallas_call" in text, "shard_map" in text
    assert kernels == ((True, True) if axes == "explicit" else (False, False))
  if axes == "auto":  # the very step "xla" traces (its guard a conditional)
    assert jaxpr(dualoptax.dual_optim_plus_8bit(1e-3)) == jaxpr(
      dualoptax.dual_optim_plus_8bit(1e-3, kernel="xla")
    )


# ---------------------------------------------------------------------------
# Running the checks on 8 simulated devices.
# ---------------------------------------------------------------------------
CHECKS = (
  [
    ("_check_adam_8bit_update_has_no_collectives", (layout, "auto"))
    for layout in LAYOUTS
  ]
  # Under explicit axes on one mesh (the loops on each layout are also
  # checked there by _check_kernel_per_shard).
  + [("_check_adam_8bit_update_has_no_collectives", ("mesh_2d", "explicit"))]
  + [
    ("_check_dual_optim_plus_8bit_sharded", (layout, axes))
    for layout, axes in [(layout, "auto") for layout in LAYOUTS]
    + [("mesh_2d", "explicit")]
  ]
  + [
    ("_check_shards_smaller_than_a_block_use_a_shard_sized_block", ()),
    ("_check_shards_without_a_whole_block_stay_float32_with_a_warning", ()),
  ]
  + [("_check_blocks_spanning_unsharded_trailing_axes", ())]
  + [("_check_init_under_jit_on_an_explicit_mesh", ())]
  + [("_check_accumulate_objectives_on_an_explicit_mesh", ())]
  + [
    ("_check_kernel_per_shard", (layout, name))
    for layout in LAYOUTS
    for name in KERNEL_TXS
  ]
  + [("_check_kernel_per_shard_with_blocks_narrower_than_lanes", ())]
  + [("_check_auto_kernels_when_traced_for_tpu", (axes,)) for axes in AXES]
  + [
    ("_check_state_scalars_replicated_over_the_params_mesh", (name, axes))
    for name in STATE_TXS
    for axes in AXES
  ]
)


def _key(fn, args):
  return f"{fn}{list(args)}"


_SCRIPT = textwrap.dedent("""
    import json, traceback
    import jax
    from tests import test_quantized_sharding as t

    out = {"__devices__": jax.device_count()}
    for fn, args in t.CHECKS:
      try:
        getattr(t, fn)(*args)
        out[t._key(fn, args)] = None
      except BaseException:  # an assertion, a pytest outcome, anything
        out[t._key(fn, args)] = traceback.format_exc()[-4000:]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def report():
  """Outcome of every check, from one 8-device subprocess."""
  out = multidevice.json_result(_SCRIPT)
  assert out.pop("__devices__") == 8
  assert sorted(out) == sorted(_key(fn, args) for fn, args in CHECKS)
  return out


def _outcome(report, fn, *args):
  error = report[_key(fn, args)]
  if error is not None:
    pytest.fail(f"in the 8-device subprocess:\n{error}", pytrace=False)


@pytest.mark.parametrize(
  "layout, axes", [(x, "auto") for x in LAYOUTS] + [("mesh_2d", "explicit")]
)
def test_adam_8bit_update_has_no_collectives(layout, axes, report):
  """quantize_state(adam): sharded state, no collective, unsharded result."""
  _outcome(report, "_check_adam_8bit_update_has_no_collectives", layout, axes)


@pytest.mark.parametrize(
  "layout, axes", [(x, "auto") for x in LAYOUTS] + [("mesh_2d", "explicit")]
)
def test_dual_optim_plus_8bit_sharded(layout, axes, report):
  """DualOptim+ 8-bit: no collective but the scalar finiteness flag."""
  _outcome(report, "_check_dual_optim_plus_8bit_sharded", layout, axes)


def test_shards_smaller_than_a_block_use_a_shard_sized_block(report):
  """128-column shards get blocks of 128."""
  _outcome(report, "_check_shards_smaller_than_a_block_use_a_shard_sized_block")


def test_shards_without_a_whole_block_stay_float32_with_a_warning(report):
  """Shards with no whole block keep float32 (warned); unsharded: padded."""
  _outcome(
    report, "_check_shards_without_a_whole_block_stay_float32_with_a_warning"
  )


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("name", list(STATE_TXS))
def test_state_scalars_replicated_over_the_params_mesh(name, axes, report):
  """Counters of a sharded state: on the params' mesh, so the state's own
  shardings work as jit out_shardings; each optimizer steps twice."""
  _outcome(
    report,
    "_check_state_scalars_replicated_over_the_params_mesh",
    name,
    axes,
  )


def test_blocks_spanning_unsharded_trailing_axes(report):
  """A short last axis: blocks span the unsharded trailing axes, not d."""
  _outcome(report, "_check_blocks_spanning_unsharded_trailing_axes")


def test_accumulate_objectives_on_an_explicit_mesh(report):
  """accumulate_objectives under a mesh with explicit axes: a held call's
  zero update has the update's sharding, and the k-th call steps."""
  _outcome(report, "_check_accumulate_objectives_on_an_explicit_mesh")


@pytest.mark.parametrize("name", list(KERNEL_TXS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_per_shard(layout, name, report):
  """Explicit axes: a kernel per shard, the loops' steps, no array moved; a
  NaN in one shard skips the call on every shard."""
  _outcome(report, "_check_kernel_per_shard", layout, name)


def test_kernel_per_shard_with_blocks_narrower_than_lanes(report):
  """Shards of 576 and 192 columns (blocks of 192): the kernel takes whole
  shard rows and agrees with the loops."""
  _outcome(report, "_check_kernel_per_shard_with_blocks_narrower_than_lanes")


@pytest.mark.parametrize("axes", AXES)
def test_auto_kernels_when_traced_for_tpu(axes, report):
  """kernel="auto" for TPU under several devices: kernels per shard with
  explicit axes, none with auto axes."""
  _outcome(report, "_check_auto_kernels_when_traced_for_tpu", axes)


def test_init_under_jit_on_an_explicit_mesh(report):
  """Under explicit axes, init inside jit sees the shards: their blocks."""
  _outcome(report, "_check_init_under_jit_on_an_explicit_mesh")
