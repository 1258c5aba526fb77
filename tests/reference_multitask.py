"""NumPy (float64) statements of the multi-task methods, for the tests.

Written from the papers' definitions, on flat gradient vectors, without the
Gram-matrix reformulation the library uses:

* PCGrad (Yu et al., 2020): each task gradient is projected, in a given order,
  off every *original* other-task gradient it conflicts with; the direction is
  the sum of the projected gradients.
* MGDA (Sener & Koltun, 2018): the min-norm point of the gradients' convex
  hull, found exactly by solving the equality-constrained problem on every face
  of the simplex and keeping the best feasible one.
* CAGrad (Liu et al., 2021): the dual ``min_w g_w·g_0 + sqrt(phi)·|g_w|`` over
  the simplex, solved exactly the same way (stationary point on every face),
  then ``d = (g_0 + sqrt(phi)/|g_w|·g_w) / (1 + c^2)``.
"""

from __future__ import annotations

import itertools

import numpy as np


def flatten(tree_leaves) -> np.ndarray:
  """Concatenates a list of arrays into one float64 vector."""
  return np.concatenate(
    [np.asarray(x, np.float64).ravel() for x in tree_leaves]
  )


def pcgrad(grads: list[np.ndarray], orders: list[list[int]]) -> np.ndarray:
  """PCGrad direction; ``orders[i]`` lists the other tasks, in order, for i."""
  grads = [np.asarray(g, np.float64) for g in grads]
  out = np.zeros_like(grads[0])
  for i, g in enumerate(grads):
    gi = g.copy()
    for j in orders[i]:
      assert j != i
      dot = gi @ grads[j]
      if dot < 0:
        gi = gi - dot / (grads[j] @ grads[j]) * grads[j]
    out += gi
  return out


def _faces(k):
  for size in range(1, k + 1):
    yield from itertools.combinations(range(k), size)


def min_norm_point(grads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Exact min-norm point of the convex hull: (simplex weights, point)."""
  a = np.stack([np.asarray(g, np.float64) for g in grads])  # [K, n]
  k = len(grads)
  best, best_w = np.inf, None
  for face in _faces(k):
    sub = a[list(face)]
    m = len(face)
    # Stationarity on the face's affine hull: 2 G w + mu 1 = 0, 1'w = 1.
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = 2 * sub @ sub.T
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:m]
    if np.any(sol < -1e-12) or abs(sol.sum() - 1) > 1e-9:
      continue
    w = np.zeros(k)
    w[list(face)] = np.clip(sol, 0, None)
    w /= w.sum()
    value = np.sum((w @ a) ** 2)
    if value < best:
      best, best_w = value, w
  return best_w, best_w @ a


def cagrad(
  grads: list[np.ndarray], c: float = 0.5, rescale: bool = True
) -> np.ndarray:
  """CAGrad direction, the dual solved exactly face by face."""
  a = np.stack([np.asarray(g, np.float64) for g in grads])  # [K, n]
  k = len(grads)
  g0 = a.mean(0)
  s = c * np.linalg.norm(g0)
  b = a @ g0

  def objective(w):
    return w @ b + s * np.linalg.norm(w @ a)

  candidates = [np.eye(k)[i] for i in range(k)]  # the vertices
  for face in _faces(k):
    if len(face) < 2 or s == 0:
      continue
    idx = list(face)
    gram = a[idx] @ a[idx].T
    # b_S + (s / |g_w|) G_S w = mu 1 with 1'w = 1, |g_w|^2 = w' G_S w:
    # w = (mu u - v) / lam with u = G^-1 1, v = G^-1 b, lam = s / |g_w|.
    u = np.linalg.solve(gram, np.ones(len(idx)))
    v = np.linalg.solve(gram, b[idx])
    one_u, one_v, b_v = u.sum(), v.sum(), b[idx] @ v
    lam_sq = one_v**2 + one_u * (s**2 - b_v)
    if lam_sq <= 0:
      continue
    lam = np.sqrt(lam_sq)
    mu = (lam + one_v) / one_u
    w_face = (mu * u - v) / lam
    if np.all(w_face >= 0):
      w = np.zeros(k)
      w[idx] = w_face
      candidates.append(w)
  w = min(candidates, key=objective)
  gw = w @ a
  norm = np.linalg.norm(gw)
  d = g0 + (s / norm * gw if norm > 0 else 0.0)
  return d / (1 + c**2) if rescale else d
