r"""PCGrad: projecting conflicting task gradients (Yu et al., 2020).

:func:`pcgrad` turns a Mapping ``{task: gradients}`` into one params-shaped
direction, to be chained before any optax optimizer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptax import _multitask

_WHO = "pcgrad"


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    count: updates taken (int32).
    key: the PRNG key the next update splits to draw its task orders.
  """

  count: jax.Array
  key: jax.Array


def _check_key(key, seed) -> jax.Array:
  if key is not None and seed is not None:
    raise ValueError(f"{_WHO}: pass either `key` or `seed`, not both.")
  if key is None:
    if seed is not None and (
      isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
    ):
      raise TypeError(f"{_WHO}: `seed` must be an int, got {seed!r}.")
    return jax.random.PRNGKey(0 if seed is None else int(seed))
  if not isinstance(key, jax.Array):
    raise TypeError(
      f"{_WHO}: `key` must be a JAX PRNG key (from "
      f"jax.random.key or PRNGKey), got {type(key).__name__}."
    )
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed and key.dtype != jnp.uint32:
    raise TypeError(
      f"{_WHO}: `key` must be a JAX PRNG key (from "
      f"jax.random.key or PRNGKey), got an array of dtype "
      f"{key.dtype}."
    )
  if typed and key.shape != ():
    raise ValueError(
      f"{_WHO}: `key` must be a single key, got shape {key.shape}."
    )
  return key


def _projection_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  r"""Weights :math:`w` with :math:`\sum_i g_i' = \sum_j w_j g_j`.

  Every projected gradient stays a linear combination of the original ones,
  :math:`g_i' = \sum_l C_{il} g_l`, so :math:`g_i' \cdot g_j = (C G)_{ij}` and
  the whole procedure runs on the :math:`K \times K` Gram matrix.

  Args:
    gram: ``[K, K]`` Gram matrix of the task gradients.
    orders: ``[K, K]`` int; row ``i`` is a permutation of ``0..K-1`` giving the
      order in which task ``i`` meets the others (its own index is skipped).

  Returns:
    ``[K]`` weights, the column sums of :math:`C`.
  """
  k = gram.shape[0]
  sq_norms = jnp.diagonal(gram)
  eye = jnp.eye(k, dtype=gram.dtype)

  def project_task(i, order):
    def body(p, c):
      j = order[p]
      dot = c @ gram[:, j]  # g_i' · g_j, with g_j the original gradient
      conflict = (dot < 0) & (j != i) & (sq_norms[j] > 0)
      step = _multitask.safe_divide(dot, sq_norms[j])
      return c - jnp.where(conflict, step, 0.0) * eye[j]

    return jax.lax.fori_loop(0, k, body, eye[i])

  coefficients = jax.vmap(project_task)(jnp.arange(k), orders)
  return jnp.sum(coefficients, axis=0)


def pcgrad(
  tasks: Optional[Sequence[str]] = None,
  *,
  key: Optional[jax.Array] = None,
  seed: Optional[int] = None,
  shuffle: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Projecting conflicting gradients (PCGrad).

  ``update`` takes a Mapping ``{task: gradients}`` (any non-empty subset of the
  tasks, each a params-shaped pytree) and returns one params-shaped direction.
  For each present task :math:`i`, starting from :math:`g_i' = g_i`, and for
  every other task :math:`j` in an order :math:`\pi_i`:

  .. math::

    \text{if } g_i' \cdot g_j < 0: \quad
    g_i' \leftarrow g_i' - \frac{g_i' \cdot g_j}{\|g_j\|^2}\, g_j,
    \qquad\qquad d = \sum_i g_i'.

  Projections are always off the *original* :math:`g_j`, never off an already
  projected one. Gradients that do not conflict pass unchanged, so with no
  conflict :math:`d` is the plain sum (the gradient of the summed loss). Dot
  products and norms run over the whole parameter vector (every leaf), not
  per leaf.

  The procedure runs on the :math:`K \times K` Gram matrix of the gradients
  (each :math:`g_i'` is a linear combination of the :math:`g_j`), so the
  parameters are read twice (Gram matrix, final weighted sum) whatever the
  number of tasks, and no per-task copy of the parameters is made.

  Task order. With ``shuffle=True`` (the paper's rule) each task meets the
  others in a uniformly random order, drawn afresh at every update from a PRNG
  key kept in the state: ``update`` splits ``state.key`` into the next state's
  key and the key of this step. Results are therefore a deterministic function
  of the initial key, and ``update`` is pure (fine under ``jit``, ``vmap`` and
  ``lax.scan``). With ``shuffle=False`` each task meets the others in the
  canonical task order (``tasks``, or the sorted names).

  Task-specific heads need no special treatment: a head leaf is zero in every
  other task's gradient, so it adds only to its own task's :math:`\|g_k\|^2`
  and never to a cross dot product; conflicts are decided by the shared
  leaves. Note that projecting :math:`g_i'` off :math:`g_j` adds a positive
  multiple of :math:`g_j`, including of task :math:`j`'s head gradient. A
  zero gradient never conflicts (its dot products are 0), and divisions by
  :math:`\|g_j\|^2 = 0` are guarded: zero gradients give finite output.

  Args:
    tasks: the task names (optional). When given, ``update`` rejects other
      names, and this order is the canonical one; when ``None``, any string
      names are accepted, in sorted order.
    key: the initial PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
    seed: an int seed instead of ``key`` (default 0 when neither is given).
    shuffle: draw a random order of the other tasks per task and update
      (default, as in the paper), or use the canonical order.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`PCGradState`. Its ``update(grads, state, params=None)`` takes the
    Mapping; ``params``, when given, is only used to check the shapes.
    Several tasks' updates are not independent: pass all the tasks of a step
    in one call.

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = optax.chain(dualoptax.pcgrad(seed=0), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> grads = {"a": {"w": jnp.array([1.0, 0.0])},
    ...          "b": {"w": jnp.array([-1.0, 1.0])}}
    >>> updates, state = tx.update(grads, state, params)
    >>> fixed = dualoptax.pcgrad(shuffle=False)
    >>> d, _ = fixed.update(grads, fixed.init(params))
    >>> d["w"]  # [0.5, 0.5] + [0, 1]: each projected off the other
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020 (arXiv 2001.06782).
  """
  tasks = _multitask.check_tasks(tasks, _WHO)
  shuffle = _multitask.check_bool(_WHO, "shuffle", shuffle)
  initial_key = _check_key(key, seed)

  def init_fn(params):
    del params
    return PCGradState(count=jnp.zeros([], jnp.int32), key=initial_key)

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    names, trees = _multitask.task_gradients(grads, tasks, params, _WHO)
    k = len(names)
    dtype = _multitask.accumulation_dtype(trees)
    next_key, step_key = jax.random.split(state.key)
    if shuffle:  # row i: a uniformly random permutation of 0..K-1
      orders = jnp.argsort(
        jax.random.bits(step_key, (k, k), jnp.uint32), axis=1
      )
    else:
      orders = jnp.broadcast_to(jnp.arange(k), (k, k))
    weights = _projection_weights(_multitask.gram_matrix(trees, dtype), orders)
    direction = _multitask.combine(weights, trees)
    return direction, PCGradState(optax.safe_increment(state.count), next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
