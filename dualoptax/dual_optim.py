r"""DualOptim: one Adam state per objective (the baseline DualOptim+ improves on).

Separate ``m_k, v_k`` and counters per objective, no shared base
(``docs/algorithm.md``, section 2). It uses the same calling convention as
:func:`dualoptax.dual_optim_plus`, so the two can be swapped.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import optax

from dualoptax import _engine, _objectives, quantized_state
from dualoptax._engine import AdamMoments
from dualoptax.dual_optim_plus import DEFAULT_OBJECTIVES


class DualOptimState(NamedTuple):
  """State of :func:`dual_optim`.

  Attributes:
    count: calls taken (int32); learning-rate schedules are evaluated at it.
    deltas: ``{objective: AdamMoments}``, each a plain Adam state (``nu >= 0``).
    skipped: calls skipped because a gradient held NaN or Inf (int32).
  """

  count: jax.Array
  deltas: dict[str, AdamMoments]
  skipped: jax.Array


def dual_optim(
  learning_rate: _objectives.LearningRate,
  *,
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: _objectives.MaskOrFn = None,
  skip_nonfinite: bool = True,
  kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim: decoupled Adam states, one per objective.

  For each objective :math:`k` present in a call, with its own count :math:`t_k`:

  .. math::

    m_k &\leftarrow \beta_1 m_k + (1-\beta_1) g_k, \quad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2) g_k^2 \\
    \Delta\theta &= -\sum_k \eta_k(T)\left(
      \frac{m_k / (1-\beta_1^{t_k})}{\sqrt{v_k / (1-\beta_2^{t_k})} + \epsilon}
      + \lambda\theta\right)

  where :math:`T` counts calls (for schedules). Absent objectives are untouched.

  Args:
    learning_rate: a float, an optax schedule, or a Mapping objective → either.
    objectives: names of the objectives.
    b1, b2: moment decays.
    eps: added outside the square root.
    weight_decay: decoupled weight decay (>= 0), scaled by each objective's lr.
    mask: weight-decay mask as in ``optax.adamw``.
    skip_nonfinite: skip (and count) calls whose gradients hold NaN or Inf.
    kernel: ``"auto"``, ``"pallas"`` or ``"xla"``, as
      :func:`dualoptax.scale_by_dual_optim_plus`: on TPU each float32 leaf a
      kernel tiles runs its step as one fused Pallas kernel.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DualOptimState`.

  Examples:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dual_optim(1e-3)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"retain": {"w": jnp.ones(2)}}, state, params)

  References:
    Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine Unlearning
    with Dual Optimizers" (arXiv 2504.15827).
  """
  objectives = _objectives.check_hyperparameters(
    objectives, dict(b1=b1, b2=b2), eps, weight_decay
  )
  lrs = _objectives.resolve_learning_rates(learning_rate, objectives)
  hyper = _engine.Hyper(b1, b2, None, None, eps, stable=False)
  _engine.check_kernel(kernel)

  def init_fn(params):
    _engine.check_float_params(params, "dual_optim")
    return DualOptimState(
      count=_engine.zero_count(params),
      deltas=_engine.init_deltas(
        params, objectives, None, None, _engine.AdamMoments
      ),
      skipped=_engine.zero_count(params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    reference = state.deltas[objectives[0]].mu
    call = _engine.prepare_call(
      grads,
      objectives,
      reference,
      params,
      weight_decay,
      mask,
      skip_nonfinite,
      kernel,
      extra_args,
    )
    coefficients = {
      k: -_objectives.evaluate(lrs[k], state.count) for k in call.present
    }
    updates, deltas, _, count = _engine.run_step(
      call,
      state.deltas,
      None,
      state.count,
      params,
      coefficients,
      weight_decay,
      hyper,
    )
    return updates, DualOptimState(
      count,
      {**state.deltas, **deltas},
      _engine.count_skipped(state.skipped, call.finite),
    )

  return optax.GradientTransformationExtraArgs(
    init_fn, quantized_state.applies(update_fn)
  )
