"""Scoring against Retrain, the paired comparisons, the table and the figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from dualoptax.unlearning import metrics
from unlearn_digits import stats
from unlearn_digits.config import BASELINE, LOSS_NAMES, METHODS

SET_NAMES = ("forget", "retain", "test")
RANDOM_METRICS = ("UA", "RA", "TA", "MIA")
CLASS_METRICS = ("UA", "RA", "TA_other", "TA_class", "MIA")


def metric_names(forget_class: Optional[int]) -> tuple:
  """The reported metrics (and those of the gap): UA, RA, TA, MIA for random
  forgetting; UA, RA, TA on the other classes, TA on the class, MIA for
  class-wise forgetting."""
  return RANDOM_METRICS if forget_class is None else CLASS_METRICS


def seed_metrics(
  logits: Mapping[str, jax.Array],
  sets: Mapping[str, tuple[jax.Array, jax.Array]],
  forget_class: Optional[int] = None,
) -> list[dict]:
  """Per-seed metric dicts (×100) from logits and labels stacked over seeds.

  Non-finite logits (a diverged run) are scored as they come out, after
  ``nan -> 0`` and clipping to ±1e4, so a diverged run gets a (bad) finite
  score rather than failing the attack's fit.
  """
  n = next(iter(logits.values())).shape[0]
  out = []
  for s in range(n):
    lg = {
      k: np.clip(np.nan_to_num(np.asarray(logits[k][s], np.float32)), -1e4, 1e4)
      for k in SET_NAMES
    }
    lab = {k: np.asarray(sets[k][1][s]) for k in SET_NAMES}
    m = metrics.unlearning_metrics(
      *[a[k] for k in SET_NAMES for a in (lg, lab)]
    )
    if forget_class is not None:
      on = lab["test"] == forget_class
      ta = lambda mask: float(
        metrics.accuracy(lg["test"][mask], lab["test"][mask])
      )
      m = dict(
        UA=m["UA"], RA=m["RA"], TA_other=ta(~on), TA_class=ta(on), MIA=m["MIA"]
      )
    out.append(m)
  return out


def summary(runs: list[dict], reference: Optional[list[dict]], names) -> dict:
  """Mean/std over seeds, the per-seed values and, against ``reference``
  (the same seeds' Retrain metrics), the per-seed gaps, their mean
  ``avg_gap`` and std, and ``gap_of_means`` (the authors' average gap of the
  mean metrics, for reference)."""
  out = dict(stats.summarize(runs, names), per_seed=runs)
  if reference is not None:
    gaps = stats.seed_gaps(runs, reference, names)
    ref_mean = stats.summarize(reference, names)["mean"]
    out.update(
      gaps=gaps.tolist(),
      avg_gap=float(gaps.mean()),
      avg_gap_std=float(gaps.std(ddof=1)) if gaps.size > 1 else 0.0,
      gap_of_means=float(
        np.mean([abs(out["mean"][m] - ref_mean[m]) for m in names])
      ),
    )
  return out


def compare(
  rows: Sequence[dict],
  original: Mapping,
  finetune: Mapping,
  reference_runs: list[dict],
  names: Sequence[str],
  confidence: float,
) -> dict:
  """Paired differences against DualOptim+ (per loss) and the verdicts.

  Adds to each row ``vs_baseline``: the paired difference of its per-seed gap
  to DualOptim+'s under the same loss, and ``vs_baseline_per_metric``, the same
  for each metric's ``|m - Retrain|``. Returns, per loss, the best method,
  :func:`stats.ranking_verdict` of the Original against it, the Original's
  paired difference to DualOptim+, and GD-only fine-tuning (``finetune``)
  against the best method.
  """
  dist = lambda r: {
    m: [abs(a[m] - b[m]) for a, b in zip(r["per_seed"], reference_runs)]
    for m in names
  }
  verdicts = {}
  for loss in dict.fromkeys(r["loss"] for r in rows):
    group = [r for r in rows if r["loss"] == loss]
    base = next((r for r in group if r["method"] == METHODS[BASELINE]), None)
    for r in group:
      if base is not None and r is not base:
        r["vs_baseline"] = stats.paired_difference(
          r["gaps"], base["gaps"], confidence
        )
        d, db = dist(r), dist(base)
        r["vs_baseline_per_metric"] = {
          m: stats.paired_difference(d[m], db[m], confidence) for m in names
        }
    best = min(group, key=lambda r: r["avg_gap"])
    verdicts[loss] = dict(
      best=best["method"],
      original_minus_best=stats.ranking_verdict(
        original["gaps"], best["gaps"], confidence
      ),
      original_minus_baseline=None
      if base is None
      else stats.paired_difference(original["gaps"], base["gaps"], confidence),
      finetune_minus_best=stats.paired_difference(
        finetune["gaps"], best["gaps"], confidence
      ),
    )
  return verdicts


def _interval(d: Mapping) -> str:
  star = " *" if d["significant"] else ""
  return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{star}"


def table(
  reference: Mapping,
  original: Mapping,
  finetune: Mapping,
  rows: Sequence[Mapping],
  names: Sequence[str],
  forget_class: Optional[int] = None,
) -> str:
  """Retrain, Original, GD-only fine-tuning, then every (loss, method) row
  grouped by loss: ``mean ± std`` per metric, avg gap ``mean ± std`` over seeds, the authors'
  gap of the mean metrics, the paired difference of the avg gap to DualOptim+
  with its interval (``*``: excludes 0), and the chosen forget lr (``EDGE``
  when on the edge of the lrs tried)."""
  label = {"TA_other": "TA other", "TA_class": f"TA on {forget_class}"}
  header = ["method", *[label.get(m, m) for m in names]]
  header += ["avg gap", "gap of means", "Δ gap vs DualOptim+ [CI]"]
  header += ["forget lr"]
  entries = [
    ("Retrain (gold standard)", reference),
    ("Original (no unlearning)", original),
    ("Fine-tune (GD only)", finetune),
  ]
  entries += [(f"{r['loss']}  {r['method']}", r) for r in rows]
  lines = []
  for name, r in entries:
    cells = [name] + [
      f"{r['mean'][m]:6.2f} ± {r['std'][m]:5.2f}" for m in names
    ]
    gap = r.get("avg_gap")
    cells.append(
      "—" if gap is None else f"{gap:5.2f} ± {r['avg_gap_std']:4.2f}"
    )
    cells.append("—" if gap is None else f"{r['gap_of_means']:5.2f}")
    cells.append(_interval(r["vs_baseline"]) if "vs_baseline" in r else "")
    if "forget_lr" in r:
      flag = f" EDGE ({r['edge']})" if r["edge"] else ""
      cells.append(f"{r['forget_lr']:.3g}{flag}")
    else:
      cells.append("")
    lines.append(cells)
  return metrics.text_table(header, lines)


def verdict_lines(verdicts: Mapping, confidence: float) -> str:
  """One line per loss: can the setting rank methods, the Original's
  distance to the best method and to DualOptim+, and GD-only fine-tuning's
  distance to the best method."""
  pct = f"{100 * confidence:g}%"
  lines = []
  for loss, v in verdicts.items():
    d = v["original_minus_best"]
    if d["can_rank"]:
      head = "can rank: the Original is significantly farther from Retrain"
    else:
      head = (
        "CANNOT RANK: the untouched Original is not significantly farther "
        "from Retrain"
      )
    line = f"{loss}: {head} than the best method ({v['best']}); Original − best = {_interval(d)}"
    if v["original_minus_baseline"] is not None:
      line += (
        f", Original − DualOptim+ = {_interval(v['original_minus_baseline'])}"
      )
    ft = _interval(v["finetune_minus_best"])
    line += f"; Fine-tune (GD only) − best = {ft}"
    lines.append(line)
  lines.append(
    f"[a, b]: {pct} t-interval over seeds of the paired difference of per-seed "
    "avg gaps; * = excludes 0."
  )
  return "\n".join(lines)


def write(out: Path, result: Mapping, table_text: str) -> list[Path]:
  """Writes ``results.json``, ``summary.png`` and ``table.txt`` under ``out``."""
  paths = [out / "results.json", out / "summary.png", out / "table.txt"]
  paths[0].write_text(json.dumps(result, indent=2))
  plot_summary(
    result["methods"], result["reference"], result["original"], paths[1]
  )
  paths[2].write_text(table_text + "\n")
  return paths


def plot_summary(
  rows: Sequence[Mapping], reference: Mapping, original: Mapping, path: Path
) -> None:
  """Three panels: average gap and average std per method (bars grouped by
  loss), and the UA–TA trade-off; Retrain and the untouched Original as
  references."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = [m for m in METHODS.values() if any(r["method"] == m for r in rows)]
  losses = [
    name for name in LOSS_NAMES.values() if any(r["loss"] == name for r in rows)
  ]
  colors = dict(
    zip(
      METHODS.values(),
      ["#8c8c8c", "#c7b72a", "#1f77b4", "#d62728", "#9467bd", "#ff9f4a"],
    )
  )
  markers = dict(zip(LOSS_NAMES.values(), ["o", "s", "^"]))
  by = {(r["loss"], r["method"]): r for r in rows}
  ta = "TA" if "TA" in reference["mean"] else "TA_other"
  fig, axes = plt.subplots(
    1, 3, figsize=(16, 4.8), gridspec_kw=dict(width_ratios=[1, 1, 1.1])
  )
  width = 0.8 / len(methods)
  panels = [
    (
      "avg_gap",
      "average gap to Retrain (lower is better)",
      original["avg_gap"],
      "Original (no unlearning)",
    ),
    (
      "avg_std",
      "average std over seeds (lower is more stable)",
      reference["avg_std"],
      "Retrain's own std",
    ),
  ]
  for ax, (key, title, ref_value, ref_label) in zip(axes, panels):
    values = [
      by[(lo, m)][key] for lo in losses for m in methods if (lo, m) in by
    ]
    top = max(
      3.0 * np.median(values + [ref_value]), 1.2 * ref_value
    )  # clip outliers
    for i, m in enumerate(methods):
      xs = [
        j + (i - (len(methods) - 1) / 2) * width for j in range(len(losses))
      ]
      ys = [by[(lo, m)][key] if (lo, m) in by else np.nan for lo in losses]
      ax.bar(
        xs,
        np.minimum(ys, top),
        width,
        color=colors[m],
        edgecolor="k",
        lw=0.4,
        label=m,
      )
      for x, y in zip(xs, ys):
        if y > top:  # clipped bar: print its value
          ax.text(
            x,
            top * 0.98,
            f"{y:.1f}",
            ha="center",
            va="top",
            rotation=90,
            fontsize=8,
            color="white",
            fontweight="bold",
          )
    line = ax.axhline(ref_value, color="k", ls="--", lw=1, label=ref_label)
    ax.legend(handles=[line], loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_xticks(range(len(losses)), losses)
    ax.set_ylim(0, top)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  ax = axes[2]
  for r in rows:
    ax.scatter(
      r["mean"]["UA"],
      r["mean"][ta],
      color=colors[r["method"]],
      marker=markers[r["loss"]],
      s=60,
      edgecolor="k",
      lw=0.5,
    )
  for name, row, mk in (
    ("Retrain", reference, "*"),
    ("Original", original, "X"),
  ):
    ax.scatter(
      row["mean"]["UA"],
      row["mean"][ta],
      color="k",
      marker=mk,
      s=160,
      zorder=5,
    )
    ax.annotate(
      name,
      (row["mean"]["UA"], row["mean"][ta]),
      textcoords="offset points",
      xytext=(7, 4),
      fontsize=9,
    )
  ax.set_xlabel("UA = 100 − forget accuracy")
  ax.set_ylabel(
    "TA = test accuracy" + (" (other classes)" if ta != "TA" else "")
  )
  ax.set_title(
    "UA–TA trade-off (means over seeds; Retrain is the target)", fontsize=10
  )
  ax.grid(alpha=0.3)
  handles = [
    plt.Rectangle((0, 0), 1, 1, color=colors[m], ec="k", lw=0.4, label=m)
    for m in methods
  ]
  handles += [
    plt.Line2D([], [], color="gray", marker=markers[lo], ls="", label=lo)
    for lo in losses
  ]
  fig.legend(
    handles=handles,
    loc="lower center",
    ncol=len(handles),
    fontsize=9,
    frameon=False,
  )
  fig.suptitle(
    "Unlearning a forget set of the digits CNN: which "
    "optimizer lands closest to Retrain, and how reliably",
    fontsize=11,
  )
  fig.tight_layout(rect=(0, 0.06, 1, 0.97))
  fig.savefig(path, dpi=120)
  plt.close(fig)
