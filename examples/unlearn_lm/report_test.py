"""The study's summary: lr points over seeds, the MU-constrained choice, the
paired FE difference and its mark, and the sequence-length choice."""

import argparse

import numpy as np
import pytest

for _name in ("flax", "scipy", "rouge_score"):
  pytest.importorskip(_name)

from unlearn_lm import pipeline, report  # noqa: E402
from unlearn_lm.data import generate_people  # noqa: E402
from unlearn_lm.tokenizer import ByteTokenizer  # noqa: E402


def _runs(table):
  """``{(optimizer, lr): [(fe, mu) per seed]}`` as result runs."""
  return [
    {
      "optimizer": name,
      "forget_loss": "npo",
      "lr": lr,
      "seed": seed,
      "forget_efficacy": fe,
      "model_utility": mu,
      "forget_quality": 0.5,
    }
    for (name, lr), values in table.items()
    for seed, (fe, mu) in enumerate(values)
  ]


def test_best_fe_under_the_mu_floor_and_the_paired_difference():
  runs = _runs(
    {
      # DualOptim+: lr 1e-2 forgets most but breaks MU; 1e-3 is chosen
      ("dual_optim_plus", 1e-4): [(0.2, 0.9), (0.2, 0.9), (0.2, 0.9)],
      ("dual_optim_plus", 1e-3): [(0.6, 0.85), (0.7, 0.85), (0.8, 0.85)],
      ("dual_optim_plus", 1e-2): [(0.9, 0.1), (0.9, 0.1), (0.9, 0.1)],
      # Adam: better by 0.1 on every seed (paired: no spread) -> marked
      ("adam", 1e-4): [(0.7, 0.9), (0.8, 0.9), (0.9, 0.9)],
      ("adam", 1e-3): [(0.9, 0.5), (0.9, 0.5), (0.9, 0.5)],
      # DualOptim: better on average, but not beyond the seed spread
      ("dual_optim", 1e-4): [(0.5, 0.9), (0.9, 0.9), (0.8, 0.9)],
      ("dual_optim", 1e-3): [(0.9, 0.1), (0.9, 0.1), (0.9, 0.1)],
      # nothing keeps MU
      ("dual_optim_plus_8bit", 1e-4): [(0.9, 0.1), (0.9, 0.1), (0.9, 0.1)],
    }
  )
  text, rows = report.study_table(runs, finetuned_mu=0.9)  # floor 0.81
  got = {r["optimizer"]: r for r in rows}
  assert got["dual_optim_plus"]["lr"] == 1e-3
  assert not got["dual_optim_plus"]["edge"]
  assert got["dual_optim_plus"]["forget_efficacy_mean"] == pytest.approx(0.7)
  assert got["dual_optim_plus"]["forget_efficacy_std"] == pytest.approx(
    np.std([0.6, 0.7, 0.8])
  )
  assert got["adam"]["lr"] == 1e-4 and got["adam"]["edge"]
  assert got["adam"]["delta_fe_mean"] == pytest.approx(0.1)
  assert got["adam"]["delta_fe_std"] == pytest.approx(0.0, abs=1e-12)
  assert got["adam"]["exceeds_spread"]
  d = np.array([0.5, 0.9, 0.8]) - np.array([0.6, 0.7, 0.8])
  assert got["dual_optim"]["delta_fe_mean"] == pytest.approx(d.mean())
  assert not got["dual_optim"]["exceeds_spread"]
  assert got["dual_optim_plus_8bit"]["lr"] is None
  assert "none meets the MU floor" in text and "(edge)" in text
  assert "+0.100 ± 0.000 *" in text


def test_one_seed_is_never_marked_and_shows_no_spread():
  runs = _runs(
    {("dual_optim_plus", 1e-3): [(0.5, 0.9)], ("adam", 1e-3): [(0.9, 0.9)]}
  )
  text, rows = report.study_table(runs, finetuned_mu=0.9)
  assert not {r["optimizer"]: r for r in rows}["adam"]["exceeds_spread"]
  # values alone: no "± 0.000", no seed-spread legend, and the reason said
  assert "±" not in text and "seed spread" not in text and "*" not in text
  assert "1 seed: no spread" in text
  assert (
    "| Adam (shared state) | 0.001 (edge) | 0.900 | 0.900 | 0.5 | +0.400 |"
    in (text)
  )


def test_the_heading_names_the_mu_floor_as_such():
  runs = _runs({("dual_optim_plus", 1e-3): [(0.5, 0.9), (0.6, 0.9)]})
  text, _ = report.study_table(runs, finetuned_mu=0.879)
  heading = text.splitlines()[0]
  assert heading == (
    "NPO+GD: best FE among the lrs with MU >= 0.791 (0.9 x fine-tuned MU "
    "0.879); final values, mean ± std over seeds"
  )
  assert "| 0.550 ± 0.050 |" in text and "seed spread" in text


def test_sequence_length_truncates_at_most_one_percent():
  data = generate_people(12, seed=0)
  args = argparse.Namespace(max_len=None)
  tok = ByteTokenizer()
  max_len, prompt_len, notes = pipeline.choose_lengths(args, data, tok)
  texts = [
    (qa.question, a)
    for qa in data.finetune_set
    + [x for s in data.eval_sets.values() for x in s]
    for a in (qa.answer, qa.paraphrase, *qa.perturbed_answers)
  ]
  lengths = np.array(
    [
      2 + len(tok.encode(f"Question: {q}\nAnswer: ")) + len(tok.encode(a))
      for q, a in texts
    ]
  )
  assert max_len % 16 == 0 and np.mean(lengths > max_len + 1) <= 0.01
  assert np.mean(lengths > max_len - 16 + 1) > 0.01  # the smallest such length
  assert prompt_len % 8 == 0 and prompt_len <= max_len // 2
  assert "truncated" in notes[0]
