"""Unlearning metrics (docs/algorithm.md section 5) on synthetic predictions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dualoptax.unlearning import metrics as M


def _onehot_logits(pred, num_classes=3, confidence=10.0):
  return confidence * np.eye(num_classes, dtype=np.float32)[np.asarray(pred)]


def test_accuracy_and_entropy():
  logits = _onehot_logits([0, 1, 2, 2])
  assert float(
    M.accuracy(jnp.asarray(logits), jnp.array([0, 1, 2, 0]))
  ) == pytest.approx(75.0)
  # Uniform: log C; one-hot-ish: ~0.
  h = M.softmax_entropy(jnp.zeros((2, 4)))
  np.testing.assert_allclose(h, [math.log(4.0)] * 2, rtol=1e-6)
  p = np.array([0.5, 0.25, 0.25])
  h = M.softmax_entropy(jnp.log(jnp.asarray(p))[None])
  np.testing.assert_allclose(h, [-(p * np.log(p)).sum()], rtol=1e-6)


def test_unlearning_metrics_ua_ra_ta():
  # forget: 1 of 4 right -> UA 75; retain: 3 of 4 -> RA 75; test: 2 of 4 -> TA 50.
  y = np.array([0, 1, 2, 0])
  out = M.unlearning_metrics(
    _onehot_logits([0, 2, 0, 1]),
    y,
    _onehot_logits([0, 1, 2, 1]),
    y,
    _onehot_logits([0, 1, 0, 1]),
    y,
  )
  assert set(out) == {"UA", "RA", "TA", "MIA"}
  assert out["UA"] == pytest.approx(75.0)
  assert out["RA"] == pytest.approx(75.0)
  assert out["TA"] == pytest.approx(50.0)
  assert 0.0 <= out["MIA"] <= 100.0


def test_mia_detects_planted_leak():
  rng = np.random.default_rng(0)
  # Members (retain): memorized, low entropy. Non-members (test): higher entropy.
  # Test set deliberately smaller: the class-balanced fit must not just follow the prior.
  members = rng.uniform(0.0, 0.2, size=900)
  nonmembers = rng.uniform(0.3, 1.5, size=100)
  leaked_forget = rng.uniform(
    0.0, 0.2, size=50
  )  # a model that memorized the forget set
  forgotten = rng.uniform(
    0.3, 1.5, size=50
  )  # a model for which it looks like test data
  assert M.mia_rate(members, nonmembers, leaked_forget) >= 95.0
  assert M.mia_rate(members, nonmembers, forgotten) <= 5.0


def test_mia_tiny_entropies_still_separate():
  # A confident model's entropies are ~1e-6: the standardization must keep them usable.
  rng = np.random.default_rng(1)
  members = rng.uniform(0.0, 1e-6, size=300)
  nonmembers = rng.uniform(2e-6, 5e-6, size=300)
  assert (
    M.mia_rate(members, nonmembers, rng.uniform(0.0, 1e-6, size=40)) >= 95.0
  )
  assert (
    M.mia_rate(members, nonmembers, rng.uniform(2e-6, 5e-6, size=40)) <= 5.0
  )


def test_mia_rejects_bad_input():
  with pytest.raises(ValueError, match="nonmember_entropy"):
    M.mia_rate(np.ones(3), np.array([]), np.ones(2))
  with pytest.raises(ValueError, match="target_entropy"):
    M.mia_rate(np.ones(3), np.zeros(3), np.array([np.nan]))


def test_summarize_and_average_gap_arithmetic():
  runs = [
    {"UA": 2.0, "RA": 99.0, "TA": 96.0, "MIA": 80.0},
    {"UA": 4.0, "RA": 97.0, "TA": 98.0, "MIA": 84.0},
  ]
  s = M.summarize(runs)
  assert s["mean"] == {"UA": 3.0, "RA": 98.0, "TA": 97.0, "MIA": 82.0}
  # Sample std (ddof=1) of two values a, b is |a - b| / sqrt(2).
  r2 = math.sqrt(2.0)
  assert s["std"] == pytest.approx(
    {"UA": r2, "RA": r2, "TA": r2, "MIA": 4.0 / r2}
  )
  assert s["avg_std"] == pytest.approx((3 * r2 + 4.0 / r2) / 4.0)
  retrain = {"UA": 5.0, "RA": 100.0, "TA": 96.5, "MIA": 70.0}
  # |3-5| + |98-100| + |97-96.5| + |82-70| = 2 + 2 + 0.5 + 12 = 16.5 -> 4.125
  assert M.average_gap(s["mean"], retrain) == pytest.approx(4.125)
  assert M.summarize(runs[:1])["avg_std"] == 0.0
  with pytest.raises(ValueError, match="runs"):
    M.summarize([])


def test_format_table_lists_every_method():
  s = M.summarize([{"UA": 1.0, "RA": 2.0, "TA": 3.0, "MIA": 4.0}])
  table = M.format_table(
    {
      "Retrain": dict(s, avg_gap=None),
      "Adam": dict(s, avg_gap=0.5, note="lr 1e-3"),
    }
  )
  lines = table.splitlines()
  assert lines[0].split()[:5] == ["method", "UA", "RA", "TA", "MIA"]
  assert lines[2].startswith("Retrain") and "—" in lines[2]
  assert (
    lines[3].startswith("Adam") and "0.50" in lines[3] and "lr 1e-3" in lines[3]
  )
