r"""The digits job's jitted training and unlearning loops, each one ``lax.scan``.

Everything here is a pure function of arrays, so a whole run (every step) compiles to one
XLA program and can be ``vmap``-ed over seeds and over hyperparameters passed as traced
arrays (e.g. a learning-rate grid).

The pieces:

* :func:`sample_batch` — a ``BatchFn`` drawing a random minibatch from in-memory arrays.
* :func:`summed_scan` — one optimizer step per iteration on :math:`\sum_k w_k L_k`
  (ordinary training with one objective; the usual "Adam on the summed loss" unlearning
  baseline with two).
* :func:`alternating_step` — one step of the alternating schedule below.
* :func:`alternating_scan` — the alternating schedule (``docs/algorithm.md``):
  ``forget_freq`` steps of the first objective, then ``retain_freq`` steps of the
  second, repeat; each step computes only the active objective's loss on its own batch. Works with a multi-objective transform
  (``dualoptax.dual_optim_plus``, ``dual_optim``: updates take ``{name: grads}``) and with
  a plain optax transform sharing one state across objectives (then ``step_scales``
  gives each objective its own learning rate).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from dualoptax.schedules import alternating_index, switch_objective

__all__ = [
  "sample_batch",
  "summed_scan",
  "alternating_step",
  "alternating_scan",
]

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
BatchFn = Callable[[jax.Array], Batch]


def sample_batch(
  data: Any, batch_size: int, size: Optional[Any] = None
) -> BatchFn:
  r"""A ``BatchFn``: ``key -> batch`` of ``batch_size`` rows drawn uniformly with replacement.

  Args:
    data: a pytree of arrays sharing the leading dimension ``N`` (e.g. ``(x, y)``).
    batch_size: rows per batch, >= 1.
    size: draw from the first ``size`` rows only (an int or a traced integer, so
      datasets of different sizes padded to one ``N`` share a compiled program);
      default ``N``.

  Returns:
    ``fn(key)`` returning the same pytree with leading dimension ``batch_size``.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(data)}
  if len(sizes) != 1:
    raise ValueError(
      f"data leaves must share the leading dimension, got sizes {sorted(sizes)}."
    )
  (n,) = sizes
  if size is not None:
    if isinstance(size, int) and not 1 <= size <= n:
      raise ValueError(f"size must lie in [1, {n}], got {size}.")
    n = size

  def fn(key: jax.Array) -> Batch:
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda x: x[idx], data)

  return fn


def _check_steps(num_steps: int) -> None:
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")


def _check_objectives(
  loss_fns: Mapping[str, LossFn], batch_fns: Mapping[str, BatchFn]
) -> tuple:
  names = tuple(loss_fns)
  if not names:
    raise ValueError("loss_fns must name at least one objective.")
  if set(batch_fns) != set(names):
    raise ValueError(
      f"batch_fns must have the same keys as loss_fns {list(names)}, got {list(batch_fns)}."
    )
  return names


def summed_scan(
  params: Params,
  tx: optax.GradientTransformation,
  loss_fns: Mapping[str, LossFn],
  batch_fns: Mapping[str, BatchFn],
  key: jax.Array,
  num_steps: int,
  *,
  weights: Optional[Mapping[str, Any]] = None,
) -> tuple[Params, Any, jax.Array]:
  r"""``num_steps`` optimizer steps on the weighted sum of the objectives' losses.

  .. math::
      \theta \leftarrow \theta + \mathrm{tx}\Big(\nabla_\theta \sum_k w_k\,
      L_k(\theta; B_k)\Big), \qquad B_k \sim \text{batch\_fns}[k]

  Every objective draws a fresh batch every step. With one objective this is plain
  minibatch training.

  Args:
    params: initial parameters.
    tx: a plain (params-shaped) optax transformation, e.g. ``optax.adam(lr)``.
    loss_fns: objective name -> ``loss(params, batch)``.
    batch_fns: objective name -> ``batch(key)`` (see :func:`sample_batch`).
    key: PRNG key for the batches.
    num_steps: static number of steps.
    weights: objective name -> weight :math:`w_k` (float or traced scalar); default 1.

  Returns:
    ``(params, opt_state, losses)`` with ``losses`` the ``[num_steps]`` weighted sum
    before each step.
  """
  _check_steps(num_steps)
  names = _check_objectives(loss_fns, batch_fns)
  weights = {k: 1.0 for k in names} if weights is None else dict(weights)
  if set(weights) != set(names):
    raise ValueError(
      f"weights must have the keys {list(names)}, got {list(weights)}."
    )

  def total_loss(p, batches):
    return sum(weights[k] * loss_fns[k](p, batches[k]) for k in names)

  def step(carry, step_key):
    p, state = carry
    keys = jax.random.split(step_key, len(names))
    batches = {k: batch_fns[k](kk) for k, kk in zip(names, keys)}
    loss, grads = jax.value_and_grad(total_loss)(p, batches)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), loss

  (params, state), losses = jax.lax.scan(
    step, (params, tx.init(params)), jax.random.split(key, num_steps)
  )
  return params, state, losses


def alternating_step(
  params: Params,
  opt_state: Any,
  step: Any,
  tx: optax.GradientTransformation,
  loss_fn: Callable[[str, Params], jax.Array],
  objectives: tuple[str, str],
  *,
  forget_freq: int = 1,
  retain_freq: int = 5,
  multi_objective: bool = True,
  step_scales: Optional[Mapping[str, Any]] = None,
) -> tuple[Params, Any, jax.Array, jax.Array]:
  r"""One step of the alternating schedule at global step ``step``.

  Picks the objective with :func:`dualoptax.alternating_index` (Python or traced
  ``step``), computes only ``loss_fn(name, params)`` and its gradient, and applies
  ``tx``: ``tx.update({name: grads}, ...)`` when ``multi_objective``, else
  ``tx.update(grads, ...)`` on a shared state with the update multiplied by
  ``step_scales[name]`` (when given).

  Returns:
    ``(params, opt_state, loss, index)``: ``loss`` before the step, ``index`` 0 for
    the first objective and 1 for the second.
  """

  def run(name):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(name, p))(params)
    if multi_objective:
      updates, new_state = tx.update({name: grads}, opt_state, params)
    else:
      updates, new_state = tx.update(grads, opt_state, params)
      if step_scales is not None:
        updates = jax.tree.map(lambda u: step_scales[name] * u, updates)
    return optax.apply_updates(params, updates), new_state, loss

  index = alternating_index(step, forget_freq, retain_freq)
  params, opt_state, loss = switch_objective(index, objectives, run)
  return params, opt_state, loss, index


def alternating_scan(
  params: Params,
  tx: optax.GradientTransformation,
  loss_fns: Mapping[str, LossFn],
  batch_fns: Mapping[str, BatchFn],
  key: jax.Array,
  num_steps: int,
  *,
  forget_freq: int = 1,
  retain_freq: int = 5,
  multi_objective: bool = True,
  step_scales: Optional[Mapping[str, Any]] = None,
) -> tuple[Params, Any, jax.Array]:
  r"""The alternating unlearning loop as one ``lax.scan``.

  At 0-based step ``s`` the active objective is the first of ``loss_fns`` iff
  ``s mod (forget_freq + retain_freq) < forget_freq``, else the second
  (:func:`dualoptax.alternating_index`). Only that objective's loss and gradient are
  computed (``lax.switch`` on the step counter, which stays a real branch under
  ``vmap`` since the counter is never batched).

  * ``multi_objective=True``: ``tx.update({name: grads}, state, params)`` — DualOptim+,
    DualOptim or any transformation taking a gradient mapping. Per-objective learning
    rates belong to ``tx`` (``learning_rate={"forget": ..., "retain": ...}``).
  * ``multi_objective=False``: ``tx.update(grads, state, params)`` with one shared state
    (e.g. ``optax.adam(1.0)``), and the update is multiplied by ``step_scales[name]``,
    the active objective's learning rate.

  Args:
    params: initial parameters.
    tx: the transformation (see above).
    loss_fns: exactly two objectives, ``{forget_name: loss, retain_name: loss}`` in
      schedule order; ``loss(params, batch) -> scalar``.
    batch_fns: the same keys -> ``batch(key)``.
    key: PRNG key for the batches.
    num_steps: static number of steps.
    forget_freq, retain_freq: the schedule (1 and 5 in the authors' runs).
    multi_objective: whether ``tx`` takes a gradient mapping.
    step_scales: objective -> multiplier of that objective's updates (float or traced
      scalar); only with ``multi_objective=False``; default 1.

  Returns:
    ``(params, opt_state, losses)``; ``losses[s]`` is the active objective's loss
    before step ``s``.

  Examples:
    >>> import jax, jax.numpy as jnp, dualoptax
    >>> loss_fns = {"forget": lambda p, b: -jnp.sum((p - b) ** 2),
    ...             "retain": lambda p, b: jnp.sum((p - b) ** 2)}
    >>> batch_fns = {"forget": lambda k: jnp.ones(3), "retain": lambda k: jnp.zeros(3)}
    >>> tx = dualoptax.dual_optim_plus(1e-2)
    >>> p, state, losses = alternating_scan(jnp.zeros(3), tx, loss_fns, batch_fns,
    ...                                     jax.random.key(0), 12)
    >>> losses.shape
    (12,)
  """
  _check_steps(num_steps)
  names = _check_objectives(loss_fns, batch_fns)
  if len(names) != 2:
    raise ValueError(
      f"alternating_scan takes exactly two objectives, got {list(names)}."
    )
  if multi_objective and step_scales is not None:
    raise ValueError(
      "step_scales is for a shared-state transform (multi_objective=False); give a "
      "multi-objective transform per-objective learning rates instead."
    )
  scales = {k: 1.0 for k in names} if step_scales is None else dict(step_scales)
  if set(scales) != set(names):
    raise ValueError(
      f"step_scales must have the keys {list(names)}, got {list(scales)}."
    )
  alternating_index(
    0, forget_freq, retain_freq
  )  # validates the frequencies early

  def step(carry, xs):
    p, state = carry
    s, step_key = xs
    p, state, loss, _ = alternating_step(
      p,
      state,
      s,
      tx,
      lambda name, q: loss_fns[name](q, batch_fns[name](step_key)),
      names,
      forget_freq=forget_freq,
      retain_freq=retain_freq,
      multi_objective=multi_objective,
      step_scales=None if multi_objective else scales,
    )
    return (p, state), loss

  xs = (
    jnp.arange(num_steps, dtype=jnp.int32),
    jax.random.split(key, num_steps),
  )
  (params, state), losses = jax.lax.scan(step, (params, tx.init(params)), xs)
  return params, state, losses
