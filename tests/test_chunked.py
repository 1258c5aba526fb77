"""The chunked 8-bit step: same codes as a whole-state step, bounded memory."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

import dualoptax
from benchmarks import memory
from dualoptax import QuantizedArray
from dualoptax._chunked import num_chunks

# Leaves of two shapes (two of one), one below min_size, one 1-d.
SHAPES = {
  "a": (48, 512),
  "a2": (48, 512),
  "c": (30, 256),
  "small": (8, 8),
  "vec": (5000,),
}


def _params():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {n: jax.random.normal(k, s) for (n, s), k in zip(SHAPES.items(), keys)}


def _grads(step, params):
  return jax.tree.map(
    lambda p: jnp.sin(p * (step + 1.5)) * (1 + 0.1 * step), params
  )


def _adam_with_full_like_cap():
  """Adam whose direction is capped by an array built inside the update
  (``jnp.full_like``: a broadcast naming the leaf's shape, which the chunked
  step evaluates at chunk shape)."""

  def cap(updates, state, params=None):
    del params
    capped = jax.tree.map(
      lambda u: jnp.minimum(u, jnp.full_like(u, 0.5)), updates
    )
    return capped, state

  return optax.chain(
    optax.scale_by_adam(),
    optax.GradientTransformation(lambda p: optax.EmptyState(), cap),
    optax.scale(-1e-2),
  )


CASES = {
  "adamw": (
    lambda cs, **kw: dualoptax.quantize_state(
      optax.adamw(1e-2, weight_decay=0.1), chunk_size=cs, **kw
    ),
    False,
  ),
  "inject_hyperparams": (
    lambda cs, **kw: dualoptax.quantize_state(
      optax.inject_hyperparams(optax.adam)(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, 10)
      ),
      chunk_size=cs,
      **kw,
    ),
    False,
  ),
  "full_like_in_update": (
    lambda cs, **kw: dualoptax.quantize_state(
      _adam_with_full_like_cap(), chunk_size=cs, **kw
    ),
    False,
  ),
  "dual_optim_plus_8bit": (
    lambda cs, **kw: dualoptax.dual_optim_plus_8bit(
      1e-2, weight_decay=0.1, chunk_size=cs, **kw
    ),
    True,
  ),
  "adamw_without_buffer_reuse": (
    lambda cs, **kw: dualoptax.quantize_state(
      optax.adamw(1e-2, weight_decay=0.1),
      chunk_size=cs,
      reuse_gradient_buffers=False,
      **kw,
    ),
    False,
  ),
  # Without the non-finite guard its loops start the update as a gradient.
  "dual_optim_plus_8bit_unguarded": (
    lambda cs, **kw: dualoptax.dual_optim_plus_8bit(
      1e-2, weight_decay=0.1, chunk_size=cs, **kw, skip_nonfinite=False
    ),
    True,
  ),
  "dual_optim_plus_8bit_base_only": (
    lambda cs, **kw: dualoptax.dual_optim_plus_8bit(
      1e-2, quantize_delta=False, chunk_size=cs, **kw
    ),
    True,
  ),
}


def _assert_states_close(s1, s2, quantized=True):
  q1 = jax.tree.leaves(s1, is_leaf=lambda x: isinstance(x, QuantizedArray))
  q2 = jax.tree.leaves(s2, is_leaf=lambda x: isinstance(x, QuantizedArray))
  assert [type(x) for x in q1] == [type(x) for x in q2]
  assert any(isinstance(x, QuantizedArray) for x in q1) == quantized
  # The same float32 math in differently fused loops: XLA may contract a
  # multiply-add into an FMA in one and not the other, so a moment can differ
  # by an ulp, its block's absmax by an ulp and, rarely, a code by one step
  # where the value sits on a code boundary. A float32 delta moment is a
  # cancelling difference (g - m_B): its rounding is ulps of the leaf's
  # largest values, not of each small one.
  for x, y in zip(q1, q2):
    if isinstance(x, QuantizedArray):
      np.testing.assert_allclose(x.absmax, y.absmax, rtol=3e-7)
      diff = np.abs(np.asarray(x.codes, int) - np.asarray(y.codes, int))
      assert diff.max() <= 1 and diff.mean() < 1e-3, diff.mean()
    else:
      _assert_float32_close(x, y)


def _assert_float32_close(x, y):
  """The same float32 step in differently fused loops (an FMA here, not
  there): ulps of the leaf's largest values (see above)."""
  scale = float(np.max(np.abs(x), initial=0.0))
  eps = float(np.finfo(np.float32).eps)
  np.testing.assert_allclose(x, y, rtol=3e-7, atol=16 * eps * scale + 1e-30)


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_step_equals_whole_step(name):
  make, multi = CASES[name]
  whole, tx = make(None), make(4096)
  chunked = {4096: jax.jit(tx.update), 2**22: jax.jit(make(2**22).update)}
  state = whole.init(_params())
  # From the same state: several chunks per leaf, and two per leaf.
  _assert_steps_agree(jax.jit(whole.update), chunked.values(), state, multi)
  # update_and_apply: the loops write the new params themselves (the
  # whole-state step adds the update after): the same state and params as
  # update, then optax.apply_updates. Writing the params, the loops start no
  # update in a gradient, so the case without that reuse is the adamw one;
  # the whole-state step is one code path, with and without the guard.
  fused = []
  if name != "adamw_without_buffer_reuse":
    fused.append((chunked[4096], tx))
  if name in ("adamw", "dual_optim_plus_8bit"):
    fused.append((jax.jit(whole.update), whole))
  for reference, t in fused:
    _assert_fused_steps_agree(reference, _fused_step(t), state, multi)


def _fused_step(tx):
  return jax.jit(lambda g, s, p: dualoptax.update_and_apply(tx, g, s, p))


def _assert_steps_agree(
  reference, others, state, multi, params=None, steps=4, quantized=True
):
  """``steps`` steps along ``reference``'s trajectory (the objectives in
  turn); from the same state at each, every update in ``others`` gives its
  state and update to float32 rounding."""
  params = _params() if params is None else params
  for t in range(steps):
    g = _grads(t, params)
    g = {("forget", "retain")[t % 2]: g} if multi else g
    u1, s1 = reference(g, state, params)
    for update in others:
      u2, s2 = update(g, state, params)
      _assert_states_close(s1, s2, quantized)
      # Updates: the same rounding, amplified where DualOptim+'s v_k + v_B
      # cancels (an ulp of v over a small |v_k + v_B|); |u| <= 1 bounds the
      # direction, so the tolerance is a fraction of lr = 1e-2 (seen: 3.3e-6
      # in one element of 24,576; a wrong chunk is off by ~lr everywhere).
      for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)
    params = optax.apply_updates(params, u1)
    state = s1


def _assert_fused_steps_agree(
  reference, fused, state, multi, params=None, quantized=True
):
  """Two steps along ``reference``'s trajectory (an ``update``; each
  objective once); from the same state at each, ``fused`` (an
  ``update_and_apply``) gives the state and the params plus the update to
  float32 rounding."""
  params = _params() if params is None else params
  for t in range(2):
    g = _grads(t, params)
    g = {("forget", "retain")[t % 2]: g} if multi else g
    u1, s1 = reference(g, state, params)
    p1 = optax.apply_updates(params, u1)
    p2, s2 = fused(g, state, params)
    _assert_states_close(s1, s2, quantized)
    # The update's tolerance (see _assert_steps_agree), plus the sum's
    # rounding: an ulp of |p| < 8.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)
    params, state = p1, s1


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_step_equals_loop_step(name):
  # The fused Pallas kernel (interpreted here; compiled on TPU) against the
  # XLA loops, from the same state each step: the same equations and codec
  # on tiles instead of chunks.
  make, multi = CASES[name]
  loop = jax.jit(make(4096, kernel="xla").update)
  kernel = make(4096, kernel="pallas")
  params = _params()
  state = kernel.init(params)
  g0 = _grads(0, params)
  g0 = {"forget": g0} if multi else g0
  jaxpr = str(jax.make_jaxpr(kernel.update)(g0, state, params))
  # A kernel per 2-d quantized leaf ("a", "a2", "c"); the padded 1-d leaf
  # keeps its loop. "a" and "a2" (one shape) share one traced kernel, called
  # twice through a jit; "c" calls its own. The float32 state of "small"
  # (below min_size) runs as a whole-leaf kernel of its own. Each kernel
  # sits in both platform branches. DualOptim+'s non-finite guard checks
  # "a", "a2" and "c" with kernels too ("vec" is not a whole number of
  # lanes): three calls, two traces, each in both branches.
  guarded = multi and "unguarded" not in name
  assert jaxpr.count("name=fused_step") == 2, jaxpr
  assert jaxpr.count("name=_nonfinite_sum") == (3 if guarded else 0)
  assert jaxpr.count("pallas_call") == (10 if guarded else 6)
  _assert_steps_agree(loop, [jax.jit(kernel.update)], state, multi)
  if name in ("adamw", "dual_optim_plus_8bit"):  # the kernels write params
    _assert_fused_steps_agree(loop, _fused_step(kernel), state, multi)


def test_float32_state_leaves_run_as_whole_leaf_kernels():
  # Leaves below min_size keep float32 state. With kernels on, a leaf of at
  # most _kernel._WHOLE_VALUES values, 1-d or 2-d and not stored column-major
  # on TPU, runs as one kernel over the whole leaf (on TPU, a kernel call
  # compiles faster than XLA's fusion of DualOptim+'s step); the others stay
  # XLA ops. Leaves of one shape share one traced kernel.
  params = {
    "q": jnp.ones((64, 512)),  # quantized: the 8-bit kernel
    "b1": jnp.linspace(-1.0, 1.0, 768),
    "b2": jnp.linspace(1.0, 2.0, 768),
    "n": jnp.full((8, 8), 0.5),
    "col": jnp.ones((300, 8)),  # column-major on TPU
    "big": jnp.ones((200, 128)),  # float32, over the whole-leaf size
  }
  kw = dict(weight_decay=0.1, min_size=1 << 15)
  kernel = dualoptax.dual_optim_plus_8bit(1e-2, kernel="pallas", **kw)
  loop = dualoptax.dual_optim_plus_8bit(1e-2, kernel="xla", **kw)
  state = kernel.init(params)
  grads = {
    "forget": _grads(0, params),
    "retain": jax.tree.map(lambda g: 0.5 - g, _grads(1, params)),
  }
  jaxpr = jax.make_jaxpr(kernel.update)(grads, state, params)
  whole = {}
  for eqn, _ in _kernel_calls(jaxpr.jaxpr, []):
    arrays = [v.aval for v in eqn.invars if v.aval.shape != (1,)]
    # Not the 8-bit kernel (uint8 operands) nor the guard's check (no
    # state to write in place).
    if (
      not eqn.params["interpret"]
      and eqn.params["input_output_aliases"]
      and all(a.dtype == jnp.float32 for a in arrays)
    ):
      shape = arrays[0].shape
      assert all(a.shape == shape for a in arrays)
      whole[shape] = whole.get(shape, 0) + 1
  assert whole == {(768,): 2, (8, 8): 1}, whole
  u1, s1 = jax.jit(loop.update)(grads, state, params)
  u2, s2 = jax.jit(kernel.update)(grads, state, params)
  _assert_states_close(s1, s2)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)


FLOAT32_KERNEL_TXS = {
  "dual_optim_plus": lambda kernel: dualoptax.dual_optim_plus(
    1e-2, weight_decay=0.1, kernel=kernel
  ),
  "dual_optim": lambda kernel: dualoptax.dual_optim(
    1e-2, weight_decay=0.1, kernel=kernel
  ),
}


@pytest.mark.parametrize("name", list(FLOAT32_KERNEL_TXS))
def test_float32_steps_run_as_kernels(name):
  # With kernels on (on TPU by default), each float32 leaf whose last axis
  # is whole lanes runs its step as one kernel over tiles of rows (a last
  # tile partial, "p"), a small 1-d or 2-d leaf as one over the whole leaf,
  # and the rest as XLA ops; leaves of one shape share one traced kernel.
  # Same values as XLA's step, a skipped call (NaN) included.
  params = {
    "a": jnp.linspace(-1.0, 1.0, 64 * 256).reshape(64, 256),
    "a2": jnp.linspace(2.0, 1.0, 64 * 256).reshape(64, 256),
    "stack": jnp.linspace(-2.0, 2.0, 2 * 16 * 128).reshape(2, 16, 128),
    "vec": jnp.linspace(0.5, -0.5, 2048),
    "p": jnp.linspace(-1.0, 3.0, 600 * 128).reshape(600, 128),
    "bias": jnp.linspace(-1.0, 1.0, 300),
    "norm": jnp.full((40, 100), 0.5),
    "col": jnp.ones((300, 8)),  # column-major on TPU: XLA
    "wide": jnp.ones((300, 130)),  # neither whole lanes nor small: XLA
    "scalar": jnp.asarray(0.3),
  }
  kernel, xla = (FLOAT32_KERNEL_TXS[name](k) for k in ("pallas", "xla"))
  state = kernel.init(params)
  grads = {
    "forget": _grads(0, params),
    "retain": jax.tree.map(lambda g: 0.5 - g, _grads(1, params)),
  }
  jaxpr = jax.make_jaxpr(kernel.update)(grads, state, params)
  shapes: dict = {}
  for eqn, _ in _kernel_calls(jaxpr.jaxpr, []):
    if not eqn.params["interpret"] and eqn.params["input_output_aliases"]:
      shape = [v.aval.shape for v in eqn.invars if v.aval.shape != (1,)][0]
      shapes[shape] = shapes.get(shape, 0) + 1
  assert shapes == {
    (64, 256): 2,
    (32, 128): 1,  # "stack"'s rows
    (16, 128): 1,  # "vec" in lanes
    (600, 128): 1,
    (300,): 1,
    (40, 100): 1,
  }, shapes
  steps = [
    grads,
    {"retain": _grads(2, params)},
    {"forget": {**_grads(3, params), "p": _grads(3, params)["p"] * jnp.nan}},
    {"forget": _grads(4, params)},
  ]
  # XLA's step, then the kernels' through update + apply_updates and
  # through update_and_apply (the kernels write the params in place), and
  # XLA's through update_and_apply.
  runs = []
  for tx, fused in ((xla, False), (kernel, False), (kernel, True), (xla, True)):
    p, s = params, tx.init(params)
    update = jax.jit(tx.update)
    for g in steps:
      if fused:
        p, s = _fused_step(tx)(g, s, p)
      else:
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
    assert int(s.skipped) == 1 and int(s.count) == 3
    runs.append((p, s))
  for run in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(run)):
      _assert_float32_close(a, b)


@pytest.mark.parametrize(
  "make, multi",
  [
    (FLOAT32_KERNEL_TXS["dual_optim_plus"], True),
    (lambda k: dualoptax.dual_optim_plus_8bit(1e-2, kernel=k), True),
    (lambda k: dualoptax.quantize_state(optax.adamw(1e-2), kernel=k), False),
  ],
  ids=["dual_optim_plus", "dual_optim_plus_8bit", "quantize_state(adamw)"],
)
def test_kernels_run_under_vmap_and_scan(make, multi):
  # An ensemble: the update vmapped over two members' params and state, in
  # a scan. Each kernel then runs once per member (a loop: the kernels'
  # memory-space constraint has no batching rule); the values are the XLA
  # step's.
  params = {
    "w": jnp.linspace(-1.0, 1.0, 2 * 64 * 512).reshape(2, 64, 512),
    "b": jnp.linspace(0.0, 1.0, 2 * 300).reshape(2, 300),
  }
  g = jax.tree.map(lambda x: 0.3 * x + 0.1, params)
  grads = {"forget": g, "retain": jax.tree.map(lambda x: 0.2 - x, g)}
  runs = []
  for kernel in ("xla", "pallas"):
    tx = make(kernel)

    def step(carry, _, tx=tx):
      p, s = carry
      u, s = jax.vmap(tx.update)(grads if multi else g, s, p)
      return (optax.apply_updates(p, u), s), None

    carry = (params, jax.vmap(tx.init)(params))
    runs.append(jax.jit(lambda c: jax.lax.scan(step, c, None, 2)[0])(carry))
  for a, b in zip(jax.tree.leaves(runs[0][0]), jax.tree.leaves(runs[1][0])):
    _assert_float32_close(a, b)


def test_kernel_steps_are_not_differentiable_but_xla_steps_are():
  # Differentiating through an update (a learned optimizer, say): the
  # kernels have no derivative rules, so a step that runs them says so and
  # names kernel="xla"; on TPU an XLA step's non-finite check is a kernel,
  # through which no derivative flows (it only decides whether the step
  # runs), so the XLA step stays differentiable there.
  from unittest import mock

  from dualoptax import _kernel

  params = {"w": jnp.linspace(-1.0, 1.0, 64 * 256).reshape(64, 256)}

  def grad(kernel):
    tx = dualoptax.dual_optim_plus(1e-2, kernel=kernel)
    state = tx.init(params)

    def loss(g):
      u, _ = tx.update({"forget": g}, state, params)
      return jnp.sum(u["w"] ** 2)

    return jax.grad(loss)(jax.tree.map(lambda x: 0.5 * x + 0.1, params))

  with pytest.raises(ValueError, match='cannot be differentiated.*"xla"'):
    grad("pallas")
  expected = grad("xla")
  with mock.patch.object(_kernel, "on_tpu", lambda: True):
    on_tpu = grad("xla")
  np.testing.assert_array_equal(on_tpu["w"], expected["w"])
  assert np.all(np.isfinite(expected["w"])) and np.any(expected["w"] != 0)


@pytest.mark.parametrize("objectives", [1, 2, 6, 12])
@pytest.mark.parametrize("shape", [(50257, 768), (600, 128), (16, 1024)])
def test_float32_step_tiles_fit_vmem(shape, objectives):
  # DualOptim+ with weight decay: per objective a gradient and two moments
  # in, two moments out; the base moments and the param in, the base
  # moments and the update out. More objectives, smaller tiles: every
  # operand's tile, double buffered, within the budget; a tile whole lanes
  # wide, its rows whole sublanes or the leaf's.
  from dualoptax import _kernel

  operands = (3 * objectives + 3) + (2 * objectives + 3)
  rows, width = _kernel.step_tile(*shape, operands)
  assert 2 * 4 * operands * rows * width <= _kernel._STEP_TILE_BYTES
  assert shape[1] % width == 0 and width % 128 == 0 and width <= 512
  assert rows == shape[0] or rows % 8 == 0
  assert rows * width >= min(shape[0] * width, 8 * width)


def test_quantize_state_runs_float32_kernels_steps_elementwise():
  # quantize_state traces its inner update to run it in chunks or kernels
  # of its own: a float32 optimizer's kernels stay out of that trace (the
  # same jaxpr as with kernel="xla"), and out of the whole-state path not.
  params = {"w": jnp.linspace(-1.0, 1.0, 64 * 512).reshape(64, 512)}
  grads = {"forget": _grads(0, params)}

  def jaxpr(kernel, chunk_size):
    tx = dualoptax.quantize_state(
      dualoptax.dual_optim_plus(1e-2, skip_nonfinite=False, kernel=kernel),
      chunk_size=chunk_size,
      kernel="xla",
    )
    state = tx.init(params)
    return str(jax.make_jaxpr(tx.update)(grads, state, params))

  assert jaxpr("pallas", 4096) == jaxpr("xla", 4096)
  assert "pallas_call" in jaxpr("pallas", None)
  assert "pallas_call" not in jaxpr("xla", None)


def _kernel_calls(jaxpr, found):
  """Each ``pallas_call`` in ``jaxpr`` (nested ones too): the equation and,
  per operand, the primitive that made it (None: an input)."""
  made = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      operands = [
        made.get(v) for v in eqn.invars if not isinstance(v, jex_core.Literal)
      ]
      found.append((eqn, operands))
    made.update((v, eqn.primitive.name) for v in eqn.outvars)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          _kernel_calls(sub.jaxpr, found)
  return found


def _one_leaf_kernel_case(multi):
  """A leaf's kernels: ``(tx, grads, params)``, quantize_state(adamw) or,
  ``multi``, dual_optim_plus_8bit with two objectives (and its check)."""
  params = {"w": jnp.ones((64, 512))}
  if multi:
    tx = dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.1, kernel="pallas")
    return tx, {"forget": params, "retain": params}, params
  tx = dualoptax.quantize_state(
    optax.adamw(1e-3, weight_decay=0.1), kernel="pallas"
  )
  return tx, params, params


@pytest.mark.parametrize("multi", [False, True])
def test_kernel_operands_stay_in_hbm_but_the_params(multi):
  # Compiled for TPU, a kernel pins its array operands in HBM, whence it
  # streams them itself (XLA would otherwise copy many into VMEM first),
  # except the parameters, which optax.apply_updates reads again: XLA may
  # place those for both. Interpreted kernels take operands as they are.
  # With multi, the guard's check kernel too, its two gradients pinned.
  tx, grads, params = _one_leaf_kernel_case(multi)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
  calls = [
    (eqn.params["interpret"], operands)
    for eqn, operands in _kernel_calls(jaxpr.jaxpr, [])
  ]
  pin = "with_memory_space_constraint"
  for interpret, operands in calls:
    if interpret:
      assert pin not in operands
  compiled = [ops for interpret, ops in calls if not interpret]
  # Operands: SMEM scalars, gradients, each moment's codes and absmax, the
  # parameter.
  moments = 6 if multi else 2
  step = [ops for ops in compiled if len(ops) > 2]
  assert len(step) == 1
  arrays = 2 + 2 * moments + 1 if multi else 1 + 2 * moments + 1
  assert step[0][-arrays:] == [pin] * (arrays - 1) + [None]
  assert pin not in step[0][:-arrays]  # the scalars
  checks = [ops for ops in compiled if len(ops) <= 2]
  assert checks == ([[pin, pin]] if multi else [])


@pytest.mark.parametrize("multi", [False, True])
def test_update_and_apply_kernel_writes_the_params_in_place(multi):
  # update_and_apply: the step kernel's last operand, the parameter, is
  # aliased to an output (the new params), besides each moment's codes and
  # absmax, and pinned in HBM like them; in update, only the moments are.
  tx, grads, params = _one_leaf_kernel_case(multi)
  state = tx.init(params)
  moments = 6 if multi else 2
  pin = "with_memory_space_constraint"
  for step, applied in (
    (tx.update, False),
    (functools.partial(dualoptax.update_and_apply, tx), True),
  ):
    jaxpr = jax.make_jaxpr(step)(grads, state, params)
    # The step's kernel, compiled and interpreted (not the check's).
    calls = [c for c in _kernel_calls(jaxpr.jaxpr, []) if len(c[1]) > 2]
    assert len(calls) == 2
    for eqn, operands in calls:
      aliases = dict(eqn.params["input_output_aliases"])
      assert len(aliases) == 2 * moments + applied, aliases
      assert (len(eqn.invars) - 1 in aliases) == applied
      if not eqn.params["interpret"]:
        assert (operands[-1] == pin) == applied
  new_params, _ = dualoptax.update_and_apply(tx, grads, state, params)
  assert jax.tree.structure(new_params) == jax.tree.structure(params)


@pytest.mark.parametrize(
  "shape, block, transposed, columns",
  [
    ((600, 512), 256, True, False),  # two row tiles, the last partial
    # 128 blocks per row: absmax kept rows-major
    ((8, 32768), 256, False, False),
    # Blocks narrower than lanes, of leaves TPU stores column-major: the
    # kernel takes the leaf transposed, blocks along sublanes, in tiles of
    # 192 x 384 lanes (one, partial) or 192 x 640 (two, the last partial);
    # and a block the whole row (as a 192-wide shard's blocks of 192).
    ((300, 192), 64, True, True),
    ((700, 192), 64, True, True),
    ((300, 64), 64, True, True),
    ((3, 300, 192), 64, True, True),  # a stack of them: a tile per layer
    # ... and of a leaf stored row-major: the tile is the whole last axis,
    # its blocks unrolled at static lane offsets.
    ((264, 192), 64, True, False),
  ],
)
def test_kernel_absmax_layouts(shape, block, transposed, columns):
  # The kernel takes a leaf's [rows, blocks] absmax transposed where TPU
  # stores it so (fewer than 128 blocks per row), as it is otherwise; and
  # the leaf itself transposed where TPU stores that so.
  from dualoptax import _kernel

  assert _kernel.columns_major(shape[-2:]) == columns
  params = {"w": jax.random.normal(jax.random.key(1), shape)}
  make = lambda kernel: dualoptax.dual_optim_plus_8bit(
    1e-2, block_size=block, chunk_size=4096, kernel=kernel
  )
  kernel = make("pallas")
  state = kernel.init(params)
  assert state.base_mu["w"].block_size == block
  nb = shape[-1] // block
  g = {"forget": params}
  jaxpr = str(jax.make_jaxpr(kernel.update)(g, state, params))
  assert "pallas_call" in jaxpr
  if columns:  # [lead, n, r]: a leaf's, and its absmax's ([lead, nb, r])
    lead, r = math.prod(shape[:-2]), shape[-2]
    assert f"u8[{lead},{shape[-1]},{r}]" in jaxpr
    assert f"f32[{lead},{nb},{r}]" in jaxpr
  else:
    assert (f"f32[{nb},{shape[0]}]" in jaxpr) == transposed
  # Two steps, each objective once: a layout read wrongly is wrong at once.
  _assert_steps_agree(
    jax.jit(make("xla").update),
    [jax.jit(kernel.update)],
    state,
    True,
    params,
    steps=2,
  )


@pytest.mark.parametrize(
  "shape, block, expected",
  [
    ((48, 512), 256, 48),  # all rows in one tile
    ((4096, 4096), 256, 512),  # tiles of 512 rows x one 256-value block
    ((50257, 768), 256, 512),  # the last row tile partial
    ((64, 4, 256), 256, None),  # merging (64, 4) rows would be a relayout
    ((64, 32, 256), 256, 512),
    ((5000,), 256, None),  # 1-d
    ((96, 96), 32, 96),  # blocks narrower than 128 lanes: whole rows
    ((96, 320), 64, None),  # ... but more than 4 such blocks a row
    # A 192-wide leaf in blocks of 64 (a shard's blocks of 192 alike), which
    # TPU stores column-major: its tile is 192 x 640 lanes (rows) ...
    ((50257, 192), 64, 640),
    ((300, 192), 64, 384),  # ... rows rounded up to whole lanes
    ((3, 300, 192), 64, 384),  # ... of one layer, in a stack of them
    # ... and one stored row-major: in VMEM a row takes 256 lanes, and its
    # absmax 128 more (320 rows a tile, here all 264).
    ((264, 192), 64, 264),
    ((8, 299520), 512, 8),  # a long last axis is many tiles one block wide
  ],
)
def test_kernel_tile_rows(shape, block, expected):
  from dualoptax import _kernel

  like = dualoptax.quantize_blockwise(
    jnp.zeros(shape[-1:] if len(shape) == 1 else (1, shape[-1])),
    signed=True,
    block_size=block,
  )
  assert _kernel.tile_rows(shape, [like]) == expected


@pytest.mark.parametrize(
  "shape",
  [
    (600, 512),  # a partial last row tile
    (40, 5120),  # partial last row and column tiles
    (50, 8, 256),  # leading axes merged into rows
    (3072,),  # a vector, read as [24, 128]
    (5000,),  # not a whole number of lanes: XLA's sum
    (30, 7),
  ],
)
def test_kernel_finiteness_check(shape):
  # The non-finite guard's check as a kernel (interpreted here): a NaN or Inf
  # anywhere in either tree, the first and last values included, is found,
  # and what a tile holds past the leaf (NaN in interpret mode) is not read.
  from dualoptax import _kernel

  x = jax.random.normal(jax.random.key(0), shape)
  trees = [{"w": x, "b": jnp.ones(3)}, {"w": -x, "b": jnp.zeros(3)}]
  jaxpr = str(jax.make_jaxpr(_kernel.all_finite)(trees))
  assert ("pallas_call" in jaxpr) == (shape[-1] % 128 == 0)
  check = jax.jit(_kernel.all_finite)
  assert bool(check(trees))
  size = x.size
  for flat in (0, size // 2 + 1, size - 1):
    at = np.unravel_index(flat, shape)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      for k in (0, 1):
        spoilt = [dict(t) for t in trees]
        spoilt[k]["w"] = spoilt[k]["w"].at[at].set(bad)
        assert not bool(check(spoilt)), (at, bad, k)


def test_kernel_finiteness_check_with_many_objectives():
  # Nine trees: three kernels per leaf (at most four arrays each, so that a
  # kernel's VMEM does not grow with the objectives), the last one's too.
  from dualoptax import _kernel

  x = jnp.ones((64, 256))
  trees = [{"w": x * k} for k in range(9)]
  jaxpr = str(jax.make_jaxpr(_kernel.all_finite)(trees))
  assert jaxpr.count("name=_nonfinite_sum") == 3
  check = jax.jit(_kernel.all_finite)
  assert bool(check(trees))
  for k in (0, 4, 8):
    spoilt = [*trees[:k], {"w": x.at[63, 255].set(jnp.inf)}, *trees[k + 1 :]]
    assert not bool(check(spoilt)), k


def test_kernel_is_validated():
  with pytest.raises(ValueError, match="kernel must be one of"):
    dualoptax.quantize_state(optax.adam(1e-3), kernel="cuda")
  with pytest.raises(ValueError, match="kernel must be one of"):
    dualoptax.dual_optim_plus_8bit(1e-3, kernel=None)


def _temp_bytes(tx, params, multi):
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(
    lambda p, s, g: tx.update({"forget": g} if multi else g, s, p),
    donate_argnums=1,
  )
  compiled = update.lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["adamw", "dual_optim_plus_8bit"])
def test_chunked_step_temporaries_are_a_fraction_of_whole(name):
  make, multi = CASES[name]
  params = {
    f"w{i}": jax.ShapeDtypeStruct((512, 1024), jnp.float32) for i in range(4)
  }
  whole = _temp_bytes(make(None), params, multi)
  chunked = _temp_bytes(make(2**16), params, multi)
  n = 4 * 512 * 1024
  # Whole: every changed moment decoded at once (>= 2 float32 per param);
  # chunked: a chunk of 64K values per leaf group at a time.
  assert whole >= 8 * n
  assert chunked <= whole / 8, (chunked / n, whole / n)


@pytest.mark.parametrize(
  "reusing, copying",
  [
    ("adamw", "adamw_without_buffer_reuse"),
    ("dual_optim_plus_8bit_unguarded", "dual_optim_plus_8bit"),
  ],
)
def test_update_takes_the_gradient_buffer(reusing, copying):
  # With the gradients dead after the update, the update is written into
  # their buffers: the step holds one params-sized float32 tree fewer.
  # Measured as benchmarks/memory.py --step train-grad does.
  params = {
    f"w{i}": jax.ShapeDtypeStruct((512, 1024), jnp.float32) for i in range(4)
  }
  wrap = (lambda g: {"forget": g}) if CASES[reusing][1] else (lambda g: g)
  reused, copied = (
    memory.measure(CASES[name][0](2**16), wrap, params, "train-grad")["temp"]
    for name in (reusing, copying)
  )
  gradient = 4.0  # B/param: a float32 gradient tree
  assert reused <= copied - 0.75 * gradient, (reused, copied)


@pytest.mark.parametrize("name", ["adamw", "dual_optim_plus_8bit"])
def test_update_and_apply_needs_no_update_buffer(name):
  # A train step whose loops write the params themselves holds no
  # params-sized update: one float32 tree fewer than update, then
  # optax.apply_updates (gradients passed in, params and state donated).
  # Measured as benchmarks/memory.py --step train / train-fused do.
  params = {
    f"w{i}": jax.ShapeDtypeStruct((512, 1024), jnp.float32) for i in range(4)
  }
  make, multi = CASES[name]
  wrap = (lambda g: {"forget": g}) if multi else (lambda g: g)
  separate, fused = (
    memory.measure(make(2**16), wrap, params, step)["temp"]
    for step in ("train", "train-fused")
  )
  update = 4.0  # B/param: a float32 update tree
  assert fused <= separate - 0.75 * update, (fused, separate)


def test_reuse_gradient_buffers_is_validated():
  with pytest.raises(ValueError, match="reuse_gradient_buffers"):
    dualoptax.quantize_state(optax.adam(1e-3), reuse_gradient_buffers=1)


def test_coupled_inner_update_warns_and_stays_exact():
  # A global-norm clip inside reads every leaf: those leaves are decoded whole.
  params = _params()

  def make(cs):
    return dualoptax.quantize_state(
      optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
      chunk_size=cs,
    )

  g = _grads(0, params)
  tx_whole, tx_chunk = make(None), make(4096)
  s = tx_whole.init(params)
  with pytest.warns(UserWarning, match="not element-wise per leaf"):
    u2, s2 = tx_chunk.update(g, s, params)
  u1, s1 = tx_whole.update(g, s, params)
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-6, atol=1e-9
    )


def test_array_closed_over_by_the_update_is_read_whole():
  # A fixed per-element scale captured by the update is whole, not a chunk:
  # the leaves that read it are decoded whole (with the warning), and the
  # step is the whole-state step's.
  params = _params()
  scale = jnp.linspace(0.5, 1.5, 48 * 512).reshape(48, 512)

  def scaled(updates, state, params=None):
    del params
    updates = dict(updates)
    updates["a"] = updates["a"] * scale
    return updates, state

  def make(cs):
    return dualoptax.quantize_state(
      optax.chain(
        optax.scale_by_adam(),
        optax.GradientTransformation(lambda p: optax.EmptyState(), scaled),
        optax.scale(-1e-2),
      ),
      chunk_size=cs,
    )

  g = _grads(0, params)
  s = make(None).init(params)
  with pytest.warns(UserWarning, match="closes over"):
    u2, s2 = jax.jit(make(4096).update)(g, s, params)
  u1, s1 = jax.jit(make(None).update)(g, s, params)
  _assert_states_close(s1, s2)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)


def test_elementwise_inner_update_does_not_warn():
  params = _params()
  tx = dualoptax.dual_optim_plus_8bit(1e-2, chunk_size=4096)
  s = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(tx.update)({"forget": _grads(0, params)}, s, params)


def test_chunk_size_is_validated():
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size"):
      dualoptax.quantize_state(optax.adam(1e-3), chunk_size=bad)


@pytest.mark.parametrize(
  "shape,chunk,devices,expected",
  [
    ((48, 512), 4096, 1, 6),  # 48 rows of 512: 8 rows per chunk
    ((48, 512), 2**22, 1, 2),  # fits in one chunk: still two (a real loop)
    ((64, 2048), 2**14, 8, 8),  # 64 / 8 devices = 8 rows per shard
    ((8, 2048), 16, 8, 1),  # one row per shard: no split keeps shards whole
    ((50257, 768), 2**22, 1, 29),  # GPT-2's embedding: 50257 = 29 * 1733
    ((5000,), 16, 1, 1),  # 1-d leaves are not split
    # Rows too few to reach chunk_size (the docstrings' examples): chunks as
    # small as whole rows of every shard allow.
    ((3, 2**24), 2**22, 1, 3),
    ((2, 5 * 10**7), 2**22, 8, 1),
  ],
)
def test_num_chunks(shape, chunk, devices, expected):
  k = num_chunks(shape, chunk, devices)
  assert k == expected
  rows = shape[0]
  assert rows % k == 0
  if k > 1:  # every shard of the leading axis holds whole chunk rows
    assert (rows // k) % np.gcd(rows, devices) == 0


def _quantized_leaves(state):
  return [
    x
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
    if isinstance(x, QuantizedArray)
  ]


@pytest.mark.parametrize(
  "chunk_size, kernel",
  # The kernel skips a call by selecting in VMEM, not by a conditional.
  [(None, "xla"), (4096, "xla"), (4096, "pallas")],
)
def test_idle_objective_and_skipped_call_keep_every_code(chunk_size, kernel):
  params = _params()
  tx = dualoptax.dual_optim_plus_8bit(
    1e-2, weight_decay=0.1, chunk_size=chunk_size, kernel=kernel
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(2):
    _, state = update(
      {"forget": _grads(t, params), "retain": _grads(t + 5, params)},
      state,
      params,
    )
  # A retain-only call leaves the forget moments' codes as they were.
  _, after = update({"retain": _grads(3, params)}, state, params)
  for a, b in zip(
    _quantized_leaves(state.deltas["forget"]),
    _quantized_leaves(after.deltas["forget"]),
  ):
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.absmax, b.absmax)
  changed = [
    not np.array_equal(a.codes, b.codes)
    for a, b in zip(
      _quantized_leaves(state.deltas["retain"]),
      _quantized_leaves(after.deltas["retain"]),
    )
  ]
  assert all(changed)
  # A NaN anywhere skips the call: zero update, every code and count kept.
  bad = _grads(4, params)
  bad["c"] = bad["c"].at[3, 5].set(jnp.nan)
  g_bad = {"forget": _grads(4, params), "retain": bad}
  if kernel == "pallas":
    jaxpr = str(jax.make_jaxpr(tx.update)(g_bad, after, params))
    assert "pallas_call" in jaxpr
  u, skipped = update(g_bad, after, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert int(skipped.skipped) == int(after.skipped) + 1
  for a, b in zip(
    jax.tree.leaves(after._replace(skipped=0)),
    jax.tree.leaves(skipped._replace(skipped=0)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Written by the step itself, the params are as they were, bit for bit.
  kept, also_skipped = _fused_step(tx)(g_bad, after, params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(also_skipped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_blocks_spanning_the_leading_axis_are_chunked_whole():
  # (256, 4, 16): 256-value blocks of 4 rows strided by 64 (QuantizedArray.rows);
  # the chunk count must divide those 64 block groups.
  assert num_chunks((256, 4, 16), 4096, 1, divides=64) == 4
  assert num_chunks((256, 4, 16), 4096, 1, divides=2) == 2
  params = {"attn": jax.random.normal(jax.random.key(1), (256, 4, 16))}
  make = lambda cs: dualoptax.dual_optim_plus_8bit(1e-2, chunk_size=cs)
  state = make(None).init(params)
  q = state.base_mu["attn"]
  assert q.rows == 4 and q.block_size == 256 and q.absmax.shape == (64,)
  whole, chunked = jax.jit(make(None).update), jax.jit(make(4096).update)
  for t in range(3):
    g = {("forget", "retain")[t % 2]: _grads(t, params)}
    u1, s1 = whole(g, state, params)
    u2, s2 = chunked(g, state, params)
    _assert_states_close(s1, s2)
    np.testing.assert_allclose(u1["attn"], u2["attn"], rtol=2e-6, atol=1e-5)
    params, state = optax.apply_updates(params, u1), s1
