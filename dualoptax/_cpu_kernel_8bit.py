"""The fused CPU kernel for DualOptim+ with 8-bit moments (decode, step, re-encode).

Per block of ``b`` values of a leaf (``dualoptax.quantization``'s layout: blocks along
the last axis, padded), the kernel makes three short passes over data in L1 cache:

1. decode every moment (``code_map[c] * absmax``), compute the step exactly as the
   float kernel does (``_cpu_kernel.element_math``), write the update and keep the new
   moments in per-thread scratch rows. On CPUs with AVX-512 VBMI the codes are first
   decoded into those rows 64 at a time with byte permutes (``_vbmi_decode64``, about
   4x faster than a gather and bit-identical to it); elsewhere the step's loop gathers
   from the 256-entry map;
2. take each new moment's absmax as an integer maximum over the float bit patterns
   with the sign bit cleared (the same order as on floats, and a non-finite value
   shows as a pattern ``>= 0x7F800000``), so the loop has no branch;
3. re-encode each moment with the exact nearest code (a block that held a
   non-finite value gets absmax NaN and the zero code, as ``quantize_blockwise``).

Each pass is a plain loop over a block, which LLVM vectorizes. No float32 moment
ever reaches memory.

The encoder is a table look-up on the float's bits (``encoder_cells``): the top 16
bits of ``x`` (sign, exponent and 7 mantissa bits) name a cell; no cell holds two
decision thresholds (midpoints between codes), which is checked when the table is
built, so one int32 entry per cell, added to the low 16 bits, carries into the next
code exactly at the threshold. This equals the exact-nearest encoder of
``quantization._encode_normalized`` (ties to the larger magnitude); the tests
compare them code for code, on every cell's first and last value and on every
threshold and its neighbours.

On CPUs with AVX-512 F and DQ a closed form replaces that gather on the common path
(``_avx512_encode16``, tables from ``encoder_segments``): the float's exponent and one
comparison with the map's own threshold give the decade exactly, and the code is the
integer part of a linear function of the value within it, computed for 16 values in
about 20 vector operations. Lanes within ``2^-12`` bins of a code edge (where float
rounding could decide) are flagged and their sixteen re-encoded with the table, so
the codes equal the table's for every float32 below 2 in magnitude; the tests check
all of them.

Moment order and maps: ``m_k`` and ``v_k`` of every present objective (signed map),
then ``m_B`` (signed) and ``v_B`` (unsigned), as ``dual_optim_plus_8bit`` stores them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualoptax import _cpu_kernel
from dualoptax import quantization as _q

# Values per prange iteration: enough to amortize the scratch allocation.
_GROUP_VALUES = 16384


def _zero_code(signed: bool) -> int:
  return 127 if signed else 0


def encoder_cells(signed: bool) -> np.ndarray:
  r"""The encoder's table: one int32 per value of the top 16 bits of a float32.

  A cell holds the floats that share their top 16 bits (sign, exponent and 7
  mantissa bits). Every cell holds at most one decision threshold (midpoint between
  neighbouring codes) of the map; this is checked here. With ``c`` the code at the
  start of the cell and ``t`` the low 16 bits of the threshold in it (``2^{16}`` if
  none), the entry is chosen so that the code of a float with bits ``x`` is

  .. math::

    \left(T[x_{31..16}] + m\right) \gg 16, \qquad
    m = \begin{cases} x_{15..0} & x \ge 0 \\ \mathtt{0xFFFF} - x_{15..0} & x < 0
    \end{cases}

  — for a positive cell ``T = (c << 16) + 2^{16} - t``, so the sum carries into the
  next code exactly when the low bits reach ``t`` (a tie goes to the larger
  magnitude, as in ``quantization._encode_normalized``); a negative cell of the
  signed map mirrors it onto the negative codes ``254 - c`` (there is no -1.0, so
  the most negative code is 0); negative values of the unsigned map get the zero
  code, as the XLA encoder's clamp to 0. Only finite values of magnitude below 2 are
  meaningful (the kernel's normalized values; a non-finite block never reaches the
  encoder).
  """
  thresholds = _q._magnitude_thresholds_np(signed)  # pylint: disable=protected-access
  bits = thresholds[np.isfinite(thresholds)].view(np.int32).astype(np.int64)
  lo = np.arange(1 << 15, dtype=np.int64) << 16  # each positive cell's first bits
  below = np.searchsorted(bits, lo, side="left")  # thresholds under the cell
  count = np.searchsorted(bits, lo + (1 << 16), side="left") - below
  if count.max() > 1:
    raise AssertionError("an encoder cell holds two thresholds")
  c = np.minimum(_zero_code(signed) + below, 255)
  t = np.where(count == 1, bits[np.minimum(below, bits.size - 1)] - lo, 1 << 16)
  table = np.zeros(1 << 16, np.int64)
  table[: 1 << 15] = (c << 16) + (1 << 16) - t
  if signed:  # the negative cells (sign bit set): codes 254 - c, never below 0
    crosses = (count == 1) & (c <= 253)
    table[1 << 15:] = (np.maximum(254 - c, 0) << 16) + np.where(crosses, t - (1 << 16), 0)
  return table.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _codec():
  """numba encoders ``x -> uint8`` (signed, unsigned) of normalized values."""
  import numba  # pylint: disable=import-outside-toplevel

  def make(signed):
    cells = encoder_cells(signed)
    low = np.int32(0xFFFF)
    sixteen, sign = np.int32(16), np.int32(31)

    # Every intermediate is cast back to int32: numba widens int32 arithmetic to
    # int64, which would halve the vector width.
    @numba.njit(inline="always", error_model="numpy")
    def encode(x):
      bits = np.float32(x).view(np.int32)
      cell = np.int32(np.int32(bits >> sixteen) & low)
      m = np.int32(np.int32(bits ^ np.int32(bits >> sign)) & low)
      return np.uint8(np.int32(np.int32(cells[cell] + m) >> sixteen))
    return encode

  return make(True), make(False)


# Closed-form AVX-512 encoder (``_avx512_encode16``): the normalized magnitude is
# raised to 2**(_TINY_EXPONENT - 127) (far below the smallest code's threshold, so the
# code is still 0) to bound the float exponent to 32 values, which index the binade
# tables by their low 5 bits; a lane whose position lies within _NEAR_EDGE bins of an
# integer is re-encoded with the exact table (2^-12 = 2.4e-4 bins against at most
# ~3e-5 bins of float32 rounding in the thresholds and the closed form; checked on
# every float32).
_TINY_EXPONENT = 101
_NEAR_EDGE = 2.0 ** -12


def encoder_segments(signed: bool) -> dict[str, np.ndarray]:
  r"""Tables of the closed-form AVX-512 encoder (:func:`_avx512_encode16`).

  A magnitude ``a`` lies in one of 9 segments: below the first threshold (code 0),
  in decade ``d = 0..6`` of the map (``n_d`` codes: ``2^d`` signed, ``2^{d+1}``
  unsigned) or at 1.0. Its segment is ``slo[e] + [a \ge th[e]]``, ``e`` the float
  exponent of ``a``: every binade holds at most one segment edge (checked here),
  and the edges are the map's own float32 thresholds, so the segment is exact. In
  segment ``s`` the code sits at the integer part of

  .. math::

    z = \min\left(a \cdot A_s + B_s,\; Z_s\right), \qquad
    A_s = \frac{10^{6-d} n_d}{0.9}, \quad
    B_s = \mathrm{first}_s + o - \frac{0.1\, n_d}{0.9}

  (``o = 127`` signed, ``0`` unsigned; ``Z_s`` caps the stretch between the
  decade's end and the next segment at its last code; the zero and 1.0 segments
  have ``A = 0`` and ``z`` half way into their code). Within a decade the thresholds
  are the bin edges, so :math:`\lfloor z \rfloor` is the exact code unless ``z``
  lies within ``2^{-12}`` of an integer (the encoder then flags the lane). Negative
  values of the signed map take :math:`\lfloor 255 - z \rfloor` (their codes mirror
  at ``254 - c``; there is no -1.0, so its segment gives code 0).

  Returns:
    ``A, B, Z`` (16 float32, by segment), ``th`` (32 float32: the segment edge in
    each binade, ``inf`` if none) and ``slo`` (32 int32: the segment below it), by
    exponent modulo 32.
  """
  thresholds = _q._magnitude_thresholds_np(signed)  # pylint: disable=protected-access
  # The XLA encoder's per-decade slope s, offset o and first/last positive-code
  # index (0 for the smallest positive code); the magnitude index counts zero too.
  decades = _q._encoder_constants(signed)  # pylint: disable=protected-access
  offset = float(_zero_code(signed))
  one = decades[-1][3] + 2  # magnitude index of 1.0
  a_s, b_s, z_s = (np.zeros(16, np.float64) for _ in range(3))
  b_s[:] = z_s[:] = one + offset + 0.5  # 1.0 (and the unused entries)
  b_s[0] = z_s[0] = offset + 0.5  # zero
  for s, (slope, shift, lo, hi) in enumerate(decades, start=1):
    a_s[s] = slope
    b_s[s] = (1 + lo) + offset - shift
    z_s[s] = (1 + hi) + offset + 0.5
  edges = thresholds[[int(lo) for _, _, lo, _ in decades] + [int(one) - 1]].astype(
      np.float64)
  th = np.full(32, np.inf, np.float32)
  slo = np.zeros(32, np.int32)
  if not edges[0] > 2.0 ** (_TINY_EXPONENT - 126):
    raise AssertionError("the first threshold is in the raised binade")
  for exponent in range(_TINY_EXPONENT, 128):  # every exponent of a in [tiny, 2)
    lo, hi = 2.0 ** (exponent - 127), 2.0 ** (exponent - 126)
    inside = edges[(edges > lo) & (edges < hi)]
    if inside.size > 1:
      raise AssertionError("a binade holds two segment edges")
    slo[exponent % 32] = np.sum(edges <= lo)
    if inside.size:
      th[exponent % 32] = inside[0]
  return dict(A=a_s.astype(np.float32), B=b_s.astype(np.float32),
              Z=z_s.astype(np.float32), th=th, slo=slo)


def _broadcast(builder, scalar, vector_type):
  """LLVM IR (inside an intrinsic's codegen): ``vector_type`` with ``scalar`` in every
  lane."""
  from llvmlite import ir  # pylint: disable=import-outside-toplevel
  i32 = ir.IntType(32)
  lane0 = builder.insert_element(ir.Constant(vector_type, None), scalar,
                                 ir.Constant(i32, 0))
  return builder.shuffle_vector(
      lane0, lane0, ir.Constant(ir.VectorType(i32, vector_type.count),
                                [0] * vector_type.count))


@functools.lru_cache(maxsize=None)
def _avx512_encode16(signed: bool):
  r"""numba intrinsic ``encode16(src, dst, inv) -> flags`` (addresses as ints): the
  codes of ``src[i] * inv`` for 16 consecutive float32 values, by the closed form of
  :func:`encoder_segments` in about 20 vector operations (no gather). Returns a
  non-zero int32 if some lane lay within ``2^{-12}`` bins of a code edge: the caller
  re-encodes those 16 values with the exact table (:func:`encoder_cells`).
  """
  from llvmlite import ir  # pylint: disable=import-outside-toplevel
  from numba import types  # pylint: disable=import-outside-toplevel
  from numba.core import cgutils  # pylint: disable=import-outside-toplevel
  from numba.extending import intrinsic  # pylint: disable=import-outside-toplevel

  tables = encoder_segments(signed)
  i16, i32 = ir.IntType(16), ir.IntType(32)
  floats, ints = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
  vector_f = lambda values: ir.Constant(floats, [float(x) for x in values])
  vector_i = lambda values: ir.Constant(ints, [int(x) for x in values])
  splat_f = lambda x: vector_f([x] * 16)
  splat_i = lambda x: vector_i([x] * 16)
  mxcsr = ir.Constant(i32, 4)  # "current rounding direction"

  @intrinsic
  def encode16(typingctx, src, dst, inv):  # pylint: disable=unused-argument
    def codegen(context, builder, signature, args):
      src, dst, inv = args

      def declare(name, ret, *params):
        return cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ret, params), name)
      permute2_f = declare("llvm.x86.avx512.vpermi2var.ps.512", floats, floats, ints,
                           floats)
      permute2_i = declare("llvm.x86.avx512.vpermi2var.d.512", ints, ints, ints, ints)
      permute_f = declare("llvm.x86.avx512.permvar.sf.512", floats, floats, ints)
      fma = declare("llvm.fma.v16f32", floats, floats, floats, floats)
      vmax = declare("llvm.x86.avx512.max.ps.512", floats, floats, floats, i32)
      vmin = declare("llvm.x86.avx512.min.ps.512", floats, floats, floats, i32)
      y = builder.fmul(builder.load(builder.inttoptr(src, floats.as_pointer()),
                                    align=4), _broadcast(builder, inv, floats))
      tiny = splat_f(2.0 ** (_TINY_EXPONENT - 127))
      if signed:  # max(|y|, tiny) in one vrangeps (imm 0b1011: max |.|, sign cleared)
        vrange = declare("llvm.x86.avx512.mask.range.ps.512", floats, floats, floats,
                         i32, floats, i16, i32)
        a = builder.call(vrange, [y, tiny, ir.Constant(i32, 0b1011),
                                  ir.Constant(floats, None), ir.Constant(i16, -1), mxcsr])
      else:  # negative values rise to tiny: the zero code
        a = builder.call(vmax, [y, tiny, mxcsr])
      exponent = builder.lshr(builder.bitcast(a, ints), splat_i(23))
      edge = builder.call(permute2_f, [vector_f(tables["th"][:16]), exponent,
                                       vector_f(tables["th"][16:])])
      below = builder.call(permute2_i, [vector_i(tables["slo"][:16]), exponent,
                                        vector_i(tables["slo"][16:])])
      segment = builder.select(builder.fcmp_ordered(">=", a, edge),
                               builder.add(below, splat_i(1)), below)
      coef = [builder.call(permute_f, [vector_f(tables[k]), segment]) for k in "ABZ"]
      z = builder.call(vmin, [builder.call(fma, [a, coef[0], coef[1]]), coef[2], mxcsr])
      if signed:
        negative = builder.icmp_signed("<", builder.bitcast(y, ints), splat_i(0))
        z = builder.select(negative, builder.fsub(splat_f(255.0), z), z)
      high = builder.fptosi(builder.fadd(z, splat_f(_NEAR_EDGE)), ints)
      low = builder.fptosi(builder.fsub(z, splat_f(_NEAR_EDGE)), ints)
      codes = ir.VectorType(ir.IntType(8), 16)
      builder.store(builder.trunc(high, codes), builder.inttoptr(dst, codes.as_pointer()),
                    align=1)
      return builder.zext(builder.bitcast(builder.icmp_signed("!=", high, low), i16), i32)
    return types.int32(types.intp, types.intp, types.float32), codegen

  return encode16


@functools.lru_cache(maxsize=None)
def _avx512_row_encoders():
  """numba ``encode_row(x, codes, count, inv)`` (signed, unsigned): ``codes[i]`` = the
  code of ``x[i] * inv`` for ``i < count``, 16 at a time by the closed form, the
  flagged sixteens, the tail and any row with ``inv = inf`` by the table."""
  import numba  # pylint: disable=import-outside-toplevel

  def make(encode16, encode):
    @numba.njit(inline="always", error_model="numpy")
    def encode_row(x, codes, count, inv):
      # A subnormal absmax gives inv = inf: values beyond the closed form's range.
      full = count - count % 16 if inv < np.float32(np.inf) else 0
      for e in range(0, full, 16):
        if encode16(x.ctypes.data + 4 * e, codes.ctypes.data + e, inv):
          for j in range(e, e + 16):
            codes[j] = encode(x[j] * inv)
      for e in range(full, count):
        codes[e] = encode(x[e] * inv)
    return encode_row

  enc_signed, enc_unsigned = _codec()
  return (make(_avx512_encode16(True), enc_signed),
          make(_avx512_encode16(False), enc_unsigned))


@functools.lru_cache(maxsize=None)
def avx512_available() -> bool:
  """Whether numba compiles for this host's CPU and it has AVX-512 F and DQ (the
  closed-form encoder); ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` turn it off."""
  return _host_has("avx512f", "avx512dq")


def _host_has(*features: str) -> bool:
  import numba  # pylint: disable=import-outside-toplevel
  from llvmlite import binding  # pylint: disable=import-outside-toplevel
  if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
    return False
  host = binding.get_host_cpu_features()
  return all(host.get(f) for f in features)


@functools.lru_cache(maxsize=None)
def vbmi_available() -> bool:
  """Whether numba compiles for this host's CPU and it has AVX-512 VBMI (``vpermi2b``).

  A user who sets ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` (e.g. for portable
  caching) gets the portable gather decode.
  """
  return _host_has("avx512vbmi", "avx512bw")


def code_map_planes(signed: bool) -> np.ndarray:
  """The code map's float32 values as 4 planes of 256 bytes (byte ``p`` of every value,
  little-endian), the table layout of the VBMI decode."""
  table = np.asarray(_q.dynamic_code_map(signed), "<f4").view(np.uint8).reshape(256, 4)
  return np.ascontiguousarray(table.T).reshape(-1)


@functools.lru_cache(maxsize=None)
def _vbmi_decode64():
  r"""numba intrinsic ``decode64(planes, codes, out, absmax)`` (addresses as ints):
  ``out[i] = code_map[codes[i]] * absmax`` for 64 consecutive codes.

  Each byte plane of the 256-entry map is four 64-byte registers; ``vpermi2b`` looks up
  64 codes in two of them (the low 7 bits) and a select on the top bit picks the
  half, so a plane costs two permutes and a blend, and the four planes are interleaved
  back into 64 floats. The result is the map's float32 value times ``absmax``, the same
  product as the gather ``code_map[c] * absmax``.
  """
  from llvmlite import ir  # pylint: disable=import-outside-toplevel
  from numba import types  # pylint: disable=import-outside-toplevel
  from numba.core import cgutils  # pylint: disable=import-outside-toplevel
  from numba.extending import intrinsic  # pylint: disable=import-outside-toplevel

  bytes64 = ir.VectorType(ir.IntType(8), 64)
  i32 = ir.IntType(32)
  interleave = ir.Constant(ir.VectorType(i32, 128),
                           [x for i in range(64) for x in (i, 64 + i)])

  @intrinsic
  def decode64(typingctx, planes, codes, out, absmax):  # pylint: disable=unused-argument
    def codegen(context, builder, signature, args):
      planes, codes, out, absmax = args
      permute = cgutils.get_or_insert_function(
          builder.module, ir.FunctionType(bytes64, [bytes64] * 3),
          "llvm.x86.avx512.vpermi2var.qi.512")

      def load(address, offset):
        at = builder.add(address, ir.Constant(address.type, offset))
        return builder.load(builder.inttoptr(at, bytes64.as_pointer()), align=1)

      index = load(codes, 0)
      upper = builder.icmp_signed("<", index, ir.Constant(bytes64, None))  # code >= 128
      plane = []
      for p in range(4):
        t = [load(planes, 256 * p + 64 * q) for q in range(4)]
        plane.append(builder.select(upper, builder.call(permute, [t[2], index, t[3]]),
                                    builder.call(permute, [t[0], index, t[1]])))
      low = builder.bitcast(builder.shuffle_vector(plane[0], plane[1], interleave),
                            ir.VectorType(ir.IntType(16), 64))
      high = builder.bitcast(builder.shuffle_vector(plane[2], plane[3], interleave),
                             ir.VectorType(ir.IntType(16), 64))
      floats = ir.VectorType(ir.FloatType(), 64)
      values = builder.bitcast(builder.shuffle_vector(low, high, interleave), floats)
      builder.store(builder.fmul(values, _broadcast(builder, absmax, floats)),
                    builder.inttoptr(out, floats.as_pointer()), align=1)
      return context.get_dummy_value()
    return types.void(types.intp, types.intp, types.intp, types.float32), codegen

  return decode64


def _moment_names(v: _cpu_kernel.Variant) -> list[tuple[str, bool]]:
  """(name, signed) of the quantized moments, in argument order."""
  names = [(f"{m}{i}", True) for i in range(v.objectives) for m in ("m", "v")]
  return names + [("mB", True), ("vB", False)]


def _loop_source(v: _cpu_kernel.Variant, parallel: bool, vbmi: bool,
                 avx512: bool) -> str:
  k = range(v.objectives)
  moments = _moment_names(v)
  grads = [f"g{i}" for i in k][1:]
  args = ["s", "dims", *grads, "p", "u"] + [f"c_{n}, a_{n}" for n, _ in moments]
  lines = [f"@numba.njit(parallel={parallel}, error_model='numpy')",
           f"def loop({', '.join(args)}):",
           *_cpu_kernel._scalar_lines(v, "float32"),  # pylint: disable=protected-access
           "  rows = np.int64(dims[0]); L = np.int64(dims[1])",
           "  Lp = np.int64(dims[2]); b = np.int64(dims[3])",
           "  nb = Lp // b",
           "  total = rows * nb",
           "  zero = np.float32(0)",
           "  finite_end = np.int32(0x7F800000)",
           f"  per_group = max(1, {_GROUP_VALUES} // b)",
           f"  for grp in {'numba.prange' if parallel else 'range'}("
           "(total + per_group - 1) // per_group):"]
  body = []
  for n, _ in moments:  # scratch rows of this thread, and their bit patterns
    body += [f"x_{n} = np.empty(b, np.float32)", f"xi_{n} = x_{n}.view(np.int32)"]
  body += ["for idx in range(grp * per_group, min(total, (grp + 1) * per_group)):",
           "  r = idx // nb",
           "  kb = idx - r * nb",
           "  cbase = r * Lp + kb * b",
           "  ubase = r * L + kb * b",
           "  cnt = min(b, L - kb * b)",
           "  uu = u[ubase:ubase + cnt]"]
  if v.decay:
    body.append("  pp = p[ubase:ubase + cnt]")
  body += [f"  gg{i} = g{i}[ubase:ubase + cnt]" for i in k if i]
  for n, _ in moments:
    body += [f"  o_{n} = a_{n}[idx]", f"  cs_{n} = c_{n}[cbase:cbase + cnt]"]
  # Pass 1: decode, step, update; new moments to scratch. With VBMI the codes are
  # first decoded into the scratch rows 64 at a time (the rest by the gather).
  if vbmi:
    body.append("  full = cnt - cnt % 64")
    for n, signed in moments:
      body += ["  for e in range(0, full, 64):",
               f"    decode64({'S' if signed else 'U'}PLANES.ctypes.data, "
               f"cs_{n}.ctypes.data + e, x_{n}.ctypes.data + 4 * e, o_{n})",
               "  for e in range(full, cnt):",
               f"    x_{n}[e] = {'S' if signed else 'U'}TABLE[cs_{n}[e]] * o_{n}"]
    step = [f"old_{n} = x_{n}[e]" for n, _ in moments]
  else:
    step = [f"old_{n} = {'S' if signed else 'U'}TABLE[cs_{n}[e]] * o_{n}"
            for n, signed in moments]
  step += _cpu_kernel.element_math(
      v, {n: f"old_{n}" for n, _ in moments},
      ["uu[e]"] + [f"gg{i}[e]" for i in k if i], "pp[e]")
  step.append("uu[e] = uval")
  new = {f"{m}{i}": f"{m}n{i}" for i in k for m in ("m", "v")}
  new.update(mB="mBn", vB="vBn")
  step += [f"x_{n}[e] = {new[n]}" for n, _ in moments]
  body += ["  for e in range(cnt):"] + ["    " + s for s in step]
  # Pass 2: absmax of every moment, on the bit patterns.
  body += [f"  hi_{n} = np.int32(0)" for n, _ in moments]
  body += ["  for e in range(cnt):"]
  body += [f"    hi_{n} = max(hi_{n}, np.int32(xi_{n}[e] & np.int32(0x7FFFFFFF)))"
           for n, _ in moments]
  # Pass 3: absmax and codes (16 at a time by the closed form with AVX-512).
  for n, signed in moments:
    enc = "enc_signed" if signed else "enc_unsigned"
    encode = (f"    encode_row_{'signed' if signed else 'unsigned'}(x_{n}, cs_{n}, cnt, inv)"
              if avx512 else
              f"    for e in range(cnt):\n      cs_{n}[e] = {enc}(x_{n}[e] * inv)")
    body += [
        f"  if hi_{n} >= finite_end:",
        f"    a_{n}[idx] = np.float32(np.nan)",
        "    for e in range(cnt):",
        f"      cs_{n}[e] = np.uint8({_zero_code(signed)})",
        "  else:",
        f"    amax = np.int32(hi_{n}).view(np.float32)",
        f"    a_{n}[idx] = amax",
        "    inv = one / amax if amax > zero else zero",
        *encode.split("\n")]
  lines += ["    " + line for line in body]
  return "\n".join(lines) + "\n"


def _handler_source(v: _cpu_kernel.Variant) -> str:
  k = v.objectives
  grads = [f"buffer(args[{2 + i}], n, dt)" for i in range(k - 1)]
  p = f"buffer(args[{1 + k}], n, dt)" if v.decay else "u"
  pairs = []
  for i, _ in enumerate(_moment_names(v)):
    pairs += [f"buffer(rets[{1 + 2 * i}], buffer_size(rets[{1 + 2 * i}]), np.uint8)",
              f"buffer(rets[{2 + 2 * i}], buffer_size(rets[{2 + 2 * i}]), dt)"]
  return _cpu_kernel.handler_source(
      v, ", ".join(["s", "dims", *grads, p, "u", *pairs]),
      setup="  dims = buffer(args[1], 4, np.int32)\n")


@functools.lru_cache(maxsize=None)
def target(v: _cpu_kernel.Variant) -> str:
  """Compiles (once) and registers the 8-bit kernel of ``v``; returns its name."""
  if not v.base or v.dtype != "float32":
    raise ValueError(f"no 8-bit kernel for {v}")
  return _cpu_kernel.build(
      "dualoptax_8bit_" + "_".join(str(x) for x in v), v,
      lambda parallel: _loop_source(v, parallel, vbmi_available(), avx512_available()),
      _handler_source(v),
      **loop_namespace())


def loop_namespace() -> dict:
  """Globals of the generated 8-bit loop: encoders, code maps, the VBMI decode."""
  enc_signed, enc_unsigned = _codec()
  namespace = dict(enc_signed=enc_signed, enc_unsigned=enc_unsigned,
                   STABLE=np.asarray(_q.dynamic_code_map(True), np.float32),
                   UTABLE=np.asarray(_q.dynamic_code_map(False), np.float32),
                   SPLANES=code_map_planes(True), UPLANES=code_map_planes(False))
  if vbmi_available():
    namespace["decode64"] = _vbmi_decode64()
  if avx512_available():
    namespace["encode_row_signed"], namespace["encode_row_unsigned"] = (
        _avx512_row_encoders())
  return namespace


def compile_loop(v: _cpu_kernel.Variant, parallel: bool, vbmi: bool, avx512: bool):
  """The generated loop of ``v`` alone, callable on NumPy buffers (tests, benchmarks);
  ``vbmi=True`` needs :func:`vbmi_available`, ``avx512=True``
  :func:`avx512_available`."""
  import numba  # pylint: disable=import-outside-toplevel
  scope = dict(numba=numba, np=np, **loop_namespace())
  exec(compile(_loop_source(v, parallel, vbmi, avx512), f"<8-bit loop {v}>", "exec"),  # pylint: disable=exec-used
       scope)
  return scope["loop"]


def leaf_step(v: _cpu_kernel.Variant, scalars: jax.Array,
              grads: Sequence[jax.Array], param, moments: Sequence[_q.QuantizedArray]):
  """One leaf whose moments are all QuantizedArrays (order: ``_moment_names``).

  Returns:
    ``(update, new_moments)`` with the new moments as QuantizedArrays of the same
    layout.
  """
  first = moments[0]
  shape = first.shape
  last = shape[-1] if shape else 1
  rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
  dims = jnp.asarray([rows, last, last + first.pad, first.block_size], jnp.int32)
  inputs = [scalars, dims, *grads[1:]] + ([param] if v.decay else [])
  aliased = [grads[0]]
  for q in moments:
    aliased += [q.codes, q.absmax]
  first_alias = len(inputs)
  out_shapes = [jax.ShapeDtypeStruct(grads[0].shape, grads[0].dtype)]
  out_shapes += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in aliased[1:]]
  call = jax.ffi.ffi_call(
      target(v), out_shapes,
      input_output_aliases={first_alias + i: i for i in range(len(aliased))},
      vmap_method="sequential")
  out = call(*inputs, *aliased)
  new = [q.__class__(codes=out[1 + 2 * i], absmax=out[2 + 2 * i], shape=q.shape,
                     dtype=q.dtype, signed=q.signed, pad=q.pad,
                     block_size=q.block_size)
         for i, q in enumerate(moments)]
  return out[0], new
