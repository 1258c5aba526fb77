"""One contract for every transformation dualoptax exports.

As optax's contrib runs each optimizer through a shared test, every case of
``CASES`` (a factory and the way to build its ``update`` input) goes through the
same contracts: jit, ``lax.scan``, ``optax.chain``, ``inject_hyperparams``,
dtypes, an orbax checkpoint, a sharded update without array-sized collectives,
and parity with the NumPy statement of ``tests/reference.py`` where one applies.

Tolerances come from the noise being compared: two float32 computations of the
same math differ by reduction order and fused-versus-separate rounding, a few
units in the last place of a leaf's largest value (``_ULP`` of them, checked to
be enough and to fail on a relative error of 1e-5); an 8-bit moment sitting on a
code boundary may take the neighbouring code when that rounding differs, which
``_assert_close`` allows for a small fraction of codes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import re
import textwrap
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax
from dualoptax import QuantizedArray
from tests import multidevice
from tests import test_parity as parity
from tests.reference import DualOptimPlusRef, DualOptimRef

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR = 1e-2
WD = 0.01
OBJECTIVES = ("forget", "retain")
TASKS = ("a", "b", "c")
# Leaves big enough for 8-bit state (64 * 256 >= min_size 4096) and one that
# stays float32 (256 < 4096).
SHAPES = {"w": (64, 256), "b": (256,)}
STEPS = 3
# FSDP-style leaves of the sharded contract: rows split over 8 devices.
SHARDED_SHAPES = {"w": (64, 2048), "b": (64, 2048)}
# Calls of a multi-objective transformation: single objectives and a joint call.
CALLS = (("forget",), ("retain",), ("forget", "retain"))

# Float32 agreement: this many float32 epsilons of a leaf's largest magnitude.
_ULP = 16
_EPS32 = float(np.finfo(np.float32).eps)
# Fraction of 8-bit codes allowed to take a neighbouring code (see docstring).
_CODE_FLIPS = 1e-3


def _decays(params):
  """Weight-decay mask: matrices only (exercises the callable mask)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


# ---------------------------------------------------------------------------
# The case table.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
  """One exported transformation under contract.

  Attributes:
    make: ``make(learning_rate)`` builds the transformation (``learning_rate``
      ignored by factories without one).
    kind: the update input: ``"objectives"`` (a Mapping of any non-empty subset
      of ``names``), ``"tasks"`` (a Mapping of every name) or ``"params"``
      (params-shaped gradients).
    has_lr: the factory has a learning rate (``inject_hyperparams`` applies).
    names: the objective or task names of a Mapping input.
    reference: ``reference()`` -> ``(tx, ref)`` built in float64 on
      ``tests/test_parity.SHAPES`` (None where no NumPy statement applies).
    merged: ``update`` returns one params-shaped tree (False: one per objective,
      as ``per_objective`` does).
  """

  make: Callable[..., Any]
  kind: str
  has_lr: bool = True
  names: tuple[str, ...] = OBJECTIVES
  reference: Optional[Callable[[], tuple[Any, Any]]] = None
  merged: bool = True


def _multitask(name):
  """``dualoptax.<name>`` built for ``TASKS``; skips the test while a
  multi-task transformation has not landed."""
  fn = getattr(dualoptax, name, None)
  if fn is None:
    pytest.skip(f"dualoptax.{name} is not there yet")
  params = inspect.signature(fn).parameters
  for key in ("tasks", "objectives", "names"):
    if key in params:
      return fn(**{key: TASKS})
  return fn()


def _ref_plus(stable=True):
  lrs = {"forget": 3e-3, "retain": optax.cosine_decay_schedule(1e-3, 50)}
  tx = dualoptax.dual_optim_plus(lrs, weight_decay=WD, stable=stable)
  return tx, DualOptimPlusRef(parity.SHAPES, lr=lrs, wd=WD, stable=stable)


def _ref_scale_by():
  # scale_by returns +u: the reference's step with lr = -1 and no decay.
  return (
    dualoptax.scale_by_dual_optim_plus(),
    DualOptimPlusRef(parity.SHAPES, lr=-1.0, stable=True),
  )


def _ref_dual_optim():
  lrs = {"forget": 2e-3, "retain": optax.exponential_decay(1e-3, 10, 0.9)}
  return (
    dualoptax.dual_optim(lrs, weight_decay=WD),
    DualOptimRef(parity.SHAPES, lr=lrs, wd=WD),
  )


def _ref_accumulate():
  # every_k = 1: each call emits, so the wrapped rule is the reference's.
  tx, ref = _ref_plus()
  return dualoptax.accumulate_objectives(tx, every_k=1), ref


CASES = {
  "dual_optim_plus": Case(
    lambda learning_rate=LR: dualoptax.dual_optim_plus(
      learning_rate, weight_decay=WD, mask=_decays
    ),
    "objectives",
    reference=_ref_plus,
  ),
  "scale_by_dual_optim_plus": Case(
    lambda learning_rate=LR: dualoptax.scale_by_dual_optim_plus(),
    "objectives",
    has_lr=False,
    reference=_ref_scale_by,
  ),
  "dual_optim": Case(
    lambda learning_rate=LR: dualoptax.dual_optim(
      learning_rate, weight_decay=WD, mask=_decays
    ),
    "objectives",
    reference=_ref_dual_optim,
  ),
  # Chunks of 4096 values: the 64 x 256 moments are stepped 16 rows at a
  # time (the default chunk holds these leaves whole; the next case uses it).
  "dual_optim_plus_8bit": Case(
    lambda learning_rate=LR: dualoptax.dual_optim_plus_8bit(
      learning_rate, weight_decay=WD, chunk_size=4096
    ),
    "objectives",
  ),
  "quantize_state_adamw": Case(
    lambda learning_rate=LR: dualoptax.quantize_state(
      optax.adamw(learning_rate, weight_decay=WD)
    ),
    "params",
  ),
  "per_objective_adamw": Case(
    lambda learning_rate=LR: dualoptax.per_objective(
      optax.adamw(learning_rate, weight_decay=WD)
    ),
    "objectives",
    merged=False,
  ),
  "accumulate_objectives": Case(
    lambda learning_rate=LR: dualoptax.accumulate_objectives(
      dualoptax.dual_optim_plus(learning_rate, weight_decay=WD), every_k=2
    ),
    "objectives",
    reference=_ref_accumulate,
  ),
  "pcgrad": Case(
    lambda learning_rate=LR: _multitask("pcgrad"),
    "tasks",
    has_lr=False,
    names=TASKS,
  ),
  "mgda": Case(
    lambda learning_rate=LR: _multitask("mgda"),
    "tasks",
    has_lr=False,
    names=TASKS,
  ),
  "cagrad": Case(
    lambda learning_rate=LR: _multitask("cagrad"),
    "tasks",
    has_lr=False,
    names=TASKS,
  ),
}


# ---------------------------------------------------------------------------
# Inputs and runs.
# ---------------------------------------------------------------------------
def _params(dtype=jnp.float32, shapes=None, seed=0):
  rng = np.random.default_rng(seed)
  return {
    n: jnp.asarray(rng.standard_normal(s), dtype)
    for n, s in (shapes or SHAPES).items()
  }


def _noise(params, seed, mean):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(mean + rng.standard_normal(p.shape), p.dtype), params
  )


def _names(case, step):
  """Names present in call ``step``: varying subsets where the case allows."""
  return CALLS[step % len(CALLS)] if case.kind == "objectives" else case.names


def _input(case, params, step, names=None):
  """The ``update`` input of call ``step``.

  Objective ``i`` has a mean of ``±0.5`` (alternating signs: the objectives
  conflict) plus unit noise; its gradient at a step does not depend on which
  other objectives are present.
  """
  if case.kind == "params":
    return _noise(params, 1000 * step, 0.1)
  names = _names(case, step) if names is None else names
  return {
    k: _noise(params, 1000 * step + i + 1, 0.5 * (-1) ** i)
    for i, k in enumerate(case.names)
    if k in names
  }


def _run(case, tx, params, steps=STEPS, update=None):
  """``steps`` calls from ``tx.init``; returns (updates, params, state)."""
  update = _jit(tx) if update is None else update
  state = tx.init(params)
  updates = []
  for s in range(steps):
    u, state = update(_input(case, params, s), state, params)
    params = _apply(case, params, u)
    updates.append(u)
  return updates, params, state


def _apply(case, params, updates):
  """Params after ``updates`` (per-objective updates are summed)."""
  if not case.merged:
    updates = jax.tree.map(lambda *u: sum(u), *updates.values())
  return optax.apply_updates(params, updates)


def _is_q(x):
  return isinstance(x, QuantizedArray)


def _leaves(tree):
  return jax.tree.flatten(tree, is_leaf=_is_q)


def _assert_close(got, want, ulp=_ULP, what=""):
  """Equal structure; float leaves within ``ulp`` epsilons of their largest
  magnitude; integer leaves equal; 8-bit codes equal but for rare neighbours."""
  got_leaves, got_def = _leaves(got)
  want_leaves, want_def = _leaves(want)
  assert got_def == want_def, (what, got_def, want_def)
  for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
    where = f"{what} leaf {i}"
    if _is_q(b):
      assert (a.shape, a.dtype, a.signed, a.pad, a.block_size) == (
        b.shape,
        b.dtype,
        b.signed,
        b.pad,
        b.block_size,
      ), where
      codes_a = np.asarray(a.codes, np.int32)
      codes_b = np.asarray(b.codes, np.int32)
      assert np.max(np.abs(codes_a - codes_b), initial=0) <= 1, where
      assert np.mean(codes_a != codes_b) <= _CODE_FLIPS, where
      _assert_float_close(a.absmax, b.absmax, ulp, where)
      continue
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
    if np.issubdtype(b.dtype, np.inexact) or b.dtype == jnp.bfloat16:
      _assert_float_close(a, b, ulp, where)
    else:
      np.testing.assert_array_equal(a, b, err_msg=where)


def _assert_float_close(a, b, ulp, where):
  eps = float(jnp.finfo(np.asarray(b).dtype).eps)
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = np.max(np.abs(b), initial=0.0)
  np.testing.assert_allclose(
    a, b, rtol=0, atol=ulp * eps * scale, err_msg=where
  )


_BUILT = {}


def _case(name):
  """The case and its transformation (skips a multi-task one not yet there).

  One transformation per case for the whole module, so that contracts share
  the compilations of its ``update`` (``_jit``).
  """
  case = CASES[name]
  if name not in _BUILT:
    _BUILT[name] = case.make()
  return case, _BUILT[name]


_JITTED = {}


def _jit(tx):
  """``jax.jit(tx.update)``, one per transformation (shared compile cache)."""
  if id(tx) not in _JITTED:
    _JITTED[id(tx)] = (tx, jax.jit(tx.update))
  return _JITTED[id(tx)][1]


def _x64():
  """A context with 64-bit types enabled (not a process-wide switch)."""
  return jax.enable_x64(True)


def _inner_dual_state(state):
  """The DualOptim(+) state inside a wrapper's state."""
  while hasattr(state, "inner_state"):
    state = state.inner_state
  return state


NAMES = list(CASES)


# ---------------------------------------------------------------------------
# Contracts.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  """Calls under ``jit`` compute what op-by-op calls compute."""
  case, tx = _case(name)
  params = _params()
  eager, p_eager, s_eager = _run(case, tx, params, update=tx.update)
  jitted, p_jit, s_jit = _run(case, tx, params)
  for i, (a, b) in enumerate(zip(jitted, eager)):
    _assert_close(a, b, what=f"update {i}")
  _assert_close(p_jit, p_eager, what="params")
  _assert_close(s_jit, s_eager, what="state")


@pytest.mark.parametrize("name", NAMES)
def test_scan_matches_python_loop(name):
  """A ``lax.scan`` over steps (alternating objectives by a traced index
  where the structure allows) equals a Python loop of jitted calls."""
  case, tx = _case(name)
  params = _params()
  n = STEPS + 2
  every = {s: _input(case, params, s, names=case.names) for s in range(n)}
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *every.values())
  # Alternation by a traced index where every call returns the same structure.
  switch = case.kind == "objectives" and case.merged

  def call(s, inputs, state, p):
    if not switch:
      return tx.update(inputs, state, p)
    return dualoptax.switch_objective(
      dualoptax.alternating_index(s, 1, 2),
      case.names,
      lambda k: tx.update({k: inputs[k]}, state, p),
    )

  def body(carry, xs):
    p, state = carry
    u, state = call(xs[0], xs[1], state, p)
    return (_apply(case, p, u), state), u

  (p_scan, s_scan), u_scan = jax.jit(
    lambda p, s, xs: jax.lax.scan(body, (p, s), xs)
  )(params, tx.init(params), (jnp.arange(n), stacked))
  update = _jit(tx)
  p_loop, s_loop = params, tx.init(params)
  for s in range(n):
    inputs = every[s]
    if switch:
      k = case.names[dualoptax.alternating_index(s, 1, 2)]
      inputs = {k: inputs[k]}
    u, s_loop = update(inputs, s_loop, p_loop)
    p_loop = _apply(case, p_loop, u)
    _assert_close(
      jax.tree.map(lambda x, s=s: x[s], u_scan), u, what=f"update {s}"
    )
  _assert_close(p_scan, p_loop, what="params")
  _assert_close(s_scan, s_loop, what="state")


def _same_params_run(case, txs, params, steps=2):
  """Runs every tx on the same joint calls and params (those of the first tx).

  Returns per tx the list of updates and the final state.
  """
  updates = [_jit(tx) for tx in txs]
  states = [tx.init(params) for tx in txs]
  outs = [[] for _ in txs]
  for s in range(steps):
    inputs = _input(case, params, s, names=case.names)
    for i, update in enumerate(updates):
      u, states[i] = update(inputs, states[i], params)
      outs[i].append(u)
    params = _apply(case, params, outs[0][-1])
  return outs, states


@pytest.mark.parametrize("name", NAMES)
def test_chain_then_scale_is_half_the_update(name):
  """``optax.chain(tx, optax.scale(0.5))``: half the update, same state.

  (Clipping *before* a Mapping-input transformation is ``per_objective``'s
  job; optax's own transformations expect params-shaped input.)
  """
  case, tx = _case(name)
  chained = optax.chain(tx, optax.scale(0.5))
  (plain, chain), (s_plain, s_chain) = _same_params_run(
    case, [tx, chained], _params()
  )
  for i, (a, b) in enumerate(zip(chain, plain)):
    _assert_close(a, jax.tree.map(lambda x: 0.5 * x, b), what=f"update {i}")
  _assert_close(s_chain[0], s_plain, what="state")


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_learning_rate(name):
  """``inject_hyperparams`` over the lr: the same updates as the plain
  factory, and a doubled injected lr doubles the update."""
  case = CASES[name]
  if not case.has_lr:
    pytest.skip("no learning rate")
  _, plain = _case(name)
  injected = optax.inject_hyperparams(case.make)(learning_rate=LR)
  update = jax.jit(injected.update)
  params = _params()
  s_plain, s_inj = plain.init(params), injected.init(params)
  assert float(s_inj.hyperparams["learning_rate"]) == pytest.approx(LR)
  for s in range(2):  # joint calls: the second from a non-zero state
    inputs = _input(case, params, s, names=case.names)
    u, s_plain = _jit(plain)(inputs, s_plain, params)
    # The same state with the injected lr doubled: the update doubles and the
    # moments do not depend on the lr.
    doubled = s_inj._replace(
      hyperparams={
        **s_inj.hyperparams,
        "learning_rate": jnp.asarray(2 * LR, jnp.float32),
      }
    )
    u2, s2 = update(inputs, doubled, params)
    u1, s_inj = update(inputs, s_inj, params)
    _assert_close(u1, u, what=f"update {s}")
    _assert_close(u2, jax.tree.map(lambda x: 2 * x, u1), what=f"doubled {s}")
    _assert_close(s2.inner_state, s_inj.inner_state, what=f"state {s}")
    params = _apply(case, params, u)
  _assert_close(s_inj.inner_state, s_plain, what="state")


@pytest.mark.parametrize(
  "factory",
  [
    dualoptax.dual_optim,
    dualoptax.dual_optim_plus,
    dualoptax.dual_optim_plus_8bit,
  ],
  ids=lambda f: f.__name__,
)
def test_inject_hyperparams_every_numeric_argument(factory):
  """Every numeric hyperparameter can be injected (not only the lr): injected
  ``weight_decay`` and ``b1`` are in the state and give the plain factory's
  updates (a factory taking ``**kwargs`` would hide them from optax). The
  8-bit storage sizes are Python ints, named static."""
  hps = dict(learning_rate=LR, weight_decay=0.1, b1=0.8)
  static = dualoptax.STATIC_8BIT_ARGS if "8bit" in factory.__name__ else ()
  injected = optax.inject_hyperparams(factory, static_args=static)(**hps)
  plain = factory(**hps)
  params = _params()
  s_inj, s_plain = injected.init(params), plain.init(params)
  assert set(hps) <= set(s_inj.hyperparams)
  case = CASES[factory.__name__]
  for s in range(2):
    inputs = _input(case, params, s, names=case.names)
    u, s_plain = _jit(plain)(inputs, s_plain, params)
    u1, s_inj = jax.jit(injected.update)(inputs, s_inj, params)
    _assert_close(u1, u, what=f"update {s}")
    params = _apply(case, params, u)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_update_dtype_follows_params(name, dtype):
  """float32, bfloat16 and (in an x64 context) float64 params: updates in
  the params' dtype, finite, and a finite state."""
  case, tx = _case(name)
  context = _x64() if dtype == "float64" else contextlib.nullcontext()
  with context:
    params = _params(jnp.dtype(dtype))
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params))
    # Two joint calls (one compilation per dtype): the second from a state
    # that is no longer zero.
    update, state, updates = _jit(tx), tx.init(params), []
    for s in range(2):
      u, state = update(
        _input(case, params, s, names=case.names), state, params
      )
      params = _apply(case, params, u)
      updates.append(u)
    for i, u in enumerate(updates):
      for leaf in jax.tree.leaves(u):
        assert leaf.dtype == jnp.dtype(dtype), (i, leaf.dtype)
        assert bool(jnp.all(jnp.isfinite(leaf))), i
    for x in jax.tree.leaves(params):
      assert x.dtype == jnp.dtype(dtype)
    for x in jax.tree.leaves(state, is_leaf=_is_q):
      if _is_q(x):
        x = dualoptax.dequantize_blockwise(x)
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("name", NAMES)
def test_orbax_checkpoint_round_trip(name, tmp_path):
  """Save, restore against an abstract target: equal types and values, and
  a bit-identical next update."""
  ocp = pytest.importorskip("orbax.checkpoint")
  case, tx = _case(name)
  update = _jit(tx)
  _, params, state = _run(case, tx, _params(), update=update)
  saved = {"params": params, "opt_state": state}
  path = os.path.join(tmp_path, "ckpt")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, saved)
    ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, target)
  # Types (NamedTuples, QuantizedArray and its static layout) are preserved.
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  assert type(restored["opt_state"]) is type(state)
  q_saved = [x for x in _leaves(state)[0] if _is_q(x)]
  q_restored = [x for x in _leaves(restored["opt_state"])[0] if _is_q(x)]
  assert len(q_saved) == len(q_restored)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The next update is bit-identical.
  inputs = _input(case, params, STEPS)
  u1, s1 = update(inputs, state, params)
  u2, s2 = update(inputs, restored["opt_state"], restored["params"])
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


PARITY = [n for n in NAMES if CASES[n].reference is not None]


def _parity_schedule(names, n_steps=60, seed=0):
  """The 1:5 alternation, then random non-empty subsets (joint calls)."""
  rng = np.random.default_rng(seed)
  schedule = parity.alternate(1, 5, n_steps // 2)
  for _ in range(n_steps - n_steps // 2):
    mask = rng.random(len(names)) < 0.5
    if not mask.any():
      mask[rng.integers(len(names))] = True
    schedule.append(tuple(k for k, m in zip(names, mask) if m))
  return schedule


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_numpy_reference_float64(name):
  """Equal to ``tests/reference.py`` in float64 over alternating and joint
  calls (through the wrapper where the case has one)."""
  with _x64():
    tx, ref = CASES[name].reference()
    worst, state, _ = parity.run_parity(
      tx, ref, _parity_schedule(OBJECTIVES), np.float64
    )
    # float64 rounding over these 60 steps: at most 1.1e-12 measured (the
    # scale_by case, whose unit steps move the params most).
    assert worst <= 1e-10, worst
    state = _inner_dual_state(state)
    if isinstance(ref, DualOptimPlusRef):
      parity.check_moments(state, ref, 1e-10)
    else:
      for k in OBJECTIVES:
        assert int(state.deltas[k].count) == ref.t[k]
        for n in parity.SHAPES:
          np.testing.assert_allclose(
            state.deltas[k].mu[n], ref.m[k][n], rtol=1e-10, atol=1e-12
          )
          np.testing.assert_allclose(
            state.deltas[k].nu[n], ref.v[k][n], rtol=1e-10, atol=1e-12
          )


# ---------------------------------------------------------------------------
# Sharded update: no array-sized collective in the compiled HLO.
# ---------------------------------------------------------------------------
_ARRAY_TYPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
# The largest all-reduce allowed, in elements: a few scalars (the finiteness
# flag) or a task Gram matrix; a shard of a leaf here holds 16384.
_TINY = 64


_collectives = multidevice.collectives


def _is_tiny_all_reduce(result_type, op):
  sizes = [
    math.prod(int(d) for d in dims.split(",") if d)
    for dims in _ARRAY_TYPE.findall(result_type)
  ]
  return op == "all-reduce" and bool(sizes) and max(sizes) <= _TINY


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, traceback
    import jax, numpy as np, pytest
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tests import test_contract as tc

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data", None))
    params = jax.device_put(tc._params(shapes=tc.SHARDED_SHAPES), rows)
    out = {"__devices__": jax.device_count()}
    for name in tc.NAMES:
      try:
        case, tx = tc._case(name)
      except pytest.skip.Exception as e:
        out[name] = {"skip": str(e)}
        continue
      try:
        state = tx.init(params)  # outside jit, on the sharded params
        inputs = jax.device_put(tc._input(case, params, 2, names=case.names),
                                rows)
        def step(p, s, g, case=case, tx=tx):
          u, s = tx.update(g, s, p)
          return tc._apply(case, p, u), s
        compiled = jax.jit(step).lower(params, state, inputs).compile()
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        unsharded = [jax.tree_util.keystr(k) for k, x in flat
                     if x.ndim and x.shape[0] == 64
                     and not x.sharding.is_equivalent_to(rows, x.ndim)]
        out[name] = {"collectives": tc._collectives(compiled.as_text()),
                     "unsharded_state": unsharded}
      except Exception:
        out[name] = {"error": traceback.format_exc()[-4000:]}
    # Control: a row sum of a row-sharded array moves an array of 2048.
    control = jax.jit(lambda x: x.sum(0)).lower(params["w"]).compile()
    out["__control__"] = tc._collectives(control.as_text())
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_report():
  """Every case compiled once on 8 simulated devices, in one subprocess (the
  device count must be set before JAX starts; this process keeps one)."""
  report = multidevice.json_result(_SHARDED_SCRIPT)
  assert report["__devices__"] == 8
  return report


def test_sharded_checker_sees_array_sized_collectives(sharded_report):
  """Control: the checker flags an array-sized all-reduce and allows tiny
  ones."""
  control = sharded_report["__control__"]
  assert control, "a cross-shard row sum must show a collective"
  assert not all(_is_tiny_all_reduce(t, op) for t, op in control), control
  assert _is_tiny_all_reduce("(f32[], pred[])", "all-reduce")
  assert _is_tiny_all_reduce("f32[3,3]{1,0}", "all-reduce")
  assert not _is_tiny_all_reduce("f32[8,2048]{1,0}", "all-reduce")
  assert not _is_tiny_all_reduce("f32[]", "all-gather")


@pytest.mark.parametrize("name", NAMES)
def test_sharded_update_has_no_array_sized_collectives(name, sharded_report):
  """Row-sharded params on 8 devices (``init`` outside ``jit``): the state
  is sharded like the params and the compiled update moves no array."""
  report = sharded_report[name]
  if "skip" in report:
    pytest.skip(report["skip"])
  if "error" in report:
    pytest.fail(
      f"in the 8-device subprocess:\n{report['error']}", pytrace=False
    )
  # init on sharded params gives state sharded like them.
  assert report["unsharded_state"] == [], report["unsharded_state"]
  bad = [
    (t, op) for t, op in report["collectives"] if not _is_tiny_all_reduce(t, op)
  ]
  assert not bad, bad
