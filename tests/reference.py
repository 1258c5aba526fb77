"""Plain-NumPy statement of DualOptim+ and DualOptim (docs/algorithm.md sections 1
and 2), float64.

Written from the spec text, independently of the package: one loop per step, one
objective at a time, dictionaries of arrays. Used as the oracle of the parity tests.
"""

import numpy as np


class DualOptimPlusRef:
  """DualOptim+, including "several objectives in one call" (section 1.4)."""

  def __init__(
    self,
    shapes,
    objectives=("forget", "retain"),
    b1=0.9,
    b2=0.95,
    base_b1=0.9,
    base_b2=0.95,
    eps=1e-8,
    wd=0.0,
    lr=1e-3,
    stable=False,
    dtype=np.float64,
  ):
    self.objectives, self.stable = objectives, stable
    self.b1, self.b2, self.bb1, self.bb2, self.eps, self.wd = (
      b1,
      b2,
      base_b1,
      base_b2,
      eps,
      wd,
    )
    self.lr = lr if isinstance(lr, dict) else {k: lr for k in objectives}
    z = lambda: {n: np.zeros(s, dtype) for n, s in shapes.items()}
    self.mB, self.vB = z(), z()
    self.m = {k: z() for k in objectives}
    self.v = {k: z() for k in objectives}
    self.T = 0
    self.t = {k: 0 for k in objectives}

  def lr_at(self, k, T):
    lr = self.lr[k]
    return float(lr(T)) if callable(lr) else lr

  def step(self, grads, params):
    """grads: {objective: {leaf: array}}; returns the new params."""
    T_before = self.T
    self.T += 1
    delta = {n: np.zeros_like(p) for n, p in params.items()}
    for k, g in grads.items():
      self.t[k] += 1
      lr = self.lr_at(k, T_before)
      for n in params:
        # Step 2: base estimate before this step; raw buffers when T == 1.
        if self.T == 1:
          mhB, vhB = self.mB[n], self.vB[n]
        else:
          mhB = self.mB[n] / (1 - self.bb1 ** (self.T - 1))
          vhB = self.vB[n] / (1 - self.bb2 ** (self.T - 1))
        # Step 3.
        self.m[k][n] = self.b1 * self.m[k][n] + (1 - self.b1) * (g[n] - mhB)
        self.v[k][n] = self.b2 * self.v[k][n] + (1 - self.b2) * (
          g[n] ** 2 - vhB
        )
        # Step 4.
        mhk = self.m[k][n] / (1 - self.b1 ** self.t[k])
        vhk = self.v[k][n] / (1 - self.b2 ** self.t[k])
        # Step 5.
        num = mhk + mhB
        den2 = np.abs(vhk + vhB)
        if self.stable:
          den2 = np.maximum(den2, num**2)
        u = num / (np.sqrt(den2) + self.eps)
        # Step 6.
        delta[n] -= lr * (u + self.wd * params[n])
    # Step 7: one base step on the mean gradient and mean squared gradient.
    for n in params:
      gs = [grads[k][n] for k in grads]
      self.mB[n] = self.bb1 * self.mB[n] + (1 - self.bb1) * np.mean(gs, axis=0)
      self.vB[n] = self.bb2 * self.vB[n] + (1 - self.bb2) * np.mean(
        [x**2 for x in gs], axis=0
      )
    return {n: params[n] + delta[n] for n in params}, delta


class DualOptimRef:
  """DualOptim: one Adam per objective; lr schedules read the call count."""

  def __init__(
    self,
    shapes,
    objectives=("forget", "retain"),
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    wd=0.0,
    lr=1e-3,
    dtype=np.float64,
  ):
    self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd
    self.lr = lr if isinstance(lr, dict) else {k: lr for k in objectives}
    z = lambda: {n: np.zeros(s, dtype) for n, s in shapes.items()}
    self.m = {k: z() for k in objectives}
    self.v = {k: z() for k in objectives}
    self.t = {k: 0 for k in objectives}
    self.calls = 0

  def step(self, grads, params):
    delta = {n: np.zeros_like(p) for n, p in params.items()}
    for k, g in grads.items():
      self.t[k] += 1
      lr = float(self.lr[k](self.calls)) if callable(self.lr[k]) else self.lr[k]
      for n in params:
        self.m[k][n] = self.b1 * self.m[k][n] + (1 - self.b1) * g[n]
        self.v[k][n] = self.b2 * self.v[k][n] + (1 - self.b2) * g[n] ** 2
        mh = self.m[k][n] / (1 - self.b1 ** self.t[k])
        vh = self.v[k][n] / (1 - self.b2 ** self.t[k])
        delta[n] -= lr * (mh / (np.sqrt(vh) + self.eps) + self.wd * params[n])
    self.calls += 1
    return {n: params[n] + delta[n] for n in params}, delta
