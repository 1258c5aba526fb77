r"""CAGrad: conflict-averse gradient descent (Liu et al., 2021).

:func:`cagrad` turns a Mapping ``{task: gradients}`` into one params-shaped
direction, to be chained before any optax optimizer; :func:`cagrad_weights`
solves the dual problem on a Gram matrix.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dualoptax import _multitask

_WHO = "cagrad"


class CAGradState(NamedTuple):
  """State of :func:`cagrad`.

  Attributes:
    count: updates taken (int32).
  """

  count: jax.Array


def _line_search(lin, p, q, r, s):
  r"""Minimiser over :math:`[0, 1]` of :math:`h(a) = lin \cdot a +
  s \sqrt{p a^2 + q a + r}` (convex; :math:`p a^2 + q a + r \ge 0`).

  Writing the quadratic as :math:`p (a - a_0)^2 + \delta`, the stationary
  point of :math:`h` is :math:`a_0 + m \sqrt{\delta / (p (p - m^2))}` with
  :math:`m = -lin / s`, when :math:`|m| < \sqrt p`; otherwise :math:`h` is
  monotone on the line. The result is clipped to the segment.
  """
  m = _multitask.safe_divide(-lin, s)
  ok = (p > 0) & (m * m < p)
  p_safe = jnp.where(ok, p, 1.0)
  a0 = -q / (2 * p_safe)
  delta = jnp.maximum(r - q * q / (4 * p_safe), 0.0)
  inside = a0 + m * jnp.sqrt(delta / (p_safe * jnp.where(ok, p - m * m, 1.0)))
  monotone = jnp.where(m > 0, 1.0, 0.0)  # h decreasing (m >= sqrt p) or not
  a = jnp.where(ok, inside, jnp.where(p > 0, monotone, 0.0))
  return jnp.clip(a, 0.0, 1.0)


def cagrad_weights(
  gram: jax.Array, c: float = 0.5, iterations: int = 250
) -> jax.Array:
  r"""Weights :math:`v` with the CAGrad direction :math:`\sum_k v_k g_k`.

  Solves the dual :math:`\min_{w \in \Delta} F(w) = w^\top G \bar 1 +
  \sqrt\phi\, \sqrt{w^\top G w}` (:math:`\bar 1 = 1/K`, :math:`\phi = c^2
  \|g_0\|^2`) by pairwise Frank–Wolfe from the uniform weights, a fixed
  number of iterations (``lax.fori_loop``), each moving weight from the
  support vertex with the largest partial derivative to the one with the
  smallest, by an exact line search in closed form; then returns
  :math:`v = \bar 1 + (\sqrt\phi / \|g_w\|)\, w` (not yet divided by
  :math:`1 + c^2`).

  Args:
    gram: ``[K, K]`` symmetric positive semi-definite matrix.
    c: the radius constant, ``>= 0``.
    iterations: Frank–Wolfe iterations.

  Returns:
    ``[K]`` weights (each ``>= 1/K``).
  """
  k = gram.shape[0]
  mean = jnp.full((k,), 1.0 / k, gram.dtype)
  b = gram @ mean  # g_k · g_0
  s = c * jnp.sqrt(jnp.maximum(mean @ b, 0.0))  # sqrt(phi) = c ||g_0||
  eye = jnp.eye(k, dtype=gram.dtype)

  def body(_, w):
    g_w = gram @ w
    sq = jnp.maximum(w @ g_w, 0.0)
    grad = b + _multitask.safe_divide(s * g_w, jnp.sqrt(sq))
    t = jnp.argmin(grad)
    a = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))
    e = (eye[t] - eye[a]) * w[a]  # move all of a's weight at most
    g_e = gram @ e
    step = _line_search(b @ e, jnp.maximum(e @ g_e, 0.0), 2 * (w @ g_e), sq, s)
    return w + step * e

  w = jax.lax.fori_loop(0, iterations, body, mean)
  norm_w = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
  return mean + _multitask.safe_divide(s, norm_w) * w


def cagrad(
  tasks: Optional[Sequence[str]] = None,
  *,
  c: float = 0.5,
  rescale: bool = True,
  iterations: int = 250,
) -> optax.GradientTransformationExtraArgs:
  r"""Conflict-averse gradient descent (CAGrad).

  ``update`` takes a Mapping ``{task: gradients}`` (any non-empty subset of the
  tasks, each a params-shaped pytree) and returns one params-shaped direction.
  With :math:`g_0 = \frac1K \sum_k g_k` the mean gradient, CAGrad looks for the
  direction within a ball around :math:`g_0` that most improves the worst
  task,

  .. math::

    \max_{d} \min_k g_k \cdot d \quad \text{s.t.} \quad
    \|d - g_0\| \le c\, \|g_0\|,

  through its dual over the simplex :math:`\Delta`: with
  :math:`g_w = \sum_k w_k g_k` and :math:`\phi = c^2 \|g_0\|^2`,

  .. math::

    w^\star = \arg\min_{w \in \Delta}\; g_w \cdot g_0 + \sqrt\phi\, \|g_w\|,
    \qquad
    d = \frac{1}{1 + c^2}\Big(g_0 + \frac{\sqrt\phi}{\|g_w^\star\|}
      g_w^\star\Big).

  The factor :math:`1/(1 + c^2)` is the authors' default rescaling
  (``rescale=False`` drops it). ``c = 0`` gives the mean gradient; a larger
  ``c`` lets the direction turn further from it towards the worst task. The
  dual is solved on the :math:`K \times K` Gram matrix (see
  :func:`cagrad_weights`) by a fixed number of pairwise Frank–Wolfe
  iterations, so ``update`` traces once and is fine under ``jit``, ``vmap``
  and ``lax.scan``. Dot products and norms run over the whole parameter
  vector (every leaf).

  Task-specific heads need no special treatment: a head leaf is zero in every
  other task's gradient, so it enters only its own task's :math:`\|g_k\|^2`.
  Divisions by zero norms are guarded (:math:`g_w^\star = 0` gives
  :math:`d = g_0 / (1 + c^2)`), so zero gradients give finite output.

  Args:
    tasks: the task names (optional). When given, ``update`` rejects other
      names; when ``None``, any string names are accepted.
    c: the radius constant, in ``[0, 1)`` (0.5 is the usual value).
    rescale: divide the direction by :math:`1 + c^2` (default, as the authors).
    iterations: Frank–Wolfe iterations of the dual solver.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`CAGradState`. Its ``update(grads, state, params=None)`` takes the
    Mapping; ``params``, when given, is only used to check the shapes.

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = optax.chain(dualoptax.cagrad(c=0.5), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> grads = {"a": {"w": jnp.array([1.0, 0.0])},
    ...          "b": {"w": jnp.array([-1.0, 2.0])}}
    >>> updates, state = tx.update(grads, state, params)

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021 (arXiv 2110.14048).

    Lacoste-Julien, Jaggi, "On the Global Linear Convergence of Frank-Wolfe
    Optimization Variants", NeurIPS 2015 (the pairwise variant).
  """
  tasks = _multitask.check_tasks(tasks, _WHO)
  if (
    isinstance(c, bool)
    or not isinstance(c, numbers.Real)
    or not 0.0 <= float(c) < 1.0
  ):
    raise ValueError(f"{_WHO}: `c` must be a number in [0, 1), got {c!r}.")
  c_value = float(c)
  rescale = _multitask.check_bool(_WHO, "rescale", rescale)
  iterations = _multitask.check_positive_int(_WHO, "iterations", iterations)

  def weights(gram):
    w = cagrad_weights(gram, c_value, iterations)
    return w / (1.0 + c_value**2) if rescale else w

  return _multitask.gram_weighting(tasks, _WHO, CAGradState, weights)
