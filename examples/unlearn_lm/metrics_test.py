"""Metric functions on hand-computed cases, and the evaluator's pieces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

for _name in ("flax", "scipy", "rouge_score"):
  pytest.importorskip(_name)

from unlearn_lm import metrics  # noqa: E402
from unlearn_lm.data import encode_qa, generate_people  # noqa: E402
from unlearn_lm.model import LanguageModel, TransformerConfig  # noqa: E402
from unlearn_lm.tokenizer import ByteTokenizer  # noqa: E402


def test_rouge_l_recall_hand_cases():
  ref = "The cat sat on the mat."
  assert metrics.rouge_l_recall(ref, ref) == 1.0
  assert metrics.rouge_l_recall("the cat sat", ref) == 0.5
  # LCS("mat the on", ref) = "the on": order matters
  assert metrics.rouge_l_recall("mat the on", ref) == pytest.approx(2 / 6)
  assert (
    metrics.rouge_l_recall("THE, CAT! sat on-the mat", ref) == 1.0
  )  # case/punctuation
  assert metrics.rouge_l_recall("dog", ref) == 0.0
  assert metrics.rouge_l_recall("", ref) == 0.0
  assert metrics.rouge_l_recall("x", "...") == 0.0
  # recall, not precision: extra generated words cost nothing
  assert (
    metrics.rouge_l_recall("well the cat really sat on the big mat ok", ref)
    == 1.0
  )
  # Porter stemming, as TOFU scores: words match when their stems agree (cats -> cat,
  # mats -> mat); "sits" (-> sit) and "sat" stay different.
  assert metrics.rouge_l_recall("the cats sat on the mats", ref) == 1.0
  assert metrics.rouge_l_recall("the cat sits", "the cat sat") == pytest.approx(
    2 / 3
  )


def test_truth_ratio_and_scores_by_hand():
  para = np.array([1.0, 2.0])
  pert = np.array([[2.0, 4.0], [1.0, 1.0]])
  r = metrics.truth_ratio(para, pert)
  np.testing.assert_allclose(r, [math.exp(2.0), math.exp(-1.0)])
  # forget: 1 - mean(min(R, 1/R))
  assert metrics.truth_ratio_score(r, forget=True) == pytest.approx(
    1 - (math.exp(-2) + math.exp(-1)) / 2
  )
  # others: mean(max(0, 1 - 1/R)); the second question prefers the wrong answers -> 0
  assert metrics.truth_ratio_score(r, forget=False) == pytest.approx(
    (1 - math.exp(-2)) / 2
  )
  with pytest.raises(ValueError, match="perturbed_nll"):
    metrics.truth_ratio(para, pert[0])


def test_probabilities_by_hand():
  nll = np.array([0.0, math.log(4.0)])
  assert metrics.answer_probability(nll) == pytest.approx((1 + 0.25) / 2)
  pert = np.array(
    [[math.log(2.0), math.log(2.0)], [math.log(4.0), math.log(4.0)]]
  )
  # row 0: 1 / (1 + 1/2 + 1/2) = 0.5 ; row 1: 1/4 / (3/4) = 1/3
  assert metrics.relative_answer_probability(nll, pert) == pytest.approx(
    (0.5 + 1 / 3) / 2
  )


def test_forget_quality_is_the_ks_p_value_by_hand():
  # All 3 x below all 3 y: D = 1, reached only by the 2 of C(6, 3) = 20 equally
  # likely orderings that separate the samples completely.
  assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
  # n = 2, m = 1: D = 1 unless the single y falls between the two x (1 of the 3
  # orderings), so P(D >= 1) = 2/3.
  assert metrics.forget_quality([1.0, 2.0], [3.0]) == pytest.approx(2 / 3)
  assert metrics.forget_quality([1.0, 2.0], [1.0, 2.0]) == pytest.approx(1.0)
  # Larger, different samples: small but positive.
  x, y = np.linspace(0.0, 1.0, 30), np.linspace(2.0, 3.0, 30)
  assert 0.0 < metrics.forget_quality(x, y) < 1e-10


def test_aggregates_by_hand():
  sets = {
    "forget": {"prob": 0.9, "rouge_l": 0.6, "truth_ratio": 0.3},
    "retain": {"prob": 0.5, "rouge_l": 1.0, "truth_ratio": 0.5},
    "facts": {"prob": 1.0, "rouge_l": 0.5, "truth_ratio": 1.0},
  }
  kinds = {"forget": "forget", "retain": "retain", "facts": "heldout"}
  # harmonic mean of 0.5, 1, 0.5, 0.5, 1, 1 (the forget set left out): 6 / 9
  assert metrics.model_utility(sets, kinds) == pytest.approx(2 / 3)
  sets["facts"]["rouge_l"] = 0.0
  assert metrics.model_utility(sets, kinds) == 0.0
  with pytest.raises(ValueError, match="non-forget"):
    metrics.model_utility(sets, {"forget": "forget"})
  assert metrics.forget_efficacy(sets["forget"]) == pytest.approx(1 - 0.6)


def test_cached_generation_equals_naive_greedy_and_evaluator_scores():
  tok = ByteTokenizer()
  lm = LanguageModel(
    TransformerConfig(max_len=32, d_model=16, num_heads=2, num_layers=1)
  )
  params = lm.init(1)
  toks = jax.random.randint(jax.random.key(0), (3, 10), 3, 259)
  pad = jnp.array([0, 2, 5])
  prompts = jnp.where(jnp.arange(10)[None] >= pad[:, None], toks, 0)
  out = np.asarray(lm.generate(params, prompts, pad, 6, eos_id=-1))
  apply = jax.jit(
    lm.apply
  )  # one shape: right padding never affects earlier positions
  for r in range(3):
    seq = list(np.asarray(toks[r, int(pad[r]) :]))
    for _ in range(6):
      buf = np.zeros((1, 16), np.int32)
      buf[0, : len(seq)] = seq
      seq.append(
        int(jnp.argmax(apply(params, jnp.asarray(buf))[0, len(seq) - 1]))
      )
    np.testing.assert_array_equal(out[r], seq[-6:])

  data = generate_people(4, num_general=3, retain_eval_size=2)
  ev = metrics.Evaluator(lm, tok, data, max_len=64, batch_size=8)
  res = ev.evaluate(params)["sets"]["general"]
  # relative probability by hand from per-token NLLs
  qa = data.eval_sets["general"][0]

  def avg_nll(answer):
    e = encode_qa(tok, [qa.question], [answer], 64)
    logp = jax.nn.log_softmax(apply(params, jnp.asarray(e.inputs)))[0]
    nll = -np.take_along_axis(np.asarray(logp), e.targets[0][:, None], -1)[:, 0]
    return float((nll * e.mask[0]).sum() / e.mask[0].sum())

  p = math.exp(-avg_nll(qa.answer))
  q = [math.exp(-avg_nll(a)) for a in qa.perturbed_answers]
  assert res["ratios"][0] == pytest.approx(
    math.exp(np.mean([-math.log(v) for v in q]) - avg_nll(qa.paraphrase)),
    rel=1e-4,
  )
  # probability of the first question alone vs the set's mean over its 3 questions
  probs = [res["prob"]]
  assert 0.0 < p / (p + sum(q)) < 1.0 and 0.0 < probs[0] < 1.0
  # scored cut to half the length (short rows) or whole: the same NLL
  stacked = jax.tree.map(lambda x: x[None], params)
  np.testing.assert_allclose(
    ev._score(stacked, 1, ev.sets["general"]["answer"])[0, 0],
    avg_nll(qa.answer),
    rtol=1e-5,
  )


def test_stacked_evaluation_equals_one_at_a_time():
  """evaluate_many over a stack of parameter sets = evaluate of each (to
  float32 rounding of the NLLs, ~1e-6 absolute after exp of differences)."""
  tok = ByteTokenizer()
  lm = LanguageModel(
    TransformerConfig(max_len=64, d_model=16, num_heads=2, num_layers=1)
  )
  data = generate_people(4, num_general=3, retain_eval_size=2)
  ev = metrics.Evaluator(lm, tok, data, max_len=64, batch_size=8)
  each = [lm.init(seed) for seed in (1, 2, 3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *each)
  together = ev.evaluate_many(stacked)
  for params, got in zip(each, together):
    want = ev.evaluate(params)
    for name, s in want["sets"].items():
      assert got["sets"][name]["samples"] == s["samples"]
      for k in ("prob", "rouge_l", "truth_ratio"):
        assert got["sets"][name][k] == pytest.approx(s[k], rel=1e-5, abs=1e-5)
    assert got["model_utility"] == pytest.approx(
      want["model_utility"], rel=1e-5
    )
