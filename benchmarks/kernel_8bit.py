"""Where the fused 8-bit CPU kernel's time goes, outside XLA, on one 4096x1024 leaf.

Times the kernel's generated loop (``dualoptax._cpu_kernel_8bit``; one objective,
weight decay) on NumPy buffers, one thread and two, and the two look-ups it is built
from, per value, on data that stays in L1 cache: the decode (``code_map[c] * absmax``,
a gather from the 256-entry map) and the exact-nearest encode (one gather from the
cell table plus integer operations). Each element of a DualOptim+ leaf decodes and
encodes four moments, so these two give a floor for the loop.

    python benchmarks/kernel_8bit.py
"""

from __future__ import annotations

import statistics
import time

import numba
import numpy as np

from dualoptax import _cpu_kernel
from dualoptax import _cpu_kernel_8bit
from dualoptax import quantization


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
  signed_map = np.asarray(quantization.dynamic_code_map(True), np.float32)
  unsigned_map = np.asarray(quantization.dynamic_code_map(False), np.float32)
  enc_signed, enc_unsigned = _cpu_kernel_8bit._codec()  # pylint: disable=protected-access
  namespace = dict(numba=numba, np=np, enc_signed=enc_signed,
                   enc_unsigned=enc_unsigned, STABLE=signed_map, UTABLE=unsigned_map)
  rng = np.random.default_rng(0)
  moments = []
  for _, signed in _cpu_kernel_8bit._moment_names(v):  # pylint: disable=protected-access
    moments += [rng.integers(0, 256, n, dtype=np.uint8),
                np.abs(rng.standard_normal(n // block)).astype(np.float32)]
  scalars = np.asarray([1, .9, .999, .9, .999, 1e-8, .01, .5, .3, .4, .2, -1e-3],
                       np.float32)
  dims = np.asarray([rows, cols, cols, block], np.int32)
  param = rng.standard_normal(n).astype(np.float32)
  grad = (1e-3 * rng.standard_normal(n)).astype(np.float32)
  print(f"numba {numba.__version__}, threading layer available: "
        f"{_cpu_kernel._thread_safe_layer()}, {numba.config.NUMBA_NUM_THREADS} threads")  # pylint: disable=protected-access
  for parallel in (False, True):
    scope = dict(namespace)
    exec(_cpu_kernel_8bit._loop_source(v, parallel and _cpu_kernel._thread_safe_layer()),  # pylint: disable=protected-access,exec-used
         scope)
    loop = scope["loop"]
    # Each call steps the same buffers again (the update lands in ``grad``, the
    # moments move), as successive optimizer steps do.
    t = median_time(loop, scalars, dims, param, grad, *moments)
    label = "2 threads" if parallel else "1 thread "
    print(f"whole loop, {label}: {t * 1e3:7.2f} ms  ({t * 1e9 / n:.2f} ns/element, "
          "4 moments)")

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

  for name, fn, args in (("decode", decode, (codes, out_f)),
                         ("encode", encode, (values, out_c)),
                         ("multiply (reference)", scale, (values, out_f))):
    t = median_time(fn, *args, repeat, reps=7)
    print(f"{name:22s} in L1, 1 thread: {t * 1e9 / (size * repeat):.3f} ns/value")


if __name__ == "__main__":
  main()
