"""Training Original and Retrain, and unlearning under every optimizer.

Every function here is pure and jit-able: a whole run (every step) is one
``lax.scan`` (:mod:`unlearn_digits.loop`), and seeds and the forget learning-rate
grid are ``vmap``-ed over it (one flat batch of runs), so each optimizer
compiles one program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

import dualoptax
from dualoptax.unlearning import losses as L
from unlearn_digits import config as C
from unlearn_digits import loop
from unlearn_digits.model import DigitsCNN, functional_model

Params = Any
Sets = Mapping[str, tuple[jax.Array, jax.Array]]

init_params, apply = functional_model(
  lambda rngs: DigitsCNN(C.NUM_CLASSES, rngs=rngs)
)


def ce_loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Mean cross-entropy of ``batch = (x, y)`` (the GD loss)."""
  x, y = batch
  return L.classifier_gd_loss(apply(params, x), y)


def train(
  key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array, steps: int
) -> Params:
  """A model trained from scratch with Adam on the first ``n`` rows of ``(x, y)``.

  ``n`` is traced, so Original (all rows) and Retrain (the retain rows, stored
  first) share one compiled program.
  """
  k_init, k_data = jax.random.split(key)
  params, _, _ = loop.summed_scan(
    init_params(k_init),
    optax.adam(C.TRAIN_LR, **C.BETAS),
    {"train": ce_loss},
    {"train": loop.sample_batch((x, y), C.BATCH, size=n)},
    k_data,
    steps,
  )
  return params


def train_original_and_retrain(
  keys_original: jax.Array, keys_retrain: jax.Array, sets: Sets, steps: int
) -> Params:
  """Original (forget + retain rows) and Retrain (retain rows only) per seed.

  Both are trained in one vmapped program: every model sees the rows ordered
  retain then forget, Original samples all of them and Retrain only the first
  ``n_retain``.

  Returns:
    Parameters stacked ``[2S, ...]``: the ``S`` Originals, then the ``S``
    Retrains.
  """
  both = lambda a, b: jnp.concatenate([a, b])
  (xf, yf), (xr, yr) = sets["forget"], sets["retain"]
  x = jnp.concatenate([xr, xf], axis=1)  # [S, n_train, 8, 8], retain first
  y = jnp.concatenate([yr, yf], axis=1)
  s, n_retain, n_train = x.shape[0], xr.shape[1], x.shape[1]
  run = jax.jit(jax.vmap(train, (0, 0, 0, 0, None)), static_argnums=4)
  return run(
    both(keys_original, keys_retrain),
    both(x, x),
    both(y, y),
    jnp.array([n_train] * s + [n_retain] * s),
    steps,
  )


def forget_data(
  originals: Params, forget: tuple[jax.Array, jax.Array], keys: jax.Array
) -> tuple[jax.Array, ...]:
  """Per-seed forget batches' source ``(x, y, ref_nll, wrong_label)``.

  ``ref_nll`` is the frozen Original's per-example NLL (NPO's reference);
  ``wrong_label`` a fixed random wrong label per example (RL's target).
  """
  x, y = forget
  ref_nll = jax.vmap(lambda p, x, y: L.classifier_nll(apply(p, x), y))(
    originals, x, y
  )
  wrong = jax.vmap(lambda k, y: L.random_wrong_labels(k, y, C.NUM_CLASSES))(
    keys, y
  )
  return x, y, ref_nll, wrong


def make_forget_loss(loss_id: jax.Array) -> Callable[[Params, Any], jax.Array]:
  """GA, NPO or RL (``loss_id`` indexes :data:`config.FORGET_LOSSES`, traced)
  on a forget batch ``(x, y, ref_nll, wrong_label)``."""

  def forget_loss(params, batch):
    x, y, ref_nll, wrong = batch
    logits = apply(params, x)
    return jax.lax.switch(
      loss_id,
      [
        lambda: L.classifier_ga_loss(logits, y),
        lambda: L.classifier_npo_loss(logits, y, ref_nll, C.NPO_BETA),
        lambda: L.random_label_loss(logits, wrong),
      ],
    )

  return forget_loss


def unlearn(
  method: str,
  steps: int,
  loss_id: jax.Array,
  forget_lr: Any,
  params: Params,
  forget: Any,
  retain: Any,
  key: jax.Array,
) -> Params:
  """One unlearning run of ``method``; ``loss_id`` and ``forget_lr`` may be traced.

  Alternating methods take the 1 forget : 5 retain schedule; Adam (summed)
  takes both losses every step.
  """
  loss_fns = {"forget": make_forget_loss(loss_id), "retain": ce_loss}
  batch_fns = {
    "forget": loop.sample_batch(forget, C.FORGET_BATCH),
    "retain": loop.sample_batch(retain, C.BATCH),
  }
  lrs = {"forget": forget_lr, "retain": C.TRAIN_LR}
  if method == "adam_summed":  # one loss, one state: w = lr_forget / lr_retain
    tx = optax.adam(C.TRAIN_LR, **C.BETAS)
    weights = {"forget": forget_lr / C.TRAIN_LR, "retain": 1.0}
    return loop.summed_scan(
      params, tx, loss_fns, batch_fns, key, steps, weights=weights
    )[0]
  if (
    method == "adam_alternating"
  ):  # one shared state, the active objective's lr
    tx = optax.adam(1.0, **C.BETAS)
    return loop.alternating_scan(
      params,
      tx,
      loss_fns,
      batch_fns,
      key,
      steps,
      multi_objective=False,
      step_scales=lrs,
    )[0]
  if method == "dual_optim":
    tx = dualoptax.dual_optim(lrs, **C.BETAS)
  elif method == "dual_optim_plus":
    tx = dualoptax.dual_optim_plus(lrs, **C.BETAS)
  elif method == "dual_optim_plus_unstable":  # the published rule
    tx = dualoptax.dual_optim_plus(lrs, **C.BETAS, stable=False)
  elif method == "dual_optim_plus_8bit":
    # Default min_size=4096: conv2 and fc1 (97.6% of the 38k parameters) are 8-bit.
    tx = dualoptax.dual_optim_plus_8bit(lrs, **C.BETAS)
  else:
    raise ValueError(f"unknown method {method!r}")
  return loop.alternating_scan(params, tx, loss_fns, batch_fns, key, steps)[0]


def sets_logits(params: Params, sets: Sets) -> dict[str, jax.Array]:
  """Logits on every set of ``sets``."""
  return {name: apply(params, x) for name, (x, _) in sets.items()}


def make_run(method: str, steps: int) -> Callable:
  """``run(loss_ids, lrs, seed_idx, originals, forget, retain, keys, sets)``.

  One jitted program per method and batch size ``B``: run ``b`` unlearns seed
  ``seed_idx[b]``'s Original with forget loss ``loss_ids[b]`` at forget lr
  ``lrs[b]`` (all ``[B]``, traced), so a tuning grid (lrs × tuning seeds) and
  the reported runs (losses × reported seeds) share the compiled program when
  padded to one ``B`` (:func:`run_padded`). The per-seed arguments have a
  leading seed axis; ``logits[name]`` is ``[B, n, classes]``.
  """

  def run(loss_ids, lrs, seed_idx, originals, forget, retain, keys, sets):
    def one(loss_id, lr, i):
      take = lambda tree: jax.tree.map(lambda a: a[i], tree)
      p = unlearn(
        method,
        steps,
        loss_id,
        lr,
        take(originals),
        take(forget),
        take(retain),
        keys[i],
      )
      return sets_logits(p, take(sets))

    return jax.vmap(one)(loss_ids, lrs, seed_idx)

  return jax.jit(run)


def run_padded(
  run: Callable, size: int, loss_ids, lrs, seed_idx, per_seed: tuple
) -> dict[str, jax.Array]:
  """``run`` (from :func:`make_run`) on ``len(lrs) <= size`` runs, padded to
  ``size`` by repeating the last run; returns the first ``len(lrs)`` logits."""
  n = len(lrs)
  if not 1 <= n <= size:
    raise ValueError(f"need 1 to {size} runs, got {n}")
  pad = lambda v, dtype: jnp.asarray(list(v) + [v[-1]] * (size - n), dtype)
  logits = run(
    pad(loss_ids, jnp.int32),
    pad(lrs, jnp.float32),
    pad(seed_idx, jnp.int32),
    *per_seed,
  )
  return {k: v[:n] for k, v in logits.items()}
