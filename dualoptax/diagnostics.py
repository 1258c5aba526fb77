r"""What the bridging is doing: norms and cosines of base and delta moments."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from dualoptax.dual_optim_plus import DualOptimPlusState
from dualoptax.quantization import QuantizedArray, dequantize_blockwise


def _is_q(x) -> bool:
  return isinstance(x, QuantizedArray)


def _decoded(x):
  """An 8-bit moment decoded (one leaf at a time); other leaves as they are."""
  return dequantize_blockwise(x) if _is_q(x) else x


def _dot(a, b):
  return jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)).real


def _leaf_stats(base: Any, deltas: dict[str, Any]) -> dict[str, jax.Array]:
  """Squared norms and dot products of one moment kind on one leaf."""
  base = _decoded(base)
  deltas = {k: _decoded(d) for k, d in deltas.items()}
  out = {"base": _dot(base, base)}
  for k, d in deltas.items():
    out[k] = _dot(d, d)
    out[f"{k}.base"] = _dot(d, base)
  for a, b in itertools.combinations(deltas, 2):
    out[f"{a}.{b}"] = _dot(deltas[a], deltas[b])
  return out


def _finish(sq: dict[str, jax.Array], names: list[str]) -> dict[str, jax.Array]:
  """Turns squared norms and dots into norms and cosine similarities."""
  norm = {k: jnp.sqrt(sq[k]) for k in ["base", *names]}
  out = {"base_norm": norm["base"]}
  for k in names:
    out[f"{k}_norm"] = norm[k]

  def cos(dot, a, b):
    den = norm[a] * norm[b]
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)

  for k in names:
    out[f"cos_{k}_vs_base"] = cos(sq[f"{k}.base"], k, "base")
  for a, b in itertools.combinations(names, 2):
    out[f"cos_{a}_vs_{b}"] = cos(sq[f"{a}.{b}"], a, b)
  return out


def bridging_stats(
  state: DualOptimPlusState, *, per_leaf: bool = False
) -> dict:
  r"""Norms and cosine similarities of DualOptim+'s base and delta moments.

  For each moment kind (``"mu"``: first moments, ``"nu"``: second moments) it reports
  :math:`\|m_B\|`, :math:`\|m_k\|` per objective, :math:`\cos(m_k, m_B)` and
  :math:`\cos(m_i, m_j)` between objectives, over the whole tree (aggregated as if
  all leaves were one vector) and, with ``per_leaf=True``, for each leaf. A delta
  that is small and anti-aligned with the base while the other objective's delta is
  aligned is the "bridging" at work: the objectives conflict and the deltas carry
  them. Cosines of zero vectors are reported as 0. 8-bit moments
  (:func:`dualoptax.dual_optim_plus_8bit`) are decoded, one leaf at a time, and
  the statistics are those of the decoded values.

  Args:
    state: a :class:`~dualoptax.DualOptimPlusState` (e.g. ``opt_state`` or the
      element of a chain's state tuple).
    per_leaf: also return the statistics for every leaf, keyed by its path.

  Returns:
    ``{"mu": {...}, "nu": {...}}`` of scalars (float32 arrays), plus
    ``"per_leaf": {path: {"mu": ..., "nu": ...}}`` when requested. Pure and
    jit-friendly: log it with ``jax.device_get``.
  """
  if not isinstance(state, DualOptimPlusState):
    raise TypeError(
      f"bridging_stats takes a DualOptimPlusState, got {type(state).__name__}."
    )
  names = list(state.deltas)
  result: dict[str, Any] = {}
  leaf_results: dict[str, Any] = {}
  for kind, base_tree in (("mu", state.base_mu), ("nu", state.base_nu)):
    paths_leaves = jax.tree_util.tree_flatten_with_path(
      base_tree, is_leaf=_is_q
    )[0]
    treedef = jax.tree.structure(base_tree, is_leaf=_is_q)
    delta_leaves = {
      k: treedef.flatten_up_to(getattr(state.deltas[k], kind)) for k in names
    }
    per = [
      _leaf_stats(leaf, {k: delta_leaves[k][i] for k in names})
      for i, (_, leaf) in enumerate(paths_leaves)
    ]
    totals = {key: sum(p[key] for p in per) for key in per[0]}
    result[kind] = _finish(totals, names)
    if per_leaf:
      for (path, _), p in zip(paths_leaves, per):
        leaf_results.setdefault(jax.tree_util.keystr(path), {})[kind] = _finish(
          p, names
        )
  if per_leaf:
    result["per_leaf"] = leaf_results
  return result
