"""The fused CPU kernel for DualOptim+ with 8-bit moments (decode, step, re-encode).

Per block of ``b`` values of a leaf (``dualoptax.quantization``'s layout: blocks along
the last axis, padded), one pass reads every moment's codes and the block's absmax,
computes the step exactly as the float kernel does (``_cpu_kernel.element_math``),
finds each new moment's absmax, then a second pass over the same block (in L1 cache)
recomputes the step, writes the update and re-encodes every moment with the exact
nearest code. No float32 moment ever reaches memory. The encoder is the closed form of
``quantization._encode_normalized`` (decade by comparison, linear bin, one threshold
look-up), so both produce the exact nearest code; the tests compare them code for code.

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

_DECADE_EDGES = np.asarray([10.0 ** (i - 7) for i in range(1, _q._NUM_DECADES)],  # pylint: disable=protected-access
                           np.float32)


def _tables(signed: bool):
  return (np.asarray(_q._encoder_constants(signed), np.float32),  # pylint: disable=protected-access
          _q._magnitude_thresholds_np(signed),  # pylint: disable=protected-access
          np.asarray(_q.dynamic_code_map(signed), np.float32))


@functools.lru_cache(maxsize=None)
def _codec():
  """numba encoders (signed, unsigned) mirroring ``_encode_normalized``."""
  import numba  # pylint: disable=import-outside-toplevel
  s_consts, s_thr, _ = _tables(True)
  u_consts, u_thr, _ = _tables(False)
  edges = _DECADE_EDGES

  def make(consts, thr, signed):
    @numba.njit(inline="always", error_model="numpy")
    def encode(xn):
      a = abs(xn)
      d = 0
      for i in range(edges.size):
        if a >= edges[i]:
          d = i + 1
      s, o, lo, hi = consts[d, 0], consts[d, 1], consts[d, 2], consts[d, 3]
      r = a * s - o
      u = min(max(np.floor(r) + lo, lo), hi)
      t = np.int32(u) + (1 if (r - (u - lo)) >= np.float32(0.5) else 0)
      m = t - 1 + (1 if a >= thr[t] else 0)
      if signed:
        if xn < 0:
          return np.uint8(126 - min(m, 126))
        return np.uint8(128 + min(m, 127))
      return np.uint8(1 + m)
    return encode

  return make(s_consts, s_thr, True), make(u_consts, u_thr, False)


def _moment_names(v: _cpu_kernel.Variant) -> list[tuple[str, bool]]:
  """(name, signed) of the quantized moments, in argument order."""
  names = [(f"{m}{i}", True) for i in range(v.objectives) for m in ("m", "v")]
  return names + [("mB", True), ("vB", False)]


def _loop_source(v: _cpu_kernel.Variant, parallel: bool) -> str:
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
           "  zero = np.float32(0)",
           f"  for idx in {'numba.prange' if parallel else 'range'}(rows * nb):",
           "    r = idx // nb",
           "    kb = idx - r * nb",
           "    cbase = r * Lp + kb * b",
           "    ubase = r * L + kb * b",
           "    cnt = min(b, L - kb * b)"]
  body = []
  for n, signed in moments:
    body += [f"o_{n} = a_{n}[idx]", f"x_{n} = zero", f"bad_{n} = False"]
  old = {n: f"({'S' if signed else 'U'}TABLE[c_{n}[c]] * o_{n})"
         for n, signed in moments}
  math = _cpu_kernel.element_math(
      v, old, ["u[j]"] + [f"g{i}[j]" for i in k][1:], "p[j]")
  new = {f"{m}{i}": f"{m}n{i}" for i in k for m in ("m", "v")}
  new.update(mB="mBn", vB="vBn")
  # Pass 1: the new absmax of every moment (NaN if the block holds a non-finite).
  body += ["for e in range(cnt):", "  j = ubase + e", "  c = cbase + e"]
  body += ["  " + line for line in math]
  for n, _ in moments:
    body += [f"  if not np.isfinite({new[n]}):", f"    bad_{n} = True",
             f"  elif abs({new[n]}) > x_{n}:", f"    x_{n} = abs({new[n]})"]
  for n, _ in moments:
    body += [f"inv_{n} = one / x_{n} if (not bad_{n} and x_{n} > zero) else zero",
             f"a_{n}[idx] = np.float32(np.nan) if bad_{n} else x_{n}"]
  # Pass 2: the same step again (bit-identical), then update and codes.
  body += ["for e in range(cnt):", "  j = ubase + e", "  c = cbase + e"]
  body += ["  " + line for line in math]
  body.append("  u[j] = uval")
  for n, signed in moments:
    value = f"(zero if bad_{n} else {new[n]}) * inv_{n}"
    if signed:
      body.append(f"  c_{n}[c] = enc_signed({value})")
    else:
      body.append(f"  c_{n}[c] = enc_unsigned(max({value}, zero))")
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
  enc_signed, enc_unsigned = _codec()
  return _cpu_kernel.build(
      "dualoptax_8bit_" + "_".join(str(x) for x in v), v,
      lambda parallel: _loop_source(v, parallel), _handler_source(v),
      enc_signed=enc_signed, enc_unsigned=enc_unsigned,
      STABLE=_tables(True)[2], UTABLE=_tables(False)[2])


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
