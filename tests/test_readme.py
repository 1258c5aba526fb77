"""The README's python blocks run as written and do what the README says.

Each test executes blocks taken from README.md itself (nothing is copied here),
then checks the results the surrounding text claims.
"""

import ast
import functools
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax
from tests import test_chunked

README = pathlib.Path(__file__).parent.parent / "README.md"


def blocks(start, stop):
  """The python blocks between the headings ``start`` and ``stop``."""
  text = README.read_text()
  section = text[text.index(start) : text.index(stop)]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def run(block, scope, name):
  exec(compile(block, f"README.md {name}", "exec"), scope)  # pylint: disable=exec-used


@pytest.fixture(scope="module")
def quick_start():
  found = blocks("## Quick start", "## API")
  assert len(found) == 2
  scope = {}
  for i, block in enumerate(found):
    run(block, scope, f"quick start, block {i + 1}")
  return scope


def test_quick_start_forgets_and_retains(quick_start):
  evaluate = quick_start["evaluate"]
  before = evaluate(quick_start["params"])
  after = evaluate(quick_start["new_params"])
  assert after["retain"] < 0.5 * before["retain"], (before, after)
  assert after["forget"] > 1.5 * before["forget"], (before, after)
  # The loop alternates 1 forget step with 5 retain steps over 120 calls.
  state = quick_start["state"]
  assert int(state.deltas["forget"].count) == 20
  assert int(state.deltas["retain"].count) == 100


def test_quick_start_scan_takes_the_python_loops_steps(quick_start):
  # One jit over the whole scan against one jit per step: the same float32
  # operations, which XLA may fuse differently; 120 steps of O(1) values keep
  # the rounding far below 1e-5.
  for a, b in zip(
    jax.tree.leaves(quick_start["scan_params"]),
    jax.tree.leaves(quick_start["new_params"]),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ("forget", "retain"):
    assert int(quick_start["scan_state"].deltas[name].count) == int(
      quick_start["state"].deltas[name].count
    )


def test_composition_recipes(quick_start, tmp_path, monkeypatch):
  # The checkpoint block's tempfile.mkdtemp() lands in pytest's tmp_path.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  found = blocks("## Composition recipes", "## 8-bit optimizer state")
  assert len(found) == 2
  scope = dict(quick_start)
  run(found[0], scope, "composition recipes")
  before = scope["evaluate"](scope["params"])
  after = scope["after"]
  assert set(after) == {
    "after",
    "before",
    "inject",
    "inject 8-bit",
    "accumulate",
    "guard",
  }
  for name, result in after.items():
    assert result["retain"] < before["retain"], (name, before, result)
    assert result["forget"] > before["forget"], (name, before, result)
  # The halved lr is in the state, and the run went on from the first one.
  state = scope["opt_state"]
  assert float(state.hyperparams["learning_rate"]) == np.float32(5e-3)
  assert int(state.inner_state.deltas["retain"].count) == 200
  assert scope["evaluate"](scope["p"])["retain"] < after["inject"]["retain"]

  run(found[1], scope, "checkpoint recipe")
  assert str(tmp_path) in scope["path"]
  saved = {"params": scope["p"], "opt_state": state}
  restored = scope["restored"]
  assert type(restored["opt_state"]) is type(state)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)


def quantized_paths(tx, params):
  """Paths of the state's 8-bit leaves, and its bytes per parameter."""
  state = jax.eval_shape(tx.init, params)
  paths = [
    jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    if leaf.dtype == jnp.uint8
  ]
  n = sum(x.size for x in jax.tree.leaves(params))
  return paths, dualoptax.state_nbytes(state) / n


def test_update_and_apply_block():
  found = blocks("**A step that writes the params", "Same tree, chips")
  assert len(found) == 1
  scope = dict(dualoptax=dualoptax, functools=functools, jax=jax)
  run(found[0], scope, "update_and_apply block")
  tx, step = scope["tx"], scope["step"]
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(keys[0], (64, 512))}
  grads = {
    name: {"w": jax.random.normal(k, (64, 512))}
    for name, k in zip(("forget", "retain"), keys[1:])
  }
  state = tx.init(params)
  updates, expected_state = jax.jit(tx.update)(grads, state, params)
  expected = optax.apply_updates(params, updates)
  # The step donates params and state: give it copies.
  new_params, new_state = step(
    jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), grads
  )
  # One float32 addition of the same update (an ulp of |w| < 8).
  np.testing.assert_allclose(new_params["w"], expected["w"], rtol=0, atol=1e-6)
  assert not np.allclose(new_params["w"], params["w"])
  test_chunked._assert_states_close(new_state, expected_state)


def test_8bit_block():
  found = blocks("## 8-bit optimizer state", "**A step whose")
  assert len(found) == 1
  statements = ast.parse(found[0]).body
  assert len(statements) == 4
  scope = {}
  txs = []
  for i, statement in enumerate(statements):
    module = ast.Module(body=[statement], type_ignores=[])
    scope.update(optax=optax, dualoptax=dualoptax)
    exec(compile(module, f"README.md 8-bit block, line {i + 1}", "exec"), scope)  # pylint: disable=exec-used
    txs.append(scope["tx"])
  # Leaves large enough to quantize (>= min_size values, whole 256-blocks).
  params = {"wte": jnp.zeros((64, 512)), "h": jnp.zeros((64, 512))}

  # quantize_state(adamw, exclude=("wte",)): embeddings stay float32.
  paths, _ = quantized_paths(txs[0], params)
  assert sorted(paths) == [
    "[0].mu['h'].codes",
    "[0].nu['h'].codes",
  ]
  # dual_optim_plus_8bit: base and both deltas, state about 6.1 B/param (six
  # 8-bit moments, one float32 absmax per 256 values, three counters).
  paths, per_param = quantized_paths(txs[1], params)
  assert len(paths) == 12
  assert 6.05 < per_param < 6.15, per_param
  # quantize_delta=False: the base only.
  paths, _ = quantized_paths(txs[2], params)
  assert len(paths) == 4 and all(p.startswith(".base_") for p in paths)
  # quantize_base=False: the deltas only.
  paths, _ = quantized_paths(txs[3], params)
  assert len(paths) == 8 and all(p.startswith(".deltas") for p in paths)
