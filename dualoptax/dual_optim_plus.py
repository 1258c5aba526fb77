r"""DualOptim+: a shared base state plus one delta state per objective.

See ``../shared/SPEC.md`` §1 (the authority) and :func:`scale_by_dual_optim_plus`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from dualoptax import _engine
from dualoptax import _objectives
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


def _dual_optim_plus_transform(
    coefficients_fn, weight_decay, mask, objectives, b1, b2, base_b1, base_b2, eps,
    stable, mu_dtype, nu_dtype, skip_nonfinite, implementation,
) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation ``Δθ = Σ_k c_k(T) (u_k + wd·θ)``."""
  objectives = _objectives.check_hyperparameters(
      objectives, dict(b1=b1, b2=b2, base_b1=base_b1, base_b2=base_b2), eps,
      weight_decay)
  implementation = _engine.check_implementation(implementation)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)
  hyper = _engine.Hyper(b1, b2, base_b1, base_b2, eps, stable)

  def init_fn(params):
    return DualOptimPlusState(
        count=jnp.zeros([], jnp.int32),
        base_mu=_engine.init_moments(params, mu_dtype),
        base_nu=_engine.init_moments(params, nu_dtype),
        deltas=_engine.init_deltas(params, objectives, mu_dtype, nu_dtype),
        skipped=jnp.zeros([], jnp.int32),
    )

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    # The reference is params-shaped even when dual_optim_plus_8bit's fused route
    # passes 8-bit moments straight through (QuantizedArray leaves).
    present, flags, finite = _engine.prepare_call(
        grads, objectives, _engine.shape_reference(state.base_mu), params,
        weight_decay, mask, skip_nonfinite)
    coefficients = coefficients_fn(present, state.count)
    updates, deltas, (base_mu, base_nu), count, finite = _engine.run_step(
        implementation, present, state.deltas,
        (state.base_mu, state.base_nu, state.count), state.count, params,
        coefficients, weight_decay, flags, hyper, finite)
    return updates, DualOptimPlusState(
        count, base_mu, base_nu, {**state.deltas, **deltas},
        _engine.count_skipped(state.skipped, finite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    implementation: Optional[str] = None,
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
  :math:`s_k` cancels to ~0 (SPEC §1, "Known hazard").

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
    implementation: ``"xla"`` (element-wise JAX, fused by XLA), ``"cpu_kernel"``
      (a single-pass numba kernel called through XLA's FFI; needs
      ``dualoptax[cpu]``, CPU only, not differentiable), or ``None`` (default):
      the kernel where it applies — CPU backend, one device, numba installed,
      float32/float64 throughout — and XLA elsewhere. Both compute the same math;
      results agree to rounding.

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
      lambda present, count: {k: 1.0 for k in present}, 0.0, None, objectives,
      b1, b2, base_b1, base_b2, eps, stable, mu_dtype, nu_dtype, skip_nonfinite,
      implementation)


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
    implementation: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim+ with per-objective learning rates and decoupled weight decay.

  The parameter change of a call is

  .. math::

    \Delta\theta = -\sum_{k \in \text{call}} \eta_k(T)\,(u_k + \lambda\,\theta)

  with :math:`u_k` from :func:`scale_by_dual_optim_plus`, :math:`\eta_k` the
  objective's learning rate evaluated at the base count *before* the call (step 0
  first, as optax schedules are) and :math:`\lambda` the weight decay, which scales
  with each objective's own learning rate (AdamW-style, SPEC step 6). Several
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
    implementation: ``None`` (auto), ``"xla"`` or ``"cpu_kernel"``; see
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
      coefficients, weight_decay, mask, objectives, b1, b2, base_b1, base_b2, eps,
      stable, mu_dtype, nu_dtype, skip_nonfinite, implementation)
