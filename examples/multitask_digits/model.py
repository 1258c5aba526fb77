"""A shared MLP trunk with one linear head per task, in plain JAX.

``init(key) -> params`` and ``apply(params, x) -> {task: logits}`` are pure
functions on a pytree ``{"trunk": [...layers], "heads": {task: layer}}``, so
training runs ``vmap`` over seeds and learning rates without further ado.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
  """He-normal weights (ReLU inputs), zero bias."""
  w = jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
  return {"w": w, "b": jnp.zeros(n_out)}


def init(
  key: jax.Array,
  num_classes: Mapping[str, int],
  hidden: Sequence[int] = (128, 128),
  n_in: int = 8 * 16,
) -> dict:
  """Parameters: trunk ``n_in -> hidden... (ReLU)``, then a head per task."""
  keys = jax.random.split(key, len(hidden) + len(num_classes))
  sizes = (n_in, *hidden)
  trunk = [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
  heads = {
    t: _dense(k, sizes[-1], c)
    for k, (t, c) in zip(keys[len(hidden) :], num_classes.items())
  }
  return {"trunk": trunk, "heads": heads}


def apply(params: dict, x: jax.Array) -> dict[str, jax.Array]:
  """``x``: ``[B, 8, 16]`` images -> ``{task: [B, classes]}`` logits."""
  h = x.reshape(x.shape[0], -1)
  for layer in params["trunk"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return {t: h @ head["w"] + head["b"] for t, head in params["heads"].items()}
