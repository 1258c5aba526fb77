"""Where the fused 8-bit CPU kernel's time goes, outside XLA, on one 4096x1024 leaf.

Times the kernel's generated loop (``dualoptax._cpu_kernel_8bit``; one objective,
weight decay) on NumPy buffers, one thread and two, with each decode and encode the
host allows, and the look-ups it is built from, per value, on data that stays in L1
cache: the decode (``code_map[c] * absmax``: a gather from the 256-entry map, or on
AVX-512 VBMI CPUs byte permutes, 64 codes at a time) and the exact-nearest encode (one
gather from the cell table plus integer operations, or on AVX-512 CPUs the closed form,
16 values in about 20 vector operations, with the table for lanes at a code edge).
Each element of a DualOptim+ leaf decodes and encodes four moments, so these give a
floor for the loop.

    python benchmarks/kernel_8bit.py
"""

from __future__ import annotations

import statistics
import time

import numba
import numpy as np

from dualoptax import _cpu_kernel
from dualoptax import _cpu_kernel_8bit


def median_time(fn, *args, reps=15):
  fn(*args)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn(*args)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  rows, cols, block = 4096, 1024, 256
  n = rows * cols
  v = _cpu_kernel.Variant(base=True, objectives=1, stable=True, decay=True,
                          dtype="float32")
  namespace = _cpu_kernel_8bit.loop_namespace()
  signed_map, enc_signed = namespace["STABLE"], namespace["enc_signed"]
  vbmi = _cpu_kernel_8bit.vbmi_available()
  avx512 = _cpu_kernel_8bit.avx512_available()
  rng = np.random.default_rng(0)
  moments = []
  for _ in _cpu_kernel_8bit._moment_names(v):  # pylint: disable=protected-access
    moments += [rng.integers(0, 256, n, dtype=np.uint8),
                np.abs(rng.standard_normal(n // block)).astype(np.float32)]
  scalars = np.asarray([1, .9, .999, .9, .999, 1e-8, .01, .5, .3, .4, .2, -1e-3],
                       np.float32)
  dims = np.asarray([rows, cols, cols, block], np.int32)
  param = rng.standard_normal(n).astype(np.float32)
  grad = (1e-3 * rng.standard_normal(n)).astype(np.float32)
  print(f"numba {numba.__version__}, threading layer available: "
        f"{_cpu_kernel._thread_safe_layer()}, {numba.config.NUMBA_NUM_THREADS} threads")  # pylint: disable=protected-access
  paths = [(False, False)] + ([(True, False)] if vbmi else []) + (
      [(vbmi, True)] if avx512 else [])
  for decode_vbmi, encode_avx512 in paths:
    for parallel in (False, True):
      loop = _cpu_kernel_8bit.compile_loop(
          v, parallel and _cpu_kernel._thread_safe_layer(), decode_vbmi, encode_avx512)  # pylint: disable=protected-access
      # Each call steps the same buffers again (the update lands in ``grad``, the
      # moments move), as successive optimizer steps do.
      t = median_time(loop, scalars, dims, param, grad, *moments)
      label = "2 threads" if parallel else "1 thread "
      print(f"whole loop, {'VBMI' if decode_vbmi else 'gather'} decode, "
            f"{'closed-form' if encode_avx512 else 'table'} encode, {label}: "
            f"{t * 1e3:7.2f} ms  ({t * 1e9 / n:.2f} ns/element, 4 moments)")

  size, repeat = 4096, 1024
  codes = rng.integers(0, 256, size, dtype=np.uint8)
  values = rng.uniform(-1, 1, size).astype(np.float32)
  out_f = np.empty(size, np.float32)
  out_c = np.empty(size, np.uint8)

  @numba.njit(error_model="numpy")
  def decode(codes, out, repeat):
    for _ in range(repeat):
      for i in range(codes.size):
        out[i] = signed_map[codes[i]] * np.float32(0.5)

  @numba.njit(error_model="numpy")
  def encode(values, out, repeat):
    for _ in range(repeat):
      for i in range(values.size):
        out[i] = enc_signed(values[i])

  @numba.njit(error_model="numpy")
  def scale(values, out, repeat):
    for _ in range(repeat):
      for i in range(values.size):
        out[i] = values[i] * np.float32(0.5)

  if vbmi:
    decode64 = namespace["decode64"]
    planes = namespace["SPLANES"]

    @numba.njit(error_model="numpy")
    def decode_vbmi(codes, out, repeat):
      for _ in range(repeat):
        for k in range(0, codes.size, 64):
          decode64(planes.ctypes.data, codes.ctypes.data + k,
                   out.ctypes.data + 4 * k, np.float32(0.5))

    t = median_time(decode_vbmi, codes, out_f, repeat, reps=7)
    print(f"{'decode (VBMI)':22s} in L1, 1 thread: {t * 1e9 / (size * repeat):.3f} ns/value")
  encoders = [("encode (table)", encode, (values, out_c))]
  if avx512:
    encode_row = _cpu_kernel_8bit._avx512_row_encoders()[0]  # pylint: disable=protected-access

    @numba.njit(error_model="numpy")
    def encode_closed_form(values, out, repeat):
      for _ in range(repeat):
        encode_row(values, out, values.size, np.float32(1))

    encoders.append(("encode (closed form)", encode_closed_form, (values, out_c)))
  for name, fn, args in (("decode (gather)", decode, (codes, out_f)), *encoders,
                         ("multiply (reference)", scale, (values, out_f))):
    t = median_time(fn, *args, repeat, reps=7)
    print(f"{name:22s} in L1, 1 thread: {t * 1e9 / (size * repeat):.3f} ns/value")


if __name__ == "__main__":
  main()
