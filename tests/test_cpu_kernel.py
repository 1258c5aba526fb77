"""The fused CPU kernel (implementation="cpu_kernel") and the automatic choice.

Numerical parity of both implementations with the NumPy statement of SPEC is in
test_parity.py; the guard is in test_behaviour.py. Here: selection, errors, vmap,
and that the default picks the kernel on a single-device CPU process.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax


def _hlo(tx, grads, params):
  state = tx.init(params)
  return jax.jit(tx.update).lower(grads, state, params).compile().as_text()


def test_implementation_is_validated():
  with pytest.raises(ValueError, match="implementation"):
    dualoptax.dual_optim_plus(1e-3, implementation="cuda")
  with pytest.raises(ValueError, match="implementation"):
    dualoptax.dual_optim(1e-3, implementation="pallas")


def test_forced_kernel_rejects_mixed_dtypes():
  params = {"w": jnp.ones((4, 8), jnp.bfloat16)}
  tx = dualoptax.dual_optim_plus(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32,
                                 implementation="cpu_kernel")
  state = tx.init(params)
  with pytest.raises(TypeError, match="float32 or float64"):
    tx.update({"forget": params}, state, params)


def test_auto_falls_back_to_xla_where_kernel_does_not_apply():
  # This process has 8 simulated devices (conftest): auto must not emit the custom
  # call, which would make XLA gather sharded operands.
  params = {"w": jnp.ones((8, 8))}
  tx = dualoptax.dual_optim_plus(1e-2)
  assert jax.device_count() > 1
  assert "dualoptax_" not in _hlo(tx, {"forget": params}, params)
  forced = dualoptax.dual_optim_plus(1e-2, implementation="cpu_kernel")
  assert "dualoptax_" in _hlo(forced, {"forget": params}, params)


def test_kernel_under_vmap_matches_loop():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)}
  tx = dualoptax.dual_optim_plus(1e-2, weight_decay=0.1, implementation="cpu_kernel")
  state = jax.vmap(tx.init)(params)
  step = lambda g, s, p: tx.update({"retain": g}, s, p)
  u, new = jax.vmap(step)(grads, state, params)
  for i in range(3):
    one = jax.tree.map(lambda x: x[i], (grads, state, params))
    u_i, new_i = step(*one)
    np.testing.assert_allclose(u["w"][i], u_i["w"], rtol=1e-6)
    np.testing.assert_allclose(new.base_nu["w"][i], new_i.base_nu["w"], rtol=1e-6)


def test_kernel_inside_scan_and_with_chain():
  params = {"w": jnp.linspace(-1.0, 1.0, 300), "b": jnp.zeros(())}
  for implementation in ("xla", "cpu_kernel"):
    tx = optax.chain(
        dualoptax.dual_optim_plus({"forget": 3e-2, "retain": 1e-2}, weight_decay=0.1,
                                  mask={"w": True, "b": False},
                                  implementation=implementation),
        optax.clip_by_global_norm(1.0))

    def body(carry, t):
      p, s = carry
      g = jax.tree.map(lambda x: jnp.sin(x + t) + 0.1 * t, p)
      objective = dualoptax.alternating_index(t.astype(jnp.int32), 1, 3)
      u, s = dualoptax.switch_objective(
          objective, ("forget", "retain"),
          lambda name: tx.update({name: g}, s, p))
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)),
                             jnp.arange(40, dtype=jnp.float32))
    if implementation == "xla":
      expected = p
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_auto_uses_kernel_on_a_single_device_cpu():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np, dualoptax
      rng = np.random.default_rng(0)
      params = {"w": jnp.asarray(rng.standard_normal((64, 9)), jnp.float32)}
      out = {}
      for impl in (None, "xla"):
        tx = dualoptax.dual_optim_plus(1e-2, weight_decay=0.1, implementation=impl)
        s, p = tx.init(params), params
        upd = jax.jit(tx.update)
        text = upd.lower({"forget": p}, s, p).compile().as_text()
        for t in range(20):
          g = {"w": jnp.sin(p["w"] * (t + 1))}
          u, s = upd({("forget", "retain")[t % 2]: g}, s, p)
          p = jax.tree.map(lambda a, b: a + b, p, u)
        out[impl] = (p["w"], "dualoptax_" in text)
      assert jax.device_count() == 1
      assert out[None][1] and not out["xla"][1], "auto did not pick the kernel"
      np.testing.assert_allclose(out[None][0], out["xla"][0], rtol=1e-5, atol=1e-7)
      big = {"w": jnp.ones((8, 1024), jnp.float32)}
      for impl, fused in ((None, True), ("xla", False)):
        tx = dualoptax.dual_optim_plus_8bit(1e-2, implementation=impl)
        text = jax.jit(tx.update).lower({"forget": big}, tx.init(big),
                                        big).compile().as_text()
        assert ("dualoptax_8bit" in text) == fused, impl
      print("ok")
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ok" in result.stdout


def test_kernel_is_not_differentiable_but_xla_path_is():
  params = {"w": jnp.linspace(0.5, 1.5, 6)}

  def first_update(p, implementation):
    tx = dualoptax.dual_optim_plus(1e-2, implementation=implementation)
    u, _ = tx.update({"forget": jax.tree.map(jnp.square, p)}, tx.init(p), p)
    return jnp.sum(u["w"])

  assert np.all(np.isfinite(jax.grad(first_update)(params, "xla")["w"]))
  with pytest.raises(Exception, match="ffi_call|[Dd]ifferentiat"):
    jax.grad(first_update)(params, "cpu_kernel")
