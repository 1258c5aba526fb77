r"""TOFU-style evaluation of language-model unlearning.

Text and statistics helpers are NumPy functions of plain numbers; :class:`Evaluator`
computes what they need (length-normalized answer likelihoods and greedy generations)
with two jitted functions of fixed shape, so evaluating every set compiles once.

Per evaluation set (TOFU, Maini et al. 2024, and the aggregation of "A Closer Look at
Machine Unlearning for LLMs", Yuan et al. 2025, which the DualOptim(+) authors use):

* **Probability** — forget/retain sets: :math:`\frac1N\sum_i P(a_i|q_i)^{1/|a_i|}`;
  held-out sets (real authors, world facts, general knowledge): the relative probability
  :math:`\frac1N\sum_i \frac{P(a_i)^{1/|a_i|}}{P(a_i)^{1/|a_i|} + \sum_j P(\tilde a_{ij})^{1/|\tilde a_{ij}|}}`.
* **ROUGE-L recall** of the greedy generation against the answer (``rouge-score``
  with the Porter stemmer, as TOFU's evaluation).
* **Truth ratio** :math:`R_i = \exp(\overline{\mathrm{nll}}(\tilde a_{i\cdot}) - \mathrm{nll}(\hat a_i))`
  with per-token NLLs of the paraphrased answer :math:`\hat a_i` and the mean over the
  perturbed answers :math:`\tilde a_{ij}` (i.e. paraphrase probability over perturbed
  probability). Reported as :math:`1 - \frac1N\sum_i \min(R_i, 1/R_i)` on the forget
  set and :math:`\frac1N\sum_i \max(0, 1 - 1/R_i)` elsewhere; both are high when the
  model tells the true answer from the false ones.
* **Forget Quality**: the two-sample Kolmogorov–Smirnov p-value
  (``scipy.stats.ks_2samp``, as TOFU) between the forget-set :math:`R_i` of the
  model and of a model trained on the retain data only.
* **Model Utility**: harmonic mean (``scipy.stats.hmean``) of the nine (or
  3 x #non-forget sets) values above on the retain and held-out sets.
* **Forget Efficacy**: :math:`1 - \mathrm{mean}` of the forget set's probability,
  ROUGE-L recall and truth-ratio value (the authors also average an NLI entailment
  score and an embedding cosine similarity, which need external models and are left out).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from rouge_score import rouge_scorer

from dualoptax.unlearning.losses import sequence_nll
from unlearn_lm.data import (
  UnlearningData,
  encode_prompts,
  encode_qa,
  visible_answer,
)
from unlearn_lm.model import LanguageModel
from unlearn_lm.tokenizer import ByteTokenizer

__all__ = [
  "rouge_l_recall",
  "truth_ratio",
  "truth_ratio_score",
  "answer_probability",
  "relative_answer_probability",
  "forget_quality",
  "model_utility",
  "forget_efficacy",
  "Evaluator",
]


# ---------------------------------------------------------------------------------------
# Text and statistics
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
  # Built once: the scorer sets up its tokenizer and Porter stemmer.
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
  r"""ROUGE-L recall: :math:`\mathrm{LCS}(\text{pred}, \text{ref}) / |\text{ref}|` on words.

  ``rouge_score``'s ``rougeL`` recall with its default tokenizer (lower-cased
  alphanumeric words) and the Porter stemmer, as TOFU's evaluation computes it.

  Args:
    prediction: generated text.
    reference: ground-truth text.

  Returns:
    A float in ``[0, 1]``; 0 when either text has no words.

  Examples:
    >>> rouge_l_recall("the cat sat", "the cat sat on the mat")
    0.5
  """
  return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].recall)


def truth_ratio(
  paraphrased_nll: np.ndarray, perturbed_nll: np.ndarray
) -> np.ndarray:
  r"""Per-question truth ratio :math:`R_i = \exp(\mathrm{mean}_j\,\tilde\ell_{ij} - \hat\ell_i)`.

  Args:
    paraphrased_nll: ``[N]`` per-token NLL of the paraphrased answers.
    perturbed_nll: ``[N, K]`` per-token NLL of the perturbed answers.

  Returns:
    ``[N]``: > 1 where the model prefers the (paraphrased) truth.
  """
  paraphrased_nll = np.asarray(paraphrased_nll, np.float64)
  perturbed_nll = np.asarray(perturbed_nll, np.float64)
  if (
    perturbed_nll.ndim != 2
    or perturbed_nll.shape[0] != paraphrased_nll.shape[0]
  ):
    raise ValueError(
      f"perturbed_nll must have shape [N, K] with N={paraphrased_nll.shape[0]}, "
      f"got {perturbed_nll.shape}."
    )
  return np.exp(perturbed_nll.mean(axis=-1) - paraphrased_nll)


def truth_ratio_score(ratios: np.ndarray, forget: bool) -> float:
  r"""Aggregates truth ratios: forget set :math:`1-\overline{\min(R, 1/R)}`, else :math:`\overline{\max(0, 1-1/R)}`."""
  r = np.asarray(ratios, np.float64)
  if forget:
    return float(1.0 - np.mean(np.minimum(r, 1.0 / r)))
  return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))


def answer_probability(avg_nll: np.ndarray) -> float:
  r""":math:`\frac1N \sum_i \exp(-\bar\ell_i)`: mean length-normalized answer probability."""
  return float(np.mean(np.exp(-np.asarray(avg_nll, np.float64))))


def relative_answer_probability(
  avg_nll: np.ndarray, perturbed_nll: np.ndarray
) -> float:
  r"""Mean of :math:`p_i / (p_i + \sum_j \tilde p_{ij})` with length-normalized probabilities."""
  p = np.exp(-np.asarray(avg_nll, np.float64))
  q = np.exp(-np.asarray(perturbed_nll, np.float64)).sum(axis=-1)
  return float(np.mean(p / (p + q)))


def forget_quality(
  ratios: Sequence[float], reference_ratios: Sequence[float]
) -> float:
  """Forget Quality: the two-sided two-sample KS p-value (``scipy.stats.ks_2samp``
  with its default method, as TOFU) between the model's forget-set truth ratios
  and those of the retain-only model.

  Examples:
    >>> round(forget_quality([1, 2, 3], [4, 5, 6]), 4)
    0.1
  """
  return float(
    scipy.stats.ks_2samp(
      np.asarray(ratios, np.float64), np.asarray(reference_ratios, np.float64)
    ).pvalue
  )


def model_utility(
  set_metrics: Mapping[str, Mapping[str, float]], kinds: Mapping[str, str]
) -> float:
  """Harmonic mean of probability, ROUGE-L recall and truth ratio over non-forget
  sets (0 when any of them is 0, as ``scipy.stats.hmean``)."""
  values = [
    set_metrics[name][k]
    for name, kind in kinds.items()
    if kind != "forget"
    for k in ("prob", "rouge_l", "truth_ratio")
  ]
  if not values:
    raise ValueError("model_utility needs at least one non-forget set.")
  return float(scipy.stats.hmean(np.asarray(values, np.float64)))


def forget_efficacy(forget_metrics: Mapping[str, float]) -> float:
  """``1 - mean(prob, rouge_l, truth_ratio)`` of the forget set (higher: more forgotten)."""
  return float(
    1.0
    - np.mean([forget_metrics[k] for k in ("prob", "rouge_l", "truth_ratio")])
  )


# ---------------------------------------------------------------------------------------
# Model evaluation
# ---------------------------------------------------------------------------------------


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
  extra = (-a.shape[0]) % multiple
  if not extra:
    return a
  return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)])


def _by_length(enc, half: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
  """``enc``'s rows split into those that end within ``half`` positions (cut
  to ``half``: the model is causal, so right padding changes nothing before
  it) and the rest: ``[(row indices, [inputs, targets, mask])]``."""
  ends = np.where(
    enc.mask.any(-1),
    enc.mask.shape[1] - np.argmax(enc.mask[:, ::-1] > 0, -1),
    0,
  )
  short = ends <= half
  return [
    (np.flatnonzero(rows), [a[rows, :width] for a in enc])
    for rows, width in ((short, half), (~short, enc.mask.shape[1]))
    if rows.any()
  ]


class Evaluator:
  r"""Evaluates a :class:`~unlearn_lm.model.LanguageModel` on :class:`UnlearningData`.

  Each evaluation set is encoded once: answers, paraphrased answers and the ``K``
  perturbed answers (every question of a set must have the same ``K``), plus
  left-padded prompts for greedy generation. Sequences that fit in half the
  length are scored cut to it (the model is causal, so right padding changes
  nothing before it). Scoring and generation run in fixed blocks, ``vmap``-ed
  over a stack of parameter sets (:meth:`evaluate_many`, e.g.
  every learning rate and seed of a sweep at once); each jitted function compiles
  once per stack size.

  Args:
    lm: the model.
    tokenizer: its tokenizer.
    data: the data (its ``eval_sets`` and ``eval_kinds`` are used).
    max_len: sequence length (``lm.config.max_len``).
    batch_size: rows per jitted call, shared by the stacked parameter sets.
    prompt_len: width of the generation prompts (default ``max_len // 2``);
      generation continues for ``max_len - prompt_len`` tokens.
  """

  def __init__(
    self,
    lm: LanguageModel,
    tokenizer: ByteTokenizer,
    data: UnlearningData,
    max_len: int,
    batch_size: int = 256,
    prompt_len: Optional[int] = None,
  ):
    self.lm, self.tok, self.max_len, self.batch_size = (
      lm,
      tokenizer,
      max_len,
      batch_size,
    )
    self.prompt_len = prompt_len or max_len // 2
    if not 2 <= self.prompt_len < max_len:
      raise ValueError(
        f"prompt_len must be in [2, {max_len}), got {self.prompt_len}."
      )
    self.kinds = dict(data.eval_kinds)
    self.sets = {}
    for name, examples in data.eval_sets.items():
      ks = {len(qa.perturbed_answers) for qa in examples}
      if len(ks) != 1 or 0 in ks:
        raise ValueError(
          f"Evaluation set {name!r}: every question needs the same, non-zero "
          f"number of perturbed answers, got counts {sorted(ks)}."
        )
      k = ks.pop()
      qs = [qa.question for qa in examples]
      prompts, num_pad = encode_prompts(
        tokenizer, qs, max_len, width=self.prompt_len
      )
      encode = lambda questions, answers: _by_length(
        encode_qa(tokenizer, questions, answers, max_len), max_len // 2
      )
      self.sets[name] = dict(
        k=k,
        answer=encode(qs, [qa.answer for qa in examples]),
        paraphrase=encode(qs, [qa.paraphrase for qa in examples]),
        perturbed=encode(
          [q for q in qs for _ in range(k)],
          [p for qa in examples for p in qa.perturbed_answers],
        ),
        prompts=prompts,
        num_pad=num_pad,
        references=[
          visible_answer(tokenizer, qa.question, qa.answer, max_len)
          for qa in examples
        ],
      )

    def avg_nll(params, inputs, targets, mask):
      logits = lm.apply(params, inputs)
      return sequence_nll(logits, targets, mask) / jnp.maximum(
        mask.sum(-1), 1.0
      )

    self.max_new_tokens = max_len - self.prompt_len
    stacked = dict(in_axes=(0, None, None, None))
    self._avg_nll = jax.jit(jax.vmap(avg_nll, **stacked))
    self._generate = jax.jit(
      jax.vmap(
        lambda params, prompts, num_pad: lm.generate(
          params,
          prompts,
          num_pad,
          self.max_new_tokens,
          tokenizer.eos_id,
          tokenizer.pad_id,
        ),
        in_axes=(0, None, None),
      )
    )

  def _rows(self, members: int) -> int:
    return max(8, self.batch_size // members)

  def _score(self, params, members: int, buckets) -> np.ndarray:
    """Mean answer NLL ``[members, rows]`` of an encoding split by
    :func:`_by_length`."""
    out = np.zeros((members, sum(rows.size for rows, _ in buckets)))
    for rows, cut in buckets:
      out[:, rows] = self._blocks(self._avg_nll, params, members, *cut)
    return out

  def _blocks(self, fn, params, members: int, *arrays) -> np.ndarray:
    """``fn(params, *block)`` over row blocks: ``[members, rows, ...]``.

    A set smaller than one block is padded to a multiple of 16 rows, not to a
    whole block: padding rows are computed and dropped, and on the CPU they
    were most of an evaluation's time (40 prompts in a block of 256)."""
    n = arrays[0].shape[0]
    rows = min(self._rows(members), -(-n // 16) * 16)
    padded = [_pad_rows(a, rows) for a in arrays]
    out = [
      np.asarray(fn(params, *(a[s : s + rows] for a in padded)))
      for s in range(0, padded[0].shape[0], rows)
    ]
    return np.concatenate(out, axis=1)[:, :n]

  def _generate_many(self, params, members: int, name: str) -> list:
    s = self.sets[name]
    ids = self._blocks(
      self._generate, params, members, s["prompts"], s["num_pad"]
    )
    return [self.tok.decode_batch(m) for m in ids]

  def _set_metrics(self, name, answer, para, pert, gens) -> dict[str, Any]:
    s = self.sets[name]
    forget = self.kinds[name] == "forget"
    pert = pert.reshape(-1, s["k"])
    ratios = truth_ratio(para, pert)
    return {
      "prob": (
        relative_answer_probability(answer, pert)
        if self.kinds[name] == "heldout"
        else answer_probability(answer)
      ),
      "truth_ratio": truth_ratio_score(ratios, forget),
      "ratios": ratios,
      "rouge_l": float(
        np.mean([rouge_l_recall(g, r) for g, r in zip(gens, s["references"])])
      ),
      "samples": list(zip(s["references"][:3], gens[:3])),
    }

  def evaluate_many(
    self, params, reference_ratios: Optional[np.ndarray] = None
  ) -> list[dict[str, Any]]:
    """:meth:`evaluate` of every member of a stack of parameter sets (leaves
    with a leading member axis), computed together."""
    members = jax.tree.leaves(params)[0].shape[0]
    raw = {}
    for name, s in self.sets.items():
      score = lambda enc: self._score(params, members, enc)
      raw[name] = (
        score(s["answer"]),
        score(s["paraphrase"]),
        score(s["perturbed"]),
        self._generate_many(params, members, name),
      )
    forget_name = next(n for n, k in self.kinds.items() if k == "forget")
    results = []
    for i in range(members):
      sets = {
        name: self._set_metrics(name, *(x[i] for x in arrays))
        for name, arrays in raw.items()
      }
      result = {
        "sets": sets,
        "model_utility": model_utility(sets, self.kinds),
        "forget_efficacy": forget_efficacy(sets[forget_name]),
        "forget_quality": None,
        "forget_ratios": sets[forget_name]["ratios"],
      }
      if reference_ratios is not None:
        result["forget_quality"] = forget_quality(
          sets[forget_name]["ratios"], reference_ratios
        )
      results.append(result)
    return results

  def evaluate(
    self, params, reference_ratios: Optional[np.ndarray] = None
  ) -> dict[str, Any]:
    """All sets plus the aggregates.

    Args:
      params: model parameters.
      reference_ratios: forget-set truth ratios of the retain-only model; when given,
        ``forget_quality`` (KS p-value) is reported.

    Returns:
      ``{"sets": {name: metrics}, "model_utility", "forget_efficacy",
      "forget_quality" (or None), "forget_ratios"}``; per set ``prob``,
      ``rouge_l``, ``truth_ratio``, the per-question ``ratios`` and three
      ``(reference, generation)`` samples.
    """
    stacked = jax.tree.map(lambda x: x[None], params)
    return self.evaluate_many(stacked, reference_ratios)[0]
