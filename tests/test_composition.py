"""DualOptim+ composed with optax, flax and the objective-aware wrappers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

PARAMS = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}


def grads(seed, params=PARAMS):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
  )


def run(tx, calls, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, call in enumerate(calls):
    u, state = update(
      {k: grads(10 * i + j) for j, k in enumerate(call)}, state, params
    )
    params = optax.apply_updates(params, u)
  return params, state


CALLS = [("forget",), ("retain",), ("retain",), ("forget", "retain")]


def test_chain_after_equals_scale_by_then_lr():
  # scale_by_dual_optim_plus + scale_by_learning_rate == the alias (one objective/call).
  calls = [("forget",), ("retain",), ("retain",), ("forget",)]
  a, _ = run(dualoptax.dual_optim_plus(1e-2), calls)
  b, _ = run(
    optax.chain(
      dualoptax.scale_by_dual_optim_plus(), optax.scale_by_learning_rate(1e-2)
    ),
    calls,
  )
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_chain_clip_schedule_and_decay_after():
  sched = optax.linear_schedule(1e-2, 1e-3, 4)
  tx = optax.chain(
    dualoptax.scale_by_dual_optim_plus(),
    optax.clip_by_global_norm(0.5),
    optax.add_decayed_weights(0.01),
    optax.scale_by_learning_rate(sched),
  )
  state = tx.init(PARAMS)
  u, state = jax.jit(tx.update)({"forget": grads(0)}, state, PARAMS)
  # The merged direction was clipped to norm 0.5 before decay and lr.
  direction = jax.tree.map(lambda x, p: -x / 1e-2 - 0.01 * p, u, PARAMS)
  assert float(optax.tree.norm(direction)) <= 0.5 + 1e-4


def test_per_objective_clipping_before():
  tx = optax.chain(
    dualoptax.per_objective(optax.clip_by_global_norm(1e-3)),
    dualoptax.scale_by_dual_optim_plus(stable=False),
  )
  big = jax.tree.map(lambda g: 1e3 * g, grads(1))
  state = tx.init(PARAMS)
  _, state = tx.update({"forget": big}, state, PARAMS)
  dual_state = state[1]
  # First step: m_forget = (1 - b1) * clipped g, so its norm is 0.1 * 1e-3.
  np.testing.assert_allclose(
    optax.tree.norm(dual_state.deltas["forget"].mu), 1e-4, rtol=1e-4
  )
  with pytest.raises(ValueError, match="Unknown objective"):
    tx.update({"other": big}, state, PARAMS)


def test_inject_hyperparams_8bit_without_static_args_says_what_to_pass():
  with pytest.raises(
    ValueError, match=r"static_args=dualoptax.STATIC_8BIT_ARGS"
  ):
    optax.inject_hyperparams(dualoptax.dual_optim_plus_8bit)(
      learning_rate=1e-2
    ).init(PARAMS)
  tx = optax.inject_hyperparams(
    dualoptax.dual_optim_plus_8bit, static_args=dualoptax.STATIC_8BIT_ARGS
  )(learning_rate=1e-2)
  tx.update({"forget": grads(0)}, tx.init(PARAMS), PARAMS)


def test_inject_hyperparams_per_objective_lr_mapping():
  # A Mapping is not injected by optax (it stays fixed, absent from
  # state.hyperparams): a warning says so and gives the factory that injects it.
  tx = optax.inject_hyperparams(dualoptax.dual_optim_plus)(
    learning_rate={"forget": 1e-2, "retain": 2e-2}
  )
  with pytest.warns(
    UserWarning,
    match=r"lambda forget_lr, retain_lr: dualoptax.dual_optim_plus\(",
  ):
    state = tx.init(PARAMS)
  assert "learning_rate" not in state.hyperparams
  tx8 = optax.inject_hyperparams(
    dualoptax.dual_optim_plus_8bit, static_args=dualoptax.STATIC_8BIT_ARGS
  )(learning_rate={"forget": 1e-2, "retain": 2e-2})
  with pytest.warns(UserWarning, match=r"dualoptax.dual_optim_plus_8bit\("):
    tx8.init(PARAMS)
  # The recipe of the warning: each rate injected, changeable at run time.
  tx = optax.inject_hyperparams(
    lambda forget_lr, retain_lr: dualoptax.dual_optim_plus(
      {"forget": forget_lr, "retain": retain_lr}
    )
  )(forget_lr=1e-2, retain_lr=2e-2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    u1, _ = update({"retain": grads(0)}, state, PARAMS)
    state.hyperparams["retain_lr"] = jnp.asarray(4e-2)
    u2, _ = update({"retain": grads(0)}, state, PARAMS)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(2 * a, b, rtol=1e-6), u1, u2
  )
  # Outside inject_hyperparams a Mapping is plain and silent.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dualoptax.dual_optim_plus({"forget": 1e-2, "retain": 2e-2}).init(PARAMS)


def test_inject_hyperparams_changes_lr_and_betas_at_run_time():
  tx = optax.inject_hyperparams(dualoptax.dual_optim_plus)(
    learning_rate=1e-2, b1=0.9, base_b2=0.95
  )
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  u1, _ = update({"forget": grads(0)}, state, PARAMS)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
  u2, state2 = update({"forget": grads(0)}, state, PARAMS)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(2 * a, b, rtol=1e-6), u1, u2
  )
  state2.hyperparams["b1"] = jnp.asarray(0.5)
  _, state3 = update({"forget": grads(1)}, state2, PARAMS)
  ref = dualoptax.dual_optim_plus(2e-2, b1=0.5)
  _, r = ref.update({"forget": grads(1)}, state2.inner_state, PARAMS)
  np.testing.assert_allclose(
    state3.inner_state.deltas["forget"].mu["dense"]["bias"],
    r.deltas["forget"].mu["dense"]["bias"],
    rtol=1e-6,
  )


def test_accumulate_objectives_equals_mean_gradient_step():
  micro = [grads(i) for i in range(4)]
  mean = jax.tree.map(lambda *g: sum(g) / 4, *micro)
  inner = dualoptax.dual_optim_plus(1e-2)
  tx = dualoptax.accumulate_objectives(inner, every_k=4)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for i, g in enumerate(micro):
    u, state = update({"retain": g}, state, PARAMS)
    if i < 3:
      assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  u_ref, s_ref = inner.update({"retain": mean}, inner.init(PARAMS), PARAMS)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u, u_ref
  )
  assert int(state.inner_state.count) == 1
  assert int(state.sizes["retain"]) == 0
  with pytest.raises(ValueError, match="every_k"):
    dualoptax.accumulate_objectives(inner, every_k=0)


def test_multisteps_cannot_wrap_and_error_says_why():
  tx = optax.MultiSteps(dualoptax.dual_optim_plus(1e-2), every_k_schedule=2)
  state = tx.init(PARAMS)
  # Given params-shaped gradients, as MultiSteps assumes, it accumulates them
  # and hands them on: DualOptim+ sees parameter names where objectives belong
  # and says which wrappers cannot wrap it and what to use instead.
  with pytest.raises(ValueError) as error:
    tx.update(grads(0), state, PARAMS)
  message = str(error.value)
  assert "Unknown objective(s) ['dense']" in message
  assert "optax.MultiSteps" in message
  assert "dualoptax.accumulate_objectives" in message
  # Given a mapping of objectives, MultiSteps fails first, in its own tree map
  # of the mapping against its params-shaped accumulator (JAX's message): the
  # library is never called.
  with pytest.raises(ValueError, match="pytree structure error"):
    tx.update({"forget": grads(0)}, state, PARAMS)
  # What to use instead: accumulate_objectives emits every 2nd call.
  tx = dualoptax.accumulate_objectives(dualoptax.dual_optim_plus(1e-2), 2)
  state = tx.init(PARAMS)
  u, state = tx.update({"forget": grads(0)}, state, PARAMS)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  u, state = tx.update({"forget": grads(1)}, state, PARAMS)
  assert all(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def test_apply_if_finite_alongside():
  # The built-in guard skips non-finite calls inside DualOptim+; apply_if_finite
  # after it guards the merged update and tracks consecutive errors.
  tx = optax.chain(
    dualoptax.dual_optim_plus(1e-2),
    optax.apply_if_finite(optax.identity(), max_consecutive_errors=3),
  )
  state = tx.init(PARAMS)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads(0))
  u, state = jax.jit(tx.update)({"forget": bad}, state, PARAMS)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  assert int(state[0].skipped) == 1
  u, state = jax.jit(tx.update)({"forget": grads(1)}, state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert int(state[0].count) == 1


def test_flax_train_state():
  from flax.training import train_state

  ts = train_state.TrainState.create(
    apply_fn=None, params=PARAMS, tx=dualoptax.dual_optim_plus(1e-2)
  )
  ts = jax.jit(lambda ts, g: ts.apply_gradients(grads={"forget": g}))(
    ts, grads(0)
  )
  assert int(ts.opt_state.count) == 1 and int(ts.step) == 1


NNX_TXS = {
  "float32": lambda: dualoptax.dual_optim_plus(1e-2),
  "8bit": lambda: dualoptax.dual_optim_plus_8bit(1e-2, chunk_size=1024),
  "quantize_state(adam)": lambda: dualoptax.quantize_state(optax.adam(1e-2)),
}


@pytest.mark.parametrize("name", NNX_TXS)
def test_flax_nnx_optimizer(name):
  # nnx.Optimizer rebuilds its opt_state from nnx.state(new_state) after each
  # update: 8-bit states used to lose their QuantizedArray class on step 1.
  from flax import nnx

  objectives = ("forget", "retain")
  per_objective = name != "quantize_state(adam)"
  model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))  # kernel above min_size
  opt = nnx.Optimizer(model, NNX_TXS[name](), wrt=nnx.Param)
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((8, 64)), jnp.float32
  )

  def loss(m):
    return jnp.mean((m(x) - 1.0) ** 2)

  @nnx.jit
  def step(model, opt, index):
    g = nnx.grad(loss)(model)
    graphdef, state = nnx.split((model, opt))

    def one(objective):  # a traced objective switch over nnx state
      m, o = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
      o.update(m, {objective: g} if per_objective else g)
      return nnx.state((m, o))

    nnx.update((model, opt), dualoptax.switch_objective(index, objectives, one))

  # The same transformation on plain pytrees, as the reference.
  tx = NNX_TXS[name]()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(params)

  @jax.jit
  def ref_step(params, state, index):
    def one(objective):
      g = jax.grad(lambda p: loss(nnx.merge(nnx.graphdef(model), p)))(params)
      g = {objective: g} if per_objective else g
      return tx.update(g, state, params)

    u, state = dualoptax.switch_objective(index, objectives, one)
    return optax.apply_updates(params, u), state

  for index in (0, 1, 1, 0):
    step(model, opt, jnp.int32(index))
    params, state = ref_step(params, state, jnp.int32(index))
  kernel = (
    opt.opt_state.base_mu["kernel"]
    if per_objective
    else opt.opt_state[0].mu["kernel"]
  )
  if name != "float32":
    assert isinstance(kernel, dualoptax.QuantizedArray)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(got["kernel"], params["kernel"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["bias"], params["bias"], rtol=0, atol=1e-6)
  assert int(opt.step[...]) == 4


def test_flax_nnx_exclude_by_name():
  # nnx param paths end in the Variable's own key: exclude still matches them.
  from flax import nnx

  model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  state = dualoptax.quantize_state(optax.adam(1e-2), exclude=("kernel",)).init(
    params
  )
  assert not isinstance(state[0].mu["kernel"], dualoptax.QuantizedArray)
  state = dualoptax.quantize_state(optax.adam(1e-2)).init(params)
  assert isinstance(state[0].mu["kernel"], dualoptax.QuantizedArray)


def test_state_structure_error_names_the_state_not_params():
  # A state whose QuantizedArrays were rebuilt as dicts: the message says the
  # moments (not the params) differ and why.
  tx = dualoptax.dual_optim_plus_8bit(1e-2)
  params = {"w": jnp.zeros((64, 128))}
  state = tx.init(params)
  mangled = state._replace(
    base_mu=jax.tree.map(
      lambda q: {"codes": q.codes, "absmax": q.absmax},
      state.base_mu,
      is_leaf=lambda x: isinstance(x, dualoptax.QuantizedArray),
    )
  )
  with pytest.raises(
    ValueError, match="optimizer state's moments.*QuantizedArray"
  ):
    tx.update({"retain": params}, mangled, params)


def test_tree_map_params():
  tx = dualoptax.dual_optim_plus(1e-2)
  state = tx.init(PARAMS)
  shapes = optax.tree.map_params(
    tx,
    lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16),
    state,
    transform_non_params=lambda x: x,
  )
  assert shapes.base_mu["dense"]["kernel"].dtype == jnp.bfloat16
  assert shapes.deltas["retain"].nu["dense"]["bias"].dtype == jnp.bfloat16
  assert shapes.count.dtype == jnp.int32


def test_dual_optim_same_calling_convention():
  p, s = run(dualoptax.dual_optim({"forget": 1e-2, "retain": 5e-3}), CALLS)
  assert (
    int(s.deltas["forget"].count) == 2 and int(s.deltas["retain"].count) == 3
  )
  assert int(s.count) == 4


def test_orbax_checkpoint_restores_exactly_and_resumes(tmp_path):
  import orbax.checkpoint as ocp

  tx = dualoptax.dual_optim_plus(
    {"forget": 1e-2, "retain": 5e-3}, weight_decay=0.01
  )
  params, state = run(tx, CALLS)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  target = jax.tree.map(
    ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}
  )
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", target)
  assert isinstance(restored["opt_state"], dualoptax.DualOptimPlusState)
  saved = {"params": params, "opt_state": state}
  assert jax.tree.structure(saved) == jax.tree.structure(restored)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  update = jax.jit(tx.update)
  u1, _ = update({"retain": grads(99)}, state, params)
  u2, _ = update(
    {"retain": grads(99)}, restored["opt_state"], restored["params"]
  )
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize(
  "make, multi",
  [
    (lambda: optax.adamw(1e-2, weight_decay=0.1), False),
    (lambda: dualoptax.dual_optim_plus(1e-2), True),
    # Our 8-bit step wrapped or chained: it returns an update, added after.
    (
      lambda: optax.inject_hyperparams(
        dualoptax.dual_optim_plus_8bit,
        static_args=dualoptax.STATIC_8BIT_ARGS,
      )(learning_rate=1e-2, min_size=4),
      True,
    ),
    (
      lambda: optax.chain(
        dualoptax.quantize_state(optax.adam(1e-2), min_size=4),
        optax.scale(0.5),
      ),
      False,
    ),
  ],
  ids=["adamw", "dual_optim_plus", "inject_8bit", "chain_quantized"],
)
def test_update_and_apply_is_update_then_apply_elsewhere(make, multi):
  # For a transformation that does not write the params itself (any but
  # quantize_state and dual_optim_plus_8bit, outermost), update_and_apply
  # is tx.update then optax.apply_updates: the same arrays, bit for bit.
  tx = make()
  state = tx.init(PARAMS)
  g = {"forget": grads(0), "retain": grads(1)} if multi else grads(0)
  u, s1 = jax.jit(tx.update)(g, state, PARAMS)
  p1 = optax.apply_updates(PARAMS, u)
  p2, s2 = jax.jit(lambda g, s, p: dualoptax.update_and_apply(tx, g, s, p))(
    g, state, PARAMS
  )
  assert jax.tree.structure(p2) == jax.tree.structure(PARAMS)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_update_and_apply_needs_params():
  tx = dualoptax.quantize_state(optax.adam(1e-2))
  with pytest.raises(ValueError, match="params are required"):
    dualoptax.update_and_apply(tx, grads(0), tx.init(PARAMS), None)
