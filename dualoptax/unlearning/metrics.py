r"""Unlearning metrics (``docs/algorithm.md`` section 5: random forgetting).

For one unlearned model, each ×100:

* UA  = 100 − accuracy on the forget set (unlearning accuracy),
* RA  = accuracy on the retain set,
* TA  = accuracy on the test set,
* MIA = membership-inference rate on the forget set: a class-balanced logistic regression
  on the softmax entropy is fit with members = retain set and non-members = test set, and
  MIA is the percentage of forget examples it calls *members* (the protocol's convention; the
  "MIA-efficacy" of SalUn is 100 minus this; gaps to Retrain are the same either way).

Across methods: the average gap is the mean over the four metrics of
:math:`|\bar m - \bar m_{\mathrm{Retrain}}|` (means over seeds; lower is better) and the
average std is the mean of the four across-seed standard deviations.

:func:`accuracy` and :func:`softmax_entropy` are pure JAX (usable inside ``jit``); the
attack uses scikit-learn (``pip install 'dualoptax[examples]'``), imported when called.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "METRICS",
  "accuracy",
  "softmax_entropy",
  "mia_rate",
  "unlearning_metrics",
  "summarize",
  "average_gap",
  "format_table",
  "text_table",
]

METRICS = ("UA", "RA", "TA", "MIA")


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Percentage of examples whose arg-max logit is the label, :math:`100\cdot\mathbb{E}[\hat y = y]`.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer labels.

  Returns:
    A scalar in ``[0, 100]`` (0 for an empty batch).
  """
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return 100.0 * jnp.sum(correct) / max(correct.size, 1)


def softmax_entropy(logits: jax.Array) -> jax.Array:
  r"""Entropy of the softmax output, :math:`H = -\sum_c p_c \log p_c`, per example.

  Args:
    logits: ``[..., C]``.

  Returns:
    ``[...]``, in ``[0, log C]``.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def mia_rate(
  member_entropy: np.ndarray,
  nonmember_entropy: np.ndarray,
  target_entropy: np.ndarray,
) -> float:
  r"""Entropy membership-inference attack: percentage of targets predicted as members.

  Fits :math:`P(\text{member}\mid H) = \sigma(w\,z(H) + b)` by class-balanced logistic
  regression (``class_weight="balanced"``, so the retain/test size ratio does not bias
  it), where :math:`z` standardizes the entropy with the training mean and std (the
  entropies of a confident model are ~1e-6, far below the scale the default L2 penalty
  assumes). Returns :math:`100 \cdot \mathbb{E}_{x \in \text{target}}[P > 1/2]`.

  Args:
    member_entropy: entropies of examples the model was trained on (the retain set).
    nonmember_entropy: entropies of unseen examples (the test set).
    target_entropy: entropies of the examples to classify (the forget set).

  Returns:
    A float in ``[0, 100]``.

  Raises:
    ValueError: if a set is empty or holds non-finite values.
  """
  from sklearn.linear_model import LogisticRegression  # optional dependency

  sets = {
    "member_entropy": np.asarray(member_entropy, np.float64).ravel(),
    "nonmember_entropy": np.asarray(nonmember_entropy, np.float64).ravel(),
    "target_entropy": np.asarray(target_entropy, np.float64).ravel(),
  }
  for name, values in sets.items():
    if values.size == 0:
      raise ValueError(f"{name} is empty.")
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{name} holds non-finite values.")
  members, nonmembers, target = sets.values()
  features = np.concatenate([members, nonmembers])
  labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
  mean, std = features.mean(), features.std()
  scale = std if std > 0 else 1.0
  attack = LogisticRegression(class_weight="balanced")
  attack.fit(((features - mean) / scale)[:, None], labels)
  predicted = attack.predict(((target - mean) / scale)[:, None])
  return float(100.0 * np.mean(predicted == 1))


def unlearning_metrics(
  forget_logits: np.ndarray,
  forget_labels: np.ndarray,
  retain_logits: np.ndarray,
  retain_labels: np.ndarray,
  test_logits: np.ndarray,
  test_labels: np.ndarray,
) -> dict[str, float]:
  r"""UA, RA, TA and MIA (each ×100) of one model from its logits on the three sets.

  Args:
    forget_logits, forget_labels: ``[Nf, C]``, ``[Nf]``.
    retain_logits, retain_labels: ``[Nr, C]``, ``[Nr]``.
    test_logits, test_labels: ``[Nt, C]``, ``[Nt]``.

  Returns:
    ``{"UA": ..., "RA": ..., "TA": ..., "MIA": ...}`` as Python floats.
  """
  return {
    "UA": 100.0
    - float(accuracy(jnp.asarray(forget_logits), jnp.asarray(forget_labels))),
    "RA": float(
      accuracy(jnp.asarray(retain_logits), jnp.asarray(retain_labels))
    ),
    "TA": float(accuracy(jnp.asarray(test_logits), jnp.asarray(test_labels))),
    "MIA": mia_rate(
      np.asarray(softmax_entropy(jnp.asarray(retain_logits))),
      np.asarray(softmax_entropy(jnp.asarray(test_logits))),
      np.asarray(softmax_entropy(jnp.asarray(forget_logits))),
    ),
  }


def summarize(
  runs: Sequence[Mapping[str, float]],
) -> dict[str, dict[str, float]]:
  r"""Mean and standard deviation over seeds of each metric.

  The std is the sample std (``ddof=1``) for two runs or more, 0 for a single run.

  Args:
    runs: one ``{"UA", "RA", "TA", "MIA"}`` mapping per seed.

  Returns:
    ``{"mean": {metric: float}, "std": {metric: float}, "avg_std": float}``, where
    ``avg_std`` is the mean of the four stds.
  """
  if not runs:
    raise ValueError("runs is empty: summarize needs at least one seed.")
  values = {m: np.array([float(r[m]) for r in runs]) for m in METRICS}
  ddof = 1 if len(runs) > 1 else 0
  mean = {m: float(v.mean()) for m, v in values.items()}
  std = {m: float(v.std(ddof=ddof)) for m, v in values.items()}
  return {
    "mean": mean,
    "std": std,
    "avg_std": float(np.mean(list(std.values()))),
  }


def average_gap(
  mean: Mapping[str, float], reference_mean: Mapping[str, float]
) -> float:
  r"""Average gap to the gold standard, :math:`\frac14\sum_{m} |\bar m - \bar m_{\mathrm{ref}}|`.

  Args:
    mean: the method's mean metrics (``UA, RA, TA, MIA``).
    reference_mean: Retrain's mean metrics.

  Returns:
    A float (lower is better).

  Examples:
    >>> average_gap({"UA": 2, "RA": 99, "TA": 97, "MIA": 80},
    ...             {"UA": 3, "RA": 100, "TA": 98, "MIA": 76})
    1.75
  """
  return float(
    np.mean([abs(float(mean[m]) - float(reference_mean[m])) for m in METRICS])
  )


def format_table(rows: Mapping[str, Mapping[str, object]]) -> str:
  r"""A plain-text table: one row per method, ``mean ± std`` per metric, gap, avg std.

  Args:
    rows: method name -> ``{"mean": {...}, "std": {...}, "avg_std": float,
      "avg_gap": float}`` (``avg_gap`` may be None, e.g. for the reference) and
      optionally ``"note"`` (a short string such as the selected learning rate).

  Returns:
    The table as a string.
  """
  header = ["method"] + list(METRICS) + ["avg gap", "avg std", "note"]
  lines = []
  for name, row in rows.items():
    cells = [name]
    for m in METRICS:
      cells.append(f"{row['mean'][m]:6.2f} ± {row['std'][m]:5.2f}")
    gap = row.get("avg_gap")
    cells.append("—" if gap is None else f"{gap:.2f}")
    cells.append(f"{row['avg_std']:.2f}")
    cells.append(str(row.get("note", "")))
    lines.append(cells)
  return text_table(header, lines)


def text_table(
  header: Sequence[object], rows: Sequence[Sequence[object]]
) -> str:
  """Left-aligned plain-text columns: the header, a rule of dashes, the rows.

  Args:
    header: the column titles.
    rows: one sequence of cells per row (anything ``str`` accepts).

  Returns:
    The table as a string, columns as wide as their widest cell.

  Examples:
    >>> print(text_table(["a", "bb"], [[1, 2], [30, 4]]))
    a   bb
    --  --
    1   2
    30  4
  """
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda cells: "  ".join(
    str(c).ljust(w) for c, w in zip(cells, widths)
  ).rstrip()
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([fmt(header), rule] + [fmt(c) for c in rows])
