"""Scores, the learning-rate choice, the table, ``results.json`` and the plot.

Δm% (the usual multi-task summary) is the mean over tasks of the relative drop
of a task's metric against the same task trained alone; for accuracies
(higher is better)

    Δm = (1/K) Σ_k −(M_k − M_k^single) / M_k^single × 100,

so lower is better and 0 means "as good as the single-task models".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from multitask_digits import data as D

# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1).
_T95 = {
  1: 12.706,
  2: 4.303,
  3: 3.182,
  4: 2.776,
  5: 2.571,
  6: 2.447,
  7: 2.365,
  8: 2.306,
  9: 2.262,
  10: 2.228,
}


def delta_m(acc: np.ndarray, single: np.ndarray) -> np.ndarray:
  """Δm% of accuracies ``[..., K]`` against single-task ones ``[..., K]``."""
  acc, single = np.asarray(acc, np.float64), np.asarray(single, np.float64)
  return np.mean(-(acc - single) / single, axis=-1) * 100.0


def choose_lr(val_score: np.ndarray, higher_is_better: bool) -> int:
  """Grid index with the best validation score averaged over seeds.

  Args:
    val_score: ``[L, S]`` scores on the validation split.
    higher_is_better: direction of the score.
  """
  mean = val_score.mean(axis=1)
  return int(np.argmax(mean) if higher_is_better else np.argmin(mean))


def paired_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean of ``a - b`` over seeds and the half-width of its 95% t-interval
  (NaN with a single seed)."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = diff.size
  if n < 2:
    return float(diff.mean()), float("nan")
  t = _T95.get(n - 1, 1.96)
  return float(diff.mean()), float(t * diff.std(ddof=1) / math.sqrt(n))


def _mean_std(x: np.ndarray) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {
    "mean": float(x.mean()),
    "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
  }


def method_row(
  name: str,
  label: str,
  lrs: Sequence[float],
  val: np.ndarray,
  test: np.ndarray,
  single_val: np.ndarray,
  single_test: np.ndarray,
) -> dict[str, Any]:
  """Picks the lr on validation Δm and scores the test split there.

  Args:
    name, label: the method's key and display name.
    lrs: the learning-rate grid.
    val, test: accuracies ``[L, S, K]`` on validation and test.
    single_val, single_test: the single-task references ``[S, K]`` (each
      task's model at its own chosen lr), compared seed by seed.
  """
  val, test = np.asarray(val, np.float64), np.asarray(test, np.float64)
  val_dm = delta_m(val, single_val[None])  # [L, S]
  best = choose_lr(val_dm, higher_is_better=False)
  test_dm = delta_m(test[best], single_test)  # [S]
  return {
    "method": name,
    "label": label,
    "lr": float(lrs[best]),
    "test_acc": {
      t: _mean_std(100 * test[best, :, k]) for k, t in enumerate(D.TASKS)
    },
    "delta_m": _mean_std(test_dm),
    "per_seed": {
      "test_acc": (100 * test[best]).tolist(),
      "delta_m": test_dm.tolist(),
    },
    "grid": {
      "val_delta_m": val_dm.mean(1).tolist(),
      "val_acc": (100 * val.mean(1)).tolist(),
      "test_acc": (100 * test.mean(1)).tolist(),
    },
  }


def single_row(
  lrs: Sequence[float], chosen: Sequence[int], test: np.ndarray
) -> dict[str, Any]:
  """The single-task references as a table row (``test``: ``[S, K]``)."""
  test = np.asarray(test, np.float64)
  return {
    "method": "single",
    "label": "Single task (reference)",
    "lr": {t: float(lrs[i]) for t, i in zip(D.TASKS, chosen)},
    "test_acc": {t: _mean_std(100 * test[:, k]) for k, t in enumerate(D.TASKS)},
    "delta_m": {"mean": 0.0, "std": 0.0},
    "per_seed": {
      "test_acc": (100 * test).tolist(),
      "delta_m": [0.0] * test.shape[0],
    },
  }


def add_paired(rows: list[dict], baseline: str = "adam_sum") -> None:
  """Adds each row's paired Δm difference against ``baseline``, in place."""
  base = next((r for r in rows if r["method"] == baseline), None)
  for r in rows:
    if base is None or r is base or r["method"] == "single":
      r["vs_baseline"] = None
      continue
    mean, half = paired_interval(
      r["per_seed"]["delta_m"], base["per_seed"]["delta_m"]
    )
    r["vs_baseline"] = {
      "baseline": baseline,
      "mean": mean,
      "ci95_half_width": half,
    }


def table(rows: Sequence[Mapping]) -> str:
  """The results table (test split, mean ± std over seeds)."""

  def ms(d, digits=1):
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

  def lr(r):
    if isinstance(r["lr"], dict):
      return "/".join(f"{v:g}" for v in r["lr"].values())
    return f"{r['lr']:g}"

  head = (
    f"{'method':<26} {'lr':>14} "
    + " ".join(f"{t + ' acc %':>13}" for t in D.TASKS)
    + f" {'Δm % (↓)':>14} {'Δm − Adam [95% CI]':>21}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    vs = r.get("vs_baseline")
    if vs is None:
      paired = "—"
    elif math.isnan(vs["ci95_half_width"]):
      paired = f"{vs['mean']:+.2f}"
    else:
      paired = f"{vs['mean']:+.2f} ± {vs['ci95_half_width']:.2f}"
    lines.append(
      f"{r['label']:<26} {lr(r):>14} "
      + " ".join(f"{ms(r['test_acc'][t]):>13}" for t in D.TASKS)
      + f" {ms(r['delta_m'], 2):>14} {paired:>21}"
    )
  return "\n".join(lines)


def plot(rows: Sequence[Mapping], path: Path) -> None:
  """Δm% and per-task test accuracy per method, error bars = std over seeds."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  labels = [r["label"] for r in rows]
  y = np.arange(len(rows))
  fig, axes = plt.subplots(
    1, 1 + len(D.TASKS), figsize=(15, 0.5 * len(rows) + 1.8), sharey=True
  )
  panels = [("Δm % (lower is better)", [r["delta_m"] for r in rows])]
  panels += [
    (f"{t}: test accuracy %", [r["test_acc"][t] for r in rows]) for t in D.TASKS
  ]
  for ax, (title, stats) in zip(axes, panels):
    means = [s["mean"] for s in stats]
    stds = [s["std"] for s in stats]
    colors = [
      "0.6"
      if r["method"] == "single"
      else "C1"
      if r["method"].startswith("dual_optim")
      else "C0"
      for r in rows
    ]
    ax.barh(y, means, xerr=stds, color=colors, capsize=3)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if title.startswith("Δm"):
      ax.axvline(0, color="k", lw=0.8)
    else:
      lo = min(m - s for m, s in zip(means, stds))
      ax.set_xlim(max(0, lo - 2), min(100, max(means) + 2))
  axes[0].set_yticks(y, labels)
  axes[0].invert_yaxis()
  fig.suptitle(
    "MultiDigits (left / right / sum), test split, mean ± std over seeds",
    fontsize=11,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(out: Path, result: Mapping, table_text: str) -> list[Path]:
  """Writes ``results.json``, ``table.txt`` and ``summary.png`` in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / "results.json", out / "table.txt", out / "summary.png"]
  paths[0].write_text(json.dumps(result, indent=2) + "\n")
  paths[1].write_text(table_text + "\n")
  plot(result["methods"], paths[2])
  return paths
