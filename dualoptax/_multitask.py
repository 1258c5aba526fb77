r"""Shared plumbing of the multi-task gradient transformations.

:func:`dualoptax.pcgrad`, :func:`dualoptax.mgda` and :func:`dualoptax.cagrad`
take a Mapping ``{task: gradients}`` and return one params-shaped direction that
is a linear combination :math:`d = \sum_k w_k g_k` of the task gradients, with
weights computed from the Gram matrix :math:`G_{ij} = g_i \cdot g_j` of the
whole-parameter-vector dot products. This module validates the mapping (at
trace time, on names, tree structures, shapes and dtypes), computes the Gram
matrix and forms the combination.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _objectives


def check_tasks(
  tasks: Optional[Sequence[str]], who: str
) -> Optional[tuple[str, ...]]:
  """Validates the optional task names given to a constructor."""
  if tasks is None:
    return None
  if isinstance(tasks, str):
    raise ValueError(
      f"{who}: `tasks` must be a sequence of names, got the single string "
      f"{tasks!r}; write ({tasks!r},) for one task."
    )
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError(
      f"{who}: `tasks` must name at least one task (or be None)."
    )
  for name in tasks:
    if not isinstance(name, str) or not name:
      raise ValueError(
        f"{who}: task names must be non-empty strings, got {name!r}."
      )
  dupes = sorted({n for n in tasks if tasks.count(n) > 1})
  if dupes:
    raise ValueError(f"{who}: `tasks` has duplicate names: {dupes}.")
  return tasks


def check_bool(who: str, name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{who}: `{name}` must be a bool, got {value!r}.")
  return value


def check_positive_int(who: str, name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{who}: `{name}` must be a positive int, got {value!r}.")
  return value


def task_gradients(
  grads: Any, tasks: Optional[tuple[str, ...]], params: Any, who: str
) -> tuple[tuple[str, ...], list[Any]]:
  """Validates ``{task: gradients}`` and returns the names and the trees.

  Args:
    grads: a Mapping from task name (a string) to a gradient pytree; ``None``
      values mean "absent".
    tasks: the constructor's task names, or None to accept any names.
    params: the params (or None); when given, gradients must match them.
    who: the public function's name, for error messages.

  Returns:
    ``(names, trees)`` of the present tasks in canonical order: the order of
    ``tasks`` when given, else the sorted names (the order in which JAX
    flattens a dict, so the result is the same inside and outside ``jit``).
  """
  if not isinstance(grads, collections.abc.Mapping):
    raise TypeError(
      f"{who}: update takes a Mapping from task name to gradients, e.g. "
      f"{{'task_a': grads_a, 'task_b': grads_b}}; got "
      f"{type(grads).__name__}."
    )
  for name in grads:
    if not isinstance(name, str):
      raise TypeError(f"{who}: task names must be strings, got {name!r}.")
  if tasks is not None:
    unknown = [k for k in grads if k not in tasks]
    if unknown:
      raise ValueError(
        f"{who}: unknown task(s) {sorted(unknown)}; this transformation was "
        f"built for tasks {list(tasks)}."
      )
    names = tuple(k for k in tasks if grads.get(k) is not None)
  else:
    names = tuple(sorted(k for k, g in grads.items() if g is not None))
  if not names:
    raise ValueError(
      f"{who}: the gradient mapping is empty; pass gradients for at least "
      "one task."
    )
  trees = [grads[k] for k in names]
  ref_name, ref = (None, params) if params is not None else (names[0], trees[0])
  ref_def = jax.tree.structure(ref)
  ref_shapes = [jnp.shape(x) for x in jax.tree.leaves(ref)]
  against = "the params" if ref_name is None else f"task {ref_name!r}"
  for name, tree in zip(names, trees):
    if jax.tree.structure(tree) != ref_def:
      raise ValueError(
        f"{who}: gradients of task {name!r} do not have the tree structure "
        f"of {against}: got {_objectives.describe(tree)}, expected {_objectives.describe(ref)}."
      )
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), shape in zip(flat, ref_shapes):
      where = jax.tree_util.keystr(path)
      if jnp.shape(leaf) != shape:
        raise ValueError(
          f"{who}: gradient of task {name!r} at {where} has shape "
          f"{jnp.shape(leaf)}, expected {shape} (the shape in {against})."
        )
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise TypeError(
          f"{who}: gradient of task {name!r} at {where} has dtype "
          f"{jnp.result_type(leaf)}; gradients must be real floating point."
        )
  return names, trees


def accumulation_dtype(trees: Sequence[Any]) -> jnp.dtype:
  """float32, or wider when the gradients are (float64 under x64)."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


def gram_matrix(trees: Sequence[Any], dtype: jnp.dtype) -> jax.Array:
  """``G[i, j] = g_i · g_j`` summed over every element of every leaf.

  Computed pairwise (``K(K+1)/2`` fused reductions) rather than by stacking
  the gradients, so no ``K × n`` copy of the parameters is made.
  """
  k = len(trees)
  leaves = [[jnp.asarray(x, dtype) for x in jax.tree.leaves(t)] for t in trees]
  entries = {}
  for i in range(k):
    for j in range(i, k):
      entries[i, j] = sum(
        (jnp.sum(a * b) for a, b in zip(leaves[i], leaves[j])),
        jnp.zeros((), dtype),
      )
  return jnp.stack(
    [
      jnp.stack([entries[min(i, j), max(i, j)] for j in range(k)])
      for i in range(k)
    ]
  )


def combine(weights: jax.Array, trees: Sequence[Any]) -> optax.Updates:
  """``Σ_k weights[k] · g_k`` per leaf, in the gradients' dtype."""
  dtype = weights.dtype

  def leaf(*xs):
    out = sum(weights[k] * jnp.asarray(x, dtype) for k, x in enumerate(xs))
    return out.astype(jnp.result_type(*xs))

  return jax.tree.map(leaf, *trees)


def safe_divide(num: jax.Array, den: jax.Array, fill: Any = 0.0) -> jax.Array:
  """``num / den`` where ``den > 0``, else ``fill`` (no NaN, no Inf)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fill)


def gram_weighting(
  tasks: Optional[tuple[str, ...]],
  who: str,
  state_type: type[NamedTuple],
  weights_fn: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
  """The transformation ``{task: g} -> sum_k w_k g_k`` with ``w =
  weights_fn(G)`` from the Gram matrix, and a ``state_type(count)`` state."""

  def init_fn(params):
    del params
    return state_type(count=jnp.zeros([], jnp.int32))

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    _, trees = task_gradients(grads, tasks, params, who)
    gram = gram_matrix(trees, accumulation_dtype(trees))
    direction = combine(weights_fn(gram), trees)
    return direction, state_type(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
