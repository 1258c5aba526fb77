"""PCGrad, MGDA and CAGrad against NumPy statements of the published methods."""

import collections.abc
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax
from dualoptax.cagrad import cagrad_weights
from dualoptax.mgda import min_norm_weights
from tests import reference_multitask as ref
from tests.test_parity import x64

# float64 comparisons: the library works on the Gram matrix, the reference on
# the vectors, so results differ by rounding amplified by a few dot products
# of ~30 elements and the conditioning of the projections (~1e3 at most
# here): 1e-10 relative is well above that noise (eps = 2.2e-16).
RTOL64 = 1e-10
RTOL32 = 1e-5  # float32 against float32: a few ulps after ~30-term sums

SHAPES = {"trunk": {"w": (3, 4), "b": (4,)}, "head": (5,)}
NAMES3 = ("a", "b", "c")


def tree_from_flat(flat, dtype):
  leaves, treedef = jax.tree.flatten(
    SHAPES, is_leaf=lambda x: isinstance(x, tuple)
  )
  out, start = [], 0
  for shape in leaves:
    size = int(np.prod(shape))
    out.append(jnp.asarray(flat[start : start + size].reshape(shape), dtype))
    start += size
  return jax.tree.unflatten(treedef, out)


N_PARAMS = 3 * 4 + 4 + 5


def flat_of(tree):
  return ref.flatten(jax.tree.leaves(tree))


def random_grads(seed, k, *, conflict, dtype=jnp.float32, names=NAMES3):
  """K task gradients over SHAPES as flat float64 vectors and as trees.

  ``conflict=True``: gradients around a common direction but with strongly
  opposed components (pairwise dot products of both signs); ``False``: all
  pairwise dot products positive (a shared component dominates).
  """
  rng = np.random.default_rng(seed)
  common = rng.standard_normal(N_PARAMS)
  flats = []
  for _ in range(k):
    noise = rng.standard_normal(N_PARAMS)
    flats.append(common * (0.3 if conflict else 3.0) + noise)
  if conflict:
    flats[1] = flats[1] - 1.5 * flats[0]  # ensure at least one conflict
  grams = np.array([[f @ g for g in flats] for f in flats])
  if not conflict:
    assert np.all(grams > 0)
  else:
    assert np.any(grams < 0)
  trees = {n: tree_from_flat(f, dtype) for n, f in zip(names[:k], flats)}
  return flats, trees


def assert_tree_close(tree, flat, rtol, atol_scale=1.0):
  got = flat_of(tree)
  atol = rtol * atol_scale * max(np.abs(flat).max(), 1e-300)
  np.testing.assert_allclose(got, flat, rtol=rtol, atol=atol)


def direction(tx, grads, params=None):
  """One update from a fresh state (eager: op compiles are cached across
  tests, a jit of each new transformation would compile again)."""
  if params is None:
    params = jax.tree.map(
      jnp.zeros_like, next(g for g in grads.values() if g is not None)
    )
  out, _ = tx.update(grads, tx.init(params), params)
  return out


# --- PCGrad -----------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("conflict", [True, False])
def test_pcgrad_fixed_order_matches_reference_float64(k, conflict):
  with x64():
    flats, trees = random_grads(k, k, conflict=conflict, dtype=jnp.float64)
    got = direction(dualoptax.pcgrad(shuffle=False), trees)
    orders = [[j for j in range(k) if j != i] for i in range(k)]
    want = ref.pcgrad(flats, orders)
    assert flat_of(got).dtype == np.float64
    assert_tree_close(got, want, RTOL64)
    if not conflict:  # nothing to project: the plain sum
      assert_tree_close(got, np.sum(flats, 0), RTOL64)


def test_pcgrad_projects_off_original_gradients():
  # Three mutually conflicting 2-D gradients: projecting off an already
  # projected g_j would give a different answer from the published rule.
  flats = [np.array([1.0, 0.0]), np.array([-0.8, 0.6]), np.array([-0.3, -1.0])]
  with x64():
    trees = {n: {"w": jnp.asarray(f)} for n, f in zip(NAMES3, flats)}
    got = direction(dualoptax.pcgrad(shuffle=False), trees)["w"]
  want = ref.pcgrad(flats, [[1, 2], [0, 2], [0, 1]])
  np.testing.assert_allclose(got, want, rtol=RTOL64)
  # The sum differs from the unprojected sum (there were conflicts).
  assert np.abs(want - np.sum(flats, 0)).max() > 0.1


def test_pcgrad_random_order_is_one_of_the_orders_and_varies():
  flats = [
    np.array([1.0, 0.0, 0.2]),
    np.array([-0.8, 0.6, 0.1]),
    np.array([-0.3, -1.0, 0.4]),
  ]
  k = len(flats)
  others = [[j for j in range(k) if j != i] for i in range(k)]
  candidates = [
    ref.pcgrad(flats, [list(o) for o in combo])
    for combo in itertools.product(
      *[list(itertools.permutations(o)) for o in others]
    )
  ]
  with x64():
    trees = {n: {"w": jnp.asarray(f)} for n, f in zip(NAMES3, flats)}
    tx = dualoptax.pcgrad(seed=0)
    update = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros(3)})
    hits = set()
    for _ in range(40):
      d, state = update(trees, state)
      dist = [np.abs(np.asarray(d["w"]) - c).max() for c in candidates]
      best = int(np.argmin(dist))
      assert dist[best] < RTOL64 * 10
      hits.add(best)
  assert int(state.count) == 40
  distinct = {tuple(np.round(c, 9)) for c in candidates}
  assert len(distinct) > 1  # the order matters for these gradients...
  assert len(hits) > 1  # ...and the random order does change between steps


def test_pcgrad_key_in_state_is_deterministic():
  _, trees = random_grads(0, 3, conflict=True)
  params = jax.tree.map(jnp.zeros_like, trees["a"])

  @jax.jit
  def run(key):  # 5 updates from a transformation built on `key`
    tx = dualoptax.pcgrad(key=key)

    def body(state, _):
      d, state = tx.update(trees, state, params)
      return state, jnp.concatenate([x.ravel() for x in jax.tree.leaves(d)])

    return jax.lax.scan(body, tx.init(params), None, length=5)

  state_a, a = run(jax.random.PRNGKey(3))
  state_b, b = run(jax.random.PRNGKey(3))
  _, c = run(jax.random.PRNGKey(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)  # another key, other orders somewhere
  assert isinstance(state_a, dualoptax.PCGradState)
  assert state_a._fields[:2] == ("count", "key")
  assert int(state_a.count) == 5
  assert not np.array_equal(
    np.asarray(state_a.key), np.asarray(jax.random.PRNGKey(3))
  )
  # `seed` is PRNGKey(seed); typed keys work too.
  init = dualoptax.pcgrad(seed=3).init(params)
  np.testing.assert_array_equal(init.key, jax.random.PRNGKey(3))
  d, state = dualoptax.pcgrad(key=jax.random.key(3)).update(
    trees, dualoptax.pcgrad(key=jax.random.key(3)).init(params), params
  )
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
  assert np.all(np.isfinite(flat_of(d)))


def test_canonical_order_ignores_mapping_order_and_jit():
  _, trees = random_grads(1, 3, conflict=True)
  reordered = {n: trees[n] for n in ("c", "a", "b")}
  tx = dualoptax.pcgrad(shuffle=False)
  a = flat_of(direction(tx, trees))
  b = flat_of(direction(tx, reordered))
  c = flat_of(jax.jit(lambda g: direction(tx, g))(reordered))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, c, rtol=RTOL32, atol=RTOL32 * np.abs(a).max())
  # With `tasks`, their order is the canonical one: c meets a before b.
  flats = [flat_of(trees[n]) for n in ("c", "a", "b")]
  with_tasks = flat_of(
    direction(dualoptax.pcgrad(("c", "a", "b"), shuffle=False), trees)
  )
  want = ref.pcgrad(flats, [[1, 2], [0, 2], [0, 1]])
  np.testing.assert_allclose(
    with_tasks, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max()
  )


# --- MGDA -------------------------------------------------------------------


def simplex_grid(k, n):
  """Every point of the simplex with coordinates in multiples of 1/n."""
  pts = [
    c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n
  ]
  pts = np.array([list(c) + [n - sum(c)] for c in pts], np.float64) / n
  return pts


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("conflict", [True, False])
def test_mgda_is_min_norm_point_float64(k, conflict):
  with x64():
    flats, trees = random_grads(10 + k, k, conflict=conflict, dtype=jnp.float64)
    got = flat_of(direction(dualoptax.mgda(), trees))
  _, want = ref.min_norm_point(flats)
  np.testing.assert_allclose(
    got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max()
  )
  # No point of a fine simplex grid is closer to the origin.
  a = np.stack(flats)
  grid = simplex_grid(k, 300 if k == 2 else 120)
  grid_best = np.min(np.sum((grid @ a) ** 2, axis=1))
  assert got @ got <= grid_best * (1 + RTOL64)
  # Common descent: d·g_k >= |d|^2 for every task (KKT of the min-norm point).
  scale = max(np.abs(a @ a.T).max(), 1e-300)
  assert np.all(a @ got >= got @ got - RTOL64 * scale)


def test_mgda_two_task_closed_form():
  g1, g2 = np.array([2.0, 0.0]), np.array([-1.0, 1.0])
  alpha1 = np.clip(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1)
  want = alpha1 * g1 + (1 - alpha1) * g2
  with x64():
    got = direction(
      dualoptax.mgda(),
      {"a": {"w": jnp.asarray(g1)}, "b": {"w": jnp.asarray(g2)}},
    )["w"]
  np.testing.assert_allclose(got, want, rtol=RTOL64)
  # A gradient inside the other's "shadow" is the answer itself (clip at 1).
  g3 = np.array([0.5, 0.0])
  with x64():
    got = direction(
      dualoptax.mgda(),
      {"a": {"w": jnp.asarray(g1)}, "b": {"w": jnp.asarray(g3)}},
    )["w"]
  np.testing.assert_allclose(got, g3, rtol=RTOL64)


@pytest.mark.parametrize("k", [4, 6])
def test_min_norm_weights_many_tasks(k):
  rng = np.random.default_rng(k)
  a = rng.standard_normal((k, 9)) + rng.standard_normal(9)
  with x64():
    alpha = np.asarray(min_norm_weights(jnp.asarray(a @ a.T)))
  _, want = ref.min_norm_point(list(a))
  assert np.all(alpha >= 0) and abs(alpha.sum() - 1) < RTOL64
  np.testing.assert_allclose(
    alpha @ a, want, rtol=RTOL64, atol=RTOL64 * np.abs(a).max()
  )


def test_mgda_normalize():
  _, trees = random_grads(4, 3, conflict=True)
  with x64():
    trees = jax.tree.map(lambda x: x.astype(jnp.float64), trees)
    got = flat_of(direction(dualoptax.mgda(normalize=True), trees))
  unit = [f / np.linalg.norm(f) for f in (flat_of(trees[n]) for n in NAMES3)]
  _, want = ref.min_norm_point(unit)
  np.testing.assert_allclose(
    got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max()
  )


# --- CAGrad -----------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("conflict", [True, False])
def test_cagrad_matches_reference_float64(k, conflict):
  with x64():
    flats, trees = random_grads(20 + k, k, conflict=conflict, dtype=jnp.float64)
    got = flat_of(direction(dualoptax.cagrad(c=0.5), trees))
    raw = flat_of(direction(dualoptax.cagrad(c=0.5, rescale=False), trees))
  want = ref.cagrad(flats, 0.5)
  np.testing.assert_allclose(
    got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max()
  )
  np.testing.assert_allclose(
    raw, want * 1.25, rtol=RTOL64, atol=RTOL64 * np.abs(want).max()
  )
  # The primal: raw lies on the ball |d - g0| <= c|g0| and no point of the
  # ball does better on the worst task (random points on its boundary).
  a = np.stack(flats)
  g0 = a.mean(0)
  radius = 0.5 * np.linalg.norm(g0)
  assert np.linalg.norm(raw - g0) <= radius * (1 + RTOL64)
  rng = np.random.default_rng(k)
  u = rng.standard_normal((2000, a.shape[1]))
  ball = g0 + radius * u / np.linalg.norm(u, axis=1, keepdims=True)
  assert np.min(a @ raw) >= np.max(np.min(ball @ a.T, axis=1)) - RTOL64 * (
    np.abs(a @ g0).max()
  )


def test_cagrad_c0_is_mean():
  flats, trees = random_grads(7, 3, conflict=True)
  got = flat_of(direction(dualoptax.cagrad(c=0.0), trees))
  want = np.mean(flats, 0)
  np.testing.assert_allclose(
    got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max()
  )


def test_cagrad_weights_many_tasks():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 9)) + rng.standard_normal(9)
  with x64():
    v = np.asarray(cagrad_weights(jnp.asarray(a @ a.T), 0.5))
  np.testing.assert_allclose(
    v @ a / 1.25,
    ref.cagrad(list(a), 0.5),
    rtol=RTOL64,
    atol=RTOL64 * np.abs(a).max(),
  )


# --- shared behaviour ---------------------------------------------------------

METHODS = {
  "pcgrad": lambda **kw: dualoptax.pcgrad(**kw),
  "mgda": lambda **kw: dualoptax.mgda(**kw),
  "cagrad": lambda **kw: dualoptax.cagrad(**kw),
}


@pytest.mark.parametrize("name", METHODS)
def test_chain_with_adam_jit_and_scan(name):
  """optax.chain passes the Mapping to the first transform; Adam follows."""
  # Two quadratic tasks sharing w, each with its own head leaf.
  targets = {"a": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array([-1.0, 0.5, 1.0])}

  def loss(params, task):
    return jnp.sum((params["w"] - targets[task]) ** 2) + jnp.sum(
      (params[f"head_{task}"] - 1.0) ** 2
    )

  params = {"w": jnp.zeros(3), "head_a": jnp.zeros(2), "head_b": jnp.zeros(2)}
  tx = optax.chain(METHODS[name](), optax.adam(3e-2))
  first = METHODS[name]()
  state = tx.init(params)

  def grads_of(p):
    return {t: jax.grad(loss)(p, t) for t in targets}

  def step(carry, _):
    p, s = carry
    upd, s = tx.update(grads_of(p), s, p)
    return (optax.apply_updates(p, upd), s), None

  # One step equals "direction, then Adam" done by hand.
  jstep = jax.jit(lambda c: step(c, None)[0])
  p_one, _ = jstep((params, state))
  d = direction(first, grads_of(params), params)
  adam = optax.adam(3e-2)
  u_ref, _ = adam.update(d, adam.init(params), params)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL32),
    p_one,
    optax.apply_updates(params, u_ref),
  )

  (p_scan, s_scan), _ = jax.jit(
    lambda c: jax.lax.scan(step, c, None, length=100)
  )((params, state))
  p_loop, s_loop = params, state
  for _ in range(100):
    p_loop, s_loop = jstep((p_loop, s_loop))
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
    p_scan,
    p_loop,
  )
  assert int(s_scan[0].count) == 100
  start = sum(loss(params, t) for t in targets)
  end = sum(loss(p_scan, t) for t in targets)
  assert end < 0.5 * start
  np.testing.assert_allclose(p_scan["head_a"], 1.0, atol=0.05)


@pytest.mark.parametrize("name", METHODS)
def test_vmap_over_batches_of_problems(name):
  trees = [random_grads(30 + i, 3, conflict=True)[1] for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  tx = METHODS[name](**({"shuffle": False} if name == "pcgrad" else {}))
  params = jax.tree.map(jnp.zeros_like, trees[0]["a"])
  batched = jax.jit(jax.vmap(lambda g: direction(tx, g, params)))(stacked)
  for i, t in enumerate(trees):
    one = flat_of(direction(tx, t, params))
    row = flat_of(jax.tree.map(lambda x, i=i: x[i], batched))
    np.testing.assert_allclose(
      row, one, rtol=RTOL32, atol=RTOL32 * np.abs(one).max()
    )


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_are_finite(name):
  tx = METHODS[name]()
  _, trees = random_grads(2, 3, conflict=True)
  zero = jax.tree.map(jnp.zeros_like, trees["a"])
  all_zero = {n: zero for n in NAMES3}
  one_zero = {**trees, "b": zero}
  for grads in (all_zero, one_zero, {"a": zero}):
    out = flat_of(direction(tx, grads))
    assert np.all(np.isfinite(out))
  assert np.all(flat_of(direction(tx, all_zero)) == 0)
  out = flat_of(direction(tx, one_zero))
  if name == "pcgrad":  # a zero gradient conflicts with nothing
    want = ref.pcgrad(
      [flat_of(trees["a"]), np.zeros(N_PARAMS), flat_of(trees["c"])],
      [[2, 1], [0, 2], [0, 1]],
    )
    alt = ref.pcgrad(
      [flat_of(trees["a"]), np.zeros(N_PARAMS), flat_of(trees["c"])],
      [[1, 2], [0, 2], [1, 0]],
    )
    # a and c only meet each other: the order of the zero one is immaterial.
    np.testing.assert_allclose(want, alt)
    np.testing.assert_allclose(
      out, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max()
    )
  elif name == "mgda":  # the origin is in the hull
    np.testing.assert_array_equal(out, 0.0)
  if name == "mgda":
    out = flat_of(direction(dualoptax.mgda(normalize=True), one_zero))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("name", METHODS)
def test_single_task_and_subsets(name):
  _, trees = random_grads(5, 3, conflict=True)
  tx = METHODS[name](tasks=NAMES3)
  one = flat_of(direction(tx, {"b": trees["b"]}))
  # CAGrad, one task: g0 = g, g_w = g, d = (1 + c) g / (1 + c^2).
  want = flat_of(trees["b"]) * (1.5 / 1.25 if name == "cagrad" else 1.0)
  np.testing.assert_allclose(one, want, rtol=RTOL32, atol=1e-7)
  # A subset equals a transformation built for those tasks only.
  sub = {"a": trees["a"], "c": trees["c"]}
  kw = {"shuffle": False} if name == "pcgrad" else {}
  a = flat_of(direction(METHODS[name](tasks=NAMES3, **kw), sub))
  b = flat_of(direction(METHODS[name](tasks=("a", "c"), **kw), sub))
  np.testing.assert_allclose(a, b, rtol=RTOL32)
  # None values mean absent.
  c = flat_of(direction(METHODS[name](tasks=NAMES3, **kw), {**sub, "b": None}))
  np.testing.assert_allclose(a, c, rtol=RTOL32)


@pytest.mark.parametrize("name", METHODS)
def test_heads_only_gradients(name):
  # Disjoint supports (each task touches only its own head): nothing
  # conflicts, every cross dot product is zero.
  g = {
    "a": {"ha": jnp.array([3.0, 4.0]), "hb": jnp.zeros(2)},
    "b": {"ha": jnp.zeros(2), "hb": jnp.array([0.0, 1.0])},
  }
  d = direction(METHODS[name](), g)
  if name == "pcgrad":  # the plain sum
    np.testing.assert_allclose(d["ha"], [3.0, 4.0])
    np.testing.assert_allclose(d["hb"], [0.0, 1.0])
  elif name == "mgda":  # orthogonal: alpha_k proportional to 1/|g_k|^2
    alpha = np.array([1 / 25, 1.0]) / (1 / 25 + 1.0)
    np.testing.assert_allclose(
      d["ha"], alpha[0] * np.array([3.0, 4.0]), rtol=RTOL32
    )
    np.testing.assert_allclose(
      d["hb"], alpha[1] * np.array([0.0, 1.0]), rtol=RTOL32
    )
  else:
    want = ref.cagrad([np.array([3.0, 4.0, 0, 0]), np.array([0, 0, 0, 1.0])])
    got = np.concatenate([d["ha"], d["hb"]])
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_low_precision_and_other_mappings(name):
  _, trees = random_grads(6, 2, conflict=True)
  tx = METHODS[name]()
  full = flat_of(direction(tx, trees))
  half = direction(tx, jax.tree.map(lambda x: x.astype(jnp.bfloat16), trees))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half))
  np.testing.assert_allclose(
    flat_of(half), full, rtol=0.05, atol=0.02 * np.abs(full).max()
  )  # bf16: 8 bits

  # Any Mapping is accepted (eager calls: jit would need a registered pytree).
  params = jax.tree.map(jnp.zeros_like, trees["a"])
  for mapping in (types.MappingProxyType(dict(trees)), Frozen(trees)):
    out, _ = tx.update(mapping, tx.init(params), params)
    np.testing.assert_allclose(
      flat_of(out), full, rtol=RTOL32, atol=RTOL32 * np.abs(full).max()
    )


class Frozen(collections.abc.Mapping):
  """A Mapping that is not a dict."""

  def __init__(self, items):
    self._items = dict(items)

  def __getitem__(self, key):
    return self._items[key]

  def __iter__(self):
    return iter(self._items)

  def __len__(self):
    return len(self._items)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_bad_inputs(name):
  _, trees = random_grads(8, 2, conflict=True)
  tx = METHODS[name](tasks=("a", "b"))
  params = jax.tree.map(jnp.zeros_like, trees["a"])
  state = tx.init(params)
  with pytest.raises(TypeError, match="Mapping"):
    tx.update(trees["a"]["trunk"]["w"], state)
  with pytest.raises(TypeError, match="Mapping"):
    tx.update([trees["a"], trees["b"]], state)
  with pytest.raises(ValueError, match="empty"):
    tx.update({}, state)
  with pytest.raises(ValueError, match="empty"):
    tx.update({"a": None}, state)
  with pytest.raises(ValueError, match=r"unknown task.*'z'"):
    tx.update({"a": trees["a"], "z": trees["b"]}, state)
  with pytest.raises(TypeError, match="strings"):
    METHODS[name]().update({0: trees["a"]}, state)
  bad_structure = {"a": trees["a"], "b": {"trunk": trees["b"]["trunk"]}}
  with pytest.raises(ValueError, match="'b'.*tree structure"):
    tx.update(bad_structure, state)
  bad_shape = {"a": trees["a"], "b": {**trees["b"], "head": jnp.zeros(6)}}
  with pytest.raises(ValueError, match=r"'b'.*\['head'\].*shape \(6,\)"):
    tx.update(bad_shape, state)
  with pytest.raises(ValueError, match="params"):
    tx.update({"a": trees["a"]}, state, {"other": jnp.zeros(2)})
  ints = {"a": jax.tree.map(lambda x: x.astype(jnp.int32), trees["a"])}
  with pytest.raises(TypeError, match="floating"):
    tx.update(ints, state)
  for tasks, err in (
    ("ab", ValueError),
    ((), ValueError),
    (("a", "a"), ValueError),
    (("a", 1), ValueError),
  ):
    with pytest.raises(err, match="task"):
      METHODS[name](tasks=tasks)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="either `key` or `seed`"):
    dualoptax.pcgrad(key=jax.random.PRNGKey(0), seed=1)
  with pytest.raises(TypeError, match="PRNG key"):
    dualoptax.pcgrad(key=np.zeros(2, np.int32))
  with pytest.raises(TypeError, match="PRNG key"):
    dualoptax.pcgrad(key=jnp.zeros(2, jnp.float32))
  with pytest.raises(TypeError, match="seed"):
    dualoptax.pcgrad(seed=1.5)
  with pytest.raises(TypeError, match="shuffle"):
    dualoptax.pcgrad(shuffle=1)
  with pytest.raises(TypeError, match="normalize"):
    dualoptax.mgda(normalize="l2")
  for it in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="iterations"):
      dualoptax.mgda(iterations=it)
    with pytest.raises(ValueError, match="iterations"):
      dualoptax.cagrad(iterations=it)
  for c in (1.0, -0.1, float("nan"), "0.5", True):
    with pytest.raises(ValueError, match="`c`"):
      dualoptax.cagrad(c=c)
  with pytest.raises(TypeError, match="rescale"):
    dualoptax.cagrad(rescale=None)
