"""Metric functions on hand-made cases, KS against scipy, and the evaluator's pieces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dualoptax.lm import metrics
from dualoptax.lm.data import generate_people
from dualoptax.lm.model import LanguageModel, TransformerConfig
from dualoptax.lm.tokenizer import ByteTokenizer


def test_rouge_l_recall_hand_cases():
  ref = "The cat sat on the mat."
  assert metrics.rouge_l_recall(ref, ref) == 1.0
  assert metrics.rouge_l_recall("the cat sat", ref) == 0.5
  # LCS("mat the on", ref) = "the on": order matters
  assert metrics.rouge_l_recall("mat the on", ref) == pytest.approx(2 / 6)
  assert metrics.rouge_l_recall("THE, CAT! sat on-the mat", ref) == 1.0  # case/punctuation
  assert metrics.rouge_l_recall("dog", ref) == 0.0
  assert metrics.rouge_l_recall("", ref) == 0.0
  assert metrics.rouge_l_recall("x", "...") == 0.0
  # recall, not precision: extra generated words cost nothing
  assert metrics.rouge_l_recall("well the cat really sat on the big mat ok", ref) == 1.0


def test_truth_ratio_and_scores_by_hand():
  para = np.array([1.0, 2.0])
  pert = np.array([[2.0, 4.0], [1.0, 1.0]])
  r = metrics.truth_ratio(para, pert)
  np.testing.assert_allclose(r, [math.exp(2.0), math.exp(-1.0)])
  # forget: 1 - mean(min(R, 1/R))
  assert metrics.truth_ratio_score(r, forget=True) == pytest.approx(
      1 - (math.exp(-2) + math.exp(-1)) / 2)
  # others: mean(max(0, 1 - 1/R)); the second question prefers the wrong answers -> 0
  assert metrics.truth_ratio_score(r, forget=False) == pytest.approx((1 - math.exp(-2)) / 2)
  with pytest.raises(ValueError, match="perturbed_nll"):
    metrics.truth_ratio(para, pert[0])


def test_probabilities_by_hand():
  nll = np.array([0.0, math.log(4.0)])
  assert metrics.answer_probability(nll) == pytest.approx((1 + 0.25) / 2)
  pert = np.array([[math.log(2.0), math.log(2.0)], [math.log(4.0), math.log(4.0)]])
  # row 0: 1 / (1 + 1/2 + 1/2) = 0.5 ; row 1: 1/4 / (3/4) = 1/3
  assert metrics.relative_answer_probability(nll, pert) == pytest.approx((0.5 + 1 / 3) / 2)


def test_ks_hand_case_and_scipy():
  stat, p = metrics.ks_2samp([1, 2, 3], [4, 5, 6])
  assert stat == 1.0 and p == pytest.approx(2 / math.comb(6, 3))
  assert metrics.ks_2samp([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)
  rng = np.random.default_rng(0)
  cases = [(5, 5, 0.0), (12, 40, 0.3), (40, 40, 1.0), (33, 7, -0.5), (60, 50, 0.2)]
  for n, m, shift in cases:
    x, y = rng.normal(size=n), rng.normal(shift, size=m)
    ref = scipy.stats.ks_2samp(x, y, method="exact")
    stat, p = metrics.ks_2samp(x, y)
    assert stat == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15), (n, m)
  x, y = np.repeat([1.0, 2.0, 3.0], 5), np.repeat([1.0, 2.0, 4.0], 4)  # ties
  assert metrics.ks_2samp(x, y)[1] == pytest.approx(scipy.stats.ks_2samp(x, y, method="exact").pvalue)
  # the asymptotic (Kolmogorov) branch is close to the exact value for large samples
  x, y = rng.normal(size=300), rng.normal(0.15, size=200)
  p_asym = metrics.ks_2samp(x, y, exact_limit=0)[1]
  p_exact = scipy.stats.ks_2samp(x, y, method="exact").pvalue
  assert 0.01 < p_exact < 0.9 and p_asym == pytest.approx(p_exact, abs=0.02)
  with pytest.raises(ValueError, match="non-empty"):
    metrics.ks_2samp([], [1.0])


def test_aggregates_by_hand():
  assert metrics.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
  assert metrics.harmonic_mean([1.0, 0.0]) == 0.0
  sets = {"forget": {"prob": 0.9, "rouge_l": 0.6, "truth_ratio": 0.3},
          "retain": {"prob": 0.5, "rouge_l": 1.0, "truth_ratio": 0.5},
          "facts": {"prob": 1.0, "rouge_l": 0.5, "truth_ratio": 1.0}}
  kinds = {"forget": "forget", "retain": "retain", "facts": "heldout"}
  assert metrics.model_utility(sets, kinds) == pytest.approx(
      scipy.stats.hmean([0.5, 1.0, 0.5, 1.0, 0.5, 1.0]))
  assert metrics.forget_efficacy(sets["forget"]) == pytest.approx(1 - 0.6)


def test_cached_generation_equals_naive_greedy_and_evaluator_scores():
  tok = ByteTokenizer()
  lm = LanguageModel(TransformerConfig(max_len=32, d_model=16, num_heads=2, num_layers=1))
  params = lm.init(1)
  toks = jax.random.randint(jax.random.key(0), (3, 10), 3, 259)
  pad = jnp.array([0, 2, 5])
  prompts = jnp.where(jnp.arange(10)[None] >= pad[:, None], toks, 0)
  out = np.asarray(lm.generate(params, prompts, pad, 6, eos_id=-1))
  apply = jax.jit(lm.apply)  # one shape: right padding never affects earlier positions
  for r in range(3):
    seq = list(np.asarray(toks[r, int(pad[r]):]))
    for _ in range(6):
      buf = np.zeros((1, 16), np.int32)
      buf[0, :len(seq)] = seq
      seq.append(int(jnp.argmax(apply(params, jnp.asarray(buf))[0, len(seq) - 1])))
    np.testing.assert_array_equal(out[r], seq[-6:])

  data = generate_people(4, num_general=3, retain_eval_size=2)
  ev = metrics.Evaluator(lm, tok, data, max_len=64, batch_size=8)
  res = ev.evaluate_set(params, "general", generate=False)
  # relative probability by hand from per-token NLLs
  qa = data.eval_sets["general"][0]

  def avg_nll(answer):
    from dualoptax.lm.data import encode_qa
    e = encode_qa(tok, [qa.question], [answer], 64)
    logp = jax.nn.log_softmax(apply(params, jnp.asarray(e.inputs)))[0]
    nll = -np.take_along_axis(np.asarray(logp), e.targets[0][:, None], -1)[:, 0]
    return float((nll * e.mask[0]).sum() / e.mask[0].sum())

  p = math.exp(-avg_nll(qa.answer))
  q = [math.exp(-avg_nll(a)) for a in qa.perturbed_answers]
  assert res["ratios"][0] == pytest.approx(
      math.exp(np.mean([-math.log(v) for v in q]) - avg_nll(qa.paraphrase)), rel=1e-4)
  # probability of the first question alone vs the set's mean over its 3 questions
  probs = [res["prob"]]
  assert 0.0 < p / (p + sum(q)) < 1.0 and 0.0 < probs[0] < 1.0
  np.testing.assert_allclose(ev._scores(params, ev.sets["general"]["answer"])[0],
                             avg_nll(qa.answer), rtol=1e-5)
