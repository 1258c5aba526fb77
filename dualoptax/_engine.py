r"""The per-leaf step shared by DualOptim+ and DualOptim, mapped over leaves.

:func:`dual_optim_plus_leaf` and :func:`dual_optim_leaf` state one parameter
leaf's step as element-wise JAX; :func:`multi_objective_step` maps one of them
over the leaves of the trees of one call. The math is in ``docs/algorithm.md``
(sections 1 and 2). Every operation is element-wise, so XLA fuses a leaf's step
into one pass over its arrays on GPU and TPU (a multi-output loop fusion reading
the gradients, moments and parameter once and writing the update and the new
moments once), and :func:`dualoptax.quantize_state` can run it chunk by chunk.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _kernel, _objectives, _sharding


class DeltaState(NamedTuple):
  r"""DualOptim+'s moments of one objective: corrections to the base.

  Attributes:
    count: steps taken by this objective (:math:`t_k`).
    mu: EMA of the residual :math:`g - \hat m_B`.
    nu: EMA of :math:`g^2 - \hat v_B`, a signed correction to the base second
      moment (it can be negative).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


class AdamMoments(NamedTuple):
  """DualOptim's moments of one objective: a plain Adam state.

  Attributes:
    count: steps taken by this objective (:math:`t_k`).
    mu: EMA of the objective's gradients.
    nu: EMA of their squares (non-negative).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates

  # Read by dualoptax.quantize_state: these leaves take the unsigned code map.
  nonnegative_fields = frozenset({"nu"})


class Hyper(NamedTuple):
  """Static hyperparameters of the step."""

  b1: Any
  b2: Any
  base_b1: Any
  base_b2: Any
  eps: Any
  stable: bool


class ObjectiveScalars(NamedTuple):
  r"""Per-call scalars of one present objective.

  Attributes:
    coefficient: :math:`c_k` of :math:`\Delta\theta = \sum_k c_k (u_k +
      \lambda\theta)` (``-lr_k`` for the aliases, 1 for ``scale_by``).
    r1: :math:`1 / (1 - \beta_1^{t_k})`, the first-moment bias correction.
    r2: :math:`1 / (1 - \beta_2^{t_k})`.
  """

  coefficient: Any
  r1: jax.Array
  r2: jax.Array


class LeafStep(NamedTuple):
  """One leaf's results: the update and the present objectives' new moments
  (and the new base moments for DualOptim+)."""

  update: jax.Array
  mu: tuple
  nu: tuple
  base_mu: Optional[jax.Array] = None
  base_nu: Optional[jax.Array] = None


def inverse_bias_correction(beta: Any, count: jax.Array, dtype) -> jax.Array:
  """``1 / (1 - beta**count)`` in ``dtype``; 1 where ``count == 0``.

  One scalar per call: moments are multiplied by it (within an ulp of dividing
  by ``1 - beta**count``, and a multiply is cheaper per element).
  """
  beta = jnp.asarray(beta, dtype)
  corr = 1 - beta ** count.astype(dtype)
  return jnp.where(count > 0, 1 / corr, jnp.ones((), dtype))


def _direction(num, second, hyper: Hyper):
  if hyper.stable:
    # A second moment is never below the squared mean, so |u| <= 1.
    second = jnp.maximum(second, num * num)
  return num / (jnp.sqrt(second) + jnp.asarray(hyper.eps, second.dtype))


def _decayed(direction, param, weight_decay):
  return direction if param is None else direction + weight_decay * param


def dual_optim_plus_leaf(
  grads: Sequence[jax.Array],
  mu: Sequence[jax.Array],
  nu: Sequence[jax.Array],
  base_mu: jax.Array,
  base_nu: jax.Array,
  param: Optional[jax.Array],
  scalars: Sequence[ObjectiveScalars],
  base_r1: jax.Array,
  base_r2: jax.Array,
  weight_decay: Any,
  hyper: Hyper,
  out_dtype,
) -> LeafStep:
  r"""DualOptim+ on one leaf for the present objectives of one call.

  With :math:`\hat m_B = r_{B1} m_B`, :math:`\hat v_B = r_{B2} v_B` (the base
  before this call) and per objective :math:`k`:

  .. math::

    m_k &\leftarrow \beta_1 m_k + (1-\beta_1)(g_k - \hat m_B), \quad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2)(g_k^2 - \hat v_B) \\
    n_k &= r_{1,k} m_k + \hat m_B, \quad s_k = |r_{2,k} v_k + \hat v_B| \\
    \Delta\theta &= \sum_k c_k \left(\frac{n_k}{\sqrt{s_k} + \epsilon}
      + \lambda\theta\right)

  then the base steps once on the mean gradient and mean squared gradient.

  Args:
    grads, mu, nu: per present objective, its gradient and delta moments.
    base_mu, base_nu: the base moments.
    param: the parameter where weight decay applies, else None.
    scalars: per present objective, its :class:`ObjectiveScalars`.
    base_r1, base_r2: the base's inverse bias corrections at ``T - 1``.
    weight_decay: :math:`\lambda`.
    hyper: betas, eps and the stable switch.
    out_dtype: dtype of the update.

  Returns:
    The leaf's :class:`LeafStep`.
  """
  mdt, vdt = base_mu.dtype, base_nu.dtype
  b1, b2 = jnp.asarray(hyper.b1, mdt), jnp.asarray(hyper.b2, vdt)
  mhB, vhB = base_mu * base_r1, base_nu * base_r2
  update, mus, nus, g_sum, g2_sum = None, [], [], None, None
  for g, m, v, s in zip(grads, mu, nu, scalars):
    g_m, g_v = g.astype(mdt), g.astype(vdt)
    g2 = g_v * g_v
    g_sum = g_m if g_sum is None else g_sum + g_m
    g2_sum = g2 if g2_sum is None else g2_sum + g2
    m = b1 * m + (1 - b1) * (g_m - mhB)
    v = b2 * v + (1 - b2) * (g2 - vhB)
    num = m * s.r1 + mhB
    second = jnp.abs(v * s.r2 + vhB)
    term = s.coefficient * _decayed(
      _direction(num, second, hyper), param, weight_decay
    )
    update = term if update is None else update + term
    mus.append(m)
    nus.append(v)
  # Every operation here is compiled once per leaf: a mean of one gradient is
  # the gradient itself.
  n = len(grads)
  g_mean = g_sum if n == 1 else g_sum / n
  g2_mean = g2_sum if n == 1 else g2_sum / n
  bb1, bb2 = jnp.asarray(hyper.base_b1, mdt), jnp.asarray(hyper.base_b2, vdt)
  return LeafStep(
    update.astype(out_dtype),
    tuple(mus),
    tuple(nus),
    bb1 * base_mu + (1 - bb1) * g_mean,
    bb2 * base_nu + (1 - bb2) * g2_mean,
  )


def dual_optim_leaf(
  grads: Sequence[jax.Array],
  mu: Sequence[jax.Array],
  nu: Sequence[jax.Array],
  param: Optional[jax.Array],
  scalars: Sequence[ObjectiveScalars],
  weight_decay: Any,
  hyper: Hyper,
  out_dtype,
) -> LeafStep:
  r"""DualOptim on one leaf: an Adam step per present objective, summed.

  .. math::

    m_k \leftarrow \beta_1 m_k + (1-\beta_1) g_k, \quad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2) g_k^2, \quad
    \Delta\theta = \sum_k c_k \left(\frac{r_{1,k} m_k}{\sqrt{r_{2,k} v_k}
      + \epsilon} + \lambda\theta\right)
  """
  update, mus, nus = None, [], []
  for g, m, v, s in zip(grads, mu, nu, scalars):
    mdt, vdt = m.dtype, v.dtype
    b1, b2 = jnp.asarray(hyper.b1, mdt), jnp.asarray(hyper.b2, vdt)
    g_v = g.astype(vdt)
    m = b1 * m + (1 - b1) * g.astype(mdt)
    v = b2 * v + (1 - b2) * g_v * g_v
    term = s.coefficient * _decayed(
      _direction(m * s.r1, v * s.r2, hyper), param, weight_decay
    )
    update = term if update is None else update + term
    mus.append(m)
    nus.append(v)
  return LeafStep(update.astype(out_dtype), tuple(mus), tuple(nus))


def _traced_once(leaf_fn: Callable) -> Callable:
  """``leaf_fn`` under ``jax.jit``: leaves of one shape and dtype are traced
  and lowered once, not once per leaf (XLA inlines the calls, so the compiled
  step is the same). The numeric hyperparameters are arguments, so they may
  be traced (``optax.inject_hyperparams``)."""

  @functools.partial(jax.jit, static_argnames=("stable", "out_dtype"))
  def leaf_step(args, numbers: Hyper, *, stable, out_dtype):
    return leaf_fn(*args, numbers._replace(stable=stable), out_dtype)

  def call(*args, hyper: Hyper, out_dtype):
    return leaf_step(
      args,
      hyper._replace(stable=None),  # the numbers, traced or not
      stable=bool(hyper.stable),
      out_dtype=jnp.dtype(out_dtype),
    )

  return call


def check_float_params(params: Any, name: str) -> None:
  """Raises at ``init`` if a parameter is not floating point (the moments of an
  integer leaf would be integers and the step would fail or round to 0)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{name}: parameter {jax.tree_util.keystr(path) or '(root)'} has dtype "
        f"{dtype}; only floating-point parameters can be optimized. Leave "
        "integer/boolean leaves out of the params (e.g. nnx.Optimizer's wrt, "
        "optax.partition / optax.set_to_zero for them)."
      )


def replicated_like(x: jax.Array, params: Any) -> jax.Array:
  """``x`` (a state scalar) replicated over the mesh of the first concrete
  params leaf with a multi-device ``NamedSharding``; else ``x`` unchanged.

  Without this, counters created by ``jnp.zeros`` live on the default device
  only, and ``out_shardings`` taken from the state's ``.sharding`` fail. Under
  ``jit``/``eval_shape`` (traced params) the compiler places them.
  """
  for leaf in jax.tree.leaves(params):
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
      continue
    sharding = getattr(leaf, "sharding", None)
    if (
      isinstance(sharding, jax.sharding.NamedSharding)
      and len(sharding.device_set) > 1
    ):
      return jax.device_put(
        x,
        jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()),
      )
  return x


def zero_count(params: Any) -> jax.Array:
  """An int32 zero counter, replicated like :func:`replicated_like`."""
  return replicated_like(jnp.zeros([], jnp.int32), params)


def init_moments(params: Any, dtype) -> Any:
  # Tree-map only, so optax.tree.map_params and sharding propagation see
  # through it.
  return jax.tree.map(
    lambda p: jnp.zeros_like(p, dtype=dtype or p.dtype), params
  )


def init_deltas(params, objectives, mu_dtype, nu_dtype, state_type=DeltaState):
  return {
    k: state_type(
      count=zero_count(params),
      mu=init_moments(params, mu_dtype),
      nu=init_moments(params, nu_dtype),
    )
    for k in objectives
  }


class Base(NamedTuple):
  """DualOptim+'s shared base for one call: moments and count ``T``."""

  mu: Any
  nu: Any
  count: jax.Array


_plus_leaf = _traced_once(dual_optim_plus_leaf)
_adam_leaf = _traced_once(dual_optim_leaf)


def _plus_state_step(
  leaf: Callable, grads, state, param, numbers, hyper, out_dtype=jnp.float32
) -> list:
  """``leaf`` (:func:`dual_optim_plus_leaf`, or it traced once) on ``state =
  [*mu, *nu, base_mu, base_nu]``: ``[update, *new state]``."""
  k = len(grads)
  scalars, base_r1, base_r2, weight_decay = numbers
  s = leaf(
    grads,
    state[:k],
    state[k : 2 * k],
    state[2 * k],
    state[2 * k + 1],
    param,
    scalars,
    base_r1,
    base_r2,
    weight_decay,
    hyper=hyper,
    out_dtype=out_dtype,
  )
  return [s.update, *s.mu, *s.nu, s.base_mu, s.base_nu]


def _adam_state_step(
  leaf: Callable, grads, state, param, numbers, hyper, out_dtype=jnp.float32
) -> list:
  """``leaf`` (:func:`dual_optim_leaf`, or it traced once) on ``state =
  [*mu, *nu]``: ``[update, *new state]``."""
  k = len(grads)
  scalars, weight_decay = numbers
  s = leaf(
    grads,
    state[:k],
    state[k:],
    param,
    scalars,
    weight_decay,
    hyper=hyper,
    out_dtype=out_dtype,
  )
  return [s.update, *s.mu, *s.nu]


# The leaf steps as kernel bodies (one object each: kernels are shared by
# signature, the step included).
_plus_kernel_step = functools.partial(_plus_state_step, dual_optim_plus_leaf)
_adam_kernel_step = functools.partial(_adam_state_step, dual_optim_leaf)


KERNELS = ("auto", "pallas", "xla")


# An extra argument of an update: True where the update is traced to be run
# element-wise by someone else (dualoptax.quantize_state's chunks and
# kernels): the float32 optimizers then run no kernels of their own.
ELEMENTWISE = "_dualoptax_elementwise"


def check_kernel(kernel: str) -> str:
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  return kernel


# An extra argument of an update marked by dualoptax.quantized_state.applies:
# True asks it for the new params instead of the update (see
# dualoptax.update_and_apply).
APPLY = "_dualoptax_apply"


def use_kernels(kernel: str) -> bool:
  """Whether a float32 step may run its leaves as kernels (decided when the
  update is traced): ``"pallas"`` always, ``"auto"`` on TPU. Which leaves
  do: :func:`_kernel_leaf`."""
  return kernel == "pallas" or (kernel == "auto" and _kernel.on_tpu())


def _kernel_leaf(
  step: Callable,
  grads: Sequence[jax.Array],
  state: Sequence[jax.Array],
  param: Optional[jax.Array],
  numbers: Any,
  hyper: Hyper,
  keep: Optional[jax.Array],
  kernel: str,
  built: dict,
  applied: Optional[jax.Array] = None,
) -> Optional[list]:
  """One leaf's step as a fused kernel (:func:`dualoptax._kernel.step_kernel`,
  its body the leaf step itself); None where the leaf keeps XLA's step: not
  float32, a shape no kernel tiles, or sharded without its sharding in its
  type (:func:`dualoptax._kernel.shard_view`).

  ``step(grads, state, param, numbers, hyper)`` returns the update and the
  new ``state`` (in its order) as a list; ``param`` is the parameter where
  weight decay applies, else None; ``numbers`` is a pytree of 0-d values
  (bias corrections, coefficients). With ``applied`` (the parameter), the
  kernel returns ``applied + update`` in place of the update, written over
  ``applied``. Where ``keep`` is False it writes a zero update (the
  parameter as it was) and the state as it was. Leaves of one signature
  share one kernel, kept in ``built``."""
  target = param if param is not None else applied
  arrays = [*grads, *state] + ([] if target is None else [target])
  if _kernel.step_view(jnp.shape(arrays[0])) is None or any(
    jnp.dtype(x.dtype) != jnp.float32 for x in arrays
  ):
    return None
  view = _kernel.shard_view(arrays, kernel)
  if view is None:
    return None
  shape = tuple(view(arrays[0]).shape)
  if _kernel.step_view(shape) is None:
    return None
  values, treedef = jax.tree.flatten((numbers, hyper._replace(stable=None)))
  n_grads, n_state = len(grads), len(state)
  at = n_grads + n_state  # the parameter's position, where it is an operand
  decay, apply = param is not None, applied is not None
  key = (step, shape, treedef, n_grads, n_state, decay, apply, hyper.stable)
  if key not in built:

    def fn(scalars, xs):
      numbers, numeric = jax.tree.unflatten(treedef, scalars)
      new = step(
        xs[:n_grads],
        xs[n_grads:at],
        xs[at] if decay else None,
        numbers,
        numeric._replace(stable=hyper.stable),
      )
      return [xs[at] + new[0], *new[1:]] if apply else new

    aliases = {n_grads + t: 1 + t for t in range(n_state)}
    if apply:
      aliases[at] = 0
    built[key] = _kernel.step_kernel(
      fn,
      shape,
      len(arrays),
      1 + n_state,
      len(values) + 1,
      aliases,
      # Read again by optax.apply_updates after the kernel.
      reread=[at] if decay and not apply else [],
    )
  flag = jnp.ones((), jnp.bool_) if keep is None else keep
  scalars = [jnp.reshape(jnp.asarray(v, jnp.float32), (1,)) for v in values]
  scalars.append(jnp.reshape(flag.astype(jnp.int32), (1,)))
  kernel_fn = built[key]._replace(scalars=scalars)
  if view is _kernel.local_stand_in:
    return _kernel.on_shards(kernel_fn, arrays, [None] * (1 + n_state))
  return kernel_fn.apply(scalars, arrays)


def multi_objective_step(
  grads: Mapping[str, Any],
  deltas: Mapping[str, Any],
  base: Optional[Base],
  params: Any,
  coefficients: Mapping[str, Any],
  weight_decay: Any,
  decay_flags: Sequence[bool],
  hyper: Hyper,
  kernel: str = "xla",
  keep: Optional[jax.Array] = None,
  apply: bool = False,
):
  """One call of the multi-objective rule, the leaf step mapped over leaves.

  Args:
    grads: present objectives' gradient trees (canonical order).
    deltas: every objective's moments (:class:`DeltaState` or
      :class:`AdamMoments`).
    base: DualOptim+'s :class:`Base`, or None for DualOptim.
    params: params tree (read where weight decay is on), or None.
    coefficients: per present objective, :math:`c_k`.
    weight_decay: decoupled decay strength, on leaves whose flag is True.
    decay_flags: one bool per leaf.
    hyper: betas, eps and the stability switch.
    kernel: ``"auto"``, ``"pallas"`` or ``"xla"`` (see :func:`use_kernels`):
      where kernels run, each float32 leaf they tile is one fused kernel.
    keep: a traced bool or None: where False, a zero update and every
      moment as it was (selected per leaf, in the kernels in VMEM).
    apply: return ``params + updates`` in place of the updates (a kernel
      writes it over the parameter).

  Returns:
    ``(updates, new_deltas, new_base_moments_or_None)``; ``new_deltas`` holds
    the present objectives only (absent ones are unchanged by definition).
  """
  names = list(grads)
  treedef = jax.tree.structure(deltas[names[0]].mu)
  flat = lambda tree: treedef.flatten_up_to(tree)
  g_leaves = [flat(grads[k]) for k in names]
  m_leaves = [flat(deltas[k].mu) for k in names]
  v_leaves = [flat(deltas[k].nu) for k in names]
  p_leaves = flat(params) if params is not None else [None] * treedef.num_leaves
  use_decay = _objectives.decay_enabled(weight_decay)

  # Per-call scalars, computed once per moment dtype rather than per leaf:
  # tracing and lowering time grow with the operations of every leaf.
  cache: dict = {}

  def scalars(dtype_m, dtype_v):
    key = ("delta", jnp.dtype(dtype_m), jnp.dtype(dtype_v))
    if key not in cache:
      cache[key] = [
        ObjectiveScalars(
          coefficients[k],
          inverse_bias_correction(hyper.b1, deltas[k].count + 1, dtype_m),
          inverse_bias_correction(hyper.b2, deltas[k].count + 1, dtype_v),
        )
        for k in names
      ]
    return cache[key]

  def base_scalars(dtype_m, dtype_v):
    key = ("base", jnp.dtype(dtype_m), jnp.dtype(dtype_v))
    if key not in cache:
      cache[key] = (
        inverse_bias_correction(hyper.base_b1, base.count, dtype_m),
        inverse_bias_correction(hyper.base_b2, base.count, dtype_v),
      )
    return cache[key]

  if base is not None:
    mB_leaves, vB_leaves = flat(base.mu), flat(base.nu)
  kernels = use_kernels(kernel)
  built: dict = {}  # one kernel per leaf signature
  steps = []
  for i in range(treedef.num_leaves):
    g = [c[i] for c in g_leaves]
    m = [c[i] for c in m_leaves]
    v = [c[i] for c in v_leaves]
    p = p_leaves[i]
    out_dtype = p.dtype if p is not None else g[0].dtype
    param = p if use_decay and decay_flags[i] else None
    if base is not None:
      mB, vB = mB_leaves[i], vB_leaves[i]
      state = [*m, *v, mB, vB]
      numbers = (
        scalars(mB.dtype, vB.dtype),
        *base_scalars(mB.dtype, vB.dtype),
        weight_decay,
      )
      on_state, fused_step = (
        functools.partial(_plus_state_step, _plus_leaf),
        _plus_kernel_step,
      )
    else:
      state = [*m, *v]
      numbers = (scalars(m[0].dtype, v[0].dtype), weight_decay)
      on_state, fused_step = (
        functools.partial(_adam_state_step, _adam_leaf),
        _adam_kernel_step,
      )
    new = None
    if kernels and jnp.dtype(out_dtype) == jnp.float32:
      new = _kernel_leaf(
        fused_step,
        g,
        state,
        param,
        numbers,
        hyper,
        keep,
        kernel,
        built,
        p if apply else None,
      )
    if new is None:
      new = on_state(g, state, param, numbers, hyper, out_dtype)
      if apply:
        new[0] = optax.apply_updates(p, new[0])
      if keep is not None:  # skipped: a zero update (params kept), old state
        old = [p if apply else jnp.zeros_like(new[0]), *state]
        new = [jnp.where(keep, x, y) for x, y in zip(new, old)]
    k = len(g)
    steps.append(
      LeafStep(
        new[0],
        tuple(new[1 : 1 + k]),
        tuple(new[1 + k : 1 + 2 * k]),
        *new[1 + 2 * k :],
      )
    )

  updates = treedef.unflatten([s.update for s in steps])
  new_deltas = {
    k: type(deltas[k])(
      count=optax.safe_increment(deltas[k].count),
      mu=treedef.unflatten([s.mu[j] for s in steps]),
      nu=treedef.unflatten([s.nu[j] for s in steps]),
    )
    for j, k in enumerate(names)
  }
  new_base = None
  if base is not None:
    new_base = (
      treedef.unflatten([s.base_mu for s in steps]),
      treedef.unflatten([s.base_nu for s in steps]),
    )
  return updates, new_deltas, new_base


class Call(NamedTuple):
  """What one call of a float32 optimizer's update runs: the present
  objectives' gradients, the weight-decay flags, the non-finite check (None
  without the guard), ``kernel`` as this call uses it and whether it returns
  the new params (:data:`APPLY`)."""

  present: dict
  flags: Sequence[bool]
  finite: Optional[jax.Array]
  kernel: str
  apply: bool


def prepare_call(
  grads,
  objectives,
  reference,
  params,
  weight_decay,
  mask,
  skip_nonfinite,
  kernel: str,
  extra_args: Mapping[str, Any],
) -> Call:
  """Trace-time checks of one call, and how it runs: ``kernel`` is ``"xla"``
  where the call is traced to be run element-wise (:data:`ELEMENTWISE`)."""
  if extra_args.get(ELEMENTWISE, False):
    kernel = "xla"
  present = _objectives.present_gradients(grads, objectives, reference)
  if _objectives.decay_enabled(weight_decay) and params is None:
    raise ValueError("`params` must be passed to update when weight_decay > 0.")
  flags = _objectives.decay_mask(mask, reference if params is None else params)
  # On TPU the check is a kernel (per shard under explicit mesh axes; XLA's
  # sum where a leaf is sharded otherwise): XLA's reductions there make the
  # step markedly slower to compile (benchmarks/tpu_aot.py).
  fused = _kernel.on_tpu() or use_kernels(kernel)
  check = _kernel.all_finite if fused else _objectives.all_finite
  finite = check(list(present.values())) if skip_nonfinite else None
  return Call(present, flags, finite, kernel, extra_args.get(APPLY, False))


# Platforms where the float32 step's non-finite guard selects rather than
# branches: on TPU the select fuses into the step's loops, while a
# conditional's outputs are whole buffers (benchmarks/tpu_aot.py measures it).
SELECT_GUARD_ON = ("tpu",)


def guarded(
  finite: Optional[jax.Array],
  step,
  unchanged,
  update_shapes,
  *,
  select_on: tuple = (),
  kept: Any = None,
):
  """Runs ``step()`` -> ``(updates, changed)``; where ``finite`` is False, skips
  it: a zero update (of ``update_shapes``), or ``kept`` where given (the
  params, for a step that returns the new params), and ``unchanged`` (the
  pre-call values of what ``step`` changes).

  One ``lax.cond`` guards the call (an element-wise select instead compiled
  slower, with more temporaries, on XLA:CPU). Only the state that the step
  changes goes through the conditional, so absent objectives' moments are not
  copied. Code lowered for a platform named in ``select_on`` (``"tpu"``,
  ``"cpu"``, ...) selects instead: the step always runs and each output is
  ``where(finite, new, old)``, which fuses into the step's own element-wise
  loops, where a conditional's outputs are whole buffers that the parameter
  update then reads back from HBM.
  """
  if finite is None:
    return step()

  def skip():
    if kept is not None:
      return kept, unchanged
    zeros = jax.tree.map(_sharding.zeros, update_shapes)
    return zeros, unchanged

  def conditional():
    return jax.lax.cond(finite, step, skip)

  if not select_on:
    return conditional()

  def select():
    # The flag leaves a trivial conditional as a buffer: read directly, XLA
    # fuses the whole finiteness reduction into every leaf's loop.
    flag = jax.lax.cond(finite, lambda: True, lambda: False)
    return jax.tree.map(
      lambda new, old: jnp.where(flag, new, old), step(), skip()
    )

  return jax.lax.platform_dependent(
    **{platform: select for platform in select_on}, default=conditional
  )


def count_skipped(skipped: jax.Array, finite: Optional[jax.Array]) -> jax.Array:
  if finite is None:
    return skipped
  return jnp.where(finite, skipped, optax.safe_increment(skipped))


def update_shapes(grads: Mapping[str, Any], params: Any) -> Any:
  """Shapes of a call's update: params-shaped, in the params' dtype (the
  first present gradient's without params)."""
  first = next(iter(grads.values()))
  return jax.tree.map(
    lambda g, p: _sharding.struct(jnp.shape(g), jnp.result_type(p), like=g),
    first,
    first if params is None else params,
  )


def run_step(
  call: Call,
  deltas,
  base: Optional[Base],
  count,
  params,
  coefficients,
  weight_decay,
  hyper: Hyper,
):
  """One guarded call: the step where ``finite`` (or the guard is off), else a
  zero update with every moment and count unchanged. Where kernels run
  (:func:`use_kernels`), each leaf selects instead (a kernel's in VMEM).
  With ``call.apply``, the new params in place of the update (the params
  where skipped).

  Returns:
    ``(updates, new_deltas (present objectives), new_base_moments_or_None,
    new_count)``.
  """
  grads, flags, finite, kernel, apply = call

  def step(keep=None):
    updates, new_deltas, new_base = multi_objective_step(
      grads,
      deltas,
      base,
      params,
      coefficients,
      weight_decay,
      flags,
      hyper,
      kernel,
      keep,
      apply,
    )
    return updates, (new_deltas, new_base, optax.safe_increment(count))

  if use_kernels(kernel) and finite is not None:
    # The kernels select in VMEM: a conditional around them would copy
    # every state array in and out of its branches.
    updates, (new_deltas, new_base, new_count) = step(finite)
    new_deltas = {
      k: d._replace(count=jnp.where(finite, d.count, deltas[k].count))
      for k, d in new_deltas.items()
    }
    return updates, new_deltas, new_base, jnp.where(finite, new_count, count)

  unchanged = (
    {k: deltas[k] for k in grads},
    None if base is None else (base.mu, base.nu),
    count,
  )
  updates, (new_deltas, new_base, new_count) = guarded(
    finite,
    step,
    unchanged,
    update_shapes(grads, params),
    select_on=SELECT_GUARD_ON,
    kept=params if apply else None,
  )
  return updates, new_deltas, new_base, new_count
