"""The per-leaf step shared by DualOptim+ and DualOptim.

Each leaf's new delta moments, merged parameter change and (for DualOptim+) new base
moments are written as one element-wise expression over that leaf, leaving fusion to
XLA. On GPU/TPU XLA can fuse the outputs; XLA:CPU emits one loop per output array
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _objectives


class DeltaState(NamedTuple):
  """Moments of one objective.

  Attributes:
    count: steps taken by this objective (``t_k``).
    mu: first moment (DualOptim+: EMA of the residual ``g - m̂_B``).
    nu: second moment (DualOptim+: EMA of ``g² - v̂_B``, a signed correction;
      DualOptim: Adam's non-negative second moment).
  """
  count: jax.Array
  mu: Any
  nu: Any


class Hyper(NamedTuple):
  b1: Any
  b2: Any
  base_b1: Any
  base_b2: Any
  eps: Any
  stable: bool


def _bias_correction(beta: Any, count: jax.Array, dtype) -> jax.Array:
  """``1 - beta**count`` in ``dtype``; 1 where ``count == 0`` (no correction)."""
  beta = jnp.asarray(beta, dtype)
  corr = 1 - beta ** count.astype(dtype)
  return jnp.where(count > 0, corr, jnp.ones((), dtype))


def init_moments(params: Any, dtype) -> Any:
  # Tree-map only, so optax.tree.map_params and sharding propagation see through it.
  return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or p.dtype), params)


def init_deltas(params, objectives, mu_dtype, nu_dtype) -> dict[str, DeltaState]:
  return {
      k: DeltaState(count=jnp.zeros([], jnp.int32),
                    mu=init_moments(params, mu_dtype),
                    nu=init_moments(params, nu_dtype))
      for k in objectives
  }


def multi_objective_step(
    grads: Mapping[str, Any],
    deltas: Mapping[str, DeltaState],
    base: Optional[tuple[Any, Any, jax.Array]],
    params: Any,
    coefficients: Mapping[str, Any],
    weight_decay: Any,
    decay_flags: Sequence[bool],
    hyper: Hyper,
):
  """One call of the multi-objective rule on every leaf.

  Args:
    grads: present objectives' gradient trees (canonical order).
    deltas: every objective's DeltaState.
    base: ``(m_B, v_B, T)`` for DualOptim+, or None for DualOptim (no base).
    params: params tree (only read when weight decay is on), or None.
    coefficients: per present objective, the factor ``c_k`` of
      ``Δθ = Σ_k c_k (u_k + wd·θ)`` (``-lr_k`` for the aliases, 1 for ``scale_by``).
    weight_decay: decoupled decay strength, applied on leaves whose flag is True.
    decay_flags: one bool per leaf.
    hyper: betas, eps and the stability switch.

  Returns:
    ``(updates, new_deltas, new_base_moments_or_None)``; ``new_deltas`` holds the
    present objectives only (absent ones are unchanged by definition).
  """
  names = list(grads)
  ref_tree = deltas[names[0]].mu
  treedef = jax.tree.structure(ref_tree)
  g_leaves = {k: treedef.flatten_up_to(grads[k]) for k in names}
  m_leaves = {k: treedef.flatten_up_to(deltas[k].mu) for k in names}
  v_leaves = {k: treedef.flatten_up_to(deltas[k].nu) for k in names}
  p_leaves = (treedef.flatten_up_to(params) if params is not None
              else [None] * treedef.num_leaves)
  if base is not None:
    mB_leaves = treedef.flatten_up_to(base[0])
    vB_leaves = treedef.flatten_up_to(base[1])
    base_count = base[2]
  use_decay = _objectives.decay_enabled(weight_decay)

  upd_out, mB_out, vB_out = [], [], []
  m_out = {k: [] for k in names}
  v_out = {k: [] for k in names}
  for i in range(treedef.num_leaves):
    g0 = g_leaves[names[0]][i]
    p = p_leaves[i]
    out_dtype = p.dtype if p is not None else g0.dtype
    mdt = m_leaves[names[0]][i].dtype
    vdt = v_leaves[names[0]][i].dtype
    if base is not None:
      mB, vB = mB_leaves[i], vB_leaves[i]
      # The base estimate from the state *before* this call (SPEC §1 step 2).
      mhB = mB / _bias_correction(hyper.base_b1, base_count, mdt)
      vhB = vB / _bias_correction(hyper.base_b2, base_count, vdt)
    update = None
    for k in names:
      g, m, v = g_leaves[k][i], m_leaves[k][i], v_leaves[k][i]
      t_k = deltas[k].count + 1
      b1 = jnp.asarray(hyper.b1, mdt)
      b2 = jnp.asarray(hyper.b2, vdt)
      g_m = g.astype(mdt)
      g_v = g.astype(vdt)
      if base is not None:
        m_new = b1 * m + (1 - b1) * (g_m - mhB)
        v_new = b2 * v + (1 - b2) * (g_v * g_v - vhB)
        num = m_new / _bias_correction(hyper.b1, t_k, mdt) + mhB
        second = jnp.abs(v_new / _bias_correction(hyper.b2, t_k, vdt) + vhB)
      else:
        m_new = b1 * m + (1 - b1) * g_m
        v_new = b2 * v + (1 - b2) * g_v * g_v
        num = m_new / _bias_correction(hyper.b1, t_k, mdt)
        second = v_new / _bias_correction(hyper.b2, t_k, vdt)
      if hyper.stable:
        # A second moment is never below the squared mean: |u| <= 1 (SPEC hazard).
        second = jnp.maximum(second, num * num)
      direction = num / (jnp.sqrt(second) + jnp.asarray(hyper.eps, second.dtype))
      if use_decay and decay_flags[i]:
        direction = direction + weight_decay * p
      term = coefficients[k] * direction
      update = term if update is None else update + term
      m_out[k].append(m_new)
      v_out[k].append(v_new)
    upd_out.append(update.astype(out_dtype))
    if base is not None:
      n = len(names)
      g_mean = sum(g_leaves[k][i].astype(mdt) for k in names) / n
      g2_mean = sum(jnp.square(g_leaves[k][i].astype(vdt)) for k in names) / n
      bb1 = jnp.asarray(hyper.base_b1, mdt)
      bb2 = jnp.asarray(hyper.base_b2, vdt)
      mB_out.append(bb1 * mB + (1 - bb1) * g_mean)
      vB_out.append(bb2 * vB + (1 - bb2) * g2_mean)

  new_deltas = {}
  for k in names:
    new_deltas[k] = DeltaState(
        count=optax.safe_increment(deltas[k].count),
        mu=treedef.unflatten(m_out[k]),
        nu=treedef.unflatten(v_out[k]))
  updates = treedef.unflatten(upd_out)
  new_base = None
  if base is not None:
    new_base = (treedef.unflatten(mB_out), treedef.unflatten(vB_out))
  return updates, new_deltas, new_base


def prepare_call(grads, objectives, reference, params, weight_decay, mask,
                 skip_nonfinite):
  """Trace-time checks of one call; returns ``(present, decay_flags, finite)``."""
  present = _objectives.present_gradients(grads, objectives, reference)
  if _objectives.decay_enabled(weight_decay) and params is None:
    raise ValueError("`params` must be passed to update when weight_decay > 0.")
  flags = _objectives.decay_mask(mask, reference if params is None else params)
  finite = _objectives.all_finite(list(present.values())) if skip_nonfinite else None
  return present, flags, finite


def guarded(finite: Optional[jax.Array], step, unchanged):
  """Runs ``step()`` -> ``(updates, changed)``; where ``finite`` is False, skips it.

  A skipped call returns a zero update and ``unchanged`` (the pre-call values of what
  ``step`` changes). One ``lax.cond`` guards the call: a per-element ``where`` on every
  leaf costs many times the compile time on trees of many leaves. Only the state that
  the step changes goes through the conditional, so absent objectives' moments are
  not copied.
  """
  if finite is None:
    return step()
  out_shapes = jax.eval_shape(step)[0]

  def skip():
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes), unchanged

  return jax.lax.cond(finite, step, skip)


def count_skipped(skipped: jax.Array, finite: Optional[jax.Array]) -> jax.Array:
  if finite is None:
    return skipped
  return jnp.where(finite, skipped, optax.safe_increment(skipped))
