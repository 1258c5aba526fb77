r"""8-bit optimizer state for any optax transformation.

:func:`quantize_state` wraps an optax ``GradientTransformation`` so that its large
floating-point state leaves live as block-wise 8-bit :class:`QuantizedArray` between
steps. Every update, inside the caller's ``jit``:

.. math::

  s \xleftarrow{\text{decode}} (c, a), \quad
  (u, s') = \mathrm{inner.update}(g, s, \theta), \quad
  (c', a') \xleftarrow{\text{encode}} s'

with the per-block ``absmax`` recomputed from :math:`s'` (bitsandbytes' scheme, no
stochastic rounding), one bounded chunk at a time (``dualoptax._chunked``). Leaves
the inner transformation returns unchanged (the moments of an objective absent from
a DualOptim+ call) keep their codes as they are, so an idle state does not drift.
The format is described in ``docs/algorithm.md`` (section 3).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptax import _chunked, _engine, _kernel, _sharding
from dualoptax import quantization as _q
from dualoptax.quantization import QuantizedArray

__all__ = ["quantize_state", "state_nbytes", "update_and_apply"]

SignedOverride = Union[None, bool, Callable[[str, Any], Optional[bool]]]
Exclude = Union[Sequence[str], Callable[[Any], Any], None]


# ---------------------------------------------------------------------------
# Which state leaves are non-negative (unsigned map): optax's second moments.
# ---------------------------------------------------------------------------
class _Tag(NamedTuple):
  """What the state's types say about one leaf (a Python leaf, not a pytree)."""

  nonneg: bool  # a second moment of optax's, never negative


def _optax_nonneg_fields() -> dict[type, frozenset]:
  table = {
    "ScaleByAdamState": ("nu",),
    "ScaleByAmsgradState": ("nu", "nu_max"),
    "ScaleByRmsState": ("nu",),
    "ScaleByBeliefState": ("nu",),
    "ScaleByAdaDeltaState": ("e_g", "e_x"),
    "ScaleByRssState": ("sum_of_squares",),
    "ScaleByAdanState": ("n",),
    "ScaleByAdamaxState": ("nu",),  # infinity norm, >= 0
  }
  out = {}
  for name, fields in table.items():
    cls = getattr(optax, name, None)
    if cls is not None:
      out[cls] = frozenset(fields)
  return out


_NONNEG_FIELDS = _optax_nonneg_fields()


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _tag_state(node, ctx: bool = False):
  """A tree shaped like ``node`` whose leaves are :class:`_Tag`."""
  if node is None:
    return None
  if _is_namedtuple(node):
    nonneg_fields = _NONNEG_FIELDS.get(type(node)) or frozenset(
      getattr(type(node), "nonnegative_fields", ())
    )
    return type(node)(
      *(
        _tag_state(getattr(node, field), ctx or field in nonneg_fields)
        for field in node._fields
      )
    )
  children, treedef = jax.tree_util.tree_flatten(
    node, is_leaf=lambda x: x is not node
  )
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # a leaf
    return _Tag(ctx)
  return treedef.unflatten([_tag_state(c, ctx) for c in children])


# ---------------------------------------------------------------------------
# Per-parameter opt-out.
# ---------------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_names(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def _contains(path: tuple[str, ...], part: tuple[str, ...]) -> bool:
  n = len(part)
  return any(path[i : i + n] == part for i in range(len(path) - n + 1))


def _excluded_param_paths(
  exclude: Exclude, params
) -> list[tuple[tuple[str, ...], tuple]]:
  """``[(param path names, shape)]`` of the parameters whose state stays unquantized."""
  if exclude is None:
    return []
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  entries = [(_path_names(p), tuple(np.shape(x))) for p, x in flat]
  if callable(exclude):
    mask = exclude(params)
    try:
      flags = jax.tree.structure(params).flatten_up_to(mask)
    except (ValueError, TypeError) as e:
      raise ValueError(
        "exclude: the callable must return a bool tree shaped like params"
      ) from e
    return [e for e, f in zip(entries, flags) if bool(f)]
  if isinstance(exclude, str):
    exclude = (exclude,)
  out = []
  for name in exclude:
    if not isinstance(name, str) or not name.strip("/"):
      raise ValueError(
        f"exclude: entries must be non-empty strings, got {name!r}"
      )
    part = tuple(name.strip("/").split("/"))
    hits = [e for e in entries if _contains(e[0], part)]
    if not hits:
      known = ", ".join("/".join(p) for p, _ in entries[:8])
      raise ValueError(
        f"exclude: no parameter named {name!r} (parameters: {known}"
        f"{', ...' if len(entries) > 8 else ''})"
      )
    out.extend(hits)
  return out


# ---------------------------------------------------------------------------
# Sharding: per-shard last dimension, and the specs of codes/absmax.
# ---------------------------------------------------------------------------
def _leaf_sharding(x):
  """The leaf's NamedSharding when known at init (concrete array or explicit mode)."""
  if isinstance(x, jax.core.Tracer):
    try:
      sharding = jax.typeof(x).sharding
    except Exception:  # pylint: disable=broad-except
      return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
      return None
    return sharding
  return getattr(x, "sharding", None)


def _local_last_dim(x, sharding) -> Optional[int]:
  if sharding is None or x.ndim == 0:
    return None
  try:
    return int(sharding.shard_shape(tuple(x.shape))[-1])
  except Exception:  # pylint: disable=broad-except
    return None


def _local_shape(x, sharding) -> Optional[tuple[int, ...]]:
  if sharding is None or x.ndim == 0:
    return None
  try:
    return tuple(int(d) for d in sharding.shard_shape(tuple(x.shape)))
  except Exception:  # pylint: disable=broad-except
    return None


def _place(q: QuantizedArray, sharding) -> QuantizedArray:
  """Gives codes and absmax the leaf's NamedSharding (same spec: blocks split the
  last axis, so the absmax of a shard's blocks lives on that shard)."""
  if not isinstance(sharding, jax.sharding.NamedSharding) or not q.shape:
    return q
  full = tuple(sharding.spec) + (None,) * (len(q.shape) - len(sharding.spec))
  codes_s = jax.sharding.NamedSharding(
    sharding.mesh, jax.sharding.PartitionSpec(*full)
  )
  # Blocks spanning trailing axes (rows > 1) span unsharded axes only: the
  # absmax [..., G] keeps the spec of the axes before the split one.
  absmax_s = jax.sharding.NamedSharding(
    sharding.mesh,
    jax.sharding.PartitionSpec(*full[: q.absmax.ndim - 1], None)
    if q.rows > 1
    else jax.sharding.PartitionSpec(*full),
  )
  if isinstance(q.codes, jax.core.Tracer):
    # Under explicit mesh axes the sharding is the arrays' type: resharded,
    # not constrained (which takes auto axes only).
    place = (
      jax.sharding.reshard
      if _sharding.on_explicit_mesh(sharding)
      else jax.lax.with_sharding_constraint
    )
    codes = place(q.codes, codes_s)
    absmax = place(q.absmax, absmax_s)
  else:
    codes = jax.device_put(q.codes, codes_s)
    absmax = jax.device_put(q.absmax, absmax_s)
  return QuantizedArray(
    codes, absmax, q.shape, q.dtype, q.signed, q.pad, q.block_size, q.rows
  )


# ---------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 2**22


def _check_min_size(min_size) -> int:
  if (
    isinstance(min_size, bool)
    or not isinstance(min_size, (int, np.integer))
    or min_size < 0
  ):
    raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
  return int(min_size)


def _check_chunk_size(chunk_size) -> Optional[int]:
  if chunk_size is None:
    return None
  if (
    isinstance(chunk_size, bool)
    or not isinstance(chunk_size, (int, np.integer))
    or chunk_size <= 0
  ):
    raise ValueError(
      f"chunk_size must be a positive int or None, got {chunk_size!r}"
    )
  return int(chunk_size)


def _is_q(x) -> bool:
  return isinstance(x, QuantizedArray)


def _is_variable(x) -> bool:
  """An nnx ``Variable`` (only if flax.nnx is loaded; dualoptax needs no flax)."""
  nnx = sys.modules.get("flax.nnx")
  variable = getattr(nnx, "Variable", None)
  return variable is not None and isinstance(x, variable)


def _requantize(x: jax.Array, like: QuantizedArray) -> QuantizedArray:
  return _q._quantize_with_layout(  # pylint: disable=protected-access
    x, like.signed, like.block_size, like.pad, like.rows
  )


def quantize_state(
  inner: optax.GradientTransformation,
  *,
  block_size: int = 256,
  min_size: int = 4096,
  exclude: Exclude = (),
  signed: SignedOverride = None,
  select: Optional[Callable[[str, Any], bool]] = None,
  chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
  reuse_gradient_buffers: bool = True,
  kernel: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps the floating-point state of ``inner`` in 8 bits between steps.

  Each floating state leaf with at least ``min_size`` elements is stored as a
  :class:`~dualoptax.QuantizedArray`: blocks of ``block_size`` values along the
  last axis, one float32 absmax and 256-level dynamic codes (bitsandbytes' map,
  exact nearest encoding). Each update decodes, runs ``inner.update`` in the
  leaf's own dtype and re-encodes with fresh absmax values:

  .. math::

    \hat s = \mathrm{code\_map}[c] \cdot a, \quad
    (u, s') = \mathrm{inner}(g, \hat s), \quad
    a' = \max_{\text{block}} |s'|, \quad
    c' = \operatorname{nearest}(s' / a').

  **Bounded step memory.** With ``chunk_size`` set (the default), the update is
  traced once and split by what depends on what: each parameter's gradients,
  state and update form a group. A group whose math is element-wise (Adam,
  AdamW, Lion, SGD with momentum, DualOptim(+), schedules,
  ``inject_hyperparams``, weight decay masks, ...) runs in strided chunks of
  rows (a ``lax.fori_loop`` that decodes a chunk, steps it, re-encodes it and
  writes codes and absmax back in place); groups of one shape and one set of
  equations (a model's layers) share a loop, their chunks stacked. A chunk
  holds at most ``chunk_size`` values where the leading axis splits that
  finely into whole rows of every shard (its chunk count divides
  ``rows / gcd(rows, devices)``); otherwise it holds as few as that allows: a
  ``(3, 2**24)`` leaf is 3 chunks of ``2**24`` values, and a ``(2, 5 * 10**7)``
  leaf on 8 devices is one chunk. At most one chunk of decoded moments
  exists at any time, on every backend. Codes, absmax and updates equal a whole-array
  step's up to float32 rounding (rarely, a code one step away at a code
  boundary). Math that is not
  element-wise per leaf — a global-norm clip or finiteness check inside
  ``inner``, per-leaf norms (LAMB, LARS), control flow, an array of a leaf's
  shape that ``inner``'s update closes over — stays correct: those
  leaves are decoded whole each step, with a warning. Put such transformations
  outside (``optax.chain(optax.clip_by_global_norm(1.0),
  quantize_state(optax.adam(1e-3)))``) to keep the bound. ``chunk_size=None``
  decodes the whole state at once. 1-d leaves are never split.

  Leaves the inner update returns unchanged (the moments of an objective absent
  from a DualOptim+ call) keep their codes as they are.

  A train step that calls :func:`update_and_apply` instead of ``update`` then
  ``optax.apply_updates`` gets the new params from the same loops or kernels,
  written in place: the update is never a params-sized array of its own.

  What stays as it is: integer and boolean leaves (counters), 0-d leaves,
  leaves with fewer than ``min_size`` elements, the state of parameters named
  in ``exclude``, leaves ``select`` rejects, and leaves whose shards cannot hold
  whole blocks (see :func:`dualoptax.quantization.block_layout`; a warning says
  so).

  The code map is chosen per leaf: unsigned (twice the resolution) for second
  moments known to be non-negative — optax's ``ScaleByAdamState.nu`` (adam,
  adamw, nadam, ...), AMSGrad, RMSProp, AdaBelief, AdaDelta, Adagrad, Adan,
  Adamax, and the fields a state NamedTuple class lists in its class attribute
  ``nonnegative_fields`` (any library's state can declare them this way;
  dualoptax's ``AdamMoments.nu`` and ``DualOptimPlusState.base_nu`` do) — and
  signed for everything else, unless ``signed`` says otherwise.

  Sharding: blocks run along the last axis (or, for a last axis shorter than
  ``block_size``, span the trailing axes where those are unsharded; see
  :func:`dualoptax.quantization.block_layout`) and never cross a shard. The block
  length is decided at ``init`` from each leaf's per-shard shape when the state
  carries a sharding (``init`` called on sharded parameters outside ``jit``);
  the codes have the parameter's shape and sharding and the absmax
  ``[..., n / b]`` the same partition spec. Chunks are strided rows whose count
  keeps every shard of the leading axis whole, so the update adds no
  collectives.

  Args:
    inner: any optax ``GradientTransformation`` (with or without extra args),
      including chains and ``inject_hyperparams``.
    block_size: values per block, a positive power of two (256 as bitsandbytes).
    min_size: leaves with fewer elements stay unquantized (bitsandbytes'
      ``min_8bit_size`` is 4096).
    exclude: parameters whose state stays at full precision (e.g. embeddings):
      a sequence of ``"/"``-separated names, each matching every parameter whose
      key path contains those keys consecutively (``"wte"`` matches
      ``params/wte/embedding``; a name matching nothing is a ``ValueError``), or
      a callable ``params -> bool tree`` (True = keep full precision).
    signed: the code map: ``True``/``False`` for every leaf, or a callable
      ``(state key path string, leaf) -> bool | None`` (None = the default).
    select: a callable ``(state key path string, leaf) -> bool``; only leaves
      it accepts are quantized (default: all).
    chunk_size: most values decoded at once per loop iteration where a
      leaf's leading axis splits that finely (see above; a positive int,
      stacked leaves share it), or None to decode the whole state at once.
    reuse_gradient_buffers: each chunked loop writes a leaf's update into a
      carry that starts as the leaf's gradient, read from it chunk by chunk
      before each chunk is overwritten. Where the gradients are computed in
      the same ``jit`` and dead after the update, XLA then writes the update
      into their buffers instead of new ones. Turn it off when this update
      runs under a ``lax.cond`` (``optax.apply_if_finite``) on gradients
      passed in from outside the ``jit``: XLA copies a conditional's operands,
      so there the reuse costs a gradient-sized copy. Measurements:
      ``benchmarks/RESULTS.md``.
    kernel: how each element-wise group runs with ``chunk_size`` set.
      ``"pallas"``: one fused Pallas kernel per leaf over tiles one block wide
      (decode, step, block absmax and encode in on-chip memory, codes and
      absmax written in place), compiled on TPU and interpreted elsewhere
      (slow: for tests); leaves whose layout the kernel does not take (1-d,
      padded, blocks not a multiple of 128 values, non-float32) keep the
      loops. A leaf whose state stays float32 (below ``min_size``,
      excluded) runs as one kernel over the whole leaf where it has at most
      16,384 values (per shard), 1-d or 2-d and not stored column-major
      on TPU; others are XLA ops as with ``"xla"``. ``"xla"``: ``lax.fori_loop`` over chunks, on every
      backend.
      ``"auto"`` (default): the kernels on TPU, the loops elsewhere. Under
      several devices a leaf whose arrays carry their sharding in their
      types (a mesh with explicit axes, ``jax.make_mesh``'s default) runs
      one kernel per shard (``jax.shard_map``, no collective); ``"auto"``
      keeps the loops for other leaves there (a custom call would gather
      sharded operands), ``"pallas"`` does not. The kernel updates state in
      place and never takes a gradient's buffer (``reuse_gradient_buffers``
      is the loops' switch). Under ``jax.vmap`` each kernel runs once per
      batch member; a step with kernels cannot be differentiated (the
      loops can).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s
    state with quantized leaves replaced by ``QuantizedArray`` pytrees.

  Raises:
    ValueError: ``block_size`` is not a positive power of two, ``min_size`` is
      negative, ``chunk_size`` is not positive, or an ``exclude`` name matches
      no parameter (at ``init``).

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = dualoptax.quantize_state(optax.adam(1e-3))
    >>> params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}
    >>> state = tx.init(params)
    >>> type(state[0].mu["w"]).__name__, type(state[0].mu["b"]).__name__
    ('QuantizedArray', 'ArrayImpl')
  """
  block_size = _q._check_block_size(block_size)  # pylint: disable=protected-access
  min_size = _check_min_size(min_size)
  if not isinstance(reuse_gradient_buffers, bool):
    raise ValueError(
      f"reuse_gradient_buffers must be a bool, got {reuse_gradient_buffers!r}"
    )
  chunk_size = _check_chunk_size(chunk_size)
  _engine.check_kernel(kernel)
  if not (signed is None or isinstance(signed, bool) or callable(signed)):
    raise ValueError(
      f"signed must be None, a bool or a callable, got {signed!r}"
    )
  if select is not None and not callable(select):
    raise ValueError(f"select must be None or a callable, got {select!r}")
  if not (
    exclude is None
    or callable(exclude)
    or isinstance(exclude, (str, list, tuple))
  ):
    raise ValueError(
      "exclude must be a sequence of parameter names or a callable, got "
      f"{exclude!r}"
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    excluded = _excluded_param_paths(exclude, params)
    state = inner.init(params)
    # The inner counters (e.g. optax's count) replicated over the params' mesh.
    state = jax.tree.map(
      lambda x: (
        _engine.replicated_like(x, params)
        if isinstance(x, jax.Array) and x.ndim == 0
        else x
      ),
      state,
    )
    tags = _tag_state(state)
    # A leaf wrapped in an nnx Variable (inner.init maps over nnx.state(model))
    # is quantized with its wrapper: a QuantizedArray *replaces* the Variable.
    # Inside it, nnx.Optimizer would rebuild the QuantizedArray as a State of
    # its data fields after the first update, losing the class.
    flat, treedef = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=_is_variable
    )
    tag_leaves = treedef.flatten_up_to(tags)
    out = []
    for (path, leaf), tag in zip(flat, tag_leaves):
      if _is_variable(leaf):
        inner_leaves = jax.tree_util.tree_flatten_with_path(leaf)[0]
        tag = jax.tree.leaves(tag, is_leaf=lambda t: isinstance(t, _Tag))
        if len(inner_leaves) == 1 and len(tag) == 1:
          ((inner_path, value),) = inner_leaves
          q = _maybe_quantize(path + inner_path, value, tag[0], excluded)
          out.append(q if _is_q(q) else leaf)
        else:
          out.append(leaf)
        continue
      out.append(_maybe_quantize(path, leaf, tag, excluded))
    return treedef.unflatten(out)

  def _maybe_quantize(path, leaf, tag, excluded):
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
      return leaf
    if (
      not jnp.issubdtype(leaf.dtype, jnp.floating)
      or leaf.ndim == 0
      or math.prod(leaf.shape) < max(min_size, 1)
    ):
      return leaf
    key = jax.tree_util.keystr(path)
    if select is not None and not select(key, leaf):
      return leaf
    names = _path_names(path)
    shape = tuple(leaf.shape)
    if any(
      s == shape and len(p) and names[-len(p) :] == p for p, s in excluded
    ):
      return leaf
    is_signed = not tag.nonneg
    if isinstance(signed, bool):
      is_signed = signed
    elif callable(signed):
      choice = signed(key, leaf)
      if choice is not None:
        is_signed = bool(choice)
    sharding = _leaf_sharding(leaf)
    local = _local_last_dim(leaf, sharding)
    layout = _q.block_layout(
      shape, block_size, local, local_shape=_local_shape(leaf, sharding)
    )
    if layout is None:
      warnings.warn(
        f"quantize_state: state leaf {key} of shape {shape} keeps "
        f"{leaf.dtype}: its shards (last axis {local}) cannot hold whole "
        f"blocks of {block_size} without a collective.",
        stacklevel=3,
      )
      return leaf
    q = _q._quantize_with_layout(jnp.asarray(leaf), is_signed, *layout)  # pylint: disable=protected-access
    return _place(q, sharding)

  def whole_update(updates, state, params, extra_args):
    leaves, treedef = jax.tree.flatten(state, is_leaf=_is_q)
    decoded = [_q.dequantize_blockwise(x) if _is_q(x) else x for x in leaves]
    updates, new_inner = inner.update(
      updates, treedef.unflatten(decoded), params, **extra_args
    )
    new_leaves = _state_leaves(new_inner, treedef)
    out = []
    for old, dec, new in zip(leaves, decoded, new_leaves):
      if not _is_q(old):
        out.append(new)
      elif new is dec:
        out.append(old)  # untouched by this call: keep the codes (no drift)
      else:
        out.append(_requantize(new, old))
    return updates, treedef.unflatten(out)

  def update_fn(updates, state, params=None, **extra_args):
    keep = extra_args.pop(KEEP_IF, None)
    apply = extra_args.pop(APPLY, False)
    st_leaves, st_def = jax.tree.flatten(state, is_leaf=_is_q)
    if chunk_size is None or not any(_is_q(x) for x in st_leaves):
      new_u, new_s = whole_update(updates, state, params, extra_args)
      if apply:
        new_u = optax.apply_updates(params, new_u)
      if keep is None:
        return new_u, new_s
      new_leaves = st_def.flatten_up_to(new_s)
      # Skipped: the params as they were, or a zero update.
      old = params if apply else jax.tree.map(lambda _: None, new_u)
      return jax.tree.map(
        lambda u, o: _chunked._kept(keep, u, o),  # pylint: disable=protected-access
        new_u,
        old,
        is_leaf=lambda x: x is None,
      ), st_def.unflatten(
        [
          _chunked._kept(keep, new, old)  # pylint: disable=protected-access
          for new, old in zip(new_leaves, st_leaves)
        ]
      )
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves, p_def = jax.tree.flatten(params)
    e_leaves, e_def = jax.tree.flatten(extra_args)
    n_s, n_u, n_p = len(st_leaves), len(u_leaves), len(p_leaves)
    out_def = []

    def flat_update(*xs):
      upd = u_def.unflatten(xs[:n_u])
      st = st_def.unflatten(xs[n_u : n_u + n_s])
      prm = p_def.unflatten(xs[n_u + n_s : n_u + n_s + n_p])
      ext = e_def.unflatten(xs[n_u + n_s + n_p :])
      # Traced to be run in chunks or kernels of this module's own: the
      # inner step as element-wise operations.
      new_u, new_s = inner.update(
        upd, st, prm, **ext, **{_engine.ELEMENTWISE: True}
      )
      if apply:  # the new params, which then replace the params in place
        new_u = optax.apply_updates(prm, new_u)
      new_u_leaves, u_out_def = jax.tree.flatten(new_u)
      out_def[:] = [u_out_def]
      return _state_leaves(new_s, st_def) + new_u_leaves

    def describe(i):  # for warnings only: the key path of input ``i``
      flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)[0]
      return "state" + jax.tree_util.keystr(flat[i - n_u][0])

    params_in = range(n_u + n_s, n_u + n_s + n_p)
    slots = {s: n_u + s for s in range(n_s)}
    if apply:  # each new param is the new value of its param, as state is
      slots.update({n_s + k: i for k, i in enumerate(params_in)})
    results = _chunked.apply_in_chunks(
      flat_update,
      u_leaves + st_leaves + p_leaves + e_leaves,
      slots,
      chunk_size=chunk_size,
      describe=describe,
      reusable=frozenset(
        range(n_u) if reuse_gradient_buffers and not apply else ()
      ),
      kernel=kernel
      if use_kernel(kernel, next(iter(u_leaves), None))
      else "xla",
      keep=keep,
      reread=frozenset(() if apply else params_in),
    )
    return out_def[0].unflatten(results[n_s:]), st_def.unflatten(results[:n_s])

  return optax.GradientTransformationExtraArgs(init_fn, applies(update_fn))


KERNELS = _engine.KERNELS
# An extra argument of the update, for dualoptax's own non-finite guard: a
# traced bool; where False the call changes nothing (zero update, every state
# leaf as it was, 8-bit codes bit for bit), without a conditional. Not passed
# to the inner transformation.
KEEP_IF = "_dualoptax_keep_if"
# An extra argument of an update marked by :func:`applies`: True asks it for
# the new params instead of the update (see :func:`update_and_apply`).
APPLY = _engine.APPLY
_APPLIES = "dualoptax_applies_updates"


def applies(update_fn: Callable) -> Callable:
  """Marks ``update_fn`` as taking the :data:`APPLY` extra argument."""
  setattr(update_fn, _APPLIES, True)
  return update_fn


def update_and_apply(
  tx: optax.GradientTransformation,
  updates: Any,
  state: Any,
  params: Any,
  **extra_args: Any,
) -> tuple[Any, Any]:
  r"""One optimizer step: the new params and state.

  .. math::

    (u, s') = \mathrm{tx.update}(g, s, \theta), \quad \theta' = \theta + u

  The same as ``tx.update`` followed by ``optax.apply_updates`` for any
  transformation. Where ``tx`` is :func:`quantize_state`,
  :func:`~dualoptax.dual_optim_plus_8bit`, :func:`~dualoptax.dual_optim_plus`
  or :func:`~dualoptax.dual_optim` itself (not wrapped or chained), the
  addition joins the update: each leaf's fused kernel (or loop) writes
  :math:`\theta'` over :math:`\theta` in place, and the update is never an
  array of its own. With params and state donated to the ``jit``, the step
  then needs no params-sized temporary and reads the params once.

  Args:
    tx: an optax transformation.
    updates: its gradients (a mapping of them for DualOptim+).
    state: its state.
    params: the params, which the step replaces.
    **extra_args: passed to ``tx.update``.

  Returns:
    ``(new_params, new_state)``.

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = dualoptax.quantize_state(optax.adam(1e-3))
    >>> params = {"w": jnp.ones((64, 256))}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((64, 256))}
    >>> params, state = dualoptax.update_and_apply(tx, grads, state, params)
    >>> round(float(params["w"][0, 0]), 4)
    0.999
  """
  if params is None:
    raise ValueError("update_and_apply: params are required (it returns them)")
  if getattr(tx.update, _APPLIES, False):
    return tx.update(updates, state, params, **extra_args, **{APPLY: True})
  new_updates, new_state = tx.update(updates, state, params, **extra_args)
  return optax.apply_updates(params, new_updates), new_state


def use_kernel(kernel: str, like: Any = None) -> bool:
  """Whether the chunked step may run fused Pallas kernels (decided when the
  update is traced): ``"pallas"`` always; ``"auto"`` on TPU, where ``like``
  (a gradient leaf) lives on one device or carries its sharding in its type
  (explicit mesh axes: a kernel per shard). Under several devices with auto
  axes the step keeps the loops (a kernel would gather sharded operands).
  Which leaves take a kernel: ``_chunked._run_kernels``."""
  if kernel == "auto":
    return _kernel.on_tpu() and (
      like is None
      or _sharding.explicit(like) is not None
      or not _sharding.several_devices(like)
    )
  return kernel == "pallas"


def _state_leaves(new_inner, treedef) -> list:
  new_leaves, new_treedef = jax.tree.flatten(new_inner)
  if new_treedef != treedef:
    raise ValueError(
      "quantize_state: the inner transformation changed its state structure "
      f"from {treedef} to {new_treedef}"
    )
  return new_leaves


def shape_tree(tree: Any) -> Any:
  """``tree`` with each :class:`QuantizedArray` replaced by the
  ``jax.ShapeDtypeStruct`` of the array it stands for."""
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _is_q(x) else x
    ),
    tree,
    is_leaf=_is_q,
  )


def state_nbytes(state: Any) -> int:
  """Bytes held by an optimizer state (arrays or ``jax.ShapeDtypeStruct``s).

  Works on the output of ``jax.eval_shape(tx.init, params)``, so the memory of a
  large model's state can be measured without allocating it.
  """
  return sum(
    int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(state)
  )
