"""MultiDigits: pairs of scikit-learn's 8×8 digits, three tasks per image.

Each example is two digits side by side (an 8×16 image). Tasks: the left digit
(10 classes), the right digit (10 classes) and their sum (19 classes). The
1,797 bundled digits are split once into train/validation/test pools (60/20/20,
stratified, fixed), and pairs are drawn within a pool, so validation and test
pairs are built from digit images the model never saw in training.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TASKS = ("left", "right", "sum")
NUM_CLASSES = {"left": 10, "right": 10, "sum": 19}


class Split(NamedTuple):
  """One split: images ``[N, 8, 16]`` in [0, 1] and ``{task: labels [N]}``."""

  x: np.ndarray
  y: dict[str, np.ndarray]


class MultiDigits(NamedTuple):
  train: Split
  val: Split
  test: Split


def _pairs(
  images: np.ndarray, digits: np.ndarray, n: int, rng: np.random.Generator
) -> Split:
  left = rng.integers(0, len(images), n)
  right = rng.integers(0, len(images), n)
  x = np.concatenate([images[left], images[right]], axis=2)
  y = {
    "left": digits[left],
    "right": digits[right],
    "sum": digits[left] + digits[right],
  }
  return Split(
    x.astype(np.float32), {k: v.astype(np.int32) for k, v in y.items()}
  )


def load(
  n_train: int = 4000, n_val: int = 1000, n_test: int = 2000, seed: int = 0
) -> MultiDigits:
  """Builds the fixed MultiDigits splits (the same for every training seed).

  Args:
    n_train, n_val, n_test: number of pairs per split.
    seed: seed of the pool split and of the pairing.

  Returns:
    :class:`MultiDigits`.
  """
  # Imported here so that importing the module needs no scikit-learn.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  idx = np.arange(len(labels))
  train_idx, rest = train_test_split(
    idx, test_size=0.4, stratify=labels, random_state=seed
  )
  val_idx, test_idx = train_test_split(
    rest, test_size=0.5, stratify=labels[rest], random_state=seed
  )
  rng = np.random.default_rng(seed)
  return MultiDigits(
    *(
      _pairs(images[i], labels[i], n, rng)
      for i, n in ((train_idx, n_train), (val_idx, n_val), (test_idx, n_test))
    )
  )
