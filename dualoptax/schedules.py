"""The alternating forget/retain schedule, for Python loops and ``lax.scan`` alike."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar, Union

import jax
import jax.numpy as jnp

T = TypeVar("T")
Step = Union[int, jax.Array]


def alternating_index(
  step: Step, forget_freq: int = 1, retain_freq: int = 5
) -> Step:
  r"""Index of the objective to step at 0-based global step ``step``.

  The authors alternate ``forget_freq`` steps of the first objective with
  ``retain_freq`` steps of the second (``docs/algorithm.md`` section 1.5):

  .. math:: \text{index}(s) = 0 \text{ if } s \bmod (f + r) < f \text{ else } 1.

  Args:
    step: a Python int (returns an int) or a traced integer (returns int32).
    forget_freq: consecutive steps of the first objective (>= 1).
    retain_freq: consecutive steps of the second objective (>= 1).

  Returns:
    0 or 1, of the same kind as ``step``.

  Examples:
    >>> [alternating_index(s, 1, 5) for s in range(7)]
    [0, 1, 1, 1, 1, 1, 0]
  """
  for name, value in (
    ("forget_freq", forget_freq),
    ("retain_freq", retain_freq),
  ):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  period = forget_freq + retain_freq
  if isinstance(step, int) and not isinstance(step, bool):
    if step < 0:
      raise ValueError(f"`step` must be >= 0, got {step}.")
    return 0 if step % period < forget_freq else 1
  step = jnp.asarray(step)
  if not jnp.issubdtype(step.dtype, jnp.integer):
    raise TypeError(f"`step` must be an integer, got dtype {step.dtype}.")
  return jnp.where(step % period < forget_freq, 0, 1).astype(jnp.int32)


def switch_objective(
  index: Step, objectives: Sequence[str], fn: Callable[[str], T]
) -> T:
  """Runs ``fn(objectives[index])`` for a Python or traced ``index``.

  With a traced index this is ``jax.lax.switch`` over one branch per objective, so a
  ``lax.scan`` step computes only the chosen objective's loss and gradient, and
  ``fn`` can call ``tx.update({name: grads}, ...)``: every branch returns the same
  state structure, since absent objectives keep their state.

  Args:
    index: which objective (Python int or traced integer).
    objectives: the names, in the optimizer's order.
    fn: called with one objective name; must return the same structure for all.

  Returns:
    ``fn``'s result for the selected objective.
  """
  objectives = tuple(objectives)
  if isinstance(index, int) and not isinstance(index, bool):
    return fn(objectives[index])
  branches = [lambda name=name: fn(name) for name in objectives]
  return jax.lax.switch(index, branches)
