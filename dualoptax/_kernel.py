"""One fused Pallas kernel per leaf for the 8-bit step (the TPU path).

:mod:`dualoptax._chunked` finds, in the traced inner update, each leaf's group
of element-wise equations. On TPU, running them as XLA loops costs relayout
copies: a block of 256 values is a slice of the minor (lane) axis, and XLA
reshapes ``[..., n] -> [..., n / 256, 256]`` through HBM for the block absmax
and back for the per-value scale. This module runs one group instead as a
``pallas_call`` over tiles one block wide: rows ``i`` (a tile of rows) and
block column ``j``. Each grid step loads that tile of every input into VMEM,
decodes the 8-bit ones with their block's absmax (column ``j`` of the row
tile's absmax, which stays in VMEM while ``j`` runs), evaluates the group's
equations, takes the block's new absmax, re-encodes, and writes codes, the
absmax column and the update; codes and absmax are aliased in place. Per
value, HBM sees each input read once and each output written once, and the
kernel body is one block's work, whatever the leaf's width, done 8 rows at a
time (the step's vector code, which XLA's TPU compiler compiles for every
kernel of a step, is a float32 vreg per 128 lanes). Groups of one
signature (a model's layers: the same equations on leaves of one shape) share
one traced and lowered kernel (:func:`group_kernel`), so tracing time grows
with the number of distinct shapes, not of leaves.

TPU stores some leaves whose last axis is not whole lanes column-major (a 192-
or 576-wide FSDP shard of 768 rows; :func:`columns_major`). The kernel takes
such a leaf transposed, a bitcast there: tiles ``n x rows``, rows whole
lanes, each block a slice of sublanes.
A block's step runs on pieces of 8 sublanes, keeping its new values and their
running peak in VMEM, and a second pass encodes them with the block's scale
(the codec's :func:`~dualoptax.quantization._block_peak`, ``_block_scale``
and ``_encode_scaled``, the parts of the one encoder).

The math is the same statement as the XLA path's: the group's equations from
the one trace of the inner update (evaluated by ``_chunked._eval_equations``)
and the codec of :mod:`dualoptax.quantization` (``_decode_normalized``,
``_encode_blocks``). Scalar equations (counts, bias corrections, schedules)
run outside the kernel, and their values enter through SMEM.

The non-finite guard's check, which must read every gradient before any
state is written, is a kernel too (:func:`all_finite`).

State an 8-bit wrapper keeps in float32 (leaves below ``min_size``: biases,
norm scales) runs as one kernel over the whole leaf
(:func:`whole_leaf_kernel`): the same equations and guard select, the
state written in place. XLA's TPU compiler gives each such leaf's step a
fusion of its own, while kernels of one signature share one lowering, so
a model's many small leaves no longer dominate the step's compile time.
For the same reason the float32 optimizers (``dual_optim_plus``,
``dual_optim``) run each leaf's step as a kernel (:func:`step_kernel`),
its body their leaf step itself rather than equations from a trace.

Off TPU the same kernel runs in Pallas' interpret mode (tests check it against
the XLA path on the CPU); ``jax.lax.platform_dependent`` picks the compiled
kernel when lowering for TPU, also ahead of time from another machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core

from dualoptax import _objectives, _sharding
from dualoptax import quantization as _q
from dualoptax.quantization import QuantizedArray

# Values of one tile (per array), so that a tile of every operand, double
# buffered, and the step's intermediates fit the TPU core's scoped VMEM.
_TILE_VALUES = 1 << 17
# Rows of a tile are a multiple of this: the sublane tiling of uint8 arrays.
_ROW_ALIGN = 32
# Rows of one float32 vreg: the kernel body's vector code works on pieces of
# this many rows (see ``rows_slice``).
_SUBLANES = 8
_LANES = 128
# Most blocks per row where blocks are not whole lanes (each is unrolled in
# the kernel body).
_WIDE_BLOCKS = 4
_SCALAR_DTYPES = ("float32", "int32", "uint32", "bool")
# Most values of a float32 leaf whose step runs as one whole-leaf kernel
# (every operand of DualOptim+'s two-objective step in VMEM at once, double
# buffered: 16 arrays of 64 KiB).
_WHOLE_VALUES = 1 << 14

# The codec as the kernel runs it (no division in the decoder, the block
# scale refined), jitted so that a kernel's several 8-bit arrays, and every
# kernel of a step, trace it once per signedness rather than once per use.
_decode = jax.jit(
  functools.partial(_q._decode_normalized, divide=False),  # pylint: disable=protected-access
  static_argnums=1,
)
_encode = jax.jit(
  functools.partial(_q._encode_blocks, refine=True),  # pylint: disable=protected-access
  static_argnums=1,
)
# The same encoder in parts, for blocks along sublanes (column-major tiles).
_peak = jax.jit(functools.partial(_q._block_peak, axis=0))  # pylint: disable=protected-access
_scale = jax.jit(functools.partial(_q._block_scale, refine=True))  # pylint: disable=protected-access
_encode_scaled = jax.jit(_q._encode_scaled, static_argnums=3)  # pylint: disable=protected-access


def on_tpu() -> bool:
  """Whether the update is being traced for TPU, where ``kernel="auto"``
  runs the kernels and the non-finite guards check with one (per shard, or
  not at all where a leaf is sharded without its sharding in its type)."""
  return jax.default_backend() == "tpu"


def _padded_tiles(rows: int, cols: int) -> int:
  """Values a float32 ``[rows, cols]`` takes in TPU's (8, 128) tiles."""
  return -(-rows // _SUBLANES) * _SUBLANES * -(-cols // _LANES) * _LANES


def columns_major(shape: Sequence[int]) -> bool:
  """Whether XLA's TPU compiler stores a 2-d float32 array of ``shape``
  column-major (layout ``{0,1}``): where the last axis is not whole lanes
  and the transposed array pads to fewer (8, 128) tiles (a tie stays
  row-major). Read from the layouts it gives such arrays as arguments; its
  uint8 arrays of these shapes follow it."""
  if len(shape) != 2:
    return False
  r, n = (int(s) for s in shape)
  return _padded_tiles(n, r) < _padded_tiles(r, n)


def _columns(shape: Sequence[int], b: int) -> bool:
  """Whether a leaf of ``shape`` in blocks of ``b`` runs column-major: TPU
  stores it so (:func:`columns_major`; with one leading axis, a stack of
  layers, it stores each ``shape[1:]`` so), its blocks are not whole lanes
  but whole uint8 sublane tiles, and a tile a lane wide fits VMEM. The
  kernel then takes the leaf transposed (a bitcast there), its blocks along
  sublanes, rather than have XLA copy the leaf to rows and back."""
  return (
    len(shape) in (2, 3)
    and columns_major(shape[-2:])
    and b % _LANES != 0
    and b % _ROW_ALIGN == 0
    and int(shape[-1]) * _LANES <= _TILE_VALUES
  )


def tile_rows(
  shape: Sequence[int], layouts: Sequence[QuantizedArray]
) -> Optional[int]:
  """Rows of a kernel tile for a leaf of ``shape``, or None where the leaf
  keeps the XLA path.

  The kernel sees the leaf as ``[rows, n]`` (``n`` the last axis) in tiles
  of ``rows x b``, ``b`` the block length. It needs one block length for
  every 8-bit operand, blocks along the last axis alone (not spanning
  trailing axes), ``n`` a whole number of blocks (no padding), and a block a
  whole number of 128-value lanes; or else the leaf stored column-major
  (:func:`_columns`: a shard 576 or 192 wide, say, in blocks of 192), whose
  tile is then all ``n`` by rows a whole number of lanes (the rows of one
  layer, for a stack of layers); or else at most
  ``_WIDE_BLOCKS`` blocks per row (Mosaic takes a tile as wide as its array,
  whose blocks the kernel unrolls). Leading axes merge into rows only
  where that is free on TPU (the second-to-last axis a multiple of 32).
  """
  if len(shape) < 2 or any(int(s) == 0 for s in shape) or not layouts:
    return None
  n = int(shape[-1])
  b = layouts[0].block_size
  for like in layouts:
    if like.block_size != b or like.pad or like.rows != 1 or n % b:
      return None  # one block length; blocks along the last axis alone
  if _columns(shape, b):
    # Rows are lanes here (of one layer): a tile whole lanes, the last one
    # partial.
    lanes = max(_TILE_VALUES // n // _LANES, 1) * _LANES
    return min(lanes, -(-int(shape[-2]) // _LANES) * _LANES)
  if len(shape) > 2 and int(shape[-2]) % _ROW_ALIGN:
    return None
  rows = math.prod(int(s) for s in shape[:-1])
  if b % _LANES and n // b > _WIDE_BLOCKS:
    return None
  width = b
  if b % _LANES:  # group_kernel's ``wide``: a tile spans the last axis
    # In VMEM its rows are padded to whole lanes, and its absmax column
    # takes a lane tile of its own.
    width = -(-n // _LANES) * _LANES + _LANES
  tr = max(_TILE_VALUES // width // _ROW_ALIGN, 1) * _ROW_ALIGN
  return rows if rows <= tr else tr


def _pick(tile, k, axis: int):
  """Index ``k`` (traced) of ``tile`` along ``axis``, the axis kept (a
  ``[tr, 1]`` column, a ``[1, w]`` row): a masked reduction. Neither a
  dynamic lane slice nor a single-sublane load at a dynamic, unaligned
  index is a TPU vector operation."""
  at = jax.lax.broadcasted_iota(jnp.int32, tile.shape, axis)
  return jnp.sum(jnp.where(at == k, tile, 0.0), axis=axis, keepdims=True)


def _with_picked(tile, k, part, axis: int):
  """``tile`` with index ``k`` along ``axis`` set to ``part``."""
  at = jax.lax.broadcasted_iota(jnp.int32, tile.shape, axis)
  return jnp.where(at == k, part, tile)


def _row_lanes(sub, width, start):
  """``[sub, width]`` mask of lane ``start + k`` in sublane ``k``: where
  lanes ``start .. start + sub`` of a row meet a ``[sub, 1]`` column."""
  shape = (sub, width)
  lanes = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return lanes == rows + start


def _row_to_column(row, start, sub):
  """Lanes ``start .. start + sub`` (traced start) of a ``[1, tr]`` row, as a
  ``[sub, 1]`` column: a masked lane reduction (one value per sublane)."""
  mask = _row_lanes(sub, row.shape[-1], start)
  picked = jnp.where(mask, jnp.broadcast_to(row, mask.shape), 0.0)
  return jnp.sum(picked, axis=1, keepdims=True)


def _with_row_part(row, start, column):
  """``row`` ``[1, tr]`` with lanes ``start .. start + sub`` set to the
  ``[sub, 1]`` ``column``: a masked sublane reduction, then a select."""
  sub = column.shape[0]
  mask = _row_lanes(sub, row.shape[-1], start)
  spread = jnp.where(mask, jnp.broadcast_to(column, mask.shape), 0.0)
  part = jnp.sum(spread, axis=0, keepdims=True)
  lane = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
  return jnp.where((lane >= start) & (lane < start + sub), part, row)


def _in_hbm(operands: Sequence[jax.Array], pinned: Sequence[bool]) -> list:
  """``operands``, those where ``pinned`` constrained to stay in HBM.

  A kernel streams its operands tile by tile from HBM itself. Left free,
  XLA's TPU compiler prefetches many of them into VMEM ahead of the kernel
  (asynchronous copies and slices), which moves no byte less from HBM but
  adds copies that cost analysis counts, HBM temporaries and compile time
  (benchmarks/tpu_aot.py). Interpreted kernels take their operands as
  they are."""
  return [
    pltpu.with_memory_space_constraint(x, pltpu.HBM) if pin else x
    for x, pin in zip(operands, pinned)
  ]


def _split_scalar_equations(jaxpr, eqn_ids):
  """Equations with only 0-d outputs (they read only scalars in an
  element-wise group) and the rest, in order."""
  scalar, array = [], []
  for k in eqn_ids:
    outs = jaxpr.eqns[k].outvars
    (scalar if all(not v.aval.shape for v in outs) else array).append(k)
  return scalar, array


def _scalar_reads(jaxpr, array_ids, local) -> list:
  """The 0-d variables the array equations read that they do not compute."""
  made = set(local)
  reads = []
  for k in array_ids:
    eqn = jaxpr.eqns[k]
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal) and v not in made:
        if v not in reads:
          reads.append(v)
    made.update(eqn.outvars)
  return reads


class _Scalars(NamedTuple):
  """A group's scalar equations, evaluated outside its kernel: the
  equations left to the kernel, the 0-d variables they read and those
  values (then ``keep``, where given), which enter through SMEM."""

  array_ids: list
  reads: list
  values: list

  @classmethod
  def of(cls, jaxpr, consts, eqn_ids, local, scalars, keep, evaluate):
    """None where a value's dtype is not one SMEM takes."""
    scalar_ids, array_ids = _split_scalar_equations(jaxpr, eqn_ids)
    reads = _scalar_reads(jaxpr, array_ids, local)
    values = evaluate(jaxpr, consts, dict(scalars), scalar_ids, reads)
    if keep is not None:
      values = [*values, jnp.asarray(keep, jnp.bool_)]
    if any(jnp.dtype(v.dtype).name not in _SCALAR_DTYPES for v in values):
      return None
    return cls(array_ids, reads, values)

  def operands(self) -> list:
    """The values as the kernel's SMEM operands, shape (1,) (bools int32)."""
    return [
      jnp.reshape(v.astype(jnp.int32) if v.dtype == jnp.bool_ else v, (1,))
      for v in self.values
    ]

  def env(self, refs) -> dict:
    """In the kernel: each read variable's value from its SMEM ref."""
    return {
      var: (ref[0] != 0 if v.dtype == jnp.bool_ else ref[0])
      for var, ref, v in zip(self.reads, refs, self.values)
    }


class GroupKernel(NamedTuple):
  """A group's fused kernel. ``apply(scalars, args) -> outputs``
  (QuantizedArray where ``out_like`` is, in its layout) for ``args`` laid
  out like the ``like_args`` it was built for; ``scalars`` are the values it
  reads from SMEM (computed from the update's 0-d inputs when it was
  built)."""

  apply: Callable[[Sequence[jax.Array], Sequence[Any]], list]
  scalars: list


def group_kernel(
  jaxpr,
  consts,
  eqn_ids,
  local: Sequence[Any],
  like_args: Sequence[Any],
  outvars: Sequence[Any],
  out_like: Sequence[Optional[QuantizedArray]],
  scalars: dict,
  aliases: dict,
  rows: int,
  evaluate,
  keep: Optional[jax.Array] = None,
  shared: bool = True,
  reread: Sequence[int] = (),
) -> Optional[GroupKernel]:
  """One group's equations as a fused kernel over tiles of rows.

  The kernel is traced and lowered once; the returned function applies it to
  the arguments of any group of the same signature (the layers of a model),
  so that a model's leaves of one shape cost one Mosaic lowering, not one
  each.

  Args:
    jaxpr, consts, eqn_ids: the traced update and the group's equations.
    local: the jaxpr input variables the group reads per element.
    like_args: the arguments of one group (QuantizedArray or arrays of the
      leaf's shape): their shapes, dtypes and layouts.
    outvars: the group's output variables.
    out_like: per output, the QuantizedArray whose layout it is encoded with
      (None: returned as an array).
    scalars: the jaxpr's 0-d inputs, by variable.
    aliases: ``{arg position: output position}``: buffers an output takes
      over (a state's codes and absmax).
    rows: tile rows (see :func:`tile_rows`).
    evaluate: ``_chunked._eval_equations``.
    keep: a traced bool or None: where False, each aliased output keeps its
      input's value (codes and absmax as they were) and each other output
      is zeros, selected in VMEM.
    shared: whether ``apply`` will serve several groups (then it reuses one
      trace of the kernel).
    reread: positions of ``like_args`` that the step reads again after the
      kernel (the parameters, which ``optax.apply_updates`` reads): left for
      XLA to place, so that one prefetch into VMEM serves both. Every other
      array operand is pinned in HBM (see :func:`_in_hbm`).

  Returns:
    A :class:`GroupKernel`, or None when a dtype keeps the group on the XLA
    path.
  """
  shape = tuple(like_args[0].shape)
  n = int(shape[-1])
  total = math.prod(shape[:-1])
  found = _Scalars.of(jaxpr, consts, eqn_ids, local, scalars, keep, evaluate)
  if found is None:
    return None
  array_ids, values = found.array_ids, found.values
  if any(
    not isinstance(a, QuantizedArray) and jnp.dtype(a.dtype) != jnp.float32
    for a in like_args
  ) or any(jnp.dtype(v.aval.dtype) != jnp.float32 for v in outvars):
    return None

  # Operands: scalars (SMEM, shape (1,)), then per arg its arrays as [rows, n]
  # in tiles of rows x b, and absmax as the row tile's whole [rows, n / b]
  # (or [n / b, rows], below).
  b = next(
    like.block_size
    for like in [*like_args, *out_like]
    if isinstance(like, QuantizedArray)
  )
  nb = n // b
  # A leaf TPU stores column-major (a 576-wide shard in blocks of 192, or a
  # stack of them; see _columns) is taken transposed, [lead, n, r] in tiles
  # n x rows (rows whole lanes of its r rows), each block a slice of
  # sublanes: the transpose is a bitcast there, where rows would cost XLA a
  # relayout copy in and out.
  columns = _columns(shape, b)
  # Otherwise a block that is not whole lanes cannot be a tile of its own:
  # the tile is then the whole last axis, and the kernel works through its
  # blocks at static lane offsets.
  wide = b % _LANES != 0 and not columns
  width = n if wide else b
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * len(values)
  arg_slots = []
  # TPU stores a [rows, nb] absmax with few blocks per row (nb < 128) rows
  # minor, i.e. as [nb, rows]: the kernel takes it transposed (a bitcast
  # there, not a relayout copy in and out of every kernel), where the row
  # tile is a whole number of lanes.
  transposed = columns or (
    nb < _LANES and (rows % _LANES == 0 or rows == total)
  )
  if columns:
    lead, r = math.prod(shape[:-2]), int(shape[-2])
    block = pl.BlockSpec((None, n, rows), lambda i, j: (j, 0, i))
    row_of_absmax = pl.BlockSpec((None, nb, rows), lambda i, j: (j, 0, i))
    leaf_view, absmax_shape = (lead, n, r), (lead, nb, r)
    grid = (pl.cdiv(r, rows), lead)

    def to_kernel(x, m):  # [..., r, m] -> [lead, m, r]
      return jnp.swapaxes(x.reshape(lead, r, m), 1, 2)

    def from_kernel(y, like_shape, m):  # and back
      del m
      return jnp.swapaxes(y, 1, 2).reshape(like_shape)

  else:
    block = pl.BlockSpec((rows, width), lambda i, j: (i, j))
    if transposed:
      row_of_absmax = pl.BlockSpec((nb, rows), lambda i, j: (0, i))
    else:
      row_of_absmax = pl.BlockSpec((rows, nb), lambda i, j: (i, 0))
    leaf_view = (total, n)
    absmax_shape = (nb, total) if transposed else (total, nb)
    grid = (pl.cdiv(total, rows), 1 if wide else nb)

    def to_kernel(x, m):  # [..., m] -> [total, m], an absmax as TPU keeps it
      x = x.reshape(total, m)
      return x.T if transposed and m == nb else x

    def from_kernel(y, like_shape, m):  # and back
      return (y.T if transposed and m == nb else y).reshape(like_shape)

  for a in like_args:
    arg_slots.append(len(in_specs))
    if isinstance(a, QuantizedArray):
      in_specs += [block, row_of_absmax]
    else:
      in_specs.append(block)

  def operands(scalar_values, group_args) -> list:
    flat = list(scalar_values)
    for a in group_args:
      if isinstance(a, QuantizedArray):
        flat += [to_kernel(a.codes, n), to_kernel(a.absmax, nb)]
      else:
        flat.append(to_kernel(a, n))
    return flat

  out_shapes, out_specs, out_slots = [], [], []
  for like in out_like:
    out_slots.append(len(out_shapes))
    if like is None:
      out_shapes.append(jax.ShapeDtypeStruct(leaf_view, jnp.float32))
      out_specs.append(block)
    else:
      out_shapes += [
        jax.ShapeDtypeStruct(leaf_view, jnp.uint8),
        jax.ShapeDtypeStruct(absmax_shape, jnp.float32),
      ]
      out_specs += [block, row_of_absmax]
  io_aliases = {}
  for p, o in aliases.items():
    a, s, t = like_args[p], arg_slots[p], out_slots[o]
    io_aliases[s] = t
    if isinstance(a, QuantizedArray):
      io_aliases[s + 1] = t + 1
  n_scalars = len(values)
  # Per output, the position of the input it replaces (its old value).
  source = {o: p for p, o in aliases.items()}

  # Each grid step works through its tile in slices of 32 rows (a loop, not
  # unrolled): Mosaic emits a slice's vector code once, so compile time does
  # not grow with the tile. 32 rows are the least an 8-bit array is loaded
  # and stored in; the step itself runs on pieces of 8 rows (one float32
  # vreg per 128 lanes) in an inner loop over int32 copies of the slice's
  # codes in VMEM scratch: Mosaic emits the step's vector code, most of the
  # kernel, for 8 rows instead of 32, and compiles a quarter as much of it.
  sub = _ROW_ALIGN if rows % _ROW_ALIGN == 0 else rows
  piece = _SUBLANES if sub % _SUBLANES == 0 else sub
  q_in = [p for p, a in enumerate(like_args) if isinstance(a, QuantizedArray)]
  q_out = [q for q, like in enumerate(out_like) if like is not None]
  if columns:
    # Per 8-bit input and output a block of one lane tile's codes (int32),
    # and per output its new values, held while the block's absmax is taken.
    scratch_shapes = [pltpu.VMEM((b, _LANES), jnp.int32)] * (
      len(q_in) + len(q_out)
    ) + [pltpu.VMEM((b, _LANES), jnp.float32)] * len(q_out)
  else:
    scratch_shapes = [pltpu.VMEM((sub, b), jnp.int32)] * (
      len(q_in) + len(q_out)
    )

  def step_piece(ins, outs, env0, kept, codes_in, local_at, at, cols, scale):
    """One piece's step, the same in either tile form: its inputs (8-bit
    ones decoded from their int32 codes in ``codes_in`` with their block
    absmax, ``scale(p)``), the group's equations, and the float32 outputs
    written (where ``kept`` is False, the old value or zero). Returns the
    new values; the caller encodes the 8-bit ones."""
    env = dict(env0)
    for p, (var, a, s) in enumerate(zip(local, like_args, arg_slots)):
      if isinstance(a, QuantizedArray):
        # TPU's forms of the codec: no division in the decoder, the block
        # scale's refined (the interpreter that tests this runs them too).
        env[var] = _decode(codes_in[p][local_at, :], a.signed) * scale(p)
      else:
        env[var] = ins[s][at, cols]
    shape = (_SUBLANES, _LANES) if columns else (piece, b)
    new = evaluate(jaxpr, consts, env, array_ids, outvars, shape)
    for q, (x, like, t) in enumerate(zip(new, out_like, out_slots)):
      if like is None:
        x = x.astype(jnp.float32)
        if kept is not None:
          p = source.get(q)
          old = 0.0 if p is None else ins[arg_slots[p]][at, cols]
          x = jnp.where(kept, x, old)
        outs[t][at, cols] = x
    return new

  def column_major(ins, outs, env0, kept, codes_in, codes_out, new_values):
    """The tile [n, rows] in lane tiles of 128 and blocks of b sublanes.
    A block's step runs on pieces of 8 sublanes (one float32 vreg), keeping
    its new values and the running peak of each 8-bit output; the peak is
    then the block's absmax, and a second pass over the pieces encodes."""

    def block_step(lanes, old_absmax, k, new_absmax):
      first = pl.multiple_of(k * b, _ROW_ALIGN)
      for p in q_in:
        codes_in[p][...] = ins[arg_slots[p]][pl.ds(first, b), lanes].astype(
          jnp.int32
        )
      old_scale = {p: _pick(old_absmax[p], k, 0) for p in q_in}

      def piece_step(t, peaks):
        local_at = pl.ds(pl.multiple_of(t * _SUBLANES, _SUBLANES), _SUBLANES)
        at = pl.ds(pl.multiple_of(first + t * _SUBLANES, _SUBLANES), _SUBLANES)
        new = step_piece(
          ins, outs, env0, kept, codes_in, local_at, at, lanes, old_scale.get
        )
        peaks = list(peaks)
        for i, q in enumerate(q_out):
          x = new[q].astype(jnp.float32)
          new_values[q][local_at, :] = x
          peaks[i] = jnp.maximum(peaks[i], _peak(x))
        return tuple(peaks)

      zero = jnp.zeros((1, _LANES), jnp.float32)
      peaks = jax.lax.fori_loop(
        0, b // _SUBLANES, piece_step, tuple(zero for _ in q_out)
      )
      new_absmax = list(new_absmax)
      for i, (q, peak) in enumerate(zip(q_out, peaks)):
        like, t_out, p = out_like[q], out_slots[q], source.get(q)
        absmax, inv, finite = _scale(peak)

        def encode_piece(t, c, q=q, like=like, p=p, inv=inv, finite=finite):
          local_at = pl.ds(pl.multiple_of(t * _SUBLANES, _SUBLANES), _SUBLANES)
          codes = _encode_scaled(
            new_values[q][local_at, :], inv, finite, like.signed
          ).astype(jnp.int32)
          if kept is not None:  # a skipped step: codes as they were
            codes = jnp.where(kept, codes, codes_in[p][local_at, :])
          codes_out[q][local_at, :] = codes
          return c

        jax.lax.fori_loop(0, b // _SUBLANES, encode_piece, 0)
        if kept is not None:
          absmax = jnp.where(kept, absmax, old_scale[p])
        outs[t_out][pl.ds(first, b), lanes] = codes_out[q][...].astype(
          jnp.uint8
        )
        new_absmax[i] = _with_picked(new_absmax[i], k, absmax, 0)
      return tuple(new_absmax)

    def lane_tile(c, carry):
      lanes = pl.ds(pl.multiple_of(c * _LANES, _LANES), _LANES)
      # The lane tile's absmax rows, all blocks ([nb, 128]), read and
      # written whole; a block's row is picked and set with masks.
      old = {p: ins[arg_slots[p] + 1][:, lanes] for p in q_in}
      zero = jnp.zeros((nb, _LANES), jnp.float32)
      new = jax.lax.fori_loop(
        0,
        nb,
        functools.partial(block_step, lanes, old),
        tuple(zero for _ in q_out),
      )
      for q, tile in zip(q_out, new):
        outs[out_slots[q] + 1][:, lanes] = tile
      return carry

    jax.lax.fori_loop(0, rows // _LANES, lane_tile, 0)

  def kernel(*refs):
    ins = refs[: len(in_specs)]
    outs = refs[len(in_specs) : len(in_specs) + len(out_specs)]
    scratch = refs[len(in_specs) + len(out_specs) :]
    codes_in = dict(zip(q_in, scratch))
    codes_out = dict(zip(q_out, scratch[len(q_in) :]))
    new_values = dict(zip(q_out, scratch[len(q_in) + len(q_out) :]))
    env0 = found.env(ins[:n_scalars])
    kept = None if keep is None else ins[n_scalars - 1][0] != 0

    if columns:
      column_major(ins, outs, env0, kept, codes_in, codes_out, new_values)
      return

    @pl.when(pl.program_id(1) == 0)
    def _():
      for like, t in zip(out_like, out_slots):
        if like is not None:
          outs[t + 1][...] = jnp.zeros(outs[t + 1].shape, jnp.float32)

    def scales(ref, at, start, j):
      """This piece's block absmax, ``[piece, 1]``."""
      if transposed:
        return _row_to_column(ref[pl.ds(j, 1), :], start, piece)
      return _pick(ref[at, :], j, 1)

    def set_scales(ref, at, start, column, j):
      if transposed:
        ref[pl.ds(j, 1), :] = _with_row_part(ref[pl.ds(j, 1), :], start, column)
      else:
        ref[at, :] = _with_picked(ref[at, :], j, column, 1)

    def rows_slice(j, cols, r, carry):
      """Rows ``r * sub ..`` of block ``j``, lanes ``cols`` of the tile."""
      first = pl.multiple_of(r * sub, sub)
      for p in q_in:
        codes_in[p][...] = ins[arg_slots[p]][pl.ds(first, sub), cols].astype(
          jnp.int32
        )

      def piece_step(k, carry):
        local_at = pl.ds(pl.multiple_of(k * piece, piece), piece)
        start = pl.multiple_of(first + k * piece, piece)
        at = pl.ds(start, piece)
        new = step_piece(
          ins,
          outs,
          env0,
          kept,
          codes_in,
          local_at,
          at,
          cols,
          lambda p: scales(ins[arg_slots[p] + 1], at, start, j),
        )
        for q in q_out:
          x, like, t, p = new[q], out_like[q], out_slots[q], source.get(q)
          codes, absmax = _encode(x.astype(jnp.float32), like.signed)
          codes = codes.astype(jnp.int32)
          if kept is not None:  # a skipped step: codes and absmax as they were
            codes = jnp.where(kept, codes, codes_in[p][local_at, :])
            absmax = jnp.where(
              kept, absmax, scales(ins[arg_slots[p] + 1], at, start, j)
            )
          codes_out[q][local_at, :] = codes
          # The row tile's absmax stays in VMEM while j runs (the same block
          # index) and is written back once; each step sets its own column.
          set_scales(outs[t + 1], at, start, absmax, j)
        return carry

      jax.lax.fori_loop(0, sub // piece, piece_step, 0)
      for q in q_out:
        outs[out_slots[q]][pl.ds(first, sub), cols] = codes_out[q][...].astype(
          jnp.uint8
        )
      return carry

    if wide:  # the tile's blocks, at static lane offsets (see tile_rows)
      blocks = [(k, pl.ds(k * b, b)) for k in range(nb)]
    else:  # the grid's block column
      blocks = [(pl.program_id(1), slice(None))]
    for j, cols in blocks:
      jax.lax.fori_loop(
        0, rows // sub, functools.partial(rows_slice, j, cols), 0
      )

  # Operands pinned in HBM: all arrays but the reread args'. Not in a wide
  # tile's kernel: TPU keeps such narrow arrays column-major, XLA copies
  # them to rows for the kernel, and pinned, those copies go through HBM.
  placed = {
    arg_slots[p] + k for p in reread for k in range(len(_arrays(like_args[p])))
  }
  pinned = [
    not wide and k >= len(values) and k not in placed
    for k in range(len(in_specs))
  ]

  launch = _launcher(
    functools.partial(
      pl.pallas_call,
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shapes,
      input_output_aliases=io_aliases,
      scratch_shapes=scratch_shapes,
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary")
      ),
    ),
    pinned,
    shared,
  )

  def apply(scalar_values, group_args) -> list:
    flat_out = launch(*operands(scalar_values, group_args))
    results = []
    for like, t in zip(out_like, out_slots):
      if like is None:
        results.append(from_kernel(flat_out[t], shape, n))
      else:
        results.append(
          dataclasses.replace(
            like,
            codes=from_kernel(flat_out[t], like.codes.shape, n),
            absmax=from_kernel(flat_out[t + 1], like.absmax.shape, nb),
          )
        )
    return results

  return GroupKernel(apply, found.operands())


def per_member(fn: Callable) -> Callable:
  """``fn`` (a kernel call on arrays) that, under ``jax.vmap`` (an ensemble
  of models, say), runs once per batch member in a loop (``lax.map``): the
  kernels' memory-space constraint has no batching rule, and a batched
  kernel would be another kernel to lower. Unbatched operands are
  broadcast. Differentiated, it raises a clear error: the kernels have no
  derivative rules (``kernel="xla"`` steps are differentiable)."""
  batched = jax.custom_batching.custom_vmap(fn)

  @batched.def_vmap
  def _(axis_size, in_batched, *flat):
    flat = [
      x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, b in zip(flat, in_batched)
    ]
    out = jax.lax.map(lambda xs: batched(*xs), flat)
    return out, jax.tree.map(lambda _: True, out)

  wrapped = jax.custom_jvp(batched)

  @wrapped.defjvp
  def _(primals, tangents):
    del primals, tangents
    raise ValueError(
      "dualoptax: an optimizer step that runs fused Pallas kernels (on TPU, "
      'kernel="auto") cannot be differentiated; build the optimizer with '
      'kernel="xla" to differentiate through its update.'
    )

  return wrapped


def _launcher(pallas_call: Callable, pinned: Sequence[bool], shared: bool):
  """``pallas_call(interpret=...)`` applied to a kernel's operands: compiled
  for TPU (operands where ``pinned`` kept in HBM), interpreted elsewhere;
  ``jax.lax.platform_dependent`` picks when lowering, also ahead of time."""

  def call(interpret: bool):
    def go(*operands):
      if not interpret:
        operands = _in_hbm(operands, pinned)
      return pallas_call(interpret=interpret)(*operands)

    return go

  @per_member
  def on_platform(*flat):
    return jax.lax.platform_dependent(
      *flat, tpu=call(False), default=call(True)
    )

  def fused_step(*flat):
    return on_platform(*flat)

  # One trace (and one lowering) of the kernel for every group it serves. A
  # jit boundary for one group only changes XLA's TPU prefetch choices for
  # nothing (GPT-2 with stacked layers: 47.3 against 47.1 B/param of HBM
  # traffic; benchmarks/tpu_aot.py).
  return jax.jit(fused_step) if shared else fused_step


def whole_leaf_values(shape: Sequence[int]) -> bool:
  """Whether a float32 leaf of ``shape`` (a shard's, under explicit axes)
  runs as one :func:`whole_leaf_kernel`: 1-d or 2-d, not stored
  column-major, at most ``_WHOLE_VALUES`` values (every operand whole in
  VMEM)."""
  return (
    len(shape) in (1, 2)
    and 0 < math.prod(shape) <= _WHOLE_VALUES
    and not columns_major(shape)
  )


def whole_leaf_kernel(
  jaxpr,
  consts,
  eqn_ids,
  local: Sequence[Any],
  like_args: Sequence[Any],
  outvars: Sequence[Any],
  scalars: dict,
  aliases: dict,
  evaluate,
  keep: Optional[jax.Array] = None,
  shared: bool = True,
  reread: Sequence[int] = (),
) -> Optional[GroupKernel]:
  """A group of float32 arrays only (state an 8-bit wrapper keeps in float32:
  biases, norm scales) as one kernel over the whole leaf.

  XLA's TPU compiler gives each such leaf's step a fusion of its own, whose
  compile time grows with the step's size (DualOptim+'s with two objectives
  is about twice AdamW's), while the kernels of one signature share one
  Mosaic lowering; the step's equations, the guard's select and the in-place
  writes are :func:`group_kernel`'s. Arguments as :func:`group_kernel`'s
  (no 8-bit operand, no ``out_like``).

  A 1-d leaf is a 1-d block: viewed as ``[1, n]`` it would cost XLA a
  relayout copy in and out. Lowering a 1-d block, Pallas reads the TPU
  generation from the context mesh (or the default device): compiled for
  TPU from another machine, lower under ``jax.set_mesh`` of TPU devices.

  Returns:
    A :class:`GroupKernel`, or None when a dtype or shape keeps the group on
    the XLA path.
  """
  shape = tuple(like_args[0].shape)
  found = _Scalars.of(jaxpr, consts, eqn_ids, local, scalars, keep, evaluate)
  if (
    found is None
    or not whole_leaf_values(shape)
    or any(
      isinstance(a, QuantizedArray)
      or tuple(a.shape) != shape
      or jnp.dtype(a.dtype) != jnp.float32
      for a in like_args
    )
    or any(jnp.dtype(v.aval.dtype) != jnp.float32 for v in outvars)
  ):
    return None
  n_scalars = len(found.values)
  source = {o: p for p, o in aliases.items()}
  whole = pl.BlockSpec(shape, lambda i: (0,) * len(shape))

  def kernel(*refs):
    ins = refs[n_scalars : n_scalars + len(like_args)]
    outs = refs[n_scalars + len(like_args) :]
    env = found.env(refs[:n_scalars])
    env.update((var, ref[...]) for var, ref in zip(local, ins))
    kept = None if keep is None else refs[n_scalars - 1][0] != 0
    new = evaluate(jaxpr, consts, env, found.array_ids, outvars)
    for q, (x, ref) in enumerate(zip(new, outs)):
      x = x.astype(jnp.float32)
      if kept is not None:
        p = source.get(q)
        x = jnp.where(kept, x, 0.0 if p is None else ins[p][...])
      ref[...] = x

  launch = _launcher(
    functools.partial(
      pl.pallas_call,
      kernel,
      grid=(1,),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] * n_scalars
      + [whole] * len(like_args),
      out_specs=[whole] * len(outvars),
      out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32)] * len(outvars),
      input_output_aliases={n_scalars + p: o for p, o in aliases.items()},
    ),
    [p >= 0 and p not in reread for p in range(-n_scalars, len(like_args))],
    shared,
  )

  def apply(scalar_values, group_args) -> list:
    return list(launch(*scalar_values, *group_args))

  return GroupKernel(apply, found.operands())


# VMEM for the tiles of a float32 step kernel's operands, double buffered
# (step_kernel): DualOptim+'s two-objective step has 16 operands, each tile
# then 64K values; more objectives, smaller tiles.
_STEP_TILE_BYTES = 8 << 20


def step_view(shape: Sequence[int]) -> Optional[tuple[int, ...]]:
  """The view a :func:`step_kernel` takes a float32 leaf of ``shape`` in:
  ``[total, n]`` in tiles of rows (:func:`_tiled_view`), else the whole
  leaf where :func:`whole_leaf_values`, else None (XLA's step)."""
  tiled = _tiled_view(shape)
  if tiled is not None:
    return tiled
  return tuple(int(s) for s in shape) if whole_leaf_values(shape) else None


def step_tile(total: int, n: int, operands: int) -> tuple[int, int]:
  """``(rows, width)`` of a :func:`step_kernel` tile of a ``[total, n]``
  view (``n`` whole lanes) for ``operands`` float32 arrays in and out: at
  most 512 lanes, rows a multiple of 8 (or all of them), every operand's
  tile double buffered within ``_STEP_TILE_BYTES``."""
  width = next(w for w in (4 * _LANES, 2 * _LANES, _LANES) if n % w == 0)
  values = _STEP_TILE_BYTES // (2 * 4 * operands)
  rows = max(values // width // _SUBLANES, 1) * _SUBLANES
  return (total if rows >= total else rows), width


def step_kernel(
  fn: Callable[[list, list], list],
  shape: Sequence[int],
  n_arrays: int,
  n_outputs: int,
  n_scalars: int,
  aliases: dict,
  reread: Sequence[int] = (),
) -> GroupKernel:
  """An element-wise step on float32 leaves of ``shape`` as one kernel.

  ``fn(scalars, arrays) -> outputs`` states the step (for the optimizers'
  float32 state, :func:`dualoptax._engine.dual_optim_plus_leaf` itself):
  the kernel applies it to tiles of every array in VMEM (8 MiB for all
  operands, double buffered), rows of ``[total, n]`` (:func:`step_view`) in
  pieces of 8 (one float32 vreg per 128 lanes), or to the whole leaf where
  it is small. Each array is read
  once and each output written once; outputs in ``aliases`` take their
  input's buffer. XLA's TPU compiler instead gives each leaf's step a
  fusion of its own, whose compile time grows with the step's size, while
  leaves of one shape share this kernel's one lowering.

  Args:
    fn: the step on values: 0-d scalars, arrays all of one shape.
    shape: the leaf's shape (one shard's, see :func:`on_shards`).
    n_arrays, n_outputs: how many arrays ``fn`` takes and returns.
    n_scalars: the scalar operands (shape ``(1,)``): float32 ones for
      ``fn``, then an int32 flag where 0 skips the step (the guard): each
      aliased output keeps its input's value, the others are zeros.
    aliases: ``{array position: output position}``: state updated in place.
    reread: array positions the step reads again after the kernel (the
      parameters): left for XLA to place (see :func:`_in_hbm`).

  Returns:
    A :class:`GroupKernel` whose ``apply(scalar_operands, arrays)`` returns
    the outputs (its ``scalars`` are empty: the caller passes them).
  """
  view = step_view(shape)
  tiled = _tiled_view(shape)
  source = {o: p for p, o in aliases.items()}

  def body(refs, at):
    scalars = [ref[0] for ref in refs[:n_scalars]]
    ins = refs[n_scalars : n_scalars + n_arrays]
    outs = refs[n_scalars + n_arrays :]
    xs = [ref[at] for ref in ins]
    kept = scalars.pop() != 0
    new = fn(scalars, xs)
    for q, (x, ref) in enumerate(zip(new, outs)):
      x = jnp.where(
        kept, x.astype(jnp.float32), xs[source[q]] if q in source else 0.0
      )
      ref[at] = x

  if tiled is None:  # the whole leaf, one grid step
    block = pl.BlockSpec(view, lambda i: (0,) * len(view))
    grid, semantics = (1,), ("arbitrary",)

    def kernel(*refs):
      body(refs, ...)

  else:
    total, n = tiled
    rows, width = step_tile(total, n, n_arrays + n_outputs)
    piece = _SUBLANES if rows % _SUBLANES == 0 else rows
    block = pl.BlockSpec((rows, width), lambda i, j: (i, j))
    grid = (pl.cdiv(total, rows), n // width)
    semantics = ("parallel", "parallel")

    def kernel(*refs):
      # A loop over pieces, not unrolled: Mosaic emits the step's vector
      # code once, whatever the tile's rows.
      def at(k, carry):
        body(
          refs, (pl.ds(pl.multiple_of(k * piece, piece), piece), slice(None))
        )
        return carry

      jax.lax.fori_loop(0, rows // piece, at, 0)

  launch = _launcher(
    functools.partial(
      pl.pallas_call,
      kernel,
      grid=grid,
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] * n_scalars
      + [block] * n_arrays,
      out_specs=[block] * n_outputs,
      out_shape=[jax.ShapeDtypeStruct(view, jnp.float32)] * n_outputs,
      input_output_aliases={n_scalars + p: o for p, o in aliases.items()},
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    ),
    [p >= 0 and p not in reread for p in range(-n_scalars, n_arrays)],
    True,
  )

  def apply(scalar_values, arrays) -> list:
    outs = launch(*scalar_values, *[x.reshape(view) for x in arrays])
    return [y.reshape(shape) for y in outs]

  return GroupKernel(apply, [])


# ---------------------------------------------------------------------------
# A kernel per shard, where arrays carry their sharding in their types.
# ---------------------------------------------------------------------------
def _arrays(x) -> list:
  return [x.codes, x.absmax] if isinstance(x, QuantizedArray) else [x]


def local_stand_in(x):
  """``x`` as one shard of it looks (shapes only), under the explicit
  sharding in its type: a ``QuantizedArray`` of ``ShapeDtypeStruct``s with
  the shard's shape, or a ``ShapeDtypeStruct``. Blocks never cross a shard
  (``quantization.block_layout``), so a shard is an 8-bit array of its own."""

  def local(a):
    sharding = _sharding.explicit(a)
    return jax.ShapeDtypeStruct(sharding.shard_shape(a.shape), a.dtype)

  if not isinstance(x, QuantizedArray):
    return local(x)
  codes, absmax = local(x.codes), local(x.absmax)
  shape = (*codes.shape[:-1], codes.shape[-1] - x.pad)
  return dataclasses.replace(x, codes=codes, absmax=absmax, shape=shape)


def shard_view(arrays: Sequence[Any], kernel: str) -> Optional[Callable]:
  """How a kernel sees ``arrays`` (one leaf's operands, 8-bit ones included):
  :func:`local_stand_in` where they carry one sharding in their types (a
  kernel per shard), the identity where they are whole; None where no
  kernel runs: arrays sharded apart (the loops and JAX's checks decide), or
  ``"auto"`` under several devices without the sharding in the types (a
  custom call would gather sharded operands)."""
  specs = {_sharding.explicit(getattr(x, "codes", x)) for x in arrays}
  if specs != {None}:
    return None if len(specs) > 1 or None in specs else local_stand_in
  if kernel == "auto" and _sharding.several_devices(arrays[0]):
    return None
  return lambda x: x


def on_shards(
  kernel: GroupKernel,
  args: Sequence[Any],
  out_like: Sequence[Optional[QuantizedArray]],
) -> list:
  """``kernel``, built for one shard's shapes (from :func:`local_stand_in`),
  run on every shard of ``args`` (``jax.shard_map`` over the mesh in their
  types, its scalars replicated): no collective, each device's kernel reads
  and writes its own shard. Outputs as ``kernel.apply``'s, in the global
  layout of ``out_like`` (None: an array sharded as the group's leaf)."""
  n_scalars = len(kernel.scalars)
  flat = list(kernel.scalars)
  specs = [jax.sharding.PartitionSpec()] * n_scalars
  for a in args:
    for x in _arrays(a):
      flat.append(x)
      specs.append(_sharding.explicit(x).spec)
  leaf = specs[n_scalars]  # a group's arrays have the leaf's shape and spec
  out_specs = []
  for like in out_like:
    if like is None:
      out_specs.append(leaf)
    else:
      out_specs += [_sharding.explicit(x).spec for x in _arrays(like)]

  def body(*local):
    it = iter(local[n_scalars:])
    local_args = [
      dataclasses.replace(
        a, codes=next(it), absmax=next(it), shape=local_stand_in(a).shape
      )
      if isinstance(a, QuantizedArray)
      else next(it)
      for a in args
    ]
    outs = kernel.apply(local[:n_scalars], local_args)
    return tuple(y for x in outs for y in _arrays(x))

  mesh = _sharding.explicit(flat[n_scalars]).mesh
  out = iter(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=tuple(specs),
      out_specs=tuple(out_specs),
      check_vma=False,  # a pallas_call's results carry no varying axes
    )(*flat)
  )
  return [
    next(out)
    if like is None
    else dataclasses.replace(like, codes=next(out), absmax=next(out))
    for like in out_like
  ]


# Arrays one finiteness kernel reads (the objectives' gradients of a leaf).
_CHECK_ARRAYS = 4


def _finite_tile(shape: tuple[int, int], count: int) -> tuple[int, int]:
  """A ``[rows, cols]`` tile of a float32 ``[total, n]`` leaf for the
  finiteness kernel: about ``_TILE_VALUES`` values over its ``count`` inputs,
  rows a multiple of 8 (float32's sublanes) and cols of 128, or whole."""
  total, n = shape
  cols = min(n, 32 * _LANES)
  values = max(_TILE_VALUES // count, _SUBLANES * cols)
  rows = max(values // cols // _SUBLANES, 1) * _SUBLANES
  return (total if rows >= total else rows), cols


# Jitted: the leaves of one shape (a model's layers) trace and lower it once.
@jax.jit
def _nonfinite_sum(*xs: jax.Array) -> jax.Array:
  """``sum(x - x)`` over float32 ``[total, n]`` arrays of one shape, as one
  kernel: NaN exactly when one of them holds a NaN or Inf."""
  total, n = xs[0].shape
  rows, cols = _finite_tile((total, n), len(xs))

  def kernel(*refs):
    out = refs[-1]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when((i == 0) & (j == 0))
    def _():
      out[...] = jnp.zeros(out.shape, jnp.float32)

    # The last row and column tiles may reach past the leaf: what a tile
    # holds there is undefined, so it is masked out, not summed.
    r = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + i * rows
    c = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + j * cols
    inside = (r < total) & (c < n)
    acc = out[...]
    for ref in refs[:-1]:
      x = ref[...]
      acc += jnp.sum(jnp.where(inside, x - x, 0.0), axis=0, keepdims=True)
    out[...] = acc

  def call(interpret: bool):
    def go(*operands):
      if not interpret:
        operands = _in_hbm(operands, [True] * len(operands))
      return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(total, rows), pl.cdiv(n, cols)),
        in_specs=[pl.BlockSpec((rows, cols), lambda i, j: (i, j))] * len(xs),
        out_specs=pl.BlockSpec((1, cols), lambda i, j: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((1, cols), jnp.float32),
        compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary", "arbitrary")
        ),
        interpret=interpret,
      )(*operands)

    return go

  part = per_member(
    lambda *xs: jax.lax.platform_dependent(
      *xs, tpu=call(False), default=call(True)
    )
  )(*xs)
  return jnp.sum(part)


def _kernel_view(xs: Sequence[Any]) -> Optional[tuple[int, int]]:
  """``[total, n]``, the view of float32 leaves of one shape the finiteness
  kernel reads them in, free on TPU (their stored tiles), or None (they are
  summed by XLA)."""
  if any(jnp.dtype(x.dtype) != jnp.float32 for x in xs):
    return None
  return _tiled_view(xs[0].shape)


def _tiled_view(shape: Sequence[int]) -> Optional[tuple[int, int]]:
  """``[total, n]``, a view of a float32 leaf of ``shape`` in whole ``[8,
  128]`` tiles, free on TPU (its stored tiles), or None."""
  shape = tuple(int(s) for s in shape)
  if math.prod(shape) < _SUBLANES * _LANES:
    return None
  if len(shape) == 1:
    # TPU tiles a float32 vector in 1024 values, as [8, 128] tiles.
    return (shape[0] // _LANES, _LANES) if shape[0] % _LANES == 0 else None
  if shape[-1] % _LANES or (len(shape) > 2 and shape[-2] % _SUBLANES):
    return None
  return math.prod(shape[:-1]), shape[-1]


def all_finite(trees: Sequence[Any]) -> jax.Array:
  """One boolean: every element of every tree (trees of one structure, the
  present objectives' gradients) is finite.

  ``_objectives.all_finite``'s test, ``sum(x - x)`` is NaN, with each leaf
  that TPU stores as ``[8, 128]`` tiles (see :func:`_kernel_view`) read by
  one kernel, all the trees' arrays at that position together. Beside the
  step's kernels, XLA's reductions would make XLA prefetch every gradient
  into VMEM for the check and again for the kernels; a kernel reads each
  gradient once (benchmarks/tpu_aot.py). Under a mesh with explicit axes the
  leaves are checked by kernels per shard, all in one ``shard_map`` with one
  scalar ``psum`` (a region and a collective per leaf are work for XLA's
  partitioner); under several devices without them, by
  ``_objectives.all_finite`` alone.
  """
  # Whether the step runs: no derivative flows through it, and none is
  # asked of the kernels.
  leaves = [jax.tree.leaves(jax.lax.stop_gradient(t)) for t in trees]
  flat = [x for xs in leaves for x in xs]
  if not any(_sharding.explicit(x) is not None for x in flat) and any(
    _sharding.several_devices(x) for x in flat
  ):
    return _objectives.all_finite(trees)  # sharded: a kernel would gather
  total = jnp.zeros((), jnp.float32)
  per_mesh: dict = {}  # mesh -> the leaves on it, each its arrays
  for xs in zip(*leaves):
    sharding = _sharding.explicit(xs[0])
    if sharding is not None:
      per_mesh.setdefault(sharding.mesh, []).append(xs)
    elif _sharding.several_devices(xs[0]):
      total += _objectives.nonfinite_sum(xs)  # a kernel would gather
    else:
      total += _leaf_nonfinite_sum(xs)
  for mesh, groups in per_mesh.items():  # kernels per shard, one psum
    total += _sharded_nonfinite_sum(mesh, groups)
  return jnp.isfinite(total)


def _sharded_nonfinite_sum(mesh, groups: Sequence[Sequence[jax.Array]]):
  """``sum(x - x)`` over leaves sharded on ``mesh`` (each a group of arrays
  of one shape): each shard's sum by :func:`_leaf_nonfinite_sum`, then one
  ``psum``. A replicated leaf is counted once per device; the sum of its
  ``x - x`` is zero or NaN whatever the count."""
  flat = [x for xs in groups for x in xs]
  specs = tuple(_sharding.explicit(x).spec for x in flat)
  names = _sharding.spec_axes(specs)
  sizes = [len(xs) for xs in groups]

  def local(*arrays):
    total, start = jnp.zeros((), jnp.float32), 0
    for n in sizes:
      total += _leaf_nonfinite_sum(arrays[start : start + n])
      start += n
    return jax.lax.psum(total, names)

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=specs,
    out_specs=jax.sharding.PartitionSpec(),
    check_vma=False,  # a pallas_call's results carry no varying axes
  )(*flat)


def _leaf_nonfinite_sum(xs: Sequence[jax.Array]) -> jax.Array:
  """``sum(x - x)`` over one leaf's arrays: kernels where the leaf's view
  allows, else XLA's sum."""
  view = _kernel_view(xs)
  if view is None:
    return _objectives.nonfinite_sum(xs)
  views = [x.reshape(view) for x in xs]
  total = jnp.zeros((), jnp.float32)
  # At most _CHECK_ARRAYS per kernel, so that its VMEM stays bounded
  # whatever the number of objectives.
  for k in range(0, len(views), _CHECK_ARRAYS):
    total += _nonfinite_sum(*views[k : k + _CHECK_ARRAYS])
  return total
