"""One fused Pallas kernel per leaf for the 8-bit step (the TPU path).

:mod:`dualoptax._chunked` finds, in the traced inner update, each leaf's group
of element-wise equations. On TPU, running them as XLA loops costs relayout
copies: a block of 256 values is a slice of the minor (lane) axis, and XLA
reshapes ``[..., n] -> [..., n / 256, 256]`` through HBM for the block absmax
and back for the per-value scale. This module runs one group instead as a
``pallas_call`` over tiles of rows. Each grid step loads a tile of every input
into VMEM, decodes the 8-bit ones a block-wide lane slice at a time, evaluates
the group's equations on the tile, takes each block's absmax, re-encodes, and
writes codes, absmax and the update; codes and absmax are aliased in place.
Per value, HBM sees each input read once and each output written once.

The math is the same statement as the XLA path's: the group's equations from
the one trace of the inner update (evaluated by ``_chunked._eval_equations``)
and the codec of :mod:`dualoptax.quantization` (``_decode_normalized``,
``_encode_blocks``). Scalar equations (counts, bias corrections, schedules)
run outside the kernel, and their values enter through SMEM.

Off TPU the same kernel runs in Pallas' interpret mode (tests check it against
the XLA path on the CPU); ``jax.lax.platform_dependent`` picks the compiled
kernel when lowering for TPU, also ahead of time from another machine.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core

from dualoptax import quantization as _q
from dualoptax.quantization import QuantizedArray

# Values of one tile (per array), so that a tile of every operand, double
# buffered, and the step's intermediates fit the TPU core's scoped VMEM.
_TILE_VALUES = 1 << 17
# Rows of a tile are a multiple of this: the sublane tiling of uint8 arrays.
_ROW_ALIGN = 32
_LANES = 128
_SCALAR_DTYPES = ("float32", "int32", "uint32", "bool")


def tile_rows(
  shape: Sequence[int], layouts: Sequence[QuantizedArray]
) -> Optional[int]:
  """Rows of a kernel tile for a leaf of ``shape``, or None where the leaf
  keeps the XLA path.

  The kernel sees the leaf as ``[rows, n]`` (``n`` the last axis). It needs
  ``n`` a whole number of blocks (no padding), and blocks a whole number of
  128-value lanes (so a block is an aligned lane slice); leading axes merge
  into rows
  only where that is free on TPU (the second-to-last axis a multiple of 32).
  """
  if len(shape) < 2 or any(int(s) == 0 for s in shape):
    return None
  n = int(shape[-1])
  if len(shape) > 2 and int(shape[-2]) % _ROW_ALIGN:
    return None
  for like in layouts:
    b = like.block_size
    if like.pad or b % _LANES or n % b:
      return None
  rows = math.prod(int(s) for s in shape[:-1])
  tr = max(_TILE_VALUES // n // _ROW_ALIGN, 1) * _ROW_ALIGN
  if tr * n > 2 * _TILE_VALUES:
    return None  # a 32-row tile of a very long last axis would not fit
  return rows if rows <= tr else tr


def _decode_tile(codes, absmax, like: QuantizedArray):
  """Decodes a ``[tr, n]`` tile, one block-wide lane slice at a time."""
  b = like.block_size
  values = _q._decode_normalized(codes, like.signed)  # pylint: disable=protected-access
  scale = jnp.concatenate(
    [
      jnp.broadcast_to(absmax[:, k : k + 1], (absmax.shape[0], b))
      for k in range(absmax.shape[1])
    ],
    axis=-1,
  )
  return values * scale


def _encode_tile(x, like: QuantizedArray):
  """Codes and absmax of a ``[tr, n]`` tile, block by block."""
  b = like.block_size
  pieces = [
    _q._encode_blocks(x[:, k * b : (k + 1) * b], like.signed)  # pylint: disable=protected-access
    for k in range(x.shape[1] // b)
  ]
  return (
    jnp.concatenate([c for c, _ in pieces], axis=-1),
    jnp.concatenate([a for _, a in pieces], axis=-1),
  )


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


def run_group(
  jaxpr,
  consts,
  eqn_ids,
  local: Sequence[Any],
  args: Sequence[Any],
  outvars: Sequence[Any],
  out_like: Sequence[Optional[QuantizedArray]],
  scalars: dict,
  aliases: dict,
  rows: int,
  evaluate,
) -> Optional[list]:
  """Runs one group's equations as a fused kernel over tiles of rows.

  Args:
    jaxpr, consts, eqn_ids: the traced update and the group's equations.
    local: the jaxpr input variables the group reads per element.
    args: their values (QuantizedArray or arrays of the leaf's shape).
    outvars: the group's output variables.
    out_like: per output, the QuantizedArray whose layout it is encoded with
      (None: returned as an array).
    scalars: the jaxpr's 0-d inputs, by variable.
    aliases: ``{arg position: output position}``: buffers an output takes
      over (a state's codes and absmax; a gradient the update may reuse).
    rows: tile rows (see :func:`tile_rows`).
    evaluate: ``_chunked._eval_equations``.

  Returns:
    The outputs (QuantizedArray where ``out_like`` is), or None when a dtype
    keeps the group on the XLA path.
  """
  shape = tuple(args[0].shape)
  n = int(shape[-1])
  total = math.prod(shape[:-1])
  scalar_ids, array_ids = _split_scalar_equations(jaxpr, eqn_ids)
  reads = _scalar_reads(jaxpr, array_ids, local)
  values = evaluate(jaxpr, consts, dict(scalars), scalar_ids, reads)
  if any(jnp.dtype(v.dtype).name not in _SCALAR_DTYPES for v in values):
    return None
  if any(
    not isinstance(a, QuantizedArray) and jnp.dtype(a.dtype) != jnp.float32
    for a in args
  ) or any(jnp.dtype(v.aval.dtype) != jnp.float32 for v in outvars):
    return None

  # Operands: scalars (SMEM, shape (1,)), then per arg its arrays as [rows, n].
  flat_in, in_specs, arg_slots = [], [], []
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  for v in values:
    flat_in.append(
      jnp.reshape(v.astype(jnp.int32) if v.dtype == jnp.bool_ else v, (1,))
    )
    in_specs.append(smem)
  tile = lambda w: pl.BlockSpec((rows, w), lambda i: (i, 0))
  for a in args:
    arg_slots.append(len(flat_in))
    if isinstance(a, QuantizedArray):
      flat_in += [
        a.codes.reshape(total, n),
        a.absmax.reshape(total, a.absmax.shape[-1]),
      ]
      in_specs += [tile(n), tile(a.absmax.shape[-1])]
    else:
      flat_in.append(a.reshape(total, n))
      in_specs.append(tile(n))
  out_shapes, out_specs, out_slots = [], [], []
  for like in out_like:
    out_slots.append(len(out_shapes))
    if like is None:
      out_shapes.append(jax.ShapeDtypeStruct((total, n), jnp.float32))
      out_specs.append(tile(n))
    else:
      nb = n // like.block_size
      out_shapes += [
        jax.ShapeDtypeStruct((total, n), jnp.uint8),
        jax.ShapeDtypeStruct((total, nb), jnp.float32),
      ]
      out_specs += [tile(n), tile(nb)]
  io_aliases = {}
  for p, o in aliases.items():
    a, s, t = args[p], arg_slots[p], out_slots[o]
    io_aliases[s] = t
    if isinstance(a, QuantizedArray):
      io_aliases[s + 1] = t + 1
  n_scalars = len(values)
  bools = [v.dtype == jnp.bool_ for v in values]

  def kernel(*refs):
    ins, outs = refs[: len(flat_in)], refs[len(flat_in) :]
    env = {
      var: (ref[0] != 0 if is_bool else ref[0])
      for var, ref, is_bool in zip(reads, ins[:n_scalars], bools)
    }
    for var, a, s in zip(local, args, arg_slots):
      if isinstance(a, QuantizedArray):
        env[var] = _decode_tile(ins[s][...], ins[s + 1][...], a)
      else:
        env[var] = ins[s][...]
    tile_shape = next(iter(x.shape for x in env.values() if x.ndim == 2))
    new = evaluate(jaxpr, consts, env, array_ids, outvars, tile_shape)
    for x, like, t in zip(new, out_like, out_slots):
      if like is None:
        outs[t][...] = x.astype(outs[t].dtype)
      else:
        codes, absmax = _encode_tile(x.astype(jnp.float32), like)
        outs[t][...] = codes
        outs[t + 1][...] = absmax

  def call(interpret: bool):
    def go(*operands):
      return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(total, rows),),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=io_aliases,
        interpret=interpret,
      )(*operands)

    return go

  flat_out = jax.lax.platform_dependent(
    *flat_in, tpu=call(False), default=call(True)
  )
  results = []
  for like, t, v in zip(out_like, out_slots, outvars):
    if like is None:
      results.append(flat_out[t].reshape(v.aval.shape))
    else:
      results.append(
        QuantizedArray(
          flat_out[t].reshape(like.codes.shape),
          flat_out[t + 1].reshape(like.absmax.shape),
          like.shape,
          like.dtype,
          like.signed,
          like.pad,
          like.block_size,
        )
      )
  return results
