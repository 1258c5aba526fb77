"""Training runs of every method, each one jitted ``lax.scan``.

A run trains the shared-trunk model for a fixed number of steps on the same
mini-batches for every method (drawn from the seed's key), then scores it.
:func:`make_run` returns one compiled program per method that trains every
(learning rate, seed) pair at once (``vmap`` over both).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import dualoptax
from multitask_digits import data as D
from multitask_digits import model as M

METHODS = {
  "adam_sum": "Adam (summed loss)",
  "dual_optim": "DualOptim",
  "dual_optim_plus": "DualOptim+",
  "dual_optim_plus_alt": "DualOptim+ alternating",
  "pcgrad": "PCGrad + Adam",
  "mgda": "MGDA + Adam",
  "cagrad": "CAGrad + Adam",
}
BETAS = dict(b1=0.9, b2=0.95)  # every optimizer alike (DualOptim+'s defaults)


def _task_losses(params, x, y, tasks: Sequence[str]) -> jax.Array:
  """Mean cross-entropy of each task on the batch, ``[len(tasks)]``."""
  logits = M.apply(params, x)
  return jnp.stack(
    [
      optax.softmax_cross_entropy_with_integer_labels(logits[t], y[t]).mean()
      for t in tasks
    ]
  )


def _optimizer(
  method: str, lr: jax.Array, key: jax.Array
) -> optax.GradientTransformation:
  tasks = D.TASKS
  if method in ("single", "adam_sum"):
    return optax.adam(lr, **BETAS)
  if method == "dual_optim":
    return dualoptax.dual_optim(lr, objectives=tasks, **BETAS)
  if method in ("dual_optim_plus", "dual_optim_plus_alt"):
    return dualoptax.dual_optim_plus(lr, objectives=tasks, **BETAS)
  first = {
    "pcgrad": lambda: dualoptax.pcgrad(tasks, key=key),
    "mgda": lambda: dualoptax.mgda(tasks),
    "cagrad": lambda: dualoptax.cagrad(tasks, c=0.5),
  }[method]()
  return optax.chain(first, optax.adam(lr, **BETAS))


def _step_fn(
  method: str, tx, tasks: Sequence[str], task_weights: jax.Array
) -> Callable:
  """``(params, state, x, y, step) -> (params, state)`` for one method."""
  if method in ("single", "adam_sum"):  # one gradient of the weighted sum

    def step(params, state, x, y, s):
      del s
      g = jax.grad(lambda p: _task_losses(p, x, y, tasks) @ task_weights)(
        params
      )
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state
  elif method == "dual_optim_plus_alt":  # one task per step, round-robin

    def step(params, state, x, y, s):
      def one(task):
        g = jax.grad(lambda p: _task_losses(p, x, y, (task,))[0])(params)
        return tx.update({task: g}, state, params)

      updates, state = dualoptax.switch_objective(s % len(tasks), tasks, one)
      return optax.apply_updates(params, updates), state
  else:  # every task's own gradient, in one call

    def step(params, state, x, y, s):
      del s
      jac = jax.jacrev(lambda p: _task_losses(p, x, y, tasks))(params)
      grads = {
        t: jax.tree.map(lambda a, i=i: a[i], jac) for i, t in enumerate(tasks)
      }
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

  return step


def make_run(
  method: str, steps: int, batch: int, hidden: Sequence[int]
) -> Callable:
  """A jitted ``run(lrs [L], keys [S], x, y)`` that trains every pair.

  Args:
    method: a key of :data:`METHODS`, or ``"single"``: Adam on each task
      alone (a leading task axis is added to the output).
    steps: optimizer steps of every run.
    batch: mini-batch size (every task sees the same batch).
    hidden: trunk widths.

  Returns:
    The compiled program, taking the learning-rate grid, the seeds' keys and
    the training split (``x [N, 8, 16]``, ``y {task: [N]}``) and returning
    params ``[L, S, ...]`` (``[K, L, S, ...]`` for ``"single"``). Seed ``s``
    of every method starts from the same initialization and draws the same
    mini-batches.
  """
  tasks = D.TASKS

  def one(lr, key, x_all, y_all, task_weights):
    init_key, batch_key = jax.random.split(key)
    params = M.init(init_key, D.NUM_CLASSES, hidden)
    tx = _optimizer(method, lr, jax.random.fold_in(key, 1))
    step = _step_fn(method, tx, tasks, task_weights)

    def body(carry, s):
      params, state = carry
      idx = jax.random.randint(
        jax.random.fold_in(batch_key, s), (batch,), 0, x_all.shape[0]
      )
      y = {t: y_all[t][idx] for t in tasks}
      return step(params, state, x_all[idx], y, s), None

    (params, _), _ = jax.lax.scan(
      body, (params, tx.init(params)), jnp.arange(steps)
    )
    return params

  grid = jax.vmap(
    jax.vmap(one, (None, 0, None, None, None)), (0, None, None, None, None)
  )
  if method == "single":  # one-hot task weights: each task trained alone
    eye = jnp.eye(len(tasks))
    return jax.jit(
      lambda lrs, keys, x, y: jax.vmap(grid, (None, None, None, None, 0))(
        lrs, keys, x, y, eye
      )
    )
  ones = jnp.ones(len(tasks))
  return jax.jit(lambda lrs, keys, x, y: grid(lrs, keys, x, y, ones))


@jax.jit
def accuracies(params, x: jax.Array, y: dict) -> jax.Array:
  """Per-task accuracy ``[L, S, K]`` of a ``[L, S]`` grid of models."""

  def one(p):
    logits = M.apply(p, x)
    return jnp.stack([(logits[t].argmax(-1) == y[t]).mean() for t in D.TASKS])

  return jax.vmap(jax.vmap(one))(params)
