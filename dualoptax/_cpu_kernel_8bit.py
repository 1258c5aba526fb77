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


@functools.lru_cache(maxsize=None)
def vbmi_available() -> bool:
  """Whether numba compiles for this host's CPU and it has AVX-512 VBMI (``vpermi2b``).

  A user who sets ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` (e.g. for portable
  caching) gets the portable gather decode.
  """
  import numba  # pylint: disable=import-outside-toplevel
  from llvmlite import binding  # pylint: disable=import-outside-toplevel
  if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
    return False
  features = binding.get_host_cpu_features()
  return bool(features.get("avx512vbmi")) and bool(features.get("avx512bw"))


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
      scale = builder.insert_element(ir.Constant(floats, None), absmax, ir.Constant(i32, 0))
      scale = builder.shuffle_vector(scale, scale, ir.Constant(ir.VectorType(i32, 64),
                                                               [0] * 64))
      builder.store(builder.fmul(values, scale),
                    builder.inttoptr(out, floats.as_pointer()), align=1)
      return context.get_dummy_value()
    return types.void(types.intp, types.intp, types.intp, types.float32), codegen

  return decode64


def _moment_names(v: _cpu_kernel.Variant) -> list[tuple[str, bool]]:
  """(name, signed) of the quantized moments, in argument order."""
  names = [(f"{m}{i}", True) for i in range(v.objectives) for m in ("m", "v")]
  return names + [("mB", True), ("vB", False)]


def _loop_source(v: _cpu_kernel.Variant, parallel: bool, vbmi: bool) -> str:
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
  # Pass 3: absmax and codes.
  for n, signed in moments:
    enc = "enc_signed" if signed else "enc_unsigned"
    body += [
        f"  if hi_{n} >= finite_end:",
        f"    a_{n}[idx] = np.float32(np.nan)",
        "    for e in range(cnt):",
        f"      cs_{n}[e] = np.uint8({_zero_code(signed)})",
        "  else:",
        f"    amax = np.int32(hi_{n}).view(np.float32)",
        f"    a_{n}[idx] = amax",
        "    inv = one / amax if amax > zero else zero",
        "    for e in range(cnt):",
        f"      cs_{n}[e] = {enc}(x_{n}[e] * inv)"]
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
      lambda parallel: _loop_source(v, parallel, vbmi_available()), _handler_source(v),
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
  return namespace


def compile_loop(v: _cpu_kernel.Variant, parallel: bool, vbmi: bool):
  """The generated loop of ``v`` alone, callable on NumPy buffers (tests, benchmarks);
  ``vbmi=True`` needs :func:`vbmi_available`."""
  import numba  # pylint: disable=import-outside-toplevel
  scope = dict(numba=numba, np=np, **loop_namespace())
  exec(compile(_loop_source(v, parallel, vbmi), f"<8-bit loop {v}>", "exec"), scope)  # pylint: disable=exec-used
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
