"""The digits job's small Flax NNX CNN, used functionally.

The loops in :mod:`unlearn_digits.loop` work on plain parameter pytrees, so a
model is split once into a static ``graphdef`` and its ``nnx.Param`` state; ``apply``
merges them back inside jitted code. This keeps everything ``vmap``-able over seeds.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DigitsCNN", "conv3x3_patches", "functional_model"]


def conv3x3_patches(x: jax.Array, stride: int = 1) -> jax.Array:
  r"""3×3 patches with SAME padding (im2col): ``[B, H, W, C] -> [B, H/s, W/s, 9C]``.

  A dense layer on these patches is exactly ``lax.conv`` with 3×3 kernel and
  ``padding="SAME"``. Why not ``nnx.Conv``:
  on XLA:CPU a convolution inside a ``while`` loop (``lax.scan``) runs about 10× slower
  than the same convolution outside one, while slices and matmuls do not; the digits
  benchmark runs every training step inside ``lax.scan``.

  Args:
    x: ``[B, H, W, C]``.
    stride: 1 or 2 (``H`` and ``W`` divisible by it).

  Returns:
    ``[B, H // stride, W // stride, 9 * C]``, patch channels ordered (row, col, C).
  """
  _, h, w, _ = x.shape
  if stride not in (1, 2) or h % stride or w % stride:
    raise ValueError(
      f"stride must be 1 or 2 and divide H, W; got {stride} for {x.shape}."
    )
  # XLA's SAME padding puts the odd padding element at the end: low = total // 2.
  off_h = 1 - max(h // stride * stride - stride + 3 - h, 0) // 2
  off_w = 1 - max(w // stride * stride - stride + 3 - w, 0) // 2
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [
    padded[
      :,
      off_h + i : off_h + i + h : stride,
      off_w + j : off_w + j + w : stride,
      :,
    ]
    for i in range(3)
    for j in range(3)
  ]
  return jnp.concatenate(cols, axis=-1)


class DigitsCNN(nnx.Module):
  """A small CNN for 8×8 grey-scale digits (about 38k parameters).

  conv3×3(16) → relu → conv3×3(32, stride 2) → relu → dense(64) → relu → dense(C);
  the convolutions are dense layers on :func:`conv3x3_patches`.

  Args:
    num_classes: number of output logits.
    rngs: ``nnx.Rngs`` for the initializers.
  """

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Linear(9 * 1, 16, rngs=rngs)
    self.conv2 = nnx.Linear(9 * 16, 32, rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: ``[B, 8, 8]`` or ``[B, 8, 8, 1]`` floats -> ``[B, num_classes]`` logits."""
    if x.ndim == 3:
      x = x[..., None]
    x = jax.nn.relu(self.conv1(conv3x3_patches(x, 1)))
    x = jax.nn.relu(self.conv2(conv3x3_patches(x, 2)))
    x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc2(x)


def functional_model(
  make_model: Callable[[nnx.Rngs], nnx.Module],
) -> tuple[Callable[[jax.Array], Any], Callable[[Any, jax.Array], jax.Array]]:
  """Turns an NNX constructor into pure ``init(key) -> params`` and ``apply(params, x)``.

  Args:
    make_model: ``rngs -> module``, e.g. ``lambda rngs: DigitsCNN(rngs=rngs)``.

  Returns:
    ``(init, apply)``; both are pure and work under ``jit`` and ``vmap`` (``init`` can
    be vmapped over keys to build one model per seed).

  Examples:
    >>> import jax
    >>> init, apply = functional_model(lambda rngs: DigitsCNN(rngs=rngs))
    >>> params = jax.vmap(init)(jax.random.split(jax.random.key(0), 3))   # 3 seeds
    >>> apply(jax.tree.map(lambda p: p[0], params), jax.numpy.zeros((2, 8, 8))).shape
    (2, 10)
  """
  graphdef, _ = nnx.split(
    nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param
  )

  def init(key: jax.Array) -> Any:
    return nnx.split(make_model(nnx.Rngs(params=key)), nnx.Param)[1]

  def apply(params: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(x)

  return init, apply
