"""The digits data: a fixed train/test split and per-seed forget/retain sets."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Split(NamedTuple):
  """The 80/20 split of scikit-learn's 1,797 bundled 8x8 digits.

  Attributes:
    x_train: ``[N, 8, 8]`` float32 images scaled to [0, 1].
    y_train: ``[N]`` int32 labels.
    x_test: ``[M, 8, 8]``.
    y_test: ``[M]``.
  """

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


def load_digits_split() -> Split:
  """The bundled digits, scaled to [0, 1], split 80/20 (stratified, fixed seed).

  scikit-learn ships the data with the package: nothing is downloaded.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
    x, y, test_size=0.2, stratify=y, random_state=0
  )
  return Split(*map(jnp.asarray, (x_tr, y_tr, x_te, y_te)))


class SeedSets(NamedTuple):
  """Per-seed sets; every array has a leading seed axis ``S``.

  Attributes:
    sets: ``{"forget" | "retain" | "test": (x, y)}``; the test set is the same
      for every seed (broadcast).
    forget_idx: ``[S, n_forget]`` rows of the training split that are forgotten.
    retain_idx: ``[S, N - n_forget]`` the other rows.
  """

  sets: dict
  forget_idx: jax.Array
  retain_idx: jax.Array


def forget_sets(split: Split, keys: jax.Array, n_forget: int) -> SeedSets:
  """A random forget set of ``n_forget`` training rows per seed key.

  Args:
    split: the data.
    keys: ``[S]`` PRNG keys, one per seed.
    n_forget: rows to forget, in ``[1, N)``.
  """
  n_train = split.x_train.shape[0]
  if not 1 <= n_forget < n_train:
    raise ValueError(f"n_forget must lie in [1, {n_train}), got {n_forget}")
  perm = jax.vmap(lambda k: jax.random.permutation(k, n_train))(keys)
  f_idx, r_idx = perm[:, :n_forget], perm[:, n_forget:]
  s = keys.shape[0]
  x, y = split.x_train, split.y_train
  sets = {
    "forget": (x[f_idx], y[f_idx]),
    "retain": (x[r_idx], y[r_idx]),
    "test": (
      jnp.broadcast_to(split.x_test, (s, *split.x_test.shape)),
      jnp.broadcast_to(split.y_test, (s, *split.y_test.shape)),
    ),
  }
  return SeedSets(sets, f_idx, r_idx)
