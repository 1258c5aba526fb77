"""The per-leaf step shared by DualOptim+ and DualOptim, in two implementations.

``multi_objective_step`` writes each leaf's new delta moments, merged parameter
change and (for DualOptim+) new base moments as element-wise expressions and leaves
fusion to XLA: its GPU/TPU backends can fuse them into one pass (multi-output
fusion; not measured in this project), XLA:CPU emits one loop per
output. ``fused_step`` runs the same math through the single-pass CPU kernel of
``_cpu_kernel``. ``run_step`` picks between them (see ``IMPLEMENTATIONS``).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _cpu_kernel
from dualoptax import _cpu_kernel_8bit
from dualoptax import _objectives
from dualoptax.quantization import QuantizedArray


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


IMPLEMENTATIONS = (None, "xla", "cpu_kernel")


def check_implementation(implementation: Optional[str]) -> Optional[str]:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {list(IMPLEMENTATIONS)}; got "
        f"{implementation!r}.")
  if implementation == "cpu_kernel" and not _cpu_kernel.numba_available():
    raise ValueError(
        "implementation='cpu_kernel' needs numba: pip install 'dualoptax[cpu]'.")
  return implementation


class Hyper(NamedTuple):
  b1: Any
  b2: Any
  base_b1: Any
  base_b2: Any
  eps: Any
  stable: bool


def _inverse_bias_correction(beta: Any, count: jax.Array, dtype) -> jax.Array:
  """``1 / (1 - beta**count)`` in ``dtype``; 1 where ``count == 0`` (no correction).

  A moment is corrected by multiplying with this scalar, not dividing by ``1 -
  beta**count`` per element (within an ulp of the quotient; divisions are the
  slowest vector instructions of the CPU kernels' step).
  """
  beta = jnp.asarray(beta, dtype)
  corr = 1 - beta ** count.astype(dtype)
  return jnp.where(count > 0, 1 / corr, jnp.ones((), dtype))


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
      mhB = mB * _inverse_bias_correction(hyper.base_b1, base_count, mdt)
      vhB = vB * _inverse_bias_correction(hyper.base_b2, base_count, vdt)
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
        num = m_new * _inverse_bias_correction(hyper.b1, t_k, mdt) + mhB
        second = jnp.abs(v_new * _inverse_bias_correction(hyper.b2, t_k, vdt) + vhB)
      else:
        m_new = b1 * m + (1 - b1) * g_m
        v_new = b2 * v + (1 - b2) * g_v * g_v
        num = m_new * _inverse_bias_correction(hyper.b1, t_k, mdt)
        second = v_new * _inverse_bias_correction(hyper.b2, t_k, vdt)
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


def _leaf_dtype(x):
  return jnp.dtype(x.dtype) if isinstance(x, QuantizedArray) else jnp.result_type(x)


def _kernel_leaves(grads, deltas, base, params, use_decay, decay_flags):
  """Per leaf, the arrays the kernel reads; None when some leaf cannot use it.

  A leaf's moments may all be :class:`QuantizedArray` (``dual_optim_plus_8bit``'s
  fused route): then everything of that leaf must be float32, and the leaf goes
  through the 8-bit kernel.
  """
  names = list(grads)
  # The gradients are params-shaped arrays: their structure stops at the moments'
  # leaves even where those are QuantizedArrays (pytrees of codes and absmax).
  treedef = jax.tree.structure(grads[names[0]])
  cols = [treedef.flatten_up_to(grads[k]) for k in names]
  cols += [treedef.flatten_up_to(getattr(deltas[k], f)) for k in names
           for f in ("mu", "nu")]
  if base is not None:
    cols += [treedef.flatten_up_to(base[0]), treedef.flatten_up_to(base[1])]
  p_leaves = (treedef.flatten_up_to(params) if params is not None
              else [None] * treedef.num_leaves)
  for i in range(treedef.num_leaves):
    arrays = [c[i] for c in cols]
    if use_decay and decay_flags[i]:
      arrays.append(p_leaves[i])
    dtypes = {_leaf_dtype(a) for a in arrays}
    if len(dtypes) != 1 or not _cpu_kernel.supported_dtype(dtypes.pop()):
      return None
    quantized = {isinstance(c[i], QuantizedArray) for c in cols[len(names):]}
    if quantized == {True} and (base is None or _leaf_dtype(arrays[0]) != jnp.float32):
      return None
    if len(quantized) != 1:
      return None
  return treedef, cols, p_leaves


def has_quantized(tree) -> bool:
  return any(isinstance(x, QuantizedArray)
             for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray)))


def shape_reference(tree):
  """A params-shaped tree of ShapeDtypeStructs for a moment tree (QuantizedArrays
  stand for arrays of their original shape and dtype)."""
  return jax.tree.map(
      lambda x: (jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype))
                 if isinstance(x, QuantizedArray) else x),
      tree, is_leaf=lambda x: isinstance(x, QuantizedArray))


def kernel_supported(grads, deltas, base, params, weight_decay, decay_flags) -> bool:
  """Whether every leaf's arrays share one float32/float64 dtype (the kernel's)."""
  use_decay = _objectives.decay_enabled(weight_decay)
  return _kernel_leaves(grads, deltas, base, params, use_decay,
                        decay_flags) is not None


def fused_step(grads, deltas, base, params, coefficients, weight_decay,
               decay_flags, hyper: Hyper, finite: Optional[jax.Array], count):
  """``multi_objective_step`` through the single-pass CPU kernel, guard included.

  Where ``finite`` is False the kernel writes a zero update and leaves every moment
  as it was; the counts here advance only where it is True.

  Returns:
    ``(updates, new_deltas, new_base_moments_or_None, new_count, finite)``.
  """
  names = list(grads)
  n = len(names)
  use_decay = _objectives.decay_enabled(weight_decay)
  leaves = _kernel_leaves(grads, deltas, base, params, use_decay, decay_flags)
  if leaves is None:
    raise TypeError(
        "implementation='cpu_kernel' needs every leaf's gradients, moments (and "
        "params, with weight decay) in one dtype, float32 or float64; use "
        "implementation=None to fall back to XLA where they differ.")
  treedef, cols, p_leaves = leaves
  if finite is None:
    ok = jnp.ones((), bool)
  else:
    # One multi-threaded pass over the gradients; XLA:CPU's reduction is slower.
    ok = _cpu_kernel.all_finite([leaf for c in cols[:n] for leaf in c])

  def scalars(dtype):
    def cast(x):
      return jnp.asarray(x, dtype)
    zero = cast(0)
    values = [ok.astype(dtype), cast(hyper.b1), cast(hyper.b2),
              cast(hyper.base_b1) if base is not None else zero,
              cast(hyper.base_b2) if base is not None else zero,
              cast(hyper.eps), cast(weight_decay if use_decay else 0.0)]
    if base is not None:
      values += [_inverse_bias_correction(hyper.base_b1, base[2], dtype),
                 _inverse_bias_correction(hyper.base_b2, base[2], dtype)]
    else:
      values += [cast(1), cast(1)]
    for k in names:
      t_k = deltas[k].count + 1
      values += [_inverse_bias_correction(hyper.b1, t_k, dtype),
                 _inverse_bias_correction(hyper.b2, t_k, dtype),
                 cast(coefficients[k])]
    return jnp.stack(values)

  per_dtype = {}
  upd_out, mom_out, base_out = [], [], []
  for i in range(treedef.num_leaves):
    dtype = jnp.result_type(cols[0][i])
    if dtype not in per_dtype:
      per_dtype[dtype] = scalars(dtype)
    decay = bool(use_decay and decay_flags[i])
    variant = _cpu_kernel.Variant(base is not None, n, bool(hyper.stable), decay,
                                  jnp.dtype(dtype).name)
    grads_i = [c[i] for c in cols[:n]]
    moments_i = [c[i] for c in cols[n:]]
    if isinstance(moments_i[0], QuantizedArray):
      update, new = _cpu_kernel_8bit.leaf_step(
          variant, per_dtype[dtype], grads_i, p_leaves[i] if decay else None,
          moments_i)
      moments, new_base = new[:2 * n], new[2 * n:]
    else:
      update, moments, new_base = _cpu_kernel.leaf_step(
          variant, per_dtype[dtype], grads_i, p_leaves[i] if decay else None,
          moments_i[:2 * n], moments_i[2 * n:])
    upd_out.append(update)
    mom_out.append(moments)
    base_out.append(new_base)

  def advance(count):
    return jnp.where(ok, optax.safe_increment(count), count)

  new_deltas = {
      k: DeltaState(count=advance(deltas[k].count),
                    mu=treedef.unflatten([m[2 * j] for m in mom_out]),
                    nu=treedef.unflatten([m[2 * j + 1] for m in mom_out]))
      for j, k in enumerate(names)}
  new_base = None
  if base is not None:
    new_base = (treedef.unflatten([b[0] for b in base_out]),
                treedef.unflatten([b[1] for b in base_out]))
  return (treedef.unflatten(upd_out), new_deltas, new_base, advance(count),
          None if finite is None else ok)


def run_step(implementation, grads, deltas, base, count, params, coefficients,
             weight_decay, decay_flags, hyper: Hyper, finite):
  """One guarded call in the chosen implementation.

  ``implementation=None`` (auto) uses the CPU kernel when numba is installed, the
  process sees a single device (sharded arrays would make XLA gather them around a
  custom call) and every leaf is float32 or float64 throughout; it is chosen per
  platform at lowering (``lax.platform_dependent``), so GPU/TPU compile the XLA path.

  Args:
    base: ``(m_B, v_B, T)`` for DualOptim+, or None.
    count: the call/base count that advances by one on a taken step.
    finite: the XLA-side finiteness flag, or None when the guard is off (the
      kernel computes its own).

  Returns:
    ``(updates, new_deltas (present objectives), new_base_moments_or_None,
    new_count, finite_or_None)``; on a skipped call the update is zero and the
    rest unchanged.
  """
  def xla():
    def step():
      updates, new_deltas, new_base = multi_objective_step(
          grads, deltas, base, params, coefficients, weight_decay, decay_flags,
          hyper)
      return updates, (new_deltas, new_base, optax.safe_increment(count))

    unchanged = ({k: deltas[k] for k in grads},
                 None if base is None else (base[0], base[1]), count)
    updates, (new_deltas, new_base, new_count) = guarded(finite, step, unchanged)
    return updates, new_deltas, new_base, new_count, finite

  def kernel():
    return fused_step(grads, deltas, base, params, coefficients, weight_decay,
                      decay_flags, hyper, finite, count)

  if implementation == "cpu_kernel" or has_quantized((deltas, base)):
    # QuantizedArray moments reach here only through dual_optim_plus_8bit's fused
    # route, which has already chosen the kernel.
    return kernel()
  if implementation == "xla":
    return xla()
  if not (_cpu_kernel.auto_applies()
          and kernel_supported(grads, deltas, base, params, weight_decay,
                               decay_flags)):
    return xla()
  return jax.lax.platform_dependent(cpu=kernel, default=xla)
