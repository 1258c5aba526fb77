"""quantize_state and dual_optim_plus_8bit: selection, signedness, training, memory, IO."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax
from benchmarks.memory import gpt2_small_shapes
from dualoptax import QuantizedArray


def _is_q(x):
  return isinstance(x, QuantizedArray)


def _quantized(state):
  """``{state key path: QuantizedArray}``."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)[0]
  return {jax.tree_util.keystr(p): x for p, x in flat if _is_q(x)}


PARAMS = {
  "w": jnp.ones((16, 512)) * 0.5,
  "emb": jnp.ones((64, 128)),
  "b": jnp.zeros((512,)),
}


def _grads(scale=1.0):
  return jax.tree.map(
    lambda p: (
      scale * jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape)
    ),
    PARAMS,
  )


# Expected (quantized path, signed) per wrapped optimizer; everything else stays put.
CASES = {
  "adam": (
    lambda: optax.adam(1e-2),
    False,
    {
      "[0].mu['w']": True,
      "[0].nu['w']": False,
      "[0].mu['emb']": True,
      "[0].nu['emb']": False,
    },
  ),
  "adamw": (
    lambda: optax.adamw(1e-2, weight_decay=0.1),
    False,
    {
      "[0].mu['w']": True,
      "[0].nu['w']": False,
      "[0].mu['emb']": True,
      "[0].nu['emb']": False,
    },
  ),
  "sgd_momentum": (
    lambda: optax.sgd(1e-2, momentum=0.9),
    False,
    {"[0].trace['w']": True, "[0].trace['emb']": True},
  ),
  "lion": (
    lambda: optax.lion(1e-3),
    False,
    {"[0].mu['w']": True, "[0].mu['emb']": True},
  ),
  "chain": (
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    False,
    {
      "[1][0].mu['w']": True,
      "[1][0].nu['w']": False,
      "[1][0].mu['emb']": True,
      "[1][0].nu['emb']": False,
    },
  ),
  "inject_hyperparams": (
    lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    False,
    {
      ".inner_state[0].mu['w']": True,
      ".inner_state[0].nu['w']": False,
      ".inner_state[0].mu['emb']": True,
      ".inner_state[0].nu['emb']": False,
    },
  ),
  "dual_optim": (
    lambda: dualoptax.dual_optim(1e-2),
    True,
    {
      f".deltas['{k}'].{f}['{p}']": f == "mu"
      for k in ("forget", "retain")
      for f in ("mu", "nu")
      for p in ("w", "emb")
    },
  ),
  "dual_optim_plus": (
    lambda: dualoptax.dual_optim_plus(1e-2),
    True,
    {
      **{
        f".base_{f}['{p}']": f == "mu"
        for f in ("mu", "nu")
        for p in ("w", "emb")
      },
      **{
        f".deltas['{k}'].{f}['{p}']": True
        for k in ("forget", "retain")
        for f in ("mu", "nu")
        for p in ("w", "emb")
      },
    },
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_wrapped_optimizer_runs_and_tracks_float32(name):
  make, multi, expected = CASES[name]
  tx8 = dualoptax.quantize_state(make(), min_size=4096)
  tx32 = make()
  s8, s32 = tx8.init(PARAMS), tx32.init(PARAMS)
  q = _quantized(s8)
  assert {k: v.signed for k, v in q.items()} == expected
  # Nothing else changed: counters stay int32, small leaves stay float32 arrays.
  for leaf in jax.tree.leaves(s8, is_leaf=_is_q):
    if not _is_q(leaf):
      assert not (
        jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size >= 4096
      )

  def run(tx, state):
    def step(carry, i):
      p, s = carry
      g = jax.tree.map(lambda x: x * jnp.cos(i * 1.0), _grads())
      g = {"forget": g} if multi else g
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (PARAMS, state), jnp.arange(5))[0]

  (p8, s8), (p32, _) = jax.jit(lambda: (run(tx8, s8), run(tx32, s32)))()
  assert jax.tree.structure(s8, is_leaf=_is_q) == jax.tree.structure(
    tx8.init(PARAMS), is_leaf=_is_q
  )
  # Relative L2 distance of the 8-bit trajectory from the float32 one.
  for k in PARAMS:
    moved = float(jnp.linalg.norm(p32[k] - PARAMS[k]))
    diff = float(jnp.linalg.norm(p8[k] - p32[k]))
    assert moved > 0 and diff <= 0.05 * moved, (k, diff, moved)


def test_inject_hyperparams_around_the_wrapper():
  tx = optax.inject_hyperparams(
    lambda learning_rate: dualoptax.quantize_state(optax.adam(learning_rate))
  )(learning_rate=1e-2)
  state = tx.init(PARAMS)
  assert set(_quantized(state)) == {
    ".inner_state[0].mu['w']",
    ".inner_state[0].nu['w']",
    ".inner_state[0].mu['emb']",
    ".inner_state[0].nu['emb']",
  }
  state.hyperparams["learning_rate"] = jnp.asarray(
    0.0
  )  # the injected value is used
  u, state = jax.jit(tx.update)(_grads(), state, PARAMS)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  assert isinstance(state.inner_state[0].nu["w"], QuantizedArray)


def test_min_size_exclude_and_signed_override():
  tx = dualoptax.quantize_state(optax.adam(1e-2), min_size=512, exclude=["emb"])
  q = _quantized(tx.init(PARAMS))
  assert set(q) == {"[0].mu['w']", "[0].nu['w']", "[0].mu['b']", "[0].nu['b']"}
  tx = dualoptax.quantize_state(
    optax.adam(1e-2),
    min_size=0,
    exclude=lambda p: {"w": True, "emb": False, "b": True},
  )
  assert set(_quantized(tx.init(PARAMS))) == {"[0].mu['emb']", "[0].nu['emb']"}
  tx = dualoptax.quantize_state(optax.adam(1e-2), signed=True)
  assert all(q.signed for q in _quantized(tx.init(PARAMS)).values())
  tx = dualoptax.quantize_state(
    optax.adam(1e-2), signed=lambda path, leaf: False if ".mu" in path else None
  )
  assert not any(q.signed for q in _quantized(tx.init(PARAMS)).values())
  # Nested names match consecutive keys anywhere in the parameter path.
  nested = {
    "params": {
      "wte": {"embedding": jnp.ones((64, 128))},
      "h": jnp.ones((64, 128)),
    }
  }
  tx = dualoptax.quantize_state(optax.adam(1e-2), exclude=("wte",))
  assert set(_quantized(tx.init(nested))) == {
    "[0].mu['params']['h']",
    "[0].nu['params']['h']",
  }
  tx = dualoptax.quantize_state(
    optax.adam(1e-2), exclude=("params/wte/embedding",)
  )
  assert len(_quantized(tx.init(nested))) == 2


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(block_size=100), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(min_size=-1), "min_size"),
    (dict(exclude=("embedding",)), "exclude"),
    (dict(exclude=("w/b",)), "exclude"),
    (dict(exclude=(3,)), "exclude"),
  ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tx = dualoptax.quantize_state(optax.adam(1e-3), **kwargs)
    tx.init(PARAMS)
  with pytest.raises(ValueError, match=match):
    tx = dualoptax.dual_optim_plus_8bit(1e-3, **kwargs)
    tx.init(PARAMS)


def test_dual_optim_plus_8bit_variants():
  groups = {}
  for qb, qd in ((True, True), (True, False), (False, True)):
    tx = dualoptax.dual_optim_plus_8bit(
      1e-2, quantize_base=qb, quantize_delta=qd
    )
    q = _quantized(tx.init(PARAMS))
    groups[(qb, qd)] = q
    assert any(k.startswith(".base_") for k in q) == qb
    assert any(k.startswith(".deltas") for k in q) == qd
  both = groups[(True, True)]
  assert not both[".base_nu['w']"].signed and both[".base_mu['w']"].signed
  assert both[".deltas['retain'].nu['w']"].signed  # a signed correction to v_B
  with pytest.raises(ValueError, match="quantize_base"):
    dualoptax.dual_optim_plus_8bit(1e-2, quantize_base=1)
  with pytest.raises(TypeError):
    dualoptax.dual_optim_plus_8bit(1e-2, not_an_argument=1)


def test_absent_objective_keeps_its_codes_bit_for_bit():
  tx = dualoptax.dual_optim_plus_8bit(1e-2)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  s = tx.init(PARAMS)
  _, s = step(PARAMS, s, {"forget": _grads()})
  for _ in range(3):
    _, s2 = step(PARAMS, s, {"retain": _grads(0.3)})
    for a, b in zip(
      jax.tree.leaves(s.deltas["forget"]), jax.tree.leaves(s2.deltas["forget"])
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s = s2


def test_state_memory_on_gpt2_small_shapes():
  params = gpt2_small_shapes()
  n = sum(x.size for x in jax.tree.leaves(params))
  assert 124e6 < n < 125e6
  per_param = lambda tx: (
    dualoptax.state_nbytes(jax.eval_shape(tx.init, params)) / n
  )
  fp32 = per_param(dualoptax.dual_optim_plus(1e-3))
  b8 = per_param(dualoptax.dual_optim_plus_8bit(1e-3))
  base_only = per_param(
    dualoptax.dual_optim_plus_8bit(1e-3, quantize_delta=False)
  )
  adam8 = per_param(dualoptax.quantize_state(optax.adam(1e-3)))
  assert fp32 == pytest.approx(24.0, abs=1e-3)
  assert b8 <= 6.2 and adam8 <= 2.1
  assert 6.0 < b8 and 2.0 < adam8
  assert base_only == pytest.approx(16 + 2 * (1 + 4 / 256), abs=0.05)


def test_state_memory_on_nnx_attention_kernel_shapes():
  # nnx.MultiHeadAttention kernels [d, heads, head_dim] (and the out kernel
  # [heads, head_dim, d]): a head_dim of 64 < 256 used to give 64-value blocks
  # per row, 7.01 B/param in an nnx transformer instead of about 6.1.
  d, heads, head_dim = 768, 12, 64
  params = {
    "query": jnp.zeros((d, heads, head_dim)),
    "key": jnp.zeros((d, heads, head_dim)),
    "value": jnp.zeros((d, heads, head_dim)),
    "out": jnp.zeros((heads, head_dim, d)),
    "small_heads": jnp.zeros((64, 4, 16)),
  }
  n = sum(x.size for x in jax.tree.leaves(params))
  state = jax.eval_shape(dualoptax.dual_optim_plus_8bit(1e-3).init, params)
  assert state.base_mu["query"].block_size == 256
  assert state.base_mu["small_heads"].block_size == 256
  per_param = dualoptax.state_nbytes(state) / n
  assert per_param == pytest.approx(6 * (1 + 4 / 256), abs=0.01)


def _stress_quadratic(tx, steps=300, n=65536, lr=1e-2, sigma=1.0):
  """The published rule's hazard (docs/algorithm.md section 1.3): noisy two-objective quadratic, 1:5 forget:retain schedule.

  Forget pulls θ towards ``a_f``, retain towards ``a_r`` (conflicting), gradients carry
  unit Gaussian noise. Returns (final retain loss, largest |Δθ| / lr over the run).
  """
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  a_r = jax.random.normal(k1, (256, n // 256))
  a_f = a_r + jax.random.normal(k2, a_r.shape)
  params = {"w": jnp.zeros_like(a_r)}

  def body(carry, s):
    p, st = carry
    noise = sigma * jax.random.normal(jax.random.fold_in(k3, s), a_r.shape)

    def update(name, target):
      return tx.update({name: {"w": p["w"] - target + noise}}, st, p)

    u, st = jax.lax.cond(
      dualoptax.alternating_index(s, 1, 5) == 0,
      lambda: update("forget", a_f),
      lambda: update("retain", a_r),
    )
    return (optax.apply_updates(p, u), st), jnp.abs(u["w"]).max()

  (p, _), max_step = jax.lax.scan(
    body, (params, tx.init(params)), jnp.arange(steps)
  )
  retain = 0.5 * jnp.mean((p["w"] - a_r) ** 2)
  return float(retain), float(max_step.max()) / lr


def test_8bit_tracks_float32_on_stress_quadratic():
  r32, m32 = _stress_quadratic(dualoptax.dual_optim_plus(1e-2))
  r8, m8 = _stress_quadratic(dualoptax.dual_optim_plus_8bit(1e-2))
  assert r8 == pytest.approx(r32, rel=0.05)
  # Stable denominator: |u| <= 1 per element, so no step exceeds lr.
  assert m32 <= 1.0 + 1e-5 and m8 <= 1.0 + 1e-5


def _mlp_run(tx, multi, steps=100):
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (1024, 32))
  teacher = jax.random.normal(k[1], (32, 10))
  y = jnp.argmax(x @ teacher + 2.0 * jax.random.normal(k[2], (1024, 10)), -1)
  params = {
    "w1": 0.2 * jax.random.normal(k[3], (32, 256)),
    "b1": jnp.zeros((256,)),
    "w2": 0.1 * jax.random.normal(k[0], (256, 32)),
    "w3": jnp.zeros((32, 10)),
  }

  def loss(p, xb, yb):
    h = jax.nn.relu(jax.nn.relu(xb @ p["w1"] + p["b1"]) @ p["w2"])
    return optax.softmax_cross_entropy_with_integer_labels(
      h @ p["w3"], yb
    ).mean()

  def body(carry, i):
    p, st = carry
    if multi:  # two agreeing objectives: the halves of the data set
      g = {
        "forget": jax.grad(loss)(p, x[:512], y[:512]),
        "retain": jax.grad(loss)(p, x[512:], y[512:]),
      }
    else:
      g = jax.grad(loss)(p, x, y)
    u, st = tx.update(g, st, p)
    return (optax.apply_updates(p, u), st), jnp.max(jnp.abs(u["w1"]))

  (p, _), steps_ = jax.lax.scan(
    body, (params, tx.init(params)), jnp.arange(steps)
  )
  return float(loss(p, x, y)), float(steps_.max())


def test_8bit_tracks_float32_on_small_mlp():
  l32, s32 = _mlp_run(optax.adamw(1e-3, weight_decay=1e-4), False)
  l8, s8 = _mlp_run(
    dualoptax.quantize_state(
      optax.adamw(1e-3, weight_decay=1e-4), min_size=2048
    ),
    False,
  )
  assert l32 < 0.5  # it learned
  assert l8 == pytest.approx(l32, rel=0.05)
  assert s8 <= 1.5 * s32
  d32, _ = _mlp_run(dualoptax.dual_optim_plus(1e-3), True)
  d8, _ = _mlp_run(dualoptax.dual_optim_plus_8bit(1e-3, min_size=2048), True)
  assert d8 == pytest.approx(d32, rel=0.05)


def test_orbax_checkpoint_resumes_bit_identically(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = dualoptax.dual_optim_plus_8bit(1e-2, weight_decay=0.01)
  step = jax.jit(
    lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)
    )
  )
  grads = lambda i, p: {
    ("forget" if i % 6 == 0 else "retain"): jax.tree.map(
      lambda x: 0.1 * x + jnp.sin(i + x), p
    )
  }
  p, s = PARAMS, tx.init(PARAMS)
  for i in range(3):
    p, s = step(p, s, grads(i, p))
  ckpt = ocp.StandardCheckpointer()
  path = os.path.join(tmp_path, "ckpt")
  ckpt.save(path, {"params": p, "opt_state": s})
  ckpt.wait_until_finished()
  target = jax.tree.map(
    ocp.utils.to_shape_dtype_struct, {"params": p, "opt_state": s}
  )
  restored = ckpt.restore(path, target)
  p2, s2 = restored["params"], restored["opt_state"]
  assert isinstance(s2, dualoptax.DualOptimPlusState)
  assert (
    isinstance(s2.base_nu["w"], QuantizedArray) and not s2.base_nu["w"].signed
  )
  assert jax.tree.structure(s2) == jax.tree.structure(s)
  for i in range(3, 9):
    p, s = step(p, s, grads(i, p))
    p2, s2 = step(p2, s2, grads(i, p2))
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
