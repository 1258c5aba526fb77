r"""MGDA: the min-norm point of the task gradients' convex hull.

:func:`mgda` turns a Mapping ``{task: gradients}`` into one params-shaped
direction (Sener & Koltun, 2018), to be chained before any optax optimizer;
:func:`min_norm_weights` is the solver on a Gram matrix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _multitask

_WHO = "mgda"


class MGDAState(NamedTuple):
  """State of :func:`mgda`.

  Attributes:
    count: updates taken (int32).
  """

  count: jax.Array


def _pair(g11, g12, g22):
  r"""Weight on the first of two points and the squared norm of the min point.

  :math:`\min_{\gamma \in [0, 1]} \|\gamma u + (1-\gamma) v\|^2` from
  :math:`u \cdot u, u \cdot v, v \cdot v`; equal points give 1/2.
  """
  gamma = jnp.clip(
    _multitask.safe_divide(g22 - g12, g11 + g22 - 2 * g12, 0.5), 0.0, 1.0
  )
  sq_norm = (
    gamma**2 * g11 + 2 * gamma * (1 - gamma) * g12 + (1 - gamma) ** 2 * g22
  )
  return gamma, sq_norm


def min_norm_weights(gram: jax.Array, iterations: int = 250) -> jax.Array:
  r"""Simplex weights of the min-norm point of the hull, from a Gram matrix.

  Solves :math:`\min_{\alpha \in \Delta} \alpha^\top G \alpha` (the squared
  norm of :math:`\sum_k \alpha_k g_k`): in closed form for :math:`K \le 2`;
  for :math:`K > 2` by pairwise Frank–Wolfe, started from the best pair of
  tasks (as in the authors' solver) and run for a fixed number of iterations
  (``lax.fori_loop``, so it traces once and jits). Each iteration moves weight
  from the support vertex with the largest :math:`(G\alpha)_a` to the vertex
  with the smallest :math:`(G\alpha)_t`, by the exact minimiser on that
  segment; unlike plain Frank–Wolfe it converges linearly, reaching rounding
  level within the default iterations for a handful of tasks.

  Args:
    gram: ``[K, K]`` symmetric positive semi-definite matrix.
    iterations: Frank–Wolfe iterations (used only when :math:`K > 2`).

  Returns:
    ``[K]`` non-negative weights summing to 1.
  """
  k = gram.shape[0]
  if k == 1:
    return jnp.ones((1,), gram.dtype)
  if k == 2:
    gamma, _ = _pair(gram[0, 0], gram[0, 1], gram[1, 1])
    return jnp.stack([gamma, 1 - gamma])

  diag = jnp.diagonal(gram)
  # Best pair (i, j): gamma[i, j] is the weight on i; the diagonal is vertex i.
  gamma, cost = _pair(diag[:, None], gram, diag[None, :])
  best = jnp.argmin(cost)
  i, j = best // k, best % k
  eye = jnp.eye(k, dtype=gram.dtype)
  alpha0 = gamma[i, j] * eye[i] + (1 - gamma[i, j]) * eye[j]

  def body(_, alpha):
    g_alpha = gram @ alpha  # half the gradient of alpha' G alpha
    t = jnp.argmin(g_alpha)
    a = jnp.argmax(jnp.where(alpha > 0, g_alpha, -jnp.inf))
    curvature = gram[t, t] + gram[a, a] - 2 * gram[t, a]
    step = _multitask.safe_divide(g_alpha[a] - g_alpha[t], curvature)
    step = jnp.clip(step, 0.0, alpha[a])
    return alpha + step * (eye[t] - eye[a])

  return jax.lax.fori_loop(0, iterations, body, alpha0)


def mgda(
  tasks: Optional[Sequence[str]] = None,
  *,
  normalize: bool = False,
  iterations: int = 250,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiple-gradient descent: the min-norm convex combination of gradients.

  ``update`` takes a Mapping ``{task: gradients}`` (any non-empty subset of the
  tasks, each a params-shaped pytree) and returns one params-shaped direction

  .. math::

    d = \sum_k \alpha_k g_k, \qquad
    \alpha = \arg\min_{\alpha \in \Delta} \Big\|\sum_k \alpha_k g_k\Big\|^2,
    \quad \Delta = \{\alpha \ge 0, \textstyle\sum_k \alpha_k = 1\},

  the point of the gradients' convex hull closest to the origin. It satisfies
  :math:`d \cdot g_k \ge \|d\|^2` for every task, so :math:`-d` decreases
  every loss to first order; :math:`d = 0` exactly when some convex
  combination of the gradients vanishes (a Pareto-stationary point). For two
  tasks the weights have the closed form

  .. math::

    \alpha_1 = \operatorname{clip}\Big(
      \frac{(g_2 - g_1) \cdot g_2}{\|g_1 - g_2\|^2}, 0, 1\Big),
    \qquad \alpha_2 = 1 - \alpha_1,

  and for more a fixed number of (pairwise) Frank–Wolfe iterations is run on
  the :math:`K \times K` Gram matrix (see :func:`min_norm_weights`). Dot
  products and norms run over the whole parameter vector (every leaf), and
  the parameters are read twice (Gram matrix, weighted sum).

  With ``normalize=True`` every gradient is first divided by its norm, and
  :math:`d` is the min-norm point of the hull of the unit vectors
  :math:`g_k / \|g_k\|` (the authors' release instead applies those weights to
  the raw gradients, a loss weighting).

  Task-specific heads need no special treatment: a head leaf is zero in every
  other task's gradient, so it adds only to its own task's :math:`\|g_k\|^2`;
  the head of task :math:`k` then moves by :math:`\alpha_k` times its own
  gradient. A zero gradient makes :math:`d = 0` (the origin is in the hull);
  divisions by zero norms are guarded, so the output is always finite.

  Args:
    tasks: the task names (optional). When given, ``update`` rejects other
      names; when ``None``, any string names are accepted.
    normalize: divide each gradient by its norm first (default False).
    iterations: Frank–Wolfe iterations for three tasks or more.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`MGDAState`. Its ``update(grads, state, params=None)`` takes the
    Mapping; ``params``, when given, is only used to check the shapes.

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = optax.chain(dualoptax.mgda(), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> grads = {"a": {"w": jnp.array([1.0, 0.0])},
    ...          "b": {"w": jnp.array([0.0, 1.0])}}
    >>> updates, state = tx.update(grads, state, params)
    >>> d, _ = dualoptax.mgda().update(grads, dualoptax.mgda().init(params))
    >>> d["w"]
    Array([0.5, 0.5], dtype=float32)

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", Comptes Rendus Mathematique 350, 2012.

    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (arXiv 1810.04650).

    Lacoste-Julien, Jaggi, "On the Global Linear Convergence of Frank-Wolfe
    Optimization Variants", NeurIPS 2015 (the pairwise variant).
  """
  tasks = _multitask.check_tasks(tasks, _WHO)
  normalize = _multitask.check_bool(_WHO, "normalize", normalize)
  iterations = _multitask.check_positive_int(_WHO, "iterations", iterations)

  def weights(gram):
    if not normalize:
      return min_norm_weights(gram, iterations)
    inv = _multitask.safe_divide(1.0, jnp.sqrt(jnp.diagonal(gram)))
    gram = gram * inv[:, None] * inv[None, :]
    return min_norm_weights(gram, iterations) * inv

  return _multitask.gram_weighting(tasks, _WHO, MGDAState, weights)
