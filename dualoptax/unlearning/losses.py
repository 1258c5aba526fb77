r"""Unlearning losses (``docs/algorithm.md`` section 4) for token sequences and for classifiers.

Token-sequence convention (the caller shifts):

* ``logits`` has shape ``[..., T, V]``; position ``t`` predicts ``targets[..., t]``.
* ``targets`` has shape ``[..., T]`` (integer token ids).
* ``mask`` has shape ``[..., T]``; it is ``1.0`` on answer tokens and ``0.0`` on question
  and padding tokens. Only answer tokens enter a loss.

Every loss is safe on fully masked inputs: a sequence (or a whole batch) without answer
tokens contributes nothing and never produces a NaN value or gradient. Reference
quantities (``ref_sequence_nll``, ``ref_logits``) are wrapped in
:func:`jax.lax.stop_gradient`: the reference model is frozen.

Classifier convention: ``logits`` ``[B, C]`` and integer ``labels`` ``[B]``; the
"sequence" of the language-model losses is replaced by the example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  # token sequences
  "token_nll",
  "sequence_nll",
  "mean_token_nll",
  "ga_loss",
  "gd_loss",
  "npo_loss",
  "me_loss",
  "kl_loss",
  "idk_loss",
  # classifiers
  "classifier_nll",
  "classifier_ga_loss",
  "classifier_gd_loss",
  "classifier_npo_loss",
  "classifier_me_loss",
  "classifier_kl_loss",
  "random_label_loss",
  "random_wrong_labels",
]


def _at_least_f32(logits: jax.Array) -> jax.Array:
  # Low-precision logits (bf16) are upcast for the log-softmax; float64 ones are
  # kept float64 rather than rounded down.
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_beta(beta) -> None:
  if isinstance(beta, (int, float)) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta!r}.")


def _check_token_shapes(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> None:
  if logits.ndim < 2:
    raise ValueError(
      f"logits must have shape [..., T, V], got shape {logits.shape}."
    )
  if targets.shape != logits.shape[:-1]:
    raise ValueError(
      f"targets must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {targets.shape}."
    )
  if mask.shape != logits.shape[:-1]:
    raise ValueError(
      f"mask must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {mask.shape}."
    )


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` over the entries where ``mask`` is non-zero; 0 when there are none."""
  mask = mask.astype(values.dtype)
  # `where` (not `values * mask`) so that a non-finite value at a masked position cannot leak.
  total = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------
# Token sequences
# ---------------------------------------------------------------------------------------


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  r"""Per-token negative log-likelihood.

  .. math::
      \mathrm{nll}_t = -\log \mathrm{softmax}(z_t)_{y_t}

  Args:
    logits: ``[..., T, V]`` (or any ``[..., V]``).
    targets: integer ids, ``logits.shape[:-1]``.

  Returns:
    ``logits.shape[:-1]`` float array.
  """
  log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  return -jnp.take_along_axis(
    log_probs, targets[..., None].astype(jnp.int32), axis=-1
  )[..., 0]


def sequence_nll(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""Summed answer-token NLL of each sequence, :math:`\ell(x)`.

  .. math::
      \ell(x) = \sum_t m_t \, \mathrm{nll}_t

  Args:
    logits: ``[..., T, V]``; position ``t`` predicts ``targets[..., t]``.
    targets: ``[..., T]`` integer ids.
    mask: ``[..., T]``, 1 on answer tokens, 0 elsewhere.

  Returns:
    ``[...]``: one value per sequence (0 for a fully masked sequence).

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))          # uniform over 4 tokens
    >>> mask = jnp.array([[0.0, 1.0, 1.0]])
    >>> float(sequence_nll(logits, jnp.zeros((1, 3), int), mask)[0])  # 2 log 4
    2.772588...
  """
  _check_token_shapes(logits, targets, mask)
  nll = token_nll(logits, targets)
  mask = mask.astype(nll.dtype)
  return jnp.sum(jnp.where(mask > 0, nll * mask, 0.0), axis=-1)


def mean_token_nll(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""Mean NLL over all answer tokens of the batch (0 when there are none).

  .. math::
      \frac{\sum_{b,t} m_{b,t}\,\mathrm{nll}_{b,t}}{\max(1, \sum_{b,t} m_{b,t})}

  Args:
    logits: ``[..., T, V]``.
    targets: ``[..., T]``.
    mask: ``[..., T]``.

  Returns:
    A scalar.
  """
  _check_token_shapes(logits, targets, mask)
  return _masked_mean(token_nll(logits, targets), mask)


def ga_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""Gradient ascent on the forget set: :math:`-\mathrm{mean\ NLL}`.

  Args:
    logits: ``[..., T, V]``.
    targets: ``[..., T]``.
    mask: ``[..., T]``.

  Returns:
    A scalar to *minimize*.
  """
  return -mean_token_nll(logits, targets, mask)


def gd_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""Gradient descent on the retain set: :math:`\mathrm{mean\ NLL}`.

  Args:
    logits: ``[..., T, V]``.
    targets: ``[..., T]``.
    mask: ``[..., T]``.

  Returns:
    A scalar to minimize.
  """
  return mean_token_nll(logits, targets, mask)


def _npo_from_nll(
  nll: jax.Array, ref_nll: jax.Array, valid: jax.Array, beta
) -> jax.Array:
  ref_nll = jax.lax.stop_gradient(ref_nll).astype(nll.dtype)
  log_sig = jax.nn.log_sigmoid(beta * (nll - ref_nll))
  return -(2.0 / beta) * _masked_mean(log_sig, valid)


def npo_loss(
  logits: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  ref_sequence_nll: jax.Array,
  beta: float = 0.1,
) -> jax.Array:
  r"""Negative preference optimization (Zhang et al. 2024) against a frozen reference.

  .. math::
      \mathcal{L}_{\mathrm{NPO}} = -\frac{2}{\beta}\,
      \mathbb{E}_x \log \sigma\big(\beta\,(\ell_\theta(x) - \ell_{\mathrm{ref}}(x))\big)

  with :math:`\ell` the summed answer-token NLL (:func:`sequence_nll`). The mean runs
  over sequences that have at least one answer token: fully masked (padding) rows are
  left out rather than adding the constant :math:`\tfrac{2}{\beta}\log 2`. At
  :math:`\theta = \mathrm{ref}` the loss is :math:`\tfrac{2}{\beta}\log 2`.

  Args:
    logits: ``[..., T, V]`` of the model being unlearned.
    targets: ``[..., T]``.
    mask: ``[..., T]``.
    ref_sequence_nll: ``[...]``, :func:`sequence_nll` of the frozen reference model on
      the same batch (gradient is stopped).
    beta: inverse temperature, > 0 (0.1 in the authors' runs).

  Returns:
    A scalar to minimize.
  """
  _check_beta(beta)
  nll = sequence_nll(logits, targets, mask)
  if ref_sequence_nll.shape != nll.shape:
    raise ValueError(
      f"ref_sequence_nll must have shape {nll.shape} (one value per sequence), "
      f"got {ref_sequence_nll.shape}."
    )
  valid = (jnp.sum(mask, axis=-1) > 0).astype(nll.dtype)
  return _npo_from_nll(nll, ref_sequence_nll, valid, beta)


def _kl_uniform(logits: jax.Array) -> jax.Array:
  # KL(U || p) = sum_v (1/V) (log(1/V) - log p_v) = -log V - mean_v log p_v
  log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  return -jnp.log(float(logits.shape[-1])) - jnp.mean(log_probs, axis=-1)


def _kl(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
  ref_log_probs = jax.nn.log_softmax(
    _at_least_f32(jax.lax.stop_gradient(ref_logits)), -1
  )
  log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  return jnp.sum(jnp.exp(ref_log_probs) * (ref_log_probs - log_probs), axis=-1)


def me_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
  r"""Maximizing entropy: mean over answer tokens of :math:`KL(U \,\|\, p_\theta)`.

  .. math::
      KL(U\,\|\,p) = -\log V - \frac{1}{V}\sum_v \log p_v \;\ge 0,

  zero exactly when the prediction is uniform over the ``V`` classes.

  Args:
    logits: ``[..., T, V]``.
    mask: ``[..., T]``.

  Returns:
    A scalar to minimize.
  """
  if mask.shape != logits.shape[:-1]:
    raise ValueError(
      f"mask must have shape {logits.shape[:-1]}, got {mask.shape}."
    )
  return _masked_mean(_kl_uniform(logits), mask)


def kl_loss(
  logits: jax.Array, ref_logits: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""Retain regularizer: mean over answer tokens of :math:`KL(p_{\mathrm{ref}} \,\|\, p_\theta)`.

  .. math::
      KL(p_{\mathrm{ref}}\,\|\,p_\theta) = \sum_v p_{\mathrm{ref},v}
      (\log p_{\mathrm{ref},v} - \log p_{\theta,v})

  Args:
    logits: ``[..., T, V]`` of the model being trained.
    ref_logits: same shape, of the frozen reference (gradient is stopped).
    mask: ``[..., T]``.

  Returns:
    A scalar to minimize.
  """
  if ref_logits.shape != logits.shape:
    raise ValueError(
      f"ref_logits must have shape {logits.shape}, got {ref_logits.shape}."
    )
  if mask.shape != logits.shape[:-1]:
    raise ValueError(
      f"mask must have shape {logits.shape[:-1]}, got {mask.shape}."
    )
  return _masked_mean(_kl(ref_logits, logits), mask)


def idk_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  r"""IDK: mean answer-token NLL of forget questions paired with "I don't know" answers.

  The loss is :func:`gd_loss`; what makes it IDK is the data: ``targets`` hold a forget
  question followed by a refusal-style answer (e.g. "I have no idea.") instead of the
  true answer, and ``mask`` marks the refusal tokens.

  Args:
    logits: ``[..., T, V]`` on the IDK-relabelled forget batch.
    targets: ``[..., T]``.
    mask: ``[..., T]``, 1 on the refusal-answer tokens.

  Returns:
    A scalar to minimize.
  """
  return mean_token_nll(logits, targets, mask)


# ---------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------


def _check_classifier(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
      f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {labels.shape}."
    )


def classifier_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Per-example cross-entropy :math:`-\log \mathrm{softmax}(z)_y`.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer classes.

  Returns:
    ``[B]``.
  """
  _check_classifier(logits, labels)
  return token_nll(logits, labels)


def classifier_gd_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""GD: mean cross-entropy (the ordinary training loss, used on the retain set).

  Args:
    logits: ``[B, C]``.
    labels: ``[B]``.

  Returns:
    A scalar to minimize.
  """
  return jnp.mean(classifier_nll(logits, labels))


def classifier_ga_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""GA: minus the mean cross-entropy on the forget set.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]``.

  Returns:
    A scalar to minimize.
  """
  return -classifier_gd_loss(logits, labels)


def classifier_npo_loss(
  logits: jax.Array, labels: jax.Array, ref_nll: jax.Array, beta: float = 0.1
) -> jax.Array:
  r"""NPO for classifiers; the sequence NLL becomes the example's cross-entropy.

  .. math::
      -\frac{2}{\beta}\,\mathbb{E}_i \log\sigma\big(\beta\,(\mathrm{CE}_\theta(x_i)
      - \mathrm{CE}_{\mathrm{ref}}(x_i))\big)

  Args:
    logits: ``[B, C]``.
    labels: ``[B]``.
    ref_nll: ``[B]``, :func:`classifier_nll` of the frozen reference model (gradient is
      stopped).
    beta: inverse temperature, > 0.

  Returns:
    A scalar to minimize.
  """
  _check_beta(beta)
  nll = classifier_nll(logits, labels)
  if ref_nll.shape != nll.shape:
    raise ValueError(
      f"ref_nll must have shape {nll.shape}, got {ref_nll.shape}."
    )
  return _npo_from_nll(nll, ref_nll, jnp.ones_like(nll), beta)


def classifier_me_loss(logits: jax.Array) -> jax.Array:
  r"""ME for classifiers: mean :math:`KL(U\,\|\,\mathrm{softmax}(z))` over examples.

  Args:
    logits: ``[B, C]``.

  Returns:
    A scalar to minimize.
  """
  return jnp.mean(_kl_uniform(logits))


def classifier_kl_loss(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  r"""KL for classifiers: mean :math:`KL(p_{\mathrm{ref}}\,\|\,p_\theta)` over examples.

  Args:
    logits: ``[B, C]``.
    ref_logits: ``[B, C]`` of the frozen reference (gradient is stopped).

  Returns:
    A scalar to minimize.
  """
  if ref_logits.shape != logits.shape:
    raise ValueError(
      f"ref_logits must have shape {logits.shape}, got {ref_logits.shape}."
    )
  return jnp.mean(_kl(ref_logits, logits))


def random_wrong_labels(
  key: jax.Array, labels: jax.Array, num_classes: int
) -> jax.Array:
  r"""Draw, for every example, a label uniformly among the ``num_classes - 1`` wrong ones.

  .. math::
      \tilde y = (y + s) \bmod C, \qquad s \sim \mathcal{U}\{1, \dots, C-1\}

  Args:
    key: a PRNG key.
    labels: ``[B]`` true integer labels in ``[0, num_classes)``.
    num_classes: ``C >= 2``.

  Returns:
    ``[B]`` int32 labels, each different from the true one.
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  shift = jax.random.randint(key, labels.shape, 1, num_classes)
  return ((labels.astype(jnp.int32) + shift) % num_classes).astype(jnp.int32)


def random_label_loss(logits: jax.Array, wrong_labels: jax.Array) -> jax.Array:
  r"""RL (random labels): cross-entropy of the forget examples to wrong labels.

  .. math::
      \mathbb{E}_i\,\mathrm{CE}(z_i, \tilde y_i), \qquad \tilde y_i \ne y_i

  Draw ``wrong_labels`` with :func:`random_wrong_labels` (fresh each step, or once).

  Args:
    logits: ``[B, C]`` on forget examples.
    wrong_labels: ``[B]`` labels different from the true ones.

  Returns:
    A scalar to minimize.
  """
  return classifier_gd_loss(logits, wrong_labels)
