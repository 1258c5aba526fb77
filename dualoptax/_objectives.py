"""Shared plumbing for multi-objective transformations.

Validation of hyperparameters and of the per-objective gradient mapping, learning-rate
resolution, weight-decay masks and the non-finite guard. Everything here runs at trace
time on static information (names, tree structures, shapes, dtypes), so errors surface
before XLA sees the program.
"""

from __future__ import annotations

import collections.abc
import numbers
import sys
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
LearningRate = Union[ScalarOrSchedule, Mapping[str, ScalarOrSchedule]]
MaskOrFn = Union[Any, Callable[[optax.Params], Any], None]


def _concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a float when it is known at trace time, else None."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (jax.Array,)) or hasattr(value, "shape"):
    try:
      if getattr(value, "ndim", 0) == 0:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return None
  return None


def check_beta(name: str, value: Any) -> None:
  v = _concrete_float(value)
  if v is not None and not 0.0 <= v < 1.0:
    raise ValueError(f"`{name}` must lie in [0, 1), got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  v = _concrete_float(value)
  if v is not None and not v >= 0.0:  # also rejects NaN
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def decay_enabled(weight_decay: Any) -> bool:
  """Whether weight decay may be non-zero (a traced value counts as enabled)."""
  return _concrete_float(weight_decay) != 0.0


def check_hyperparameters(
  objectives: Sequence[str],
  betas: Mapping[str, Any],
  eps: Any,
  weight_decay: Any,
) -> tuple[str, ...]:
  """Validates the constructor arguments shared by the dual transformations."""
  objectives = check_objectives(objectives)
  for name, value in betas.items():
    check_beta(name, value)
  check_non_negative("eps", eps)
  check_non_negative("weight_decay", weight_decay)
  return objectives


def check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
  if isinstance(objectives, str):
    raise ValueError(
      "`objectives` must be a sequence of names, got the single string "
      f"{objectives!r}; write ({objectives!r},) for one objective."
    )
  objectives = tuple(objectives)
  if not objectives:
    raise ValueError("`objectives` must name at least one objective.")
  for name in objectives:
    if not isinstance(name, str) or not name:
      raise ValueError(f"`objectives` must be non-empty strings, got {name!r}.")
  dupes = sorted({n for n in objectives if objectives.count(n) > 1})
  if dupes:
    raise ValueError(f"`objectives` has duplicate names: {dupes}.")
  return objectives


def _injected_factory(depth: int = 6) -> Optional[str]:
  """The name of the optimizer factory ``optax.inject_hyperparams`` is calling
  (a frame above the caller's), or None when it is not."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  for _ in range(depth):
    if frame is None or frame.f_back is None:
      return None
    if frame.f_back.f_globals.get("__name__", "").startswith("optax.schedules"):
      return frame.f_code.co_name
    frame = frame.f_back
  return None


def resolve_learning_rates(
  learning_rate: LearningRate, objectives: tuple[str, ...]
) -> dict[str, ScalarOrSchedule]:
  """Maps each objective to its float or schedule, validating a mapping's keys."""
  if isinstance(learning_rate, collections.abc.Mapping):
    keys = set(learning_rate.keys())
    if keys != set(objectives):
      raise ValueError(
        "`learning_rate` mapping must have exactly the objectives as keys: "
        f"missing {sorted(set(objectives) - keys)}, "
        f"unknown {sorted(map(str, keys - set(objectives)))}."
      )
    lrs = {k: learning_rate[k] for k in objectives}
    # Under inject_hyperparams, injected values arrive as arrays; Python
    # numbers in a Mapping were left out of the injection.
    if (
      any(isinstance(v, numbers.Real) for v in lrs.values())
      and (factory := _injected_factory()) is not None
    ):
      names = ", ".join(f"{k}_lr" for k in objectives)
      args = ", ".join(f"{k!r}: {k}_lr" for k in objectives)
      warnings.warn(
        "A per-objective learning_rate Mapping under optax.inject_hyperparams "
        "is not injected (optax injects only numbers, arrays and schedules): "
        "it stays fixed and is absent from state.hyperparams. To inject the "
        "rates, make each one an argument of the factory: "
        f"optax.inject_hyperparams(lambda {names}: dualoptax.{factory}("
        f"{{{args}}}))(...).",
        UserWarning,
        stacklevel=2,
      )
  else:
    lrs = {k: learning_rate for k in objectives}
  for k, lr in lrs.items():
    if not callable(lr):
      check_non_negative(f"learning_rate[{k!r}]", lr)
  return lrs


def evaluate(lr: ScalarOrSchedule, count: jax.Array) -> Any:
  """Value of a float or schedule at ``count`` (step 0 first, as optax does).

  The counter is passed as JAX's default integer (int64 under ``jax_enable_x64``):
  optax schedules given an int32 counter compute in float32 even in float64 runs.
  """
  if not callable(lr):
    return lr
  return lr(count.astype(jax.dtypes.canonicalize_dtype(jnp.int64)))


def describe(tree: Any) -> str:
  """``'N leaves [path, ...]'``: a tree's size and first paths, for errors."""
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
  return f"{len(paths)} leaves [{shown}]"


def _last_key(path) -> Any:
  if not path:
    return None
  k = path[-1]
  return getattr(k, "key", getattr(k, "name", None))


def present_gradients(
  grads: Any,
  objectives: tuple[str, ...],
  reference: Any,
  reference_name: str = "the optimizer state's moments (the params' at init)",
) -> dict[str, Any]:
  """Validates the per-objective gradient mapping against ``reference``.

  Args:
    grads: a Mapping from objective name to a gradient pytree. ``None`` values mean
      "absent" (convenient when building the mapping programmatically).
    objectives: the transformation's objective names, in their canonical order.
    reference: a params-shaped tree (params, or a moment tree of the state).
    reference_name: what ``reference`` is, for error messages.

  Returns:
    A dict of the present objectives' gradients, in canonical objective order.
  """
  if not isinstance(grads, collections.abc.Mapping):
    raise TypeError(
      "DualOptim updates take a Mapping from objective name to gradients, e.g. "
      f"{{{objectives[0]!r}: grads}}; got {type(grads).__name__}. "
      "Transformations that assume params-shaped input (optax.MultiSteps, "
      "apply_if_finite, masked) cannot wrap it: see dualoptax.per_objective and "
      "dualoptax.accumulate_objectives."
    )
  unknown = [k for k in grads.keys() if k not in objectives]
  if unknown:
    hint = ""
    if len(unknown) == len(grads):
      hint = (
        f" If these are parameter names, wrap params-shaped gradients by "
        f"objective: {{{objectives[0]!r}: grads}}. Wrappers that pass "
        "params-shaped gradients on (optax.MultiSteps, apply_if_finite, "
        "masked) cannot wrap this optimizer: see "
        "dualoptax.accumulate_objectives and dualoptax.per_objective."
      )
    raise ValueError(
      f"Unknown objective(s) {sorted(map(str, unknown))}; this optimizer was built "
      f"for objectives {list(objectives)}.{hint}"
    )
  present = {
    k: grads[k] for k in objectives if k in grads and grads[k] is not None
  }
  if not present:
    raise ValueError(
      "The gradient mapping is empty: pass gradients for at least one of "
      f"{list(objectives)}."
    )
  ref_def = jax.tree.structure(reference)
  ref_leaves = jax.tree.leaves(reference)
  for name, g in present.items():
    g_def = jax.tree.structure(g)
    if g_def != ref_def:
      hint = ""
      if any(
        _last_key(p) in ("codes", "absmax")
        for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]
      ):
        hint = (
          " The expected leaves are the 8-bit state's codes/absmax: its "
          "QuantizedArray nodes were rebuilt as plain containers (by code that "
          "converted the state between steps)."
        )
      raise ValueError(
        f"Gradients for objective {name!r} do not match the tree structure of "
        f"{reference_name}: got {describe(g)}, expected {describe(reference)}."
        f"{hint}"
      )
    for (path, leaf), ref in zip(
      jax.tree_util.tree_flatten_with_path(g)[0], ref_leaves
    ):
      shape = jnp.shape(leaf)
      if shape != jnp.shape(ref):
        raise ValueError(
          f"Gradient for objective {name!r} at {jax.tree_util.keystr(path)} has "
          f"shape {shape}, expected {jnp.shape(ref)} (the params' shape)."
        )
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        raise TypeError(
          f"Gradient for objective {name!r} at {jax.tree_util.keystr(path)} has "
          f"dtype {jnp.result_type(leaf)}; gradients must be floating point."
        )
  return present


def all_finite(trees: Sequence[Any]) -> jax.Array:
  """One boolean: every element of every tree is finite.

  ``sum(x - x)`` is NaN exactly when ``x`` holds a NaN or Inf (and never
  overflows); unlike ``all(isfinite(x))`` it reduces in one fused pass without
  a boolean temporary. (``sum(x * 0)``, the same test, made XLA:CPU
  materialize an array of zeros the size of the largest leaf.)
  """
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.isfinite(nonfinite_sum(leaves))


def nonfinite_sum(leaves: Sequence[jax.Array]) -> jax.Array:
  """``sum(x - x)`` over ``leaves`` in float32: NaN exactly when one of them
  holds a NaN or Inf (see :func:`all_finite`)."""
  return sum(jnp.sum(x - x, dtype=jnp.float32) for x in leaves)


def decay_mask(mask: MaskOrFn, params: Any) -> list[bool]:
  """Per-leaf weight-decay switches (True: decay), as in ``optax.adamw``'s mask."""
  n = len(jax.tree.leaves(params))
  if mask is None:
    return [True] * n
  tree = mask(params) if callable(mask) else mask
  flags = jax.tree.leaves(tree)
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
      "`mask` must have the params' tree structure (a bool per leaf); got "
      f"{describe(tree)}, expected {describe(params)}."
    )
  if any(isinstance(f, jax.core.Tracer) for f in flags):
    raise TypeError("`mask` leaves must be Python bools, not traced arrays.")
  return [bool(f) for f in flags]
