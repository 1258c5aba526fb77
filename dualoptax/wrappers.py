r"""Objective-aware wrappers: per-objective preprocessing and gradient accumulation.

``optax.MultiSteps``, ``optax.masked``, ``apply_if_finite`` and ``multi_transform``
assume their input is shaped like the params, so they cannot wrap a transformation
whose input is a Mapping of per-objective gradients. These wrappers are the
objective-aware counterparts; transformations of the *merged* update (clipping it,
schedules, ``add_decayed_weights``, ``apply_if_finite`` on the update) simply go
after DualOptim+ in an ``optax.chain``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _objectives, _sharding
from dualoptax.dual_optim_plus import DEFAULT_OBJECTIVES


class PerObjectiveState(NamedTuple):
  """State of :func:`per_objective`: the inner state of every objective."""

  inner_states: dict[str, Any]


def per_objective(
  inner: optax.GradientTransformation,
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
) -> optax.GradientTransformationExtraArgs:
  r"""Applies ``inner`` to each objective's gradients separately.

  Each objective gets its own copy of ``inner``'s state, so e.g.
  ``per_objective(optax.clip_by_global_norm(1.0))`` clips the forget and the retain
  gradients each to norm 1 before DualOptim+ sees them:

  .. math:: g_k \mapsto \text{inner}(g_k; s_k) \quad \text{for each present } k.

  Absent objectives' states are untouched.

  Args:
    inner: any optax transformation of params-shaped trees.
    objectives: the objective names (those of the DualOptim+ it feeds).

  Returns:
    A transformation from a Mapping of gradients to a dict of transformed gradients.

  Examples:
    >>> import optax, dualoptax
    >>> tx = optax.chain(
    ...     dualoptax.per_objective(optax.clip_by_global_norm(1.0)),
    ...     dualoptax.dual_optim_plus(1e-3))
  """
  objectives = _objectives.check_objectives(objectives)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PerObjectiveState({k: inner.init(params) for k in objectives})

  def update_fn(grads, state, params=None, **extra_args):
    # Without params, structure is checked downstream by the multi-objective step.
    reference = params if params is not None else _first_present(grads)
    present = _objectives.present_gradients(
      grads,
      objectives,
      reference,
      "the params" if params is not None else "the other objectives' gradients",
    )
    out, states = {}, dict(state.inner_states)
    for k, g in present.items():
      out[k], states[k] = inner.update(g, states[k], params, **extra_args)
    return out, PerObjectiveState(states)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _first_present(grads):
  """Any present gradient tree (a structural reference when params are absent)."""
  values = grads.values() if hasattr(grads, "values") else ()
  return next((g for g in values if g is not None), None)


class AccumulateState(NamedTuple):
  """State of :func:`accumulate_objectives`.

  Attributes:
    count: micro-steps taken (int32).
    sums: per objective, the sum of its gradients since its last emitted step.
    sizes: per objective, how many micro-batches ``sums`` holds (int32).
    inner_state: the wrapped transformation's state.
  """

  count: jax.Array
  sums: dict[str, Any]
  sizes: dict[str, jax.Array]
  inner_state: Any


def accumulate_objectives(
  inner: optax.GradientTransformation,
  every_k: int,
  objectives: Sequence[str] = DEFAULT_OBJECTIVES,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient accumulation over micro-batches, per objective (``MultiSteps``' role).

  Every call adds each present objective's gradients to its own running sum. Every
  ``every_k``-th call the objectives present *in that call* are passed to ``inner``
  as the mean of their accumulated micro-batches, and their sums reset; all other
  calls return a zero update and leave ``inner``'s state untouched:

  .. math:: \bar g_k = \frac{1}{n_k}\sum_{j=1}^{n_k} g_k^{(j)}.

  With the alternating schedule, run ``every_k`` micro-batches of the scheduled
  objective per optimizer step: the result equals one step on the full batch's mean
  gradient. An objective accumulated in a window but absent from its last call keeps
  its sum for a later window.

  Args:
    inner: the multi-objective transformation, e.g. :func:`dual_optim_plus`.
    every_k: micro-batches per optimizer step (>= 1).
    objectives: the objective names.

  Returns:
    A transformation with :class:`AccumulateState`.

  Examples:
    >>> import dualoptax
    >>> tx = dualoptax.accumulate_objectives(dualoptax.dual_optim_plus(1e-3), 4)
  """
  if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
    raise ValueError(f"`every_k` must be a positive int, got {every_k!r}.")
  objectives = _objectives.check_objectives(objectives)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AccumulateState(
      count=jnp.zeros([], jnp.int32),
      sums={k: jax.tree.map(jnp.zeros_like, params) for k in objectives},
      sizes={k: jnp.zeros([], jnp.int32) for k in objectives},
      inner_state=inner.init(params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    reference = state.sums[objectives[0]]
    present = _objectives.present_gradients(grads, objectives, reference)
    sums, sizes = dict(state.sums), dict(state.sizes)
    for k, g in present.items():
      sums[k] = jax.tree.map(lambda s, x: s + x.astype(s.dtype), sums[k], g)
      sizes[k] = sizes[k] + 1
    count = optax.safe_increment(state.count)

    def emit(operand):
      sums, sizes, inner_state = operand
      means = {
        k: jax.tree.map(lambda s, n=sizes[k]: s / n.astype(s.dtype), sums[k])
        for k in present
      }
      updates, inner_state = inner.update(
        means, inner_state, params, **extra_args
      )
      for k in present:
        sums[k] = jax.tree.map(jnp.zeros_like, sums[k])
        sizes[k] = jnp.zeros_like(sizes[k])
      return updates, (sums, sizes, inner_state)

    operand = (sums, sizes, state.inner_state)
    out_shapes = jax.eval_shape(emit, operand)[0]

    def hold(operand):
      zeros = jax.tree.map(_sharding.zeros, out_shapes)
      return zeros, operand

    updates, (sums, sizes, inner_state) = jax.lax.cond(
      count % every_k == 0, emit, hold, operand
    )
    return updates, AccumulateState(count, sums, sizes, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
