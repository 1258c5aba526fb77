r"""Block-wise dynamic 8-bit quantization (the codec of bitsandbytes' 8-bit optimizers).

A float array is cut into blocks of (by default) 256 consecutive values along its
**last axis**. Each block stores one float32 ``absmax`` and one uint8 code per value;
the value is recovered as

.. math::

  \hat x_i = \mathrm{code\_map}[c_i] \cdot \mathrm{absmax}_{b(i)},
  \qquad c_i = \operatorname*{arg\,min}_c \left| \mathrm{code\_map}[c]
  - x_i / \mathrm{absmax}_{b(i)} \right|.

The code map is bitsandbytes' *dynamic* map (:func:`dynamic_code_map`). Encoding picks
the exact nearest code (ties at float32 resolution go to the code of larger
magnitude), like the bitsandbytes GPU kernel. Encoder and decoder are closed
forms of the code (comparisons, a linear bin index, and each code's value as
two products and a sum that round to the table's float32 value on any IEEE
arithmetic, see ``_code_value``): no ``searchsorted``, no table look-up, which
on TPU would be a gather over every value, and no division, which XLA on GPU
rounds to within an ulp only.

Block layout and sharding
-------------------------
bitsandbytes flattens a tensor into blocks; under JAX SPMD that reshape of a sharded
array forces an all-gather. Here a block is ``b`` consecutive values of the **last
axis** and never crosses it: the uint8 codes keep the array's own shape (so they carry
its sharding unchanged) and the absmax has shape ``[..., n / b]``. A shard of the last
axis holds whole blocks whenever its length is a multiple of ``b``. (Keeping the codes
in the natural shape, rather than ``[..., n / b, b]``, also lets XLA fuse decoding into
the optimizer's own element-wise loops without index arithmetic.) The block
length ``b`` of a leaf is chosen by :func:`block_layout` from the *per-shard* length
``m`` of the last axis (``m = n`` when the axis is not sharded):

1. ``b = block_size`` if ``block_size`` divides ``m``;
2. else ``b`` = the largest divisor of ``m`` not above ``block_size``, if it is at
   least ``block_size / 8`` or equals ``m`` (a short last axis is one block per row);
3. else, if the last axis is not sharded, it is zero-padded locally to a multiple of
   ``block_size`` (padding never changes a block's absmax and is dropped on decode);
4. else no collective-free layout exists: :func:`block_layout` returns ``None`` and
   :func:`dualoptax.quantize_state` keeps that leaf in its own dtype (documented
   fallback; never a silent gather).

**Short last axes.** A last axis shorter than ``block_size`` that is not sharded
(attention kernels ``[d, heads, head_dim]``) would make short blocks and cost more
absmax bytes. When the trailing axes are unsharded too, :func:`block_layout`
lets a block span them instead: walking from the last axis, it takes the first
axis ``j`` whose length times the product ``p`` of the axes after it reaches
``block_size`` (or axis 0), and a block is ``rows`` entries of axis ``j`` (the
largest divisor of its length with ``rows * p <= block_size``) times all ``p``
values after them (``QuantizedArray.rows``). The ``rows`` entries are strided by
``G = shape[j] / rows``: block ``g`` holds entries ``g, g + G, ...``, so the
strided row chunks of the chunked step hold whole blocks (their count divides
``G``). The absmax has shape ``[*shape[:j], G]``; the codes keep the array's
shape. ``(64, 4, 16)`` gets 16 blocks of 256 values instead of 256 of 16. The
split and later axes must be unsharded (per-shard shape, ``local_shape``);
otherwise, or when ``rows`` would be 1, the rules above apply to the last axis.

1-d arrays use their only axis as the last axis. :func:`quantize_blockwise` treats a
0-d array as one block of one value; :func:`dualoptax.quantize_state` never quantizes
0-d leaves (nor any leaf below its ``min_size``).

Non-finite input
----------------
A NaN or ±Inf anywhere in a block poisons that block: its ``absmax`` is stored as NaN
and the whole block decodes to NaN. Non-finite state is never silently turned into
finite numbers, and other blocks are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "QuantizedArray",
  "block_layout",
  "dynamic_code_map",
  "quantize_blockwise",
  "dequantize_blockwise",
]

_NUM_DECADES = 7  # decades 1e-7..1e-6, ..., 1e-1..1


# ---------------------------------------------------------------------------
# The code map.
# ---------------------------------------------------------------------------
def _decade_sizes(signed: bool) -> list[int]:
  # Signed: 2^i positive codes in decade i (+ their negatives); unsigned: 2^(i+1).
  return [2**i if signed else 2 ** (i + 1) for i in range(_NUM_DECADES)]


def _code_map_np(signed: bool) -> np.ndarray:
  values = []
  for i, n in enumerate(_decade_sizes(signed)):
    j = np.arange(n, dtype=np.float64)
    means = 0.1 + 0.9 * (j + 0.5) / n
    values.extend((10.0 ** (i - 6) * means).tolist())
    if signed:
      values.extend((-(10.0 ** (i - 6)) * means).tolist())
  values += [0.0, 1.0]
  assert len(values) == 256
  return np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)


_CODE_MAPS = {s: _code_map_np(s) for s in (True, False)}
for _m in _CODE_MAPS.values():
  _m.setflags(write=False)


def dynamic_code_map(signed: bool = True) -> np.ndarray:
  r"""The 256 values of bitsandbytes' dynamic 8-bit code map, sorted ascending.

  For decades :math:`i = 0..6` with scale :math:`10^{i-6}`, the interval
  :math:`[0.1, 1]` is split into :math:`n_i` equal bins and the bin midpoints

  .. math:: 10^{i-6}\,\bigl(0.1 + 0.9\,(j + \tfrac12) / n_i\bigr),\quad j = 0..n_i-1

  are taken, with :math:`n_i = 2^i` for the signed map (plus the negatives) and
  :math:`2^{i+1}` for the unsigned map; ``0`` and ``1.0`` complete the 256 values.
  Signed: 127 negatives, zero at index 127, min :math:`\approx -0.99297`, max 1.
  Unsigned: zero at index 0, max 1.

  Args:
    signed: the signed map (for values of either sign) or the unsigned one
      (non-negative values, twice the resolution).

  Returns:
    A read-only float32 NumPy array of shape ``(256,)``.

  Examples:
    >>> import dualoptax
    >>> m = dualoptax.dynamic_code_map(signed=True)
    >>> float(m[127]), float(m[255])
    (0.0, 1.0)
  """
  if not isinstance(signed, (bool, np.bool_)):
    raise TypeError(f"signed must be a bool, got {signed!r}")
  return _CODE_MAPS[bool(signed)]


def _midpoints_np(signed: bool) -> np.ndarray:
  """Decision thresholds between consecutive codes, float32 (the exact reference)."""
  c = _CODE_MAPS[signed].astype(np.float64)
  return ((c[:-1] + c[1:]) / 2).astype(np.float32)


def _masked(x: jax.Array, mask: int) -> jax.Array:
  """float32 ``x`` with only the bits of ``mask`` kept: ``0xFF800000`` (sign
  and exponent) leaves its power of two, ``0xFFFFF000`` its 12 leading
  significant bits (the rest, ``x`` minus that, is exact)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(mask)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _denominators(signed: bool) -> list[float]:
  """Per decade ``i``, the denominator of its codes (:func:`_code_value`):
  ``2^(8 + unsigned) 5^(7-i)``, exact in float32."""
  scale = 256.0 if signed else 512.0
  return [scale * 5.0 ** (7 - i) for i in range(_NUM_DECADES)]


def _reciprocal_parts(signed: bool) -> list[tuple[float, float]]:
  """Per decade ``i``, ``1 / den_i`` as ``hi + lo`` (see :func:`_code_value`):
  ``hi`` rounded to 12 significant bits, ``lo`` the float32 rest."""
  parts = []
  for den in _denominators(signed):
    inv = 1.0 / den
    mantissa, exponent = np.frexp(inv)
    hi = float(np.ldexp(np.round(mantissa * 2.0**12), exponent - 12))
    parts.append((hi, float(np.float32(inv - hi))))
  return parts


def _code_value(num: jax.Array, hi: jax.Array, lo: jax.Array) -> jax.Array:
  r"""A code's float32 value from its numerator, without a division.

  Code ``j`` of decade ``i`` (``n`` codes) is

  .. math:: 10^{i-6}\bigl(0.1 + 0.9\,\tfrac{j + 1/2}{n}\bigr)
     = \frac{2n + 18j + 9}{den_i},\quad den_i = 2^{8 + [\text{unsigned}]}\,
     5^{7-i}.

  With :math:`1 / den_i = hi + lo` (:func:`_reciprocal_parts`) and a
  numerator below :math:`2^{12}`, ``num * hi`` is exact and ``num * lo``
  off by far less than an ulp, so the sum rounds to the correctly rounded
  quotient: the code map's float32 value, bit for bit. Each of the 381
  decade codes of the two maps sits at least 9 times that error away from a
  rounding boundary (``tests/test_quantization.py``), so this holds on any
  IEEE float32 arithmetic, with or without fused multiply-adds. A division
  would not: XLA on GPU divides to within an ulp, not exactly.
  """
  return num * hi + num * lo


def _positive_code_value(
  m: jax.Array, signed: bool, divide: Optional[bool] = None
) -> jax.Array:
  r"""The ``m``-th positive code of the map, in closed form (no table look-up).

  ``m`` (float32 holding whole numbers) runs over ``-1`` (the zero code), the
  decades' codes, and their count (the code ``1.0``). Decade ``i`` starts at
  code :math:`n - 1` (signed, :math:`n = 2^i` codes) or :math:`n - 2`
  (unsigned, :math:`n = 2^{i+1}`), so :math:`n` is the highest power of two
  in :math:`k = m + 1` (or :math:`m + 2`), read from ``k``'s float exponent,
  code ``m`` is code :math:`j = k - n` of its decade, and its value is
  the quotient of :math:`2n + 18j + 9` by the decade's denominator.
  Element-wise arithmetic and selects, not a gather from the table, keep
  this a loop that a TPU vectorizes.

  ``divide`` says how the quotient is rounded: True, one division (exact
  where XLA divides correctly rounded, as on the CPU); False,
  :func:`_code_value` (exact on any IEEE arithmetic); None, the division
  when lowered for the CPU (where the fused loops run the 8-bit step about a
  fifth faster with it) and :func:`_code_value` elsewhere.
  """
  if divide is None:
    return jax.lax.platform_dependent(
      m,
      cpu=functools.partial(_positive_code_value, signed=signed, divide=True),
      default=functools.partial(
        _positive_code_value, signed=signed, divide=False
      ),
    )
  sizes = _decade_sizes(signed)
  # Per decade: its denominator, or the two parts of its reciprocal.
  if divide:
    consts = [(den,) for den in _denominators(signed)]
  else:
    consts = _reciprocal_parts(signed)
  k = m + (1.0 if signed else 2.0)
  n = _masked(k, 0xFF800000)  # k's power of two
  num = 18.0 * k - 16.0 * n + 9.0  # 2n + 18j + 9
  chosen = [jnp.float32(c) for c in consts[0]]
  for i in range(1, _NUM_DECADES):
    later = k >= sizes[i]
    chosen = [
      jnp.where(later, jnp.float32(c), x) for c, x in zip(consts[i], chosen)
    ]
  value = num / chosen[0] if divide else _code_value(num, *chosen)
  value = jnp.where(m >= jnp.float32(sum(sizes)), jnp.float32(1.0), value)
  return jnp.where(m < 0, jnp.float32(0.0), value)


# ---------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------
def _check_block_size(block_size: Any) -> int:
  if (
    isinstance(block_size, bool)
    or not isinstance(block_size, (int, np.integer))
    or block_size <= 0
    or (block_size & (block_size - 1)) != 0
  ):
    raise ValueError(
      f"block_size must be a positive power of two, got {block_size!r}"
    )
  return int(block_size)


def block_layout(
  shape: tuple[int, ...],
  block_size: int = 256,
  local_last_dim: Optional[int] = None,
  *,
  local_shape: Optional[tuple[int, ...]] = None,
) -> Optional[tuple[int, ...]]:
  """The block length and last-axis padding used for an array.

  A last axis shorter than ``block_size`` (e.g. attention kernels
  ``[d, heads, head_dim]``) does not make short blocks when the axes it can be
  merged with are unsharded: the block then spans the trailing axes from some
  axis ``j`` on, taking ``rows`` entries of axis ``j`` (strided by
  ``shape[j] / rows``, so that the optimizer's strided row chunks hold whole
  blocks) times every value of the axes after ``j``; see the module docstring.

  Args:
    shape: global shape of the array.
    block_size: nominal block length (a positive power of two).
    local_last_dim: per-shard length of the last axis when the last axis is sharded;
      ``None`` (or the full length) when it is not.
    local_shape: the per-shard shape (``None``: unsharded, or only the last axis
      sharded as ``local_last_dim`` says). Blocks span several axes only where
      those axes are unsharded.

  Returns:
    ``(b, pad)``: blocks of ``b`` values along the last axis after zero-padding it
    by ``pad``; ``(b, 0, rows)`` with ``rows > 1`` for blocks spanning the
    trailing axes as above; or ``None`` when the array has no collective-free
    layout (0-d, empty, or a sharded last axis whose shards cannot hold whole
    blocks).
  """
  block_size = _check_block_size(block_size)
  if len(shape) == 0 or math.prod(shape) == 0:
    return None
  n = int(shape[-1])
  if local_shape is not None and local_last_dim is None:
    local_last_dim = int(local_shape[-1])
  m = n if local_last_dim is None else int(local_last_dim)
  sharded = m != n
  if not sharded and n < block_size and len(shape) > 1:
    spanning = _spanning_layout(shape, block_size, local_shape)
    if spanning is not None:
      return spanning
  if m % block_size == 0:
    return block_size, 0
  b = max(d for d in range(1, min(block_size, m) + 1) if m % d == 0)
  if b == m or b >= max(block_size // 8, 1):
    return b, 0
  if not sharded:
    return block_size, (-n) % block_size
  return None


def _spanning_layout(shape, block_size: int, local_shape) -> Optional[tuple]:
  """``(b, 0, rows)`` for blocks spanning unsharded trailing axes, or None."""
  local = tuple(shape) if local_shape is None else tuple(local_shape)
  inner = 1
  for j in range(len(shape) - 1, -1, -1):
    if int(local[j]) != int(shape[j]):
      return None  # a sharded axis: blocks stop at the last axis (as before)
    if j < len(shape) - 1 and (inner * shape[j] >= block_size or j == 0):
      rows = max(
        d
        for d in range(1, int(shape[j]) + 1)
        if shape[j] % d == 0 and d * inner <= block_size
      )
      return (rows * inner, 0, rows) if rows > 1 else None
    inner *= int(shape[j])
  return None


def _split_axis(shape: tuple[int, ...], b: int, rows: int) -> int:
  """The axis ``j`` a spanning layout splits into ``(rows, shape[j] / rows)``."""
  inner = b // rows
  for j in range(len(shape) - 2, -1, -1):
    if math.prod(shape[j + 1 :]) == inner and shape[j] % rows == 0:
      return j
  raise ValueError(
    f"no axis of shape {shape} holds blocks of {b} values spanning {rows} rows"
  )


def _as_row_blocks(x: jax.Array, b: int, rows: int) -> jax.Array:
  """``x`` of a spanning layout as ``[..., G, b]`` (each block a contiguous row)."""
  j = _split_axis(tuple(x.shape), b, rows)
  g = x.shape[j] // rows
  y = x.reshape(*x.shape[:j], rows, g, b // rows)
  return jnp.swapaxes(y, j, j + 1).reshape(*x.shape[:j], g, b)


def _from_row_blocks(
  y: jax.Array, shape: tuple, b: int, rows: int
) -> jax.Array:
  """Inverse of :func:`_as_row_blocks`."""
  j = _split_axis(tuple(shape), b, rows)
  g = shape[j] // rows
  y = y.reshape(*shape[:j], g, rows, b // rows)
  return jnp.swapaxes(y, j, j + 1).reshape(shape)


def absmax_shape(shape: tuple, b: int, pad: int, rows: int = 1) -> tuple:
  """Shape of the absmax of an array of ``shape`` in a given layout."""
  if rows > 1:
    j = _split_axis(tuple(shape), b, rows)
    return (*shape[:j], shape[j] // rows)
  shape = tuple(shape) or (1,)
  return (*shape[:-1], (shape[-1] + pad) // b)


# ---------------------------------------------------------------------------
# The quantized array.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A block-wise 8-bit array: a pytree with two array children and static metadata.

  Attributes:
    codes: ``uint8``, the original shape with the last axis padded by ``pad``
      (a 0-d array becomes ``(1,)``): code indices into the code map. Block ``k`` of a
      row is ``codes[..., k * block_size:(k + 1) * block_size]``.
    absmax: ``float32[..., num_blocks]`` per-block absolute maximum (NaN marks a block
      that held a non-finite value).
    shape: the original shape (static).
    dtype: the original dtype name (static), restored by dequantization.
    signed: which code map (static).
    pad: zero-padding added to the last axis (static).
    block_size: values per block (static).
    rows: 1 for blocks along the last axis; ``> 1`` when a block spans the
      trailing axes (``rows`` strided entries of the split axis, see
      :func:`block_layout`); the absmax then has shape ``[..., shape[j] / rows]``
      (static).
  """

  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...]
  dtype: str
  signed: bool
  pad: int = 0
  block_size: int = 256
  rows: int = 1

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.codes.shape)) + 4 * int(np.prod(self.absmax.shape))


jax.tree_util.register_dataclass(
  QuantizedArray,
  data_fields=["codes", "absmax"],
  meta_fields=["shape", "dtype", "signed", "pad", "block_size", "rows"],
)


# ---------------------------------------------------------------------------
# Encode / decode.
# ---------------------------------------------------------------------------
def _encode_normalized(xn: jax.Array, signed: bool) -> jax.Array:
  r"""Exact nearest code of ``xn`` (values normalized to about [-1, 1]), as uint8.

  Ties at float32 resolution go to the code of larger magnitude.

  Within decade :math:`i` (``n`` codes, :math:`p = 10^{6-i}`) the codes are
  the midpoints of ``n`` equal bins, so the thresholds between them sit at
  whole bin positions :math:`r = (|x| p - 0.1)\, n / 0.9`: the nearest one
  is bin boundary :math:`b = \lfloor r + 1/2 \rfloor`, clipped to the
  decade (boundary 0 is the one with the decade below, or with the zero
  code; boundary ``n`` exists in the top decade alone, with the code 1.0).
  One comparison with that threshold, the midpoint of the float32 codes
  :math:`b - 1` and :math:`b` (:func:`_code_value`, exact), picks the code;
  the bin position only has to be right to within a fifth of a bin, so its
  float32 rounding does not matter.
  """
  a = jnp.abs(xn)
  sizes = _decade_sizes(signed)
  parts = _reciprocal_parts(signed)
  positive = _CODE_MAPS[signed][_CODE_MAPS[signed] > 0]
  # Decade by comparison with 1e-6..1e-1: the float exponent alone cannot tell
  # decades of 10 apart. Selects instead of gathers keep this one fused loop.
  # ``below``: the code under the decade's first (the decade below's last, or
  # zero).
  n, p = jnp.float32(sizes[0]), jnp.float32(1e6)
  hi, lo = (jnp.float32(c) for c in parts[0])
  below = jnp.float32(0.0)
  for i in range(1, _NUM_DECADES):
    in_decade = a >= jnp.float32(10.0 ** (i - 7))
    n = jnp.where(in_decade, jnp.float32(sizes[i]), n)
    p = jnp.where(in_decade, jnp.float32(10.0 ** (6 - i)), p)
    hi = jnp.where(in_decade, jnp.float32(parts[i][0]), hi)
    lo = jnp.where(in_decade, jnp.float32(parts[i][1]), lo)
    below = jnp.where(in_decade, positive[sum(sizes[:i]) - 1], below)
  top = in_decade.astype(jnp.float32)  # the decade whose last code is 1.0
  r = (a * p - 0.1) * (n * jnp.float32(1.0 / 0.9))  # position, in bins
  b = jnp.clip(jnp.floor(r + 0.5), 0.0, n - 1.0 + top)  # nearest boundary
  # Codes b - 1 and b of the decade: numerators 2n + 18j + 9.
  t = 18.0 * b + 2.0 * n
  upper = jnp.where(b == n, jnp.float32(1.0), _code_value(t + 9.0, hi, lo))
  lower = jnp.where(b == 0.0, below, _code_value(t - 9.0, hi, lo))
  threshold = 0.5 * (lower + upper)
  # Index among the positive codes (-1: zero; the decade's first code is
  # n - 1 signed, n - 2 unsigned).
  first_code = n - (1.0 if signed else 2.0)
  m = (first_code + b - 1.0).astype(jnp.int32) + (a >= threshold).astype(
    jnp.int32
  )
  if signed:
    # Positive codes sit at 128..255 (1.0 last); negatives mirror them at 126..0
    # and have no -1.0.
    neg = xn < 0
    m = jnp.minimum(m, jnp.where(neg, 126, 127))
    return jnp.where(neg, 126 - m, 128 + m).astype(jnp.uint8)
  return (1 + m).astype(jnp.uint8)


def _decode_normalized(
  codes: jax.Array, signed: bool, divide: Optional[bool] = None
) -> jax.Array:
  """``code_map[codes]`` as float32, computed from the codes (no gather);
  ``divide`` as in :func:`_positive_code_value`."""
  c = codes.astype(jnp.float32)
  if not signed:
    return _positive_code_value(c - 1.0, signed, divide)  # code 0 is zero
  # Positive codes sit at 128..255, zero at 127, negatives mirror at 126..0.
  value = _positive_code_value(jnp.abs(c - 127.0) - 1.0, signed, divide)
  return jnp.where(c < 127.0, -value, value)


def _refined_reciprocal(m: jax.Array, r: jax.Array) -> jax.Array:
  r"""The float32 nearest to :math:`1/m`, from ``r`` within two ulps of it.

  XLA on GPU divides to within an ulp, not exactly; the encoder's block scale
  must be the correctly rounded reciprocal for the codes to be the same on
  every platform. Of ``r`` and its four nearest floats, this keeps the one
  with the smallest :math:`|1 - m c|`: with :math:`m` and :math:`c` split
  into 12-bit halves (:func:`_masked`) the four partial products are
  exact and :math:`1 - m_h c_h` is exact (both near 1), so the residual is
  known to far better than the gap between neighbours (about an ulp of 1).
  Only where ``r`` is a normal float; elsewhere ``r`` itself.
  """
  m_hi = _masked(m, 0xFFFFF000)
  m_lo = m - m_hi

  def residual(c):
    c_hi = _masked(c, 0xFFFFF000)
    c_lo = c - c_hi
    return jnp.abs(
      (((1.0 - m_hi * c_hi) - m_hi * c_lo) - m_lo * c_hi) - m_lo * c_lo
    )

  best, error = r, residual(r)
  for step in (-2, -1, 1, 2):
    c = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(r, jnp.int32) + step, jnp.float32
    )
    e = residual(c)
    better = e < error
    best, error = jnp.where(better, c, best), jnp.where(better, e, error)
  normal = (jnp.abs(r) >= jnp.finfo(jnp.float32).tiny) & jnp.isfinite(r)
  return jnp.where(normal, best, r)


def _block_peak(blocks: jax.Array, axis: int = -1) -> jax.Array:
  """The largest ``|value|`` of each block (``axis`` kept, length 1), with a
  NaN or Inf counting as +inf, so the peak is +inf exactly when the block
  holds one (a vectorized max may drop a NaN, never an inf). The max is
  exact in any order: peaks of a block's parts, maxed, are its peak."""
  return jnp.max(
    jnp.where(jnp.isfinite(blocks), jnp.abs(blocks), jnp.inf),
    axis=axis,
    keepdims=True,
  )


def _block_scale(peak: jax.Array, refine: Optional[bool] = None):
  """``(absmax, inv, finite)`` of blocks of ``peak`` (:func:`_block_peak`):
  the stored absmax (NaN for a block with a NaN or Inf), the reciprocal
  the values are scaled by (0 for a zero or non-finite block, whose codes
  are then the zero code) and whether the block is finite. ``refine`` as
  in :func:`_encode_blocks`."""
  finite = peak < jnp.inf
  absmax = jnp.where(finite, peak, jnp.float32(jnp.nan))
  # One reciprocal per block, then a multiply per value (as the bitsandbytes
  # kernel).
  safe = jnp.where(finite & (peak > 0), peak, 1.0)
  refined = lambda m: _refined_reciprocal(m, 1.0 / m)
  if refine is None:
    inv = jax.lax.platform_dependent(
      safe, cpu=lambda m: 1.0 / m, default=refined
    )
  else:
    inv = refined(safe) if refine else 1.0 / safe
  inv = jnp.where(finite & (peak > 0), inv, 0.0)
  return absmax, inv, finite


def _encode_scaled(
  blocks: jax.Array, inv: jax.Array, finite: jax.Array, signed: bool
) -> jax.Array:
  """The codes of ``blocks`` given their blocks' ``inv`` and ``finite``
  (:func:`_block_scale`, broadcast against ``blocks``)."""
  xn = jnp.where(finite, blocks, 0.0) * inv
  if not signed:
    xn = jnp.maximum(xn, 0.0)
  return _encode_normalized(xn, signed)


def _encode_blocks(
  blocks: jax.Array, signed: bool, refine: Optional[bool] = None
):
  """Codes and absmax of float32 ``blocks`` whose last axis is one block.

  Returns ``(codes, absmax)``: uint8 codes of ``blocks``' shape and the
  float32 absmax with the last axis kept (length 1). Both the whole-array
  encoder and the fused TPU kernel (on one block-wide slice of a tile) call
  it; the kernel's column-major form runs its three parts
  (:func:`_block_peak`, :func:`_block_scale`, :func:`_encode_scaled`) on a
  block's pieces.
  ``refine``: whether the block scale's division is refined to the nearest
  float32 (:func:`_refined_reciprocal`); None: everywhere but where lowered
  for the CPU, whose division is exact (there the refinement cost the
  8-bit step's fused loops about a tenth of their time, measured).
  """
  absmax, inv, finite = _block_scale(_block_peak(blocks), refine)
  return _encode_scaled(blocks, inv, finite, signed), absmax


def _padded(x: jax.Array, pad: int) -> jax.Array:
  if x.ndim == 0:
    x = x.reshape(1)
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x


def _per_value(a: jax.Array, b: int) -> jax.Array:
  """``[..., nb] -> [..., nb * b]``: each block's scalar repeated over its values."""
  return jnp.broadcast_to(a[..., None], (*a.shape, b)).reshape(
    *a.shape[:-1], -1
  )


def quantize_blockwise(
  x: jax.Array,
  *,
  signed: bool,
  block_size: int = 256,
  local_last_dim: Optional[int] = None,
) -> QuantizedArray:
  r"""Quantizes ``x`` to 8 bits, block-wise along its last axis.

  .. math::

    \mathrm{absmax}_b = \max_{i \in b} |x_i|, \qquad
    c_i = \operatorname*{arg\,min}_c |\mathrm{code\_map}[c] - x_i \cdot
    \mathrm{absmax}_b^{-1}|

  The encoder is closed-form: six comparisons of :math:`|x|` with
  :math:`10^{-6}, \dots, 10^{-1}` give the decade, the bin inside it is linear, and
  one comparison with the decision thresholds of the neighbouring codes fixes
  rounding. An all-zero block decodes to exact zeros. A block holding NaN or ±Inf
  decodes to NaN (all of it). For ``signed=False`` negative inputs are clamped to 0.
  A last axis shorter than ``block_size`` gets blocks spanning the trailing axes
  (see :func:`block_layout`; ``x`` is taken as unsharded apart from
  ``local_last_dim``).

  Args:
    x: a floating-point array of any shape (0-d arrays become one block of one value).
    signed: use the signed code map (values of either sign) or the unsigned one.
    block_size: nominal block length, a positive power of two.
    local_last_dim: per-shard length of the last axis if it is sharded (see
      :func:`block_layout`); ``None`` if unsharded.

  Returns:
    A :class:`QuantizedArray` (a pytree of uint8 codes and float32 absmax).

  Raises:
    ValueError: ``block_size`` is not a positive power of two, or the sharded last
      axis cannot hold whole blocks.

  Examples:
    >>> import jax, jax.numpy as jnp, dualoptax
    >>> x = jax.random.normal(jax.random.key(0), (4, 512))
    >>> q = dualoptax.quantize_blockwise(x, signed=True)
    >>> q.codes.shape, q.absmax.shape
    ((4, 512), (4, 2))
    >>> dualoptax.dequantize_blockwise(q).shape
    (4, 512)
  """
  block_size = _check_block_size(block_size)
  if not isinstance(signed, (bool, np.bool_)):
    raise TypeError(f"signed must be a bool, got {signed!r}")
  signed = bool(signed)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
  shape = tuple(x.shape) if x.ndim else ()
  layout = block_layout(shape if shape else (1,), block_size, local_last_dim)
  if layout is None:
    raise ValueError(
      f"local_last_dim={local_last_dim} cannot hold whole blocks of an array of "
      f"shape {shape} (block_size={block_size}) without padding a sharded axis"
    )
  return _quantize_with_layout(x, signed, *layout)


def _quantize_with_layout(
  x: jax.Array, signed: bool, b: int, pad: int, rows: int = 1
) -> QuantizedArray:
  """Encodes ``x`` with a given layout (the update path reuses the init layout)."""
  if rows > 1:  # blocks spanning trailing axes: encoded as rows of [..., G, b]
    q = _quantize_with_layout(_as_row_blocks(x, b, rows), signed, b, 0)
    return QuantizedArray(
      codes=_from_row_blocks(q.codes, tuple(x.shape), b, rows),
      absmax=q.absmax[..., 0],
      shape=tuple(x.shape),
      dtype=q.dtype,
      signed=q.signed,
      pad=0,
      block_size=int(b),
      rows=int(rows),
    )
  shape = tuple(x.shape)
  xp = _padded(x.astype(jnp.float32), pad)
  blocks = xp.reshape(*xp.shape[:-1], xp.shape[-1] // b, b)
  codes, absmax = _encode_blocks(blocks, signed)
  codes = codes.reshape(xp.shape)
  absmax = absmax[..., 0]
  return QuantizedArray(
    codes=codes,
    absmax=absmax,
    shape=shape,
    dtype=jnp.dtype(x.dtype).name,
    signed=bool(signed),
    pad=int(pad),
    block_size=int(b),
  )


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
  r"""Decodes a :class:`QuantizedArray`: :math:`\mathrm{code\_map}[c_i]\cdot\mathrm{absmax}_b`.

  ``code_map[c]`` is computed from ``c`` (see :func:`dynamic_code_map`: a
  quotient of two integers, rounded once, see ``_code_value``), equal to the
  table bit for bit on any IEEE float32 arithmetic, without gathering from
  the table.

  Args:
    q: the output of :func:`quantize_blockwise`.

  Returns:
    An array of the original shape and dtype.
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"q must be a QuantizedArray, got {type(q).__name__}")
  if (
    q.rows > 1
  ):  # blocks spanning trailing axes: decoded as rows of [..., G, b]
    b = q.block_size
    rowwise = QuantizedArray(
      _as_row_blocks(q.codes, b, q.rows),
      q.absmax[..., None],
      (),
      q.dtype,
      q.signed,
      0,
      b,
    )
    rowwise = dataclasses.replace(rowwise, shape=tuple(rowwise.codes.shape))
    return _from_row_blocks(dequantize_blockwise(rowwise), q.shape, b, q.rows)
  values = _decode_normalized(q.codes, q.signed) * _per_value(
    q.absmax, q.block_size
  )
  if q.pad:
    values = values[..., : values.shape[-1] - q.pad]
  return values.reshape(q.shape).astype(q.dtype)
