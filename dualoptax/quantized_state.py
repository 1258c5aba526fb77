r"""8-bit optimizer state for any optax transformation, and DualOptim+ 8bit.

:func:`quantize_state` wraps an optax ``GradientTransformation`` so that its large
floating-point state leaves live as block-wise 8-bit :class:`QuantizedArray` between
steps. Every update, inside the caller's ``jit``:

.. math::

  s \xleftarrow{\text{decode}} (c, a), \quad
  (u, s') = \mathrm{inner.update}(g, s, \theta), \quad
  (c', a') \xleftarrow{\text{encode}} s'

with the per-block ``absmax`` recomputed from :math:`s'` (bitsandbytes' scheme, no
stochastic rounding). Leaves the inner transformation returns unchanged (the moments of
an objective absent from a DualOptim+ call) keep their codes as they are, so an idle
state does not drift.
"""

from __future__ import annotations

import collections.abc
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptax import quantization as _q
from dualoptax.quantization import QuantizedArray

__all__ = ["quantize_state", "dual_optim_plus_8bit", "state_nbytes"]

_SignedOverride = Union[None, bool, Callable[[str, Any], Optional[bool]]]
_Exclude = Union[Sequence[str], Callable[[Any], Any], None]


# ---------------------------------------------------------------------------
# Which state leaves are non-negative (unsigned map) — from the state's types.
# ---------------------------------------------------------------------------
class _Tag(NamedTuple):
  """What the state's structure says about one leaf (a Python leaf, not a pytree)."""
  nonneg: bool  # the leaf is a second moment, never negative
  group: Optional[str]  # "base" / "delta" inside a DualOptim(+) state, else None


class _Ctx(NamedTuple):
  nonneg: bool = False
  nonneg_fields: frozenset = frozenset()  # fields that are >= 0 in NamedTuples below
  group: Optional[str] = None


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


def _dualoptax_rules(node) -> Optional[dict[str, _Ctx]]:
  """Per-field contexts for dualoptax's own states (imported lazily: no cycle)."""
  from dualoptax.dual_optim import DualOptimState  # pylint: disable=g-import-not-at-top
  from dualoptax.dual_optim_plus import DualOptimPlusState  # pylint: disable=g-import-not-at-top
  if isinstance(node, DualOptimPlusState):
    # Base second moment >= 0; the deltas' second moments are signed corrections.
    return {"base_mu": _Ctx(group="base"), "base_nu": _Ctx(True, group="base"),
            "deltas": _Ctx(group="delta")}
  if isinstance(node, DualOptimState):
    # One plain Adam per objective: every delta ``nu`` is >= 0.
    return {"deltas": _Ctx(nonneg_fields=frozenset({"nu"}), group="delta")}
  return None


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _tag_state(node, ctx: _Ctx = _Ctx()):
  """A tree shaped like ``node`` whose leaves are :class:`_Tag`."""
  if node is None:
    return None
  if _is_namedtuple(node):
    rules = _dualoptax_rules(node)
    nonneg_fields = _NONNEG_FIELDS.get(type(node), frozenset()) | ctx.nonneg_fields
    children = []
    for field in node._fields:
      if rules is not None and field in rules:
        sub = rules[field]
        child_ctx = _Ctx(ctx.nonneg or sub.nonneg,
                         ctx.nonneg_fields | sub.nonneg_fields, sub.group or ctx.group)
      else:
        child_ctx = _Ctx(ctx.nonneg or field in nonneg_fields, ctx.nonneg_fields,
                         ctx.group)
      children.append(_tag_state(getattr(node, field), child_ctx))
    return type(node)(*children)
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # a leaf
    return _Tag(ctx.nonneg, ctx.group)
  return treedef.unflatten([_tag_state(c, ctx) for c in children])


def _is_tag(x) -> bool:
  return isinstance(x, _Tag)


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
  return any(path[i:i + n] == part for i in range(len(path) - n + 1))


def _excluded_param_paths(exclude: _Exclude, params) -> list[tuple[tuple[str, ...], tuple]]:
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
          "exclude: the callable must return a bool tree shaped like params") from e
    return [e for e, f in zip(entries, flags) if bool(f)]
  if isinstance(exclude, str):
    exclude = (exclude,)
  out = []
  for name in exclude:
    if not isinstance(name, str) or not name.strip("/"):
      raise ValueError(f"exclude: entries must be non-empty strings, got {name!r}")
    part = tuple(name.strip("/").split("/"))
    hits = [e for e in entries if _contains(e[0], part)]
    if not hits:
      known = ", ".join("/".join(p) for p, _ in entries[:8])
      raise ValueError(
          f"exclude: no parameter named {name!r} (parameters: {known}"
          f"{', ...' if len(entries) > 8 else ''})")
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


def _place(q: QuantizedArray, sharding) -> QuantizedArray:
  """Gives codes and absmax the leaf's NamedSharding (same spec: blocks split the
  last axis, so the absmax of a shard's blocks lives on that shard)."""
  if not isinstance(sharding, jax.sharding.NamedSharding) or not q.shape:
    return q
  spec = jax.sharding.PartitionSpec(
      *(tuple(sharding.spec) + (None,) * (len(q.shape) - len(sharding.spec))))
  codes_s = absmax_s = jax.sharding.NamedSharding(sharding.mesh, spec)
  if isinstance(q.codes, jax.core.Tracer):
    codes = jax.lax.with_sharding_constraint(q.codes, codes_s)
    absmax = jax.lax.with_sharding_constraint(q.absmax, absmax_s)
  else:
    codes = jax.device_put(q.codes, codes_s)
    absmax = jax.device_put(q.absmax, absmax_s)
  return QuantizedArray(codes, absmax, q.shape, q.dtype, q.signed, q.pad, q.block_size)


# ---------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------
def _check_min_size(min_size) -> int:
  if (isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer))
      or min_size < 0):
    raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
  return int(min_size)


def _is_q(x) -> bool:
  return isinstance(x, QuantizedArray)


def _requantize(x: jax.Array, like: QuantizedArray) -> QuantizedArray:
  return _q._quantize_with_layout(  # pylint: disable=protected-access
      x, like.signed, like.block_size, like.pad)


def _quantize_state(
    inner: optax.GradientTransformation,
    *,
    block_size: int,
    min_size: int,
    exclude: _Exclude,
    signed: _SignedOverride,
    select: Optional[Callable[[_Tag], bool]] = None,
) -> optax.GradientTransformationExtraArgs:
  block_size = _q._check_block_size(block_size)  # pylint: disable=protected-access
  min_size = _check_min_size(min_size)
  if not (signed is None or isinstance(signed, bool) or callable(signed)):
    raise ValueError(f"signed must be None, a bool or a callable, got {signed!r}")
  if not (exclude is None or callable(exclude) or isinstance(exclude, (str, list, tuple))):
    raise ValueError(
        f"exclude must be a sequence of parameter names or a callable, got {exclude!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    excluded = _excluded_param_paths(exclude, params)
    state = inner.init(params)
    tags = _tag_state(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    tag_leaves = treedef.flatten_up_to(tags)
    out = []
    for (path, leaf), tag in zip(flat, tag_leaves):
      out.append(_maybe_quantize(path, leaf, tag, excluded))
    return treedef.unflatten(out)

  def _maybe_quantize(path, leaf, tag, excluded):
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
      return leaf
    if (not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.ndim == 0
        or math.prod(leaf.shape) < max(min_size, 1)):
      return leaf
    if select is not None and not select(tag):
      return leaf
    names = _path_names(path)
    shape = tuple(leaf.shape)
    if any(s == shape and len(p) and names[-len(p):] == p for p, s in excluded):
      return leaf
    is_signed = not tag.nonneg
    if isinstance(signed, bool):
      is_signed = signed
    elif callable(signed):
      choice = signed(jax.tree_util.keystr(path), leaf)
      if choice is not None:
        is_signed = bool(choice)
    sharding = _leaf_sharding(leaf)
    local = _local_last_dim(leaf, sharding)
    layout = _q.block_layout(shape, block_size, local)
    if layout is None:
      warnings.warn(
          f"quantize_state: state leaf {jax.tree_util.keystr(path)} of shape {shape} "
          f"keeps {leaf.dtype}: its shards (last axis {local}) cannot hold whole "
          f"blocks of {block_size} without a collective.", stacklevel=3)
      return leaf
    q = _q._quantize_with_layout(jnp.asarray(leaf), is_signed, *layout)  # pylint: disable=protected-access
    return _place(q, sharding)

  def update_fn(updates, state, params=None, **extra_args):
    leaves, treedef = jax.tree.flatten(state, is_leaf=_is_q)
    decoded = [_q.dequantize_blockwise(x) if _is_q(x) else x for x in leaves]
    inner_state = treedef.unflatten(decoded)
    updates, new_inner = inner.update(updates, inner_state, params, **extra_args)
    new_leaves, new_treedef = jax.tree.flatten(new_inner)
    if new_treedef != jax.tree.structure(inner_state):
      raise ValueError(
          "quantize_state: the inner transformation changed its state structure "
          f"from {jax.tree.structure(inner_state)} to {new_treedef}")
    def requantized():
      out = []
      for old, dec, new in zip(leaves, decoded, new_leaves):
        if not _is_q(old):
          out.append(new)
        elif new is dec:
          out.append(old)  # untouched by this call: keep the codes (no drift)
        else:
          out.append(_requantize(new, old))
      return out

    skipped = _skipped_now(state, new_inner)
    if skipped is None:
      return updates, treedef.unflatten(requantized())
    # A dualoptax state that skipped a non-finite call is unchanged: keep every code
    # as it was (re-encoding the decoded moments would shift some by one code).
    kept = [new if not _is_q(old) else old for old, new in zip(leaves, new_leaves)]
    out = jax.lax.cond(skipped, lambda: kept, requantized)
    return updates, treedef.unflatten(out)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    exclude: _Exclude = (),
    signed: _SignedOverride = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps the floating-point state of ``inner`` in 8 bits between steps.

  Each floating state leaf with at least ``min_size`` elements is stored as a
  :class:`~dualoptax.QuantizedArray`: blocks of ``block_size`` values along the last
  axis, one float32 absmax and 256-level dynamic codes (bitsandbytes' map, exact
  nearest encoding). Each update decodes, runs ``inner.update`` in float32 (or the
  leaf's own dtype) and re-encodes with fresh absmax values:

  .. math::

    \hat s = \mathrm{code\_map}[c] \cdot a, \quad
    (u, s') = \mathrm{inner}(g, \hat s), \quad
    a' = \max_{\text{block}} |s'|, \quad
    c' = \operatorname{nearest}(s' / a').

  What stays as it is: integer and boolean leaves (counters), 0-d leaves, leaves with
  fewer than ``min_size`` elements, the state of parameters named in ``exclude``, and
  leaves whose shards cannot hold whole blocks (see
  :func:`dualoptax.quantization.block_layout`; a warning says so).

  The code map is chosen per leaf from the state's types: unsigned (twice the
  resolution) for second moments known to be non-negative — optax's
  ``ScaleByAdamState.nu`` (adam, adamw, nadam, ...), AMSGrad, RMSProp, AdaBelief,
  AdaDelta, Adagrad, Adan, Adamax, dualoptax's ``DualOptimPlusState.base_nu`` and
  ``DualOptimState``'s delta ``nu`` — and signed for everything else, including the
  signed delta second moments of :func:`dualoptax.dual_optim_plus`.

  Sharding: blocks run along the last axis and never cross a shard. The block length
  is decided at ``init`` from each leaf's per-shard shape when the state carries a
  sharding (``init`` called on sharded parameters outside ``jit``, or in
  explicit-sharding mode); the codes then have the parameter's shape and sharding and
  the absmax ``[..., n / b]`` the same partition spec. The update adds no
  collectives. If ``init`` runs under ``jit`` on tracers without sharding, the global
  shape decides, which is collective-free whenever each shard of the last axis is a
  multiple of ``block_size`` (e.g. 8 shards of 4096 columns).

  Args:
    inner: any optax ``GradientTransformation`` (with or without extra args),
      including chains and ``inject_hyperparams``.
    block_size: values per block, a positive power of two (256 as bitsandbytes).
    min_size: leaves with fewer elements stay unquantized (bitsandbytes'
      ``min_8bit_size`` is 4096).
    exclude: parameters whose state stays at full precision (e.g. embeddings):
      a sequence of ``"/"``-separated names, each matching every parameter whose
      key path contains those keys consecutively (``"wte"`` matches
      ``params/wte/embedding``; a name matching nothing is a ``ValueError``), or a
      callable ``params -> bool tree`` (True = keep full precision).
    signed: override of the code map: ``True``/``False`` for every leaf, or a
      callable ``(state key path string, leaf) -> bool | None`` (None = default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s state with
    quantized leaves replaced by ``QuantizedArray`` pytrees.

  Raises:
    ValueError: ``block_size`` is not a positive power of two, ``min_size`` is
      negative, or an ``exclude`` name matches no parameter (at ``init``).

  Examples:
    >>> import jax.numpy as jnp, optax, dualoptax
    >>> tx = dualoptax.quantize_state(optax.adam(1e-3))
    >>> params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}
    >>> state = tx.init(params)
    >>> type(state[0].mu["w"]).__name__, type(state[0].mu["b"]).__name__
    ('QuantizedArray', 'ArrayImpl')
  """
  return _quantize_state(inner, block_size=block_size, min_size=min_size,
                         exclude=exclude, signed=signed)


def _skipped_now(state, new_inner) -> Optional[jax.Array]:
  """True where a dualoptax state counted this call as skipped (None: not one)."""
  if not (hasattr(state, "skipped") and hasattr(new_inner, "skipped")):
    return None
  return new_inner.skipped != state.skipped


def dual_optim_plus_8bit(
    learning_rate: Any,
    *,
    quantize_base: bool = True,
    quantize_delta: bool = True,
    block_size: int = 256,
    min_size: int = 4096,
    exclude: _Exclude = (),
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim+ with 8-bit moments (the release's three 8-bit variants).

  :func:`dualoptax.dual_optim_plus` wrapped by :func:`quantize_state`: the base
  moments :math:`m_B` (signed map) and :math:`v_B` (unsigned map) when
  ``quantize_base``, and every objective's delta moments :math:`m_k, v_k` (both signed:
  :math:`v_k` is a correction that may be negative) when ``quantize_delta``. With both,
  2 objectives keep about 6.09 bytes per parameter instead of 24.

  The stabilized denominator (``stable=True``, the default) matters more here than in
  float32: quantization error of :math:`v_B` and :math:`v_k` (about 1% of a block's
  absmax) can cancel in :math:`\hat v_k + \hat v_B`.

  Args:
    learning_rate: as :func:`dualoptax.dual_optim_plus`.
    quantize_base: store the base moments in 8 bits.
    quantize_delta: store the per-objective delta moments in 8 bits.
    block_size: values per block (positive power of two).
    min_size: smaller leaves stay float32.
    exclude: parameters whose moments stay float32 (see :func:`quantize_state`).
    **kwargs: every other keyword argument of :func:`dualoptax.dual_optim_plus`
      (``objectives, b1, b2, base_b1, base_b2, eps, weight_decay, mask, stable,
      mu_dtype, nu_dtype, skip_nonfinite, implementation``). With both groups
      quantized, ``implementation=None`` runs a fused 8-bit CPU kernel (decode,
      step and re-encode per block, no float32 moment in memory) where the float
      kernel would apply and every leaf is float32; ``"xla"`` always wraps the
      float transformation in :func:`quantize_state`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dual_optim_plus_8bit(1e-3, quantize_delta=False)
    >>> state = tx.init({"w": jnp.zeros((64, 256))})
    >>> type(state.base_nu["w"]).__name__, type(state.deltas["forget"].mu["w"]).__name__
    ('QuantizedArray', 'ArrayImpl')
  """
  from dualoptax.dual_optim_plus import dual_optim_plus  # pylint: disable=g-import-not-at-top
  if not isinstance(quantize_base, bool):
    raise ValueError(f"quantize_base must be a bool, got {quantize_base!r}")
  if not isinstance(quantize_delta, bool):
    raise ValueError(f"quantize_delta must be a bool, got {quantize_delta!r}")
  inner = dual_optim_plus(learning_rate, **kwargs)
  groups = {g for g, on in (("base", quantize_base), ("delta", quantize_delta)) if on}
  generic = _quantize_state(inner, block_size=block_size, min_size=min_size,
                            exclude=exclude, signed=None,
                            select=lambda tag: tag.group in groups)
  implementation = kwargs.get("implementation")
  if implementation == "xla" or not (quantize_base and quantize_delta):
    return generic

  def update_fn(updates, state, params=None, **extra_args):
    fused = lambda: inner.update(updates, state, params, **extra_args)
    xla = lambda: generic.update(updates, state, params, **extra_args)
    if implementation == "cpu_kernel":
      return fused()
    if not _fused_8bit_applies(updates, state, params):
      return xla()
    return jax.lax.platform_dependent(cpu=fused, default=xla)

  return optax.GradientTransformationExtraArgs(generic.init, update_fn)


def _fused_8bit_applies(grads, state, params) -> bool:
  """Whether the fused 8-bit CPU kernel can take this call (see ``_engine.run_step``).

  Every leaf float32 with all its moments quantized, or all float32 arrays; numba
  installed; one device in the process.
  """
  from dualoptax import _cpu_kernel, _engine  # pylint: disable=g-import-not-at-top
  if not _cpu_kernel.auto_applies():
    return False
  if not isinstance(grads, collections.abc.Mapping) or not grads:
    return False  # let the generic path raise its clear error
  present = {k: g for k, g in grads.items() if g is not None}
  if not present or any(k not in state.deltas for k in present):
    return False
  try:
    return _engine.kernel_supported(
        present, state.deltas, (state.base_mu, state.base_nu, state.count), params,
        1.0 if params is not None else 0.0, [True] * len(jax.tree.leaves(
            next(iter(present.values())))))
  except ValueError:  # structure mismatch: the generic path reports it
    return False


def state_nbytes(state: Any) -> int:
  """Bytes held by an optimizer state (arrays or ``jax.ShapeDtypeStruct``s).

  Works on the output of ``jax.eval_shape(tx.init, params)``, so the memory of a
  large model's state can be measured without allocating it.
  """
  return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state))
