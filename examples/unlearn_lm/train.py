r"""Jitted ``lax.scan`` training/unlearning chunks, mesh sharding and Orbax checkpoints.

A run is a sequence of *chunks*: one jitted function advances a :class:`TrainState`
by ``chunk_steps`` optimizer steps inside a :func:`jax.lax.scan`. Every minibatch is a
pure function of ``(seed, global step)``, so a run stopped after any chunk and resumed
from its checkpoint takes exactly the same steps as an uninterrupted one.

Unlearning follows the alternating schedule (``docs/algorithm.md``): at 0-based step ``s`` the forget
objective is active iff ``s mod (f + r) < f`` (``f = 1, r = 5`` by default); only the
active objective's loss and gradient are computed (``lax.switch``). A multi-objective
transform (DualOptim+, DualOptim) receives ``{name: grads}``; a plain optax transform
(Adam with one shared state) receives the gradient itself.

Sharding: on a mesh with axes ``data`` and ``fsdp`` every parameter and optimizer-state
array (8-bit codes and scales included) is split along its largest dimension divisible
by the ``fsdp`` size (FSDP / ZeRO-3 style; small arrays stay replicated), and every
minibatch is split along its batch dimension over both axes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dualoptax.schedules import alternating_index, switch_objective
from dualoptax.unlearning import losses
from unlearn_lm.cli import FORGET_LOSSES
from unlearn_lm.data import EncodedQA
from unlearn_lm.model import LanguageModel

__all__ = [
  "TrainState",
  "FORGET_LOSSES",
  "parse_mesh",
  "make_mesh",
  "array_spec",
  "tree_shardings",
  "place",
  "make_finetune_chunk",
  "alternating_step",
  "make_unlearn_chunk",
  "make_unlearn_sweep_chunk",
  "reference_sequence_nll",
  "save_pytree",
  "restore_pytree",
  "RunCheckpointer",
]


class TrainState(NamedTuple):
  """Carry of a training run.

  Attributes:
    step: int32 global step (number of optimizer steps taken).
    params: model parameters (pure dict).
    opt_state: optimizer state.
  """

  step: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------
# Mesh and sharding
# ---------------------------------------------------------------------------------------


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses ``"data=2,fsdp=4"`` into ``{"data": 2, "fsdp": 4}`` (missing axes get size 1)."""
  axes = {"data": 1, "fsdp": 1}
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
      f"mesh spec must be a string like 'data=2,fsdp=4', got {spec!r}."
    )
  for part in spec.split(","):
    name, sep, size = part.strip().partition("=")
    if not sep or name not in axes or not size.isdigit() or int(size) < 1:
      raise ValueError(
        f"Bad mesh spec {spec!r}: expected comma-separated 'data=N' and/or "
        f"'fsdp=M' with positive ints."
      )
    axes[name] = int(size)
  return axes


def make_mesh(axes: Mapping[str, int], devices: Optional[list] = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over the first ``data * fsdp`` devices."""
  devices = jax.devices() if devices is None else devices
  n = axes["data"] * axes["fsdp"]
  if n > len(devices):
    raise ValueError(
      f"The mesh {dict(axes)} needs {n} devices, but only {len(devices)} exist "
      f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
      f"before JAX starts)."
    )
  grid = np.asarray(devices[:n]).reshape(axes["data"], axes["fsdp"])
  return Mesh(grid, ("data", "fsdp"))


def array_spec(
  shape: tuple[int, ...], fsdp_size: int, min_size: int = 1024
) -> P:
  """Partition spec of one state array under FSDP.

  The first dimension other than the last one that ``fsdp_size`` divides goes to the
  ``fsdp`` axis; arrays without one, 1-D arrays and arrays under ``min_size`` elements
  stay replicated. The last dimension is never split, so 8-bit states (blocks laid along
  the last axis) keep the same block layout as on one device and need no collectives.
  """
  if (
    fsdp_size <= 1
    or len(shape) < 2
    or int(np.prod(shape, dtype=np.int64)) < min_size
  ):
    return P()
  for i in range(len(shape) - 1):
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """:class:`NamedSharding` for every array leaf of ``tree``.

  A leaf already laid out on ``mesh`` keeps its sharding (e.g. 8-bit codes that
  ``tx.init`` placed after the sharded parameters); any other leaf gets :func:`array_spec`.
  """
  fsdp = mesh.shape["fsdp"]

  def one(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return sharding
    return NamedSharding(mesh, array_spec(np.shape(x), fsdp))

  return jax.tree.map(one, tree)


def place(tree: Any, mesh: Optional[Mesh]) -> Any:
  """``device_put`` of ``tree`` with :func:`tree_shardings` (no-op without a mesh)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, tree_shardings(tree, mesh))


def _constrain_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
  if mesh is None:
    return batch
  spec = NamedSharding(mesh, P(("data", "fsdp")))
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, spec), batch
  )


def _jit_chunk(
  fn: Callable, state: TrainState, mesh: Optional[Mesh]
) -> Callable:
  if mesh is None:
    return jax.jit(fn, donate_argnums=0)
  shardings = tree_shardings(state, mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    fn,
    in_shardings=(shardings, replicated),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )


def _check_batch(batch_size: int, mesh: Optional[Mesh]) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(
      f"batch_size={batch_size} must be divisible by the mesh size {mesh.size}."
    )


# ---------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------


def _gather(enc: EncodedQA, idx: jax.Array) -> EncodedQA:
  return EncodedQA(*(x[idx] for x in enc))


def make_finetune_chunk(
  lm: LanguageModel,
  tx: optax.GradientTransformation,
  *,
  batch_size: int,
  seed: int,
  chunk_steps: int,
  mesh: Optional[Mesh] = None,
) -> Callable:
  r"""``chunk(state, data) -> (state, losses)``: ``chunk_steps`` steps of mean answer NLL.

  ``data`` is an :class:`EncodedQA`; step ``s`` draws ``batch_size`` rows uniformly with
  the key ``fold_in(key(seed), s)``. The function is jitted (the state is donated) and
  compiled on first call; with a mesh, state and batches are sharded.
  """
  _check_batch(batch_size, mesh)
  base = jax.random.key(seed)

  def chunk(state, data):
    n = data.inputs.shape[0]

    def step(state, _):
      idx = jax.random.randint(
        jax.random.fold_in(base, state.step), (batch_size,), 0, n
      )
      b = _constrain_batch(_gather(data, idx), mesh)
      loss, grads = jax.value_and_grad(
        lambda p: losses.mean_token_nll(
          lm.apply(p, b.inputs), b.targets, b.mask
        )
      )(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(state.step + 1, params, opt_state), loss

    return jax.lax.scan(step, state, None, length=chunk_steps)

  cache = {}

  def run(state: TrainState, data: EncodedQA):
    if "fn" not in cache:
      cache["fn"] = _jit_chunk(chunk, state, mesh)
    return cache["fn"](state, data)

  return run


def alternating_step(
  params: Any,
  opt_state: Any,
  step: jax.Array,
  tx: optax.GradientTransformation,
  loss_fn: Callable[[str, Any], jax.Array],
  objectives: tuple[str, str],
  *,
  forget_freq: int,
  retain_freq: int,
  multi_objective: bool,
) -> tuple[Any, Any, jax.Array, jax.Array]:
  """One step of the alternating schedule at global step ``step`` (traced).

  Only the active objective's ``loss_fn(name, params)`` and gradient are
  computed (:func:`dualoptax.switch_objective`). A multi-objective transform
  gets ``{name: grads}``, a plain optax transform the gradient itself.

  Returns:
    ``(params, opt_state, loss, index)``: the loss before the step, and
    ``index`` 0 for the first objective, 1 for the second.
  """

  def run(name):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(name, p))(params)
    updates, new_state = tx.update(
      {name: grads} if multi_objective else grads, opt_state, params
    )
    return optax.apply_updates(params, updates), new_state, loss

  index = alternating_index(step, forget_freq, retain_freq)
  new_params, new_state, loss = switch_objective(index, objectives, run)
  return new_params, new_state, loss, index


def _unlearn_step_fn(
  lm: LanguageModel,
  tx: optax.GradientTransformation,
  *,
  multi_objective: bool,
  forget_loss: str,
  batch_size: int,
  forget_freq: int,
  retain_freq: int,
  npo_beta: float,
  objectives: tuple[str, str],
  mesh: Optional[Mesh],
) -> Callable:
  """``step(state, data, base_key) -> (state, (loss, index))``: one alternating step."""
  if forget_loss not in FORGET_LOSSES:
    raise ValueError(
      f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}."
    )
  _check_batch(batch_size, mesh)
  alternating_index(0, forget_freq, retain_freq)  # validates the schedule early
  forget_name, retain_name = objectives

  def objective_loss(name, params, data, key):
    if name == forget_name:
      n = data["forget"].inputs.shape[0]
      idx = jax.random.randint(key, (batch_size,), 0, n)
      b = _constrain_batch(_gather(data["forget"], idx), mesh)
      logits = lm.apply(params, b.inputs)
      if forget_loss == "npo":
        return losses.npo_loss(
          logits, b.targets, b.mask, data["ref_nll"][idx], beta=npo_beta
        )
      if forget_loss == "ga":
        return losses.ga_loss(logits, b.targets, b.mask)
      return losses.me_loss(logits, b.mask)
    n = data["retain"].inputs.shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    b = _constrain_batch(_gather(data["retain"], idx), mesh)
    return losses.gd_loss(lm.apply(params, b.inputs), b.targets, b.mask)

  def step(state, data, base_key):
    key = jax.random.fold_in(base_key, state.step)
    params, opt_state, loss, index = alternating_step(
      state.params,
      state.opt_state,
      state.step,
      tx,
      lambda name, p: objective_loss(name, p, data, key),
      objectives,
      forget_freq=forget_freq,
      retain_freq=retain_freq,
      multi_objective=multi_objective,
    )
    return TrainState(state.step + 1, params, opt_state), (loss, index)

  return step


def make_unlearn_chunk(
  lm: LanguageModel,
  tx: optax.GradientTransformation,
  *,
  multi_objective: bool,
  forget_loss: str = "npo",
  batch_size: int,
  seed: int,
  chunk_steps: int,
  forget_freq: int = 1,
  retain_freq: int = 5,
  npo_beta: float = 0.1,
  objectives: tuple[str, str] = ("forget", "retain"),
  mesh: Optional[Mesh] = None,
) -> Callable:
  r"""``chunk(state, data) -> (state, (losses, index))``: alternating unlearning steps.

  ``data`` is ``{"forget": EncodedQA, "retain": EncodedQA, "ref_nll": [N_forget]}``
  (``ref_nll``: summed answer NLL of the frozen fine-tuned model, used by NPO).
  Objective losses (:mod:`dualoptax.unlearning.losses`): forget ``npo`` (β = ``npo_beta``), ``ga`` or ``me``;
  retain GD (mean answer NLL). ``index[s]`` is 0 for a forget step and 1 for a retain step.
  Step ``s`` draws its batch with the key ``fold_in(key(seed), s)``.

  Args:
    lm: the model.
    tx: a multi-objective dualoptax transform (``multi_objective=True``) or any optax
      transform sharing one state (``multi_objective=False``).
    multi_objective: see above.
    forget_loss: ``"npo"``, ``"ga"`` or ``"me"``.
    batch_size: rows per step (divisible by the mesh size).
    seed: batch-sampling seed.
    chunk_steps: steps per call.
    forget_freq, retain_freq: the alternating schedule.
    npo_beta: NPO's β.
    objectives: names of the two objectives, in schedule order.
    mesh: optional ``(data, fsdp)`` mesh.
  """
  step = _unlearn_step_fn(
    lm,
    tx,
    multi_objective=multi_objective,
    forget_loss=forget_loss,
    batch_size=batch_size,
    forget_freq=forget_freq,
    retain_freq=retain_freq,
    npo_beta=npo_beta,
    objectives=objectives,
    mesh=mesh,
  )
  base = jax.random.key(seed)

  def chunk(state, data):
    return jax.lax.scan(
      lambda s, _: step(s, data, base), state, None, length=chunk_steps
    )

  cache = {}

  def run(state: TrainState, data: Mapping[str, Any]):
    if "fn" not in cache:
      cache["fn"] = _jit_chunk(chunk, state, mesh)
    return cache["fn"](state, data)

  return run


def make_unlearn_sweep_chunk(
  lm: LanguageModel,
  tx: optax.GradientTransformation,
  *,
  multi_objective: bool,
  forget_loss: str = "npo",
  batch_size: int,
  chunk_steps: int,
  forget_freq: int = 1,
  retain_freq: int = 5,
  npo_beta: float = 0.1,
  objectives: tuple[str, str] = ("forget", "retain"),
) -> Callable:
  r"""``chunk(states, seeds, data) -> (states, (losses, index))``: the chunk of
  :func:`make_unlearn_chunk` for a stack of runs at once, ``vmap``-ed.

  ``states`` is a :class:`TrainState` whose ``params`` and ``opt_state`` have a
  leading *member* axis (e.g. one member per learning rate and seed: give ``tx``
  its learning rate through ``optax.inject_hyperparams`` so each member's state
  holds its own) and whose ``step`` is one scalar shared by all (a batched step
  would turn the schedule's ``lax.switch`` into computing both objectives);
  ``seeds[i]`` (int32) is member ``i``'s batch-sampling seed. Member ``i``
  takes exactly the steps of ``make_unlearn_chunk(..., seed=seeds[i])``.
  Jitted, the states donated; one device.
  """
  step = _unlearn_step_fn(
    lm,
    tx,
    multi_objective=multi_objective,
    forget_loss=forget_loss,
    batch_size=batch_size,
    forget_freq=forget_freq,
    retain_freq=retain_freq,
    npo_beta=npo_beta,
    objectives=objectives,
    mesh=None,
  )

  def member(state, seed, data):
    base = jax.random.key(seed)
    return jax.lax.scan(
      lambda s, _: step(s, data, base), state, None, length=chunk_steps
    )

  axes = TrainState(None, 0, 0)
  return jax.jit(
    jax.vmap(member, in_axes=(axes, 0, None), out_axes=(axes, 0)),
    donate_argnums=0,
  )


def reference_sequence_nll(
  lm: LanguageModel, params: Any, enc: EncodedQA
) -> jax.Array:
  """Summed answer NLL of every row of ``enc`` under ``params`` (NPO's frozen reference)."""
  logits = jax.jit(lm.apply)(params, jnp.asarray(enc.inputs))
  return losses.sequence_nll(
    logits, jnp.asarray(enc.targets), jnp.asarray(enc.mask)
  )


# ---------------------------------------------------------------------------------------
# Orbax checkpoints
# ---------------------------------------------------------------------------------------


def _abstract(tree: Any) -> Any:
  import orbax.checkpoint as ocp

  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_pytree(directory: str, tree: Any) -> None:
  """Saves ``tree`` with Orbax (written to a temporary name, then renamed: atomic)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree)


def restore_pytree(directory: str, like: Any) -> Any:
  """Restores a tree saved by :func:`save_pytree` into the structure, dtypes and
  shardings of ``like`` (concrete or abstract; NamedTuples come back as NamedTuples)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), _abstract(like))


class RunCheckpointer:
  """Checkpoints of one unlearning run: the :class:`TrainState` plus a JSON history.

  Wraps ``orbax.checkpoint.CheckpointManager`` (keeps the ``max_to_keep`` latest steps).

  Args:
    directory: where the step folders go.
    max_to_keep: how many checkpoints to keep.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, history: Any) -> None:
    ocp = self._ocp
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
      ),
    )
    self.manager.wait_until_finished()

  def restore(self, step: int, like: TrainState) -> tuple[TrainState, Any]:
    ocp = self._ocp
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like)),
        history=ocp.args.JsonRestore(),
      ),
    )
    return out["state"], out["history"]

  def close(self) -> None:
    self.manager.close()
