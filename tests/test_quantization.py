"""The 8-bit block-wise codec (docs/algorithm.md section 3): code map, exact-nearest encoding, layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualoptax
from dualoptax import quantization as qz


def _bnb_dynamic_map(signed):
  """bitsandbytes' ``create_dynamic_map`` (functional.py), transliterated to NumPy.

  The release builds bin edges with ``torch.linspace(0.1, 1, n + 1)`` in float32,
  takes their float32 means, scales them by ``10 ** (i - 6)`` in Python floats and
  stores the sorted result as float32.
  """
  data = []
  for i in range(7):
    n = 2**i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1, n + 1, dtype=np.float32)
    means = ((edges[:-1] + edges[1:]) / np.float32(2.0)).astype(np.float32)
    data += [10 ** (i - 6) * float(m) for m in means]
    if signed:
      data += [-(10 ** (i - 6)) * float(m) for m in means]
  data += [0.0, 1.0]
  return np.sort(np.asarray(data, np.float32))


def _reference_codes(x, signed, block_size=256):
  """Exact nearest code by ``searchsorted`` on the midpoints between codes.

  Values are normalized like the encoder (times the float32 reciprocal of the block
  absmax); ties at float32 resolution go to the code of larger magnitude.
  """
  xb = np.asarray(x, np.float32).reshape(-1, block_size)
  absmax = np.abs(xb).max(-1, keepdims=True)
  inv = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0)
  xn = (xb * inv.astype(np.float32)).astype(np.float32)
  if not signed:
    xn = np.maximum(xn, 0)
  mids = qz._midpoints_np(signed)
  codes = np.where(
    xn < 0,
    np.searchsorted(mids, xn, side="left"),
    np.searchsorted(mids, xn, side="right"),
  )
  return codes, absmax[:, 0]


_quantize = jax.jit(
  qz.quantize_blockwise,
  static_argnames=("signed", "block_size", "local_last_dim"),
)
_dequantize = jax.jit(qz.dequantize_blockwise)


@pytest.mark.parametrize("signed", [True, False])
def test_code_map_equals_bitsandbytes(signed):
  ours = dualoptax.dynamic_code_map(signed)
  assert ours.dtype == np.float32 and ours.shape == (256,)
  np.testing.assert_allclose(ours, _bnb_dynamic_map(signed), rtol=0, atol=1e-7)
  assert np.all(np.diff(ours) > 0)
  assert ours[-1] == 1.0
  if signed:
    assert ours[127] == 0.0 and np.sum(ours < 0) == 127
    assert abs(ours[0] + 0.99297) < 1e-5
  else:
    assert ours[0] == 0.0 and np.all(ours >= 0)
  with pytest.raises(ValueError):
    ours[0] = 3.0  # read-only: nobody can corrupt the shared map


@pytest.mark.parametrize("signed", [True, False])
def test_codes_equal_searchsorted_reference_on_1m_values(signed):
  # bitsandbytes' figures: 1M standard normals (signed) and squared normals (unsigned).
  x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
  data = x if signed else x * x
  q = _quantize(data, signed=signed)
  ref_codes, ref_absmax = _reference_codes(data, signed)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1, 256), ref_codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), ref_absmax)
  err = np.abs(np.asarray(_dequantize(q)) - data)
  ref_err = np.abs(
    (
      dualoptax.dynamic_code_map(signed)[ref_codes] * ref_absmax[:, None]
    ).ravel()
    - data
  )
  assert err.mean() == pytest.approx(ref_err.mean(), rel=1e-6)
  # bitsandbytes (blocksize 256, GPU): mean 8.53e-3 / 6.82e-3 on its own draw.
  bnb_mean, bnb_max = (8.53e-3, 3.35e-2) if signed else (6.82e-3, 8.42e-2)
  assert err.mean() < 1.01 * bnb_mean
  assert err.max() < 1.1 * bnb_max


@pytest.mark.parametrize("signed", [True, False])
def test_codes_exact_over_wide_range_and_at_every_boundary(signed):
  rng = np.random.default_rng(1)
  # Log-uniform magnitudes over every decade of the map (and below it).
  mag = np.exp(rng.uniform(np.log(1e-10), 0, size=(64, 256))).astype(np.float32)
  mag[:, 0] = 1.0  # absmax 1: normalized values are the values themselves
  sign = np.where(rng.random(mag.shape) < 0.5, -1, 1) if signed else 1
  wide = (mag * sign).astype(np.float32)
  # Every code value and both float32 neighbours of every midpoint.
  table = dualoptax.dynamic_code_map(signed)
  mids = qz._midpoints_np(signed)
  edges = np.concatenate(
    [
      table,
      mids,
      np.nextafter(mids, np.float32(-2)),
      np.nextafter(mids, np.float32(2)),
    ]
  ).astype(np.float32)
  edges = np.concatenate([edges, np.ones(256 - len(edges) % 256, np.float32)])
  # The encoder's own switch points: 64 float32 steps either side of every
  # decade edge 1e-7..1 and of every code value (where its bin position
  # crosses a half), with absmax 1 in each block.
  steps = np.arange(-64, 64, dtype=np.int32)
  pivots = np.concatenate(
    [np.float32(10.0) ** np.arange(-7, 1, dtype=np.float32), table]
  ).astype(np.float32)
  near = (pivots.view(np.int32)[:, None] + steps).view(np.float32).ravel()
  near = near[np.abs(near) <= 1]  # (drops the NaNs below zero's bits)
  near = np.pad(near, (0, -len(near) % 255)).reshape(-1, 255)
  near = np.concatenate([near, np.ones((len(near), 1), np.float32)], axis=1)
  for data in (wide, edges, near):
    q = _quantize(data.reshape(-1, 256), signed=signed)
    ref_codes, _ = _reference_codes(data, signed)
    np.testing.assert_array_equal(
      np.asarray(q.codes).reshape(-1, 256), ref_codes
    )
  # Code values themselves (absmax 1) encode to their own index.
  q = _quantize(edges[:256].reshape(1, 256), signed=signed)
  np.testing.assert_array_equal(np.asarray(q.codes).ravel(), np.arange(256))


@pytest.mark.parametrize("signed", [True, False])
def test_decoder_is_the_table_bit_for_bit_and_gathers_nothing(signed):
  # Every code with absmax 1 decodes to the code map's own float32 value.
  q = qz.QuantizedArray(
    codes=jnp.arange(256, dtype=jnp.uint8),
    absmax=jnp.ones((1,), jnp.float32),
    shape=(256,),
    dtype="float32",
    signed=signed,
    pad=0,
    block_size=256,
  )
  out = np.asarray(_dequantize(q))
  table = dualoptax.dynamic_code_map(signed)
  np.testing.assert_array_equal(out.view(np.int32), table.view(np.int32))
  # Both ways to the quotient: one division (what XLA:CPU runs) and the
  # division-free sum (what other platforms and the TPU kernel run).
  for divide in (True, False):
    out = np.asarray(qz._decode_normalized(q.codes, signed, divide=divide))
    np.testing.assert_array_equal(out.view(np.int32), table.view(np.int32))
  # Neither direction indexes a table: on TPU a gather over every value.
  x = jnp.ones((8, 512), jnp.float32)
  for fn in (
    lambda x: qz.quantize_blockwise(x, signed=signed),
    lambda x: qz.dequantize_blockwise(qz.quantize_blockwise(x, signed=signed)),
  ):
    text = str(jax.make_jaxpr(fn)(x))
    assert "gather" not in text and "dynamic_slice" not in text


@pytest.mark.parametrize("signed", [True, False])
def test_code_values_round_the_same_on_any_ieee_arithmetic(signed):
  # The codec computes code j of decade i as num * hi + num * lo, with
  # num = 2n + 18j + 9 and hi + lo = 1 / den_i: no division (XLA on GPU
  # divides to within an ulp). In exact rationals: num * hi is exact, and
  # the sum before its one rounding is far closer to num / den_i than any
  # float32 rounding boundary, so every evaluation order rounds to the map.
  from fractions import Fraction

  def exact(x) -> Fraction:
    return Fraction(float(x))

  sizes = qz._decade_sizes(signed)
  parts = qz._reciprocal_parts(signed)
  positive = dualoptax.dynamic_code_map(signed)
  positive = positive[positive > 0]
  k = 0
  for i, n in enumerate(sizes):
    den = (256 if signed else 512) * 5 ** (7 - i)
    hi, lo = (np.float32(c) for c in parts[i])
    assert exact(hi) + exact(lo) != Fraction(1, den)  # not trivially exact
    for j in range(n):
      num = 2 * n + 18 * j + 9
      assert num < 2**12
      assert exact(np.float32(num) * hi) == num * exact(hi)
      value = Fraction(num, den)
      table = positive[k]
      k += 1
      assert exact(table) == exact(np.float32(float(value)))  # the map
      ulp = exact(np.spacing(table))
      margin = min(
        value - (exact(table) - ulp / 2), exact(table) + ulp / 2 - value
      )
      error = abs(num * exact(hi) + num * exact(lo) - value)
      error += abs(num * exact(lo)) * Fraction(1, 2**24)  # rounding num * lo
      assert margin > 9 * error, (i, j)
      got = np.float32(np.float32(num) * hi + np.float32(num) * lo)
      assert got == table, (i, j)
  assert k == len(positive) - 1  # every code but 1.0


def test_block_scale_is_the_correctly_rounded_reciprocal_on_any_division():
  # The encoder's block scale 1/absmax is refined to the nearest float32
  # (XLA on GPU divides to within an ulp): from a quotient up to two ulps
  # off either way, it is NumPy's correctly rounded reciprocal.
  rng = np.random.default_rng(5)
  m = np.exp(rng.uniform(np.log(1e-30), np.log(1e30), 20000)).astype(np.float32)
  m = np.concatenate([m, np.float32([1, 2, 3, 0.1, 1e-7, 7.5, 2.0**-60])])
  want = np.float32(1) / m
  refine = jax.jit(qz._refined_reciprocal)
  for step in (-2, -1, 0, 1, 2):
    off = (want.view(np.int32) + step).view(np.float32)
    got = np.asarray(refine(jnp.asarray(m), jnp.asarray(off)))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_zero_blocks_and_zeros_decode_exactly():
  x = np.zeros((4, 512), np.float32)
  x[1, 300] = -2.5
  x[2, :256] = np.linspace(-1, 1, 256)
  out = np.asarray(_dequantize(_quantize(x, signed=True)))
  assert np.all(out[0] == 0) and np.all(out[3] == 0)
  assert np.all(out[1, :256] == 0)
  assert out[1, 300] == np.float32(2.5) * dualoptax.dynamic_code_map(True)[0]
  assert np.all(out[x == 0] == 0)
  q = _quantize(np.zeros((256,), np.float32), signed=False)
  assert np.all(np.asarray(q.absmax) == 0) and np.all(
    np.asarray(_dequantize(q)) == 0
  )


@pytest.mark.parametrize("width", [256, 1000])  # blocks of 256, and of 250
def test_nonfinite_values_poison_only_their_block(width):
  x = np.ones((16, width), np.float32)
  x[0, 5] = np.nan
  x[1, 7] = np.inf
  b = width if width == 256 else 250
  for signed in (True, False):
    q = _quantize(x, signed=signed)
    out = np.asarray(_dequantize(q))
    assert np.all(np.isnan(out[:2, :b])), (
      "a non-finite block must decode to NaN"
    )
    np.testing.assert_array_equal(out[:2, b:], 1.0)
    np.testing.assert_array_equal(out[2:], 1.0)
    assert np.isnan(np.asarray(q.absmax)).sum() == 2


def test_shapes_dtypes_and_layouts():
  rng = np.random.default_rng(2)
  cases = [
    ((), 256, None),  # 0-d: one block of one value
    ((1000,), 256, (250, 0)),  # largest divisor <= 256
    ((3, 5, 512), 256, (256, 0)),
    ((7, 100), 256, (100, 0)),  # short last axis: one block per row
    ((4, 526), 256, (256, 242)),  # no divisor >= 32: padded locally
  ]
  q = _quantize(np.ones((4, 526), np.float32), signed=False)
  assert q.codes.shape == (4, 768) and q.absmax.shape == (4, 3) and q.pad == 242
  for shape, bs, layout in cases:
    if layout is not None:
      assert qz.block_layout(shape, bs) == layout
    x = rng.standard_normal(shape).astype(np.float32)
    q = _quantize(x, signed=True, block_size=bs)
    out = np.asarray(_dequantize(q))
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, x, atol=0.02 * max(np.abs(x).max(), 1e-9))
  xb = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
  out = _dequantize(_quantize(xb, signed=True))
  assert out.dtype == jnp.bfloat16
  # Sharded last axis: blocks never straddle a shard.
  assert qz.block_layout((4, 1024), 256, local_last_dim=128) == (128, 0)
  assert qz.block_layout((4, 768), 256, local_last_dim=96) == (96, 0)
  assert qz.block_layout((4, 8 * 526), 256, local_last_dim=526) is None
  assert qz.block_layout((0, 256), 256) is None
  with pytest.raises(ValueError, match="local_last_dim"):
    qz.quantize_blockwise(
      np.ones((4, 8 * 526), np.float32), signed=True, local_last_dim=526
    )


@pytest.mark.parametrize("bad", [0, 3, -256, 100, 2.0, True, "256"])
def test_block_size_must_be_positive_power_of_two(bad):
  with pytest.raises(ValueError, match="block_size"):
    qz.quantize_blockwise(
      np.ones((256,), np.float32), signed=True, block_size=bad
    )


def test_bad_inputs_are_type_errors():
  with pytest.raises(TypeError, match="signed"):
    qz.quantize_blockwise(np.ones((256,), np.float32), signed=1)
  with pytest.raises(TypeError, match="floating"):
    qz.quantize_blockwise(np.ones((256,), np.int32), signed=True)
  with pytest.raises(TypeError, match="QuantizedArray"):
    qz.dequantize_blockwise(np.ones((256,), np.float32))


def test_codec_is_vmap_friendly():
  x = jax.random.normal(jax.random.key(0), (3, 2, 256))
  out = jax.jit(
    jax.vmap(
      lambda v: qz.dequantize_blockwise(qz.quantize_blockwise(v, signed=True))
    )
  )(x)
  direct = _dequantize(_quantize(x, signed=True))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(direct))


@pytest.mark.parametrize("signed", [True, False])
def test_short_last_axis_blocks_span_the_trailing_axes(signed):
  # An nnx attention kernel [d, heads, head_dim] = (64, 4, 16): 256-value
  # blocks spanning the trailing axes, not one 16-value block per row.
  shape = (64, 4, 16)
  assert qz.block_layout(shape, 256) == (256, 0, 4)
  x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
  x = x if signed else x * x
  q = _quantize(x, signed=signed)
  assert q.codes.shape == shape and q.absmax.shape == (16,)
  assert q.block_size == 256 and q.rows == 4 and q.pad == 0
  assert q.nbytes == 4096 + 4 * 16  # 1.016 B/value (16-value blocks: 1.25)
  # Block g holds rows g, g + 16, g + 32, g + 48 of axis 0 (strided, so the
  # optimizer's strided row chunks hold whole blocks): exactly the reference
  # codec on those 256 values.
  blocks = x.reshape(4, 16, 64).transpose(1, 0, 2).reshape(16, 256)
  ref_codes, ref_absmax = _reference_codes(blocks, signed)
  codes = np.asarray(q.codes).reshape(4, 16, 64).transpose(1, 0, 2)
  np.testing.assert_array_equal(codes.reshape(16, 256), ref_codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), ref_absmax)
  decoded = dualoptax.dynamic_code_map(signed)[ref_codes] * ref_absmax[:, None]
  np.testing.assert_array_equal(
    np.asarray(_dequantize(q)),
    decoded.reshape(16, 4, 64).transpose(1, 0, 2).reshape(shape),
  )
  # Axes short of a block after merging stay as they were: one block per row.
  assert qz.block_layout((7, 100), 256) == (100, 0)
  # A sharded axis is never spanned (the trailing axes' shards stay whole).
  assert qz.block_layout(shape, 256, local_shape=(8, 4, 16)) == (16, 0)
  assert qz.block_layout((8, 64, 16), 256, local_shape=(8, 8, 16)) == (16, 0)
