r"""DualOptim+: a shared base state plus one delta state per objective.

The math is in ``docs/algorithm.md`` (section 1) and
:func:`scale_by_dual_optim_plus`; :func:`dual_optim_plus` is the alias with
learning rates and weight decay, :func:`dual_optim_plus_8bit` its 8-bit form.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptax import _engine, _kernel, _objectives, quantized_state
from dualoptax._engine import DeltaState

DEFAULT_OBJECTIVES = ("forget", "retain")


class DualOptimPlusState(NamedTuple):
  """State of :func:`scale_by_dual_optim_plus`.

  Attributes:
    count: base steps taken, ``T`` (int32). Skipped calls do not count.
    base_mu: base first moment ``m_B``, an EMA of the raw gradients (params-shaped).
    base_nu: base second moment ``v_B``, an EMA of the squared gradients (>= 0).
    deltas: ``{objective: DeltaState}``; each holds ``t_k`` and the residual moments
      ``m_k`` and ``v_k`` (``v_k`` is a signed correction to ``v_B``).
    skipped: calls skipped because a gradient held NaN or Inf (int32).
  """

  count: jax.Array
  base_mu: optax.Updates
  base_nu: optax.Updates
  deltas: dict[str, DeltaState]
  skipped: jax.Array

  # Read by dualoptax.quantize_state: v_B >= 0 takes the unsigned code map.
  nonnegative_fields = frozenset({"base_nu"})


def _dual_optim_plus_transform(
  coefficients_fn,
  weight_decay,
  mask,
  objectives,
  b1,
  b2,
  base_b1,
  base_b2,
  eps,
  stable,
  mu_dtype,
  nu_dtype,
  skip_nonfinite,
  kernel,
) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation ``Δθ = Σ_k c_k(T) (u_k + wd·θ)``."""
  _engine.check_kernel(kernel)
  objectives = _objectives.check_hyperparameters(
    objectives,
    dict(b1=b1, b2=b2, base_b1=base_b1, base_b2=base_b2),
    eps,
    weight_decay,
  )
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)
  hyper = _engine.Hyper(b1, b2, base_b1, base_b2, eps, stable)

  def init_fn(params):
    _engine.check_float_params(params, "dual_optim_plus")
    return DualOptimPlusState(
      count=_engine.zero_count(params),
      base_mu=_engine.init_moments(params, mu_dtype),
      base_nu=_engine.init_moments(params, nu_dtype),
      deltas=_engine.init_deltas(params, objectives, mu_dtype, nu_dtype),
      skipped=_engine.zero_count(params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    call = _engine.prepare_call(
      grads,
      objectives,
      state.base_mu,
      params,
      weight_decay,
      mask,
      skip_nonfinite,
      kernel,
      extra_args,
    )
    coefficients = coefficients_fn(call.present, state.count)
    updates, deltas, (base_mu, base_nu), count = _engine.run_step(
      call,
      state.deltas,
      _engine.Base(state.base_mu, state.base_nu, state.count),
      state.count,
      params,
      coefficients,
      weight_decay,
      hyper,
    )
    return updates, DualOptimPlusState(
      count,
      base_mu,
      base_nu,
      {**state.deltas, **deltas},
      _engine.count_skipped(state.skipped, call.finite),
    )

  return optax.GradientTransformationExtraArgs(
    init_fn, quantized_state.applies(update_fn)
  )


def scale_by_dual_optim_plus(
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  *,
  stable: bool = True,
  mu_dtype: Optional[chex.ArrayDType] = None,
  nu_dtype: Optional[chex.ArrayDType] = None,
  skip_nonfinite: bool = True,
  kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales per-objective gradients with DualOptim+'s base and delta moments.

  ``update`` takes a Mapping ``{objective: gradients}`` (any non-empty subset of
  ``objectives``) and returns one params-shaped tree, the sum of the present
  objectives' directions. For a call carrying objective :math:`k` with gradient
  :math:`g`, with base count :math:`T` and objective count :math:`t_k` *after*
  incrementing:

  .. math::

    \hat m_B &= m_B / (1 - \beta_{B1}^{T-1}), \quad
    \hat v_B = v_B / (1 - \beta_{B2}^{T-1}) \quad (\text{raw buffers when } T = 1) \\
    m_k &\leftarrow \beta_1 m_k + (1-\beta_1)(g - \hat m_B), \quad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2)(g^2 - \hat v_B) \\
    n_k &= \frac{m_k}{1-\beta_1^{t_k}} + \hat m_B, \quad
    s_k = \left|\frac{v_k}{1-\beta_2^{t_k}} + \hat v_B\right| \\
    u_k &= n_k / (\sqrt{s_k} + \epsilon)

  then the base takes one step on the mean of the present gradients (and of their
  squares): :math:`m_B \leftarrow \beta_{B1} m_B + (1-\beta_{B1})\bar g`,
  :math:`v_B \leftarrow \beta_{B2} v_B + (1-\beta_{B2})\overline{g^2}`.

  With ``stable=True`` (the default) the denominator uses
  :math:`\max(s_k, n_k^2)`: a second moment can never be below the squared mean, so
  :math:`|u_k| < 1` and elements whose estimate is consistent are untouched. The
  published rule (``stable=False``) can take steps of thousands × lr when
  :math:`s_k` cancels to ~0 (``docs/algorithm.md``, "The stable bound").

  Args:
    objectives: names of the objectives (default ``("forget", "retain")``).
    b1: decay of the delta first moments.
    b2: decay of the delta second moments.
    base_b1: decay of the base first moment.
    base_b2: decay of the base second moment.
    eps: added to the denominator outside the square root.
    stable: bound the direction per element as above; ``False`` is the published rule.
    mu_dtype: storage dtype of the first moments (default: the params' dtype).
    nu_dtype: storage dtype of the second moments (default: the params' dtype).
    skip_nonfinite: when any present gradient holds NaN or Inf, skip the call
      (zero update, every moment and count unchanged) and count it in
      ``state.skipped``. On sharded params the check costs one scalar all-reduce.
    kernel: ``"auto"`` (the default), ``"pallas"`` or ``"xla"``: with
      ``"auto"`` on TPU (and ``"pallas"`` anywhere, interpreted off TPU),
      each float32 leaf whose shape a kernel tiles (its last axis whole
      128-value lanes, or at most 16,384 values, 1-d or 2-d) runs its step
      as one fused Pallas kernel, the leaf step above its body, state
      written in place; the others, and everything under ``"xla"`` or off
      TPU, as XLA's element-wise ops. Under several devices a leaf takes a
      kernel per shard where its sharding is in its type (explicit mesh
      axes), else XLA's ops. Under ``jax.vmap`` each kernel runs once per
      batch member; a step with kernels cannot be differentiated (a clear
      error says so): use ``"xla"`` to differentiate through the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`DualOptimPlusState`.

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = optax.chain(dualoptax.scale_by_dual_optim_plus(),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"forget": {"w": jnp.ones(3)}}, state, params)

  References:
    Zhong, Li, Guo, Liu, "DualOptim+", ICML 2026 (arXiv 2605.21539).
  """
  return _dual_optim_plus_transform(
    lambda present, count: {k: 1.0 for k in present},
    0.0,
    None,
    objectives,
    b1,
    b2,
    base_b1,
    base_b2,
    eps,
    stable,
    mu_dtype,
    nu_dtype,
    skip_nonfinite,
    kernel,
  )


def dual_optim_plus(
  learning_rate: _objectives.LearningRate,
  *,
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: _objectives.MaskOrFn = None,
  stable: bool = True,
  mu_dtype: Optional[chex.ArrayDType] = None,
  nu_dtype: Optional[chex.ArrayDType] = None,
  skip_nonfinite: bool = True,
  kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim+ with per-objective learning rates and decoupled weight decay.

  The parameter change of a call is

  .. math::

    \Delta\theta = -\sum_{k \in \text{call}} \eta_k(T)\,(u_k + \lambda\,\theta)

  with :math:`u_k` from :func:`scale_by_dual_optim_plus`, :math:`\eta_k` the
  objective's learning rate evaluated at the base count *before* the call (step 0
  first, as optax schedules are) and :math:`\lambda` the weight decay, which scales
  with each objective's own learning rate (AdamW-style). Several
  objectives in one call each contribute their own term.

  Args:
    learning_rate: a float, an optax schedule of the base count, or a Mapping from
      objective to float or schedule (e.g. the forget/retain lr ratio).
    objectives: names of the objectives.
    b1, b2: delta moment decays.
    base_b1, base_b2: base moment decays.
    eps: added outside the square root.
    weight_decay: decoupled weight decay :math:`\lambda` (>= 0).
    mask: a bool tree shaped like params, or a callable returning one; weight decay
      applies where True (as in ``optax.adamw``).
    stable: bound every element's direction to ``|u| < 1`` (default); ``False``
      reproduces the published rule exactly.
    mu_dtype, nu_dtype: storage dtypes of first/second moments (default: params').
    skip_nonfinite: skip (and count) calls whose gradients hold NaN or Inf.
    kernel: ``"auto"``, ``"pallas"`` or ``"xla"``, as
      :func:`scale_by_dual_optim_plus`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DualOptimPlusState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, dualoptax
    >>> params = {"w": jnp.zeros(4)}
    >>> tx = dualoptax.dual_optim_plus(1e-3, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> g = {"w": jnp.ones(4)}
    >>> updates, state = tx.update({"forget": g}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> updates, state = tx.update({"retain": g}, state, params)

  References:
    Zhong, Li, Guo, Liu, "DualOptim+", ICML 2026 (arXiv 2605.21539).
  """
  objectives = _objectives.check_objectives(objectives)
  lrs = _objectives.resolve_learning_rates(learning_rate, objectives)

  def coefficients(present, count):
    return {k: -_objectives.evaluate(lrs[k], count) for k in present}

  return _dual_optim_plus_transform(
    coefficients,
    weight_decay,
    mask,
    objectives,
    b1,
    b2,
    base_b1,
    base_b2,
    eps,
    stable,
    mu_dtype,
    nu_dtype,
    skip_nonfinite,
    kernel,
  )


def _skip_nonfinite(
  tx: optax.GradientTransformationExtraArgs,
  objectives: tuple[str, ...],
  kernel: str,
) -> optax.GradientTransformationExtraArgs:
  """Skips (and counts in ``state.skipped``) calls with NaN or Inf gradients.

  The check runs once over every present gradient, outside ``tx``, so ``tx``
  stays element-wise per leaf; a skipped call leaves the whole state, 8-bit
  codes included, exactly as it was.
  """

  def update_fn(grads, state, params=None, **extra_args):
    apply = extra_args.pop(quantized_state.APPLY, False)
    present = _objectives.present_gradients(
      grads, objectives, quantized_state.shape_tree(state.base_mu)
    )
    first = jax.tree.leaves(next(iter(present.values())))
    fused = quantized_state.use_kernel(kernel, next(iter(first), None))
    # With the kernels, the check is a kernel too (see _kernel.all_finite).
    check = _kernel.all_finite if fused else _objectives.all_finite
    finite = check(list(present.values()))
    skipped = jnp.where(
      finite, state.skipped, optax.safe_increment(state.skipped)
    )
    if fused:
      # The fused kernels select in VMEM: a conditional around them would
      # copy every code array in and out of its branches.
      updates, new_state = tx.update(
        grads,
        state,
        params,
        **extra_args,
        **{quantized_state.KEEP_IF: finite, quantized_state.APPLY: apply},
      )
      return updates, new_state._replace(skipped=skipped)

    def step():
      return tx.update(
        grads, state, params, **extra_args, **{quantized_state.APPLY: apply}
      )

    # Skipped: zero update (or the params as they were), the state as it was,
    # one more skipped call.
    unchanged = state._replace(skipped=skipped)
    return _engine.guarded(
      finite,
      step,
      unchanged,
      _engine.update_shapes(present, params),
      kept=params if apply else None,
    )

  return optax.GradientTransformationExtraArgs(
    tx.init, quantized_state.applies(update_fn)
  )


STATIC_8BIT_ARGS = ("block_size", "min_size", "chunk_size")
"""Arguments of :func:`dual_optim_plus_8bit` that fix the state's layout: pass
them as ``static_args`` to ``optax.inject_hyperparams``."""


def dual_optim_plus_8bit(
  learning_rate: _objectives.LearningRate,
  *,
  quantize_base: bool = True,
  quantize_delta: bool = True,
  block_size: int = 256,
  min_size: int = 4096,
  exclude: quantized_state.Exclude = (),
  chunk_size: Optional[int] = quantized_state.DEFAULT_CHUNK_SIZE,
  kernel: str = "auto",
  skip_nonfinite: bool = True,
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: _objectives.MaskOrFn = None,
  stable: bool = True,
  mu_dtype: Optional[chex.ArrayDType] = None,
  nu_dtype: Optional[chex.ArrayDType] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim+ with 8-bit moments (the release's three 8-bit variants).

  :func:`dual_optim_plus` with its state kept by :func:`dualoptax.quantize_state`:
  the base moments :math:`m_B` (signed code map) and :math:`v_B` (unsigned map,
  it is non-negative) when ``quantize_base``, and every objective's delta
  moments :math:`m_k, v_k` (both signed: :math:`v_k` is a correction that may be
  negative) when ``quantize_delta``. With both, 2 objectives keep six 8-bit
  moments and one float32 absmax per block: about 6.1 bytes of state per
  parameter instead of 24.

  Each step decodes, steps and re-encodes the moments one chunk of a leaf at a
  time, leaf after leaf (at most ``chunk_size`` values where the leaf's
  leading axis splits that finely, see :func:`dualoptax.quantize_state`), so
  the step's temporary memory is bounded by the chunk, not the model; on
  TPU, one fused kernel per leaf (per shard, under a mesh with explicit
  axes) works through tiles in on-chip memory instead. The non-finite
  check runs before, over all gradients at once; a skipped call keeps every
  code as it was.

  The stable denominator (``stable=True``, the default) matters more here than
  in float32: quantization error of :math:`v_B` and :math:`v_k` (about 1% of a
  block's absmax) can cancel in :math:`\hat v_k + \hat v_B`.

  Args:
    learning_rate: as :func:`dual_optim_plus`.
    quantize_base: store the base moments in 8 bits.
    quantize_delta: store the per-objective delta moments in 8 bits.
    block_size: values per block (a positive power of two).
    min_size: leaves with fewer elements stay float32.
    exclude: parameters whose moments stay float32 (see
      :func:`dualoptax.quantize_state`).
    chunk_size: most values decoded at once (None: the whole state).
    kernel: ``"auto"``, ``"pallas"`` or ``"xla"``: fused Pallas kernels per
      leaf or XLA loops over chunks (see :func:`dualoptax.quantize_state`).
    skip_nonfinite: skip (and count) calls whose gradients hold NaN or Inf.
      The check reads every gradient once before the step reads them again
      (on TPU a sizeable share of the step's traffic and compile time:
      ``benchmarks/RESULTS.md``); with the fused kernels it is a kernel too.
      On the XLA loops the skip is a ``lax.cond`` around the step, under
      which the update cannot take the gradients' buffers; with False it
      does (see :func:`dualoptax.quantize_state`'s
      ``reuse_gradient_buffers``): a params-sized float32 buffer fewer in a
      train step that computes its gradients. The fused kernels select in
      on-chip memory instead, without a conditional.
    objectives, b1, b2, base_b1, base_b2, eps, weight_decay, mask, stable,
      mu_dtype, nu_dtype: as :func:`dual_optim_plus` (named here, not passed
      through ``**kwargs``, so ``optax.inject_hyperparams`` can inject them;
      name the storage sizes static there:
      ``optax.inject_hyperparams(dual_optim_plus_8bit, static_args=STATIC_8BIT_ARGS)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DualOptimPlusState` with :class:`~dualoptax.QuantizedArray` moments.

  Examples:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dual_optim_plus_8bit(1e-3, quantize_delta=False)
    >>> state = tx.init({"w": jnp.zeros((64, 256))})
    >>> type(state.base_nu["w"]).__name__
    'QuantizedArray'
    >>> type(state.deltas["forget"].mu["w"]).__name__
    'ArrayImpl'
  """
  for name, value in (
    ("block_size", block_size),
    ("min_size", min_size),
    ("chunk_size", chunk_size),
  ):
    if isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(
        f"dual_optim_plus_8bit: {name} fixes the layout of the 8-bit state "
        f"and must be a Python int, got an array ({value!r}). Under "
        "optax.inject_hyperparams pass "
        "static_args=dualoptax.STATIC_8BIT_ARGS."
      )
  for name, value in (
    ("quantize_base", quantize_base),
    ("quantize_delta", quantize_delta),
    ("skip_nonfinite", skip_nonfinite),
  ):
    if not isinstance(value, bool):
      raise ValueError(f"{name} must be a bool, got {value!r}")
  inner = dual_optim_plus(
    learning_rate,
    objectives=objectives,
    b1=b1,
    b2=b2,
    base_b1=base_b1,
    base_b2=base_b2,
    eps=eps,
    weight_decay=weight_decay,
    mask=mask,
    stable=stable,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    skip_nonfinite=False,
    kernel="xla",  # quantize_state runs the step (its own kernels)
  )
  groups = tuple(
    g for g, on in (("base", quantize_base), ("delta", quantize_delta)) if on
  )

  def select(path: str, leaf) -> bool:
    del leaf
    group = (
      "base"
      if path.startswith((".base_mu", ".base_nu"))
      else ("delta" if path.startswith(".deltas") else None)
    )
    return group in groups

  def signed(path: str, leaf) -> bool:
    del leaf
    return not path.startswith(".base_nu")  # v_B >= 0; v_k is signed

  tx = quantized_state.quantize_state(
    inner,
    block_size=block_size,
    min_size=min_size,
    exclude=exclude,
    signed=signed,
    select=select,
    chunk_size=chunk_size,
    kernel=kernel,
    # Under the non-finite guard's lax.cond the gradient's buffer is not the
    # update's to take: XLA would copy it (measured in benchmarks/RESULTS.md).
    reuse_gradient_buffers=not skip_nonfinite,
  )
  if not skip_nonfinite:
    return tx
  return _skip_nonfinite(tx, _objectives.check_objectives(objectives), kernel)
