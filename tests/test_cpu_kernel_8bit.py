"""The fused 8-bit CPU kernel of dual_optim_plus_8bit against the generic wrapper.

implementation="xla" is quantize_state(dual_optim_plus(...)) (decode, float step,
re-encode, all element-wise XLA); "cpu_kernel" decodes, steps and re-encodes per block
in one numba kernel. Both encode with the exact nearest code; they differ only where
the float step rounds differently and a value sits at a code boundary.
"""

import jax
import jax.numpy as jnp
import numba
import numpy as np
import optax
import pytest

import dualoptax
from dualoptax import _cpu_kernel_8bit
from dualoptax import quantization


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_encoder_equals_xla_encoder(signed):
  enc_signed, enc_unsigned = _cpu_kernel_8bit._codec()
  encode = enc_signed if signed else enc_unsigned

  @numba.njit
  def encode_all(x):
    out = np.empty(x.size, np.uint8)
    for i in range(x.size):
      out[i] = encode(x[i])
    return out

  rng = np.random.default_rng(0)
  mids = quantization._midpoints_np(signed)
  # The kernel's encoder looks up the float's top 16 bits: the first and last value
  # of every such cell up to 1.0 are where its table could be off by one.
  cells = np.arange(0x3F81, dtype=np.uint32) << 16
  edges = np.concatenate([cells, cells + 0xFFFF]).view(np.float32)
  x = np.concatenate([
      rng.uniform(-1.0 if signed else 0.0, 1.0, 500_000), edges,
      quantization.dynamic_code_map(signed), mids,
      np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
      10.0 ** -np.arange(0, 9, 0.01)]).astype(np.float32)
  x = np.abs(x[np.abs(x) <= 1])
  x = np.concatenate([x, -x]).astype(np.float32)
  # The XLA route clamps the unsigned map's input to 0 before encoding; the
  # kernel's table gives negative values the zero code itself.
  want = np.asarray(quantization._encode_normalized(
      jnp.asarray(x if signed else np.maximum(x, 0)), signed))
  np.testing.assert_array_equal(encode_all(x), want)


def _run(implementation, schedule, nan_at=None, **kwargs):
  rng = np.random.default_rng(0)
  params = {  # layouts: blocks of 250 (1000 = 4 x 250), of 256, of 256 with the
      # last axis padded by 3 (1021 is prime), and a float leaf
      "a": jnp.asarray(rng.standard_normal((16, 1000)), jnp.float32),
      "c": jnp.asarray(rng.standard_normal((4, 2048)), jnp.float32),
      "p": jnp.asarray(rng.standard_normal((8, 1021)), jnp.float32),
      "small": jnp.asarray(rng.standard_normal((300,)), jnp.float32)}
  tx = dualoptax.dual_optim_plus_8bit({"forget": 3e-3, "retain": 1e-3},
                                      weight_decay=0.01,
                                      implementation=implementation, **kwargs)
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  grad_rng = np.random.default_rng(1)
  for t, call in enumerate(schedule):
    g = {k: jax.tree.map(lambda x, i=i: jnp.asarray(
        grad_rng.standard_normal(x.shape) * (1 + i), jnp.float32), p)
         for i, k in enumerate(call)}
    if t == nan_at:
      g[call[0]]["a"] = g[call[0]]["a"].at[3, 5].set(jnp.nan)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  return p, state


def test_fused_matches_generic_wrapper():
  schedule = [("forget",), ("retain",), ("forget", "retain"), ("retain",)] * 8
  p_x, s_x = _run("xla", schedule, nan_at=5)
  p_k, s_k = _run("cpu_kernel", schedule, nan_at=5)
  assert int(s_x.skipped) == int(s_k.skipped) == 1
  assert int(s_x.count) == int(s_k.count) == len(schedule) - 1
  assert isinstance(s_k.base_nu["a"], dualoptax.QuantizedArray)
  assert not isinstance(s_k.base_nu["small"], dualoptax.QuantizedArray)
  assert s_k.base_mu["p"].pad == 3
  for name in ("a", "c", "p"):
    moments = [(s_x.base_mu[name], s_k.base_mu[name]),
               (s_x.base_nu[name], s_k.base_nu[name])]
    moments += [(s_x.deltas[k].mu[name], s_k.deltas[k].mu[name])
                for k in ("forget", "retain")]
    moments += [(s_x.deltas[k].nu[name], s_k.deltas[k].nu[name])
                for k in ("forget", "retain")]
    for qx, qk in moments:
      assert qx.codes.dtype == qk.codes.dtype == jnp.uint8
      assert float(jnp.mean(qx.codes == qk.codes)) >= 0.999
      np.testing.assert_allclose(qx.absmax, qk.absmax, rtol=1e-2)
    diff = np.abs(np.asarray(p_x[name]) - np.asarray(p_k[name]))
    assert np.mean(diff > 1e-5) < 1e-3 and diff.max() < 20 * 3e-3
  np.testing.assert_allclose(p_x["small"], p_k["small"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "cpu_kernel"])
def test_skipped_call_keeps_every_code(implementation):
  schedule = [("forget",), ("retain",), ("forget",)]
  _, before = _run(implementation, schedule[:2])
  _, after = _run(implementation, schedule, nan_at=2)
  assert int(after.skipped) == 1
  for x, y in zip(jax.tree.leaves(before._replace(skipped=0)),
                  jax.tree.leaves(after._replace(skipped=0))):
    np.testing.assert_array_equal(x, y)


def test_nonfinite_moments_without_skip_match_generic_wrapper():
  # skip_nonfinite=False lets a NaN gradient into the moments: each block that holds
  # it must come back as absmax NaN with every code the zero code, on both routes.
  schedule = [("forget",), ("retain",), ("forget",)]
  _, s_x = _run("xla", schedule, nan_at=2, skip_nonfinite=False)
  _, s_k = _run("cpu_kernel", schedule, nan_at=2, skip_nonfinite=False)
  hit = (3, 5 // 250)  # row 3 of "a", the block holding column 5
  for qx, qk in ((s_x.base_mu["a"], s_k.base_mu["a"]),
                 (s_x.base_nu["a"], s_k.base_nu["a"]),
                 (s_x.deltas["forget"].mu["a"], s_k.deltas["forget"].mu["a"]),
                 (s_x.deltas["forget"].nu["a"], s_k.deltas["forget"].nu["a"])):
    np.testing.assert_array_equal(np.isnan(qx.absmax), np.isnan(qk.absmax))
    assert np.isnan(qk.absmax).sum() == 1 and np.isnan(qk.absmax[hit])
    zero = 127 if qk.signed else 0
    block = np.asarray(qk.codes)[3, :250]
    np.testing.assert_array_equal(block, zero)
    np.testing.assert_array_equal(np.asarray(qx.codes)[3, :250], zero)


_SIMD = (_cpu_kernel_8bit.vbmi_available(), _cpu_kernel_8bit.avx512_available())


def _loop(vbmi, avx512, parallel=False):
  from dualoptax import _cpu_kernel
  v = _cpu_kernel.Variant(base=True, objectives=2, stable=True, decay=True,
                          dtype="float32")
  return _cpu_kernel_8bit.compile_loop(v, parallel, vbmi, avx512)


@pytest.mark.skipif(not any(_SIMD), reason="this CPU has no AVX-512 (the portable "
                    "gather decode and table encoder run)")
@pytest.mark.parametrize("rows,cols,cols_padded,block,parallel", [
    (6, 1000, 1000, 250, False),  # blocks of 250: three 64-code chunks, a 58-code tail
    (3, 1021, 1024, 256, False),  # padded last axis: the last block holds 253 values
    (5, 512, 512, 256, False),
    (40, 1000, 1000, 250, True)])  # the prange loop: three groups of blocks
def test_simd_loop_is_bit_identical_to_portable_loop(rows, cols, cols_padded, block,
                                                     parallel):
  """VBMI decode and AVX-512 closed-form encoder (as the host has them) against the
  gather decode and table encoder."""
  rng = np.random.default_rng(0)
  n, nb = rows * cols, rows * (cols_padded // block)
  scalars = np.asarray([1, .9, .999, .9, .999, 1e-8, .01, .5, .3, .4, .2, -1e-3,
                        .35, .25, -2e-3], np.float32)
  dims = np.asarray([rows, cols, cols_padded, block], np.int32)
  g1, param = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
  g0 = (1e-2 * rng.standard_normal(n)).astype(np.float32)
  g0[7] = np.inf  # a non-finite moment block, handled on both paths
  moments = []
  for _ in range(6):
    moments += [rng.integers(0, 256, rows * cols_padded, dtype=np.uint8),
                np.abs(rng.standard_normal(nb)).astype(np.float32)]
  results = []
  for simd in ((False, False), _SIMD):  # the portable loop runs serially
    u, state = g0.copy(), [m.copy() for m in moments]
    _loop(*simd, parallel and simd != (False, False))(scalars, dims, g1, param, u,
                                                       *state)
    results.append([u] + state)
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)
  assert np.isnan(results[1][2][0])  # the block of the Inf gradient: absmax NaN


@pytest.mark.skipif(not _cpu_kernel_8bit.vbmi_available(),
                    reason="this CPU has no AVX-512 VBMI (the gather decode runs)")
@pytest.mark.parametrize("signed", [True, False])
def test_vbmi_decode64_equals_code_map(signed):
  decode64 = _cpu_kernel_8bit._vbmi_decode64()
  planes = _cpu_kernel_8bit.code_map_planes(signed)
  table = np.asarray(quantization.dynamic_code_map(signed), np.float32)

  @numba.njit
  def decode(codes, scale):
    out = np.empty(codes.size, np.float32)
    for k in range(0, codes.size, 64):
      decode64(planes.ctypes.data, codes.ctypes.data + k, out.ctypes.data + 4 * k,
               scale)
    return out

  codes = np.concatenate([np.arange(256), np.arange(256)[::-1]]).astype(np.uint8)
  for scale in (np.float32(1), np.float32(3.7e-3), np.float32(1e30)):
    np.testing.assert_array_equal(decode(codes, scale), table[codes] * scale)


@pytest.mark.skipif(not _cpu_kernel_8bit.avx512_available(),
                    reason="this CPU has no AVX-512 F/DQ (the table encoder runs)")
@pytest.mark.parametrize("signed", [True, False])
def test_avx512_encoder_equals_table_encoder_on_every_float(signed):
  """Every float32 of magnitude below 2, both signs: the closed form (with its
  fall-back on flagged lanes) gives the table encoder's code, which
  test_kernel_encoder_equals_xla_encoder ties to the exact-nearest encoder."""
  encode_row = _cpu_kernel_8bit._avx512_row_encoders()[0 if signed else 1]
  encode = _cpu_kernel_8bit._codec()[0 if signed else 1]

  @numba.njit
  def mismatches(sign):
    chunk = 1 << 14
    x = np.empty(chunk, np.float32)
    bits = x.view(np.int32)
    codes = np.empty(chunk, np.uint8)
    bad = 0
    for start in range(0, 0x40000000, chunk):  # bit patterns of [0, 2)
      for j in range(chunk):
        bits[j] = np.int32((start + j) | sign)
      encode_row(x, codes, chunk, np.float32(1))
      for j in range(chunk):
        bad += codes[j] != encode(x[j])
    return bad

  assert mismatches(0) == 0
  assert mismatches(-(1 << 31)) == 0


@pytest.mark.skipif(not _cpu_kernel_8bit.avx512_available(),
                    reason="this CPU has no AVX-512 F/DQ (the table encoder runs)")
@pytest.mark.parametrize("signed", [True, False])
def test_avx512_encoder_rarely_falls_back(signed):
  """The flag (a lane within 2^-12 bins of a code edge) is rare on moment-like data,
  so the table look-up stays off the common path."""
  encode16 = _cpu_kernel_8bit._avx512_encode16(signed)

  @numba.njit
  def flagged(x, inv):
    codes = np.empty(x.size, np.uint8)
    count = 0
    for e in range(0, x.size, 16):
      count += encode16(x.ctypes.data + 4 * e, codes.ctypes.data + e, inv) != 0
    return count

  rng = np.random.default_rng(0)
  x = rng.standard_normal(1 << 20).astype(np.float32)
  x = x if signed else x * x
  groups = x.size // 16
  assert flagged(x, np.float32(1 / np.abs(x).max())) < 0.02 * groups
