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


def _gather(split: Split, f_idx: jax.Array, r_idx: jax.Array) -> SeedSets:
  s = f_idx.shape[0]
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


def forget_sets(
  split: Split, keys: jax.Array, n_forget: int, n_use: int | None = None
) -> SeedSets:
  """A random forget set of ``n_forget`` training rows per seed key.

  Each seed draws ``n_use`` of the training rows at random (all by default);
  the first ``n_forget`` of them are forgotten, the rest are the retain set.

  Args:
    split: the data.
    keys: ``[S]`` PRNG keys, one per seed.
    n_forget: rows to forget, in ``[1, n_use)``.
    n_use: training rows used per seed, in ``[2, N]``; default ``N``.
  """
  n_train = split.x_train.shape[0]
  n_use = n_train if n_use is None else n_use
  if not 2 <= n_use <= n_train:
    raise ValueError(f"n_use must lie in [2, {n_train}], got {n_use}")
  if not 1 <= n_forget < n_use:
    raise ValueError(f"n_forget must lie in [1, {n_use}), got {n_forget}")
  perm = jax.vmap(lambda k: jax.random.permutation(k, n_train))(keys)
  return _gather(split, perm[:, :n_forget], perm[:, n_forget:n_use])


def class_forget_sets(split: Split, seeds: int, forget_class: int) -> SeedSets:
  """Class-wise forgetting: every training row of ``forget_class`` is forgotten.

  The sets are the same for every seed (only initialization and batches
  differ); they are stacked ``seeds`` times like :func:`forget_sets`'.
  """
  y = np.asarray(split.y_train)
  if forget_class not in set(y.tolist()):
    raise ValueError(f"no training image has class {forget_class}")
  tile = lambda idx: jnp.broadcast_to(jnp.asarray(idx), (seeds, idx.size))
  f_idx = np.flatnonzero(y == forget_class)
  r_idx = np.flatnonzero(y != forget_class)
  return _gather(split, tile(f_idx), tile(r_idx))
