"""Unlearning losses (docs/algorithm.md section 4) against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualoptax import unlearning as ul

# One sequence, T=3, V=2. Logits chosen so every probability is a closed form:
#   t=0: [0, 0]        -> p = [1/2, 1/2]
#   t=1: [log 3, 0]    -> p = [3/4, 1/4]
#   t=2: [0, log 4]    -> p = [1/5, 4/5]
LOGITS = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]]])
TARGETS = jnp.array([[0, 1, 1]])
MASK = jnp.array([[0.0, 1.0, 1.0]])  # t=0 is the question
NLL = [math.log(2.0), math.log(4.0), math.log(5.0 / 4.0)]


def test_token_and_sequence_nll():
  np.testing.assert_allclose(ul.token_nll(LOGITS, TARGETS)[0], NLL, rtol=1e-6)
  np.testing.assert_allclose(
    ul.sequence_nll(LOGITS, TARGETS, MASK), [NLL[1] + NLL[2]], rtol=1e-6
  )


def test_mean_token_nll_ga_gd_idk():
  # Batch of 2: the second sequence has one answer token (t=0).
  logits = jnp.concatenate([LOGITS, LOGITS])
  targets = jnp.concatenate([TARGETS, TARGETS])
  mask = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
  want = (
    NLL[1] + NLL[2] + NLL[0]
  ) / 3.0  # mean over the 3 answer tokens, not per row
  np.testing.assert_allclose(
    ul.mean_token_nll(logits, targets, mask), want, rtol=1e-6
  )
  np.testing.assert_allclose(ul.gd_loss(logits, targets, mask), want, rtol=1e-6)
  np.testing.assert_allclose(
    ul.idk_loss(logits, targets, mask), want, rtol=1e-6
  )
  np.testing.assert_allclose(
    ul.ga_loss(logits, targets, mask), -want, rtol=1e-6
  )


def test_npo_hand_value_and_reference_gradient_stopped():
  beta = 0.1
  ell = NLL[1] + NLL[2]
  ref = jnp.array([1.0])
  want = -(2.0 / beta) * math.log(1.0 / (1.0 + math.exp(-beta * (ell - 1.0))))
  np.testing.assert_allclose(
    ul.npo_loss(LOGITS, TARGETS, MASK, ref, beta), want, rtol=1e-6
  )
  # At theta = ref the loss is (2/beta) log 2.
  ref_same = ul.sequence_nll(LOGITS, TARGETS, MASK)
  np.testing.assert_allclose(
    ul.npo_loss(LOGITS, TARGETS, MASK, ref_same, 0.5),
    4.0 * math.log(2.0),
    rtol=1e-6,
  )
  g_ref = jax.grad(lambda r: ul.npo_loss(LOGITS, TARGETS, MASK, r))(ref)
  np.testing.assert_array_equal(g_ref, 0.0)
  # NPO's gradient is GA's direction weighted by 2*sigma(beta*(ref - ell)) per sequence:
  # d/dz of -(2/b) log sig(b (ell - r)) = -2 sig(-b(ell - r)) d ell/dz.
  g = jax.grad(lambda z: ul.npo_loss(z, TARGETS, MASK, ref, beta))(LOGITS)
  g_ell = jax.grad(lambda z: ul.sequence_nll(z, TARGETS, MASK)[0])(LOGITS)
  w = 2.0 / (1.0 + math.exp(beta * (ell - 1.0)))
  np.testing.assert_allclose(g, -w * g_ell, rtol=1e-5, atol=1e-7)


def test_npo_ignores_fully_masked_rows():
  logits = jnp.concatenate([LOGITS, LOGITS])
  targets = jnp.concatenate([TARGETS, TARGETS])
  mask = jnp.concatenate([MASK, jnp.zeros_like(MASK)])
  ref = jnp.array([1.0, 123.0])
  np.testing.assert_allclose(
    ul.npo_loss(logits, targets, mask, ref),
    ul.npo_loss(LOGITS, TARGETS, MASK, ref[:1]),
    rtol=1e-6,
  )


def test_me_loss_hand_value():
  # KL(U||p) = sum_v 1/V log((1/V)/p_v); t=1: 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4)
  kl1 = 0.5 * math.log(2.0 / 3.0) + 0.5 * math.log(2.0)
  kl2 = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
  np.testing.assert_allclose(
    ul.me_loss(LOGITS, MASK), (kl1 + kl2) / 2.0, rtol=1e-6
  )
  # Uniform prediction: zero.
  np.testing.assert_allclose(
    ul.me_loss(jnp.zeros((2, 3, 5)), jnp.ones((2, 3))), 0.0, atol=1e-7
  )


def test_kl_loss_hand_value_and_zero_at_reference():
  ref = jnp.zeros_like(LOGITS)  # uniform reference
  # KL(U || p) at answer tokens: the same numbers as ME.
  kl1 = 0.5 * math.log(2.0 / 3.0) + 0.5 * math.log(2.0)
  kl2 = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
  np.testing.assert_allclose(
    ul.kl_loss(LOGITS, ref, MASK), (kl1 + kl2) / 2.0, rtol=1e-6
  )
  # Reversed direction differs: KL(p_ref=[3/4,1/4] || U) at t=1 only.
  mask1 = jnp.array([[0.0, 1.0, 0.0]])
  want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
  np.testing.assert_allclose(ul.kl_loss(ref, LOGITS, mask1), want, rtol=1e-6)
  np.testing.assert_allclose(ul.kl_loss(LOGITS, LOGITS, MASK), 0.0, atol=1e-7)
  g_ref = jax.grad(lambda r: ul.kl_loss(LOGITS, r, MASK))(ref)
  np.testing.assert_array_equal(g_ref, 0.0)


@pytest.mark.parametrize(
  "loss",
  [
    lambda z, y, m: ul.ga_loss(z, y, m),
    lambda z, y, m: ul.gd_loss(z, y, m),
    lambda z, y, m: ul.npo_loss(z, y, m, jnp.zeros(z.shape[:-2])),
    lambda z, y, m: ul.me_loss(z, m),
    lambda z, y, m: ul.kl_loss(z, jnp.zeros_like(z), m),
  ],
  ids=["ga", "gd", "npo", "me", "kl"],
)
def test_fully_masked_batch_is_zero_without_nan(loss):
  # -inf logits at padding positions must not leak either.
  z = jnp.full((2, 3, 4), 0.5).at[:, :, 0].set(-jnp.inf)
  y = jnp.zeros((2, 3), jnp.int32)
  m = jnp.zeros((2, 3))
  value, grad = jax.value_and_grad(loss)(jnp.where(jnp.isinf(z), 0.0, z), y, m)
  assert float(value) == 0.0
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_shape_errors():
  with pytest.raises(ValueError, match="mask"):
    ul.gd_loss(LOGITS, TARGETS, MASK[:, :2])
  with pytest.raises(ValueError, match="targets"):
    ul.gd_loss(LOGITS, TARGETS[:, :2], MASK)
  with pytest.raises(ValueError, match="ref_sequence_nll"):
    ul.npo_loss(LOGITS, TARGETS, MASK, jnp.zeros((2,)))
  with pytest.raises(ValueError, match="beta"):
    ul.npo_loss(LOGITS, TARGETS, MASK, jnp.zeros((1,)), beta=0.0)


# --- classifiers ----------------------------------------------------------------------

CLS_LOGITS = jnp.array(
  [[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]]
)  # p0 = [3/5,1/5,1/5]
CLS_LABELS = jnp.array([0, 2])


def test_classifier_ce_ga_gd():
  ce = [math.log(5.0 / 3.0), math.log(3.0)]
  np.testing.assert_allclose(
    ul.classifier_nll(CLS_LOGITS, CLS_LABELS), ce, rtol=1e-6
  )
  np.testing.assert_allclose(
    ul.classifier_gd_loss(CLS_LOGITS, CLS_LABELS), np.mean(ce), rtol=1e-6
  )
  np.testing.assert_allclose(
    ul.classifier_ga_loss(CLS_LOGITS, CLS_LABELS), -np.mean(ce), rtol=1e-6
  )


def test_classifier_npo_me_kl():
  beta = 0.2
  ce = np.array([math.log(5.0 / 3.0), math.log(3.0)])
  ref = np.array([0.5, 2.0])
  want = -(2.0 / beta) * np.mean(
    np.log(1.0 / (1.0 + np.exp(-beta * (ce - ref))))
  )
  np.testing.assert_allclose(
    ul.classifier_npo_loss(CLS_LOGITS, CLS_LABELS, jnp.asarray(ref), beta),
    want,
    rtol=1e-6,
  )
  me0 = sum(math.log((1 / 3) / p) / 3 for p in (0.6, 0.2, 0.2))
  np.testing.assert_allclose(
    ul.classifier_me_loss(CLS_LOGITS), me0 / 2.0, rtol=1e-5
  )
  kl0 = sum(
    p * math.log(p / (1 / 3)) for p in (0.6, 0.2, 0.2)
  )  # KL(p_ref || U)
  np.testing.assert_allclose(
    ul.classifier_kl_loss(jnp.zeros_like(CLS_LOGITS), CLS_LOGITS),
    kl0 / 2.0,
    rtol=1e-5,
  )


def test_random_wrong_labels_and_rl_loss():
  labels = jnp.arange(1000) % 10
  wrong = ul.random_wrong_labels(jax.random.key(0), labels, 10)
  assert wrong.dtype == jnp.int32
  assert bool(jnp.all(wrong != labels)) and bool(
    jnp.all((wrong >= 0) & (wrong < 10))
  )
  # Every wrong class is reachable: roughly uniform over the 9 others.
  counts = np.bincount(np.asarray((wrong - labels) % 10), minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 60
  np.testing.assert_allclose(
    ul.random_label_loss(CLS_LOGITS, jnp.array([1, 0])),
    (math.log(5.0) + math.log(3.0)) / 2.0,
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="num_classes"):
    ul.random_wrong_labels(jax.random.key(0), labels, 1)


def test_losses_compute_in_at_least_float32_and_keep_float64():
  # bf16 logits are upcast for the log-softmax; float64 ones stay float64.
  nll_bf16 = ul.sequence_nll(LOGITS.astype(jnp.bfloat16), TARGETS, MASK)
  assert nll_bf16.dtype == jnp.float32
  with jax.enable_x64(True):
    # LOGITS rebuilt in float64 (the module constant holds float32 logs).
    logits = jnp.array(
      [[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]]], jnp.float64
    )
    nll = ul.sequence_nll(logits, TARGETS, MASK)
    assert nll.dtype == jnp.float64
    # log 4 + log(5/4) = log 5, to float64 rounding (float32 would be ~1e-7).
    np.testing.assert_allclose(float(nll[0]), math.log(5.0), rtol=1e-13)
