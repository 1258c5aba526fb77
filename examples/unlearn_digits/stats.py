r"""Seed-level statistics: gaps to Retrain, lr selection and paired comparisons.

Every comparison is *paired*: seed :math:`s` fixes the forget set, the
Original, the Retrain and the batches, so two methods run on seed :math:`s`
differ only by the optimizer. The unit of comparison is the per-seed gap

.. math::
    g_s = \frac{1}{|M|} \sum_{m \in M} |m_s - m_{s,\mathrm{Retrain}}|

over the reported metrics :math:`M`; a method's *avg gap* is the mean of
:math:`g_s` over the reported seeds. The difference of two methods is
:math:`d_s = g_s^{A} - g_s^{B}` with a t-interval over seeds
(``scipy.stats.t``); it is called real only when the interval excludes 0.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

Runs = Sequence[Mapping[str, float]]


def seed_gaps(runs: Runs, reference: Runs, names: Sequence[str]) -> np.ndarray:
  """``[S]`` per-seed gaps: mean over ``names`` of ``|run - reference|``,
  seed by seed (``reference[s]`` is seed ``s``'s Retrain)."""
  if len(runs) != len(reference):
    raise ValueError(f"{len(runs)} runs but {len(reference)} references")
  a = np.array([[r[m] for m in names] for r in runs], np.float64)
  b = np.array([[r[m] for m in names] for r in reference], np.float64)
  return np.abs(a - b).mean(axis=1)


def summarize(runs: Runs, names: Sequence[str]) -> dict:
  """Mean and sample std (``ddof=1``; 0 for one seed) of each metric, and
  ``avg_std``, the mean of the stds."""
  values = np.array([[r[m] for m in names] for r in runs], np.float64)
  std = values.std(axis=0, ddof=1) if len(runs) > 1 else 0 * values[0]
  return {
    "mean": dict(zip(names, values.mean(axis=0).tolist())),
    "std": dict(zip(names, std.tolist())),
    "avg_std": float(std.mean()),
  }


def paired_difference(
  a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> dict:
  """Mean of ``a - b`` over seeds with its t-interval at ``confidence``.

  Returns:
    ``{"mean", "lo", "hi", "significant", "n"}``; ``significant`` is whether
    the interval excludes 0. With one seed the interval is undefined (NaN,
    not significant); when every difference is equal it is that value.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n, mean = d.size, float(d.mean())
  if n < 2:
    lo = hi = float("nan")
  elif np.all(d == d[0]):
    lo = hi = mean
  else:
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(d))
  significant = bool(lo > 0 or hi < 0)  # False for NaN
  return dict(
    mean=mean, lo=float(lo), hi=float(hi), significant=significant, n=n
  )


def ranking_verdict(
  original_gaps: Sequence[float],
  best_gaps: Sequence[float],
  confidence: float = 0.95,
) -> dict:
  """Whether the setting can rank unlearning methods at all.

  The untouched Original is the do-nothing method. If the best method's
  per-seed gaps are not significantly lower than the Original's (the
  interval of Original - best does not lie above 0), doing nothing is as
  close to Retrain as the best unlearning, and the benchmark cannot rank the
  methods. Returns the paired difference plus ``can_rank``.
  """
  diff = paired_difference(original_gaps, best_gaps, confidence)
  return dict(diff, can_rank=bool(diff["lo"] > 0))


def edge(lrs: Sequence[float], index: int) -> str | None:
  """``"low"``/``"high"`` when ``lrs[index]`` is the smallest/largest of a grid
  of two or more (a choice on the edge: the optimum may lie outside)."""
  if len(lrs) < 2 or 0 < index < len(lrs) - 1:
    return None
  return "low" if index == 0 else "high"


def widen(grid: Sequence[float], side: str) -> tuple:
  """The next block of ``len(grid)`` lrs beyond ``side`` of a geometric grid
  (the same shape, so a compiled grid program is reused)."""
  g = np.asarray(sorted(grid), np.float64)
  factor = g[-1] / g[0] * (g[1] / g[0]) if g.size > 1 else 10.0
  return tuple((g * factor if side == "high" else g / factor).tolist())


def tune_forget_lr(
  evaluate: Callable[[tuple], list],
  grid: Sequence[float],
  reference: Runs,
  names: Sequence[str],
  max_widen: int,
) -> dict:
  """The forget lr with the lowest avg gap on the tuning seeds.

  Args:
    evaluate: ``lrs -> [runs per lr]``, each the per-seed metric dicts of the
      *tuning* seeds (``reference`` holds those seeds' Retrain metrics).
    grid: starting lr grid.
    reference: per-seed Retrain metrics of the tuning seeds.
    names: metrics of the gap.
    max_widen: while the best lr is on an edge, up to this many times, one
      more block beyond that edge is evaluated (:func:`widen`).

  Returns:
    ``{"forget_lr", "edge", "tune_gap", "tried": [[lr, tuning avg gap]]}``;
    ``edge`` is not None when the choice is still on the edge of all lrs tried.
  """
  tried: dict[float, float] = {}
  block = tuple(grid)
  outer = {"low": block, "high": block}  # the outermost block on each side
  for attempt in range(max_widen + 1):
    for lr, runs in zip(block, evaluate(block)):
      gap = seed_gaps(runs, reference, names).mean()
      tried[float(lr)] = float(gap) if np.isfinite(gap) else float("inf")
    lrs = sorted(tried)
    best = min(range(len(lrs)), key=lambda i: tried[lrs[i]])
    side = edge(lrs, best)
    if side is None or attempt == max_widen:
      break
    block = outer[side] = widen(outer[side], side)
  return dict(
    forget_lr=lrs[best],
    edge=side,
    tune_gap=tried[lrs[best]],
    tried=[[lr, tried[lr]] for lr in lrs],
  )
