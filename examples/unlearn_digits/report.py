"""Scoring against Retrain, the printed table and the summary figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dualoptax.unlearning import metrics
from unlearn_digits.config import LOSS_NAMES, METHODS

SET_NAMES = ("forget", "retain", "test")


def seed_metrics(
  logits: Mapping[str, jax.Array],
  sets: Mapping[str, tuple[jax.Array, jax.Array]],
) -> list[dict]:
  """Per-seed UA/RA/TA/MIA dicts from logits and labels stacked over seeds."""
  n = next(iter(logits.values())).shape[0]
  out = []
  for s in range(n):
    args = []
    for name in SET_NAMES:
      args += [np.asarray(logits[name][s]), np.asarray(sets[name][1][s])]
    out.append(metrics.unlearning_metrics(*args))
  return out


def summary(runs: list[dict], reference: Mapping[str, Any] | None) -> dict:
  """Mean/std over seeds, the per-seed values, and the average gap to
  ``reference`` (Retrain's summary) when given."""
  out = dict(metrics.summarize(runs), per_seed=runs)
  if reference is not None:
    out["avg_gap"] = metrics.average_gap(out["mean"], reference["mean"])
  return out


def grid_summaries(
  logits: Mapping[str, jax.Array],
  sets: Mapping,
  forget_lrs: Sequence[float],
  reference: Mapping,
) -> list[dict]:
  """One :func:`summary` per forget lr; ``logits[name]`` is ``[S, len(lrs), ...]``."""
  grid = []
  for j, lr in enumerate(forget_lrs):
    runs = seed_metrics({k: v[:, j] for k, v in logits.items()}, sets)
    grid.append(dict(forget_lr=lr, **summary(runs, reference)))
  return grid


def table(
  reference: Mapping,
  original: Mapping,
  rows: Sequence[Mapping],
  losses: Sequence[str],
) -> str:
  """Retrain, Original, then every (loss, method) row, grouped by loss."""
  table_rows = {
    "Retrain (gold standard)": dict(reference, avg_gap=None),
    "Original (no unlearning)": original,
  }
  for loss in [LOSS_NAMES[name] for name in losses]:
    for r in rows:
      if r["loss"] == loss:
        table_rows[f"{loss}  {r['method']}"] = dict(
          r, note=f"forget lr {r['forget_lr']:g}"
        )
  return metrics.format_table(table_rows)


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
      METHODS.values(), ["#8c8c8c", "#c7b72a", "#1f77b4", "#d62728", "#ff9f4a"]
    )
  )
  markers = dict(zip(LOSS_NAMES.values(), ["o", "s", "^"]))
  by = {(r["loss"], r["method"]): r for r in rows}
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
      r["mean"]["TA"],
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
      row["mean"]["TA"],
      color="k",
      marker=mk,
      s=160,
      zorder=5,
    )
    ax.annotate(
      name,
      (row["mean"]["UA"], row["mean"]["TA"]),
      textcoords="offset points",
      xytext=(7, 4),
      fontsize=9,
    )
  ax.set_xlabel("UA = 100 − forget accuracy")
  ax.set_ylabel("TA = test accuracy")
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
    "Unlearning a random forget set of the digits CNN: which "
    "optimizer lands closest to Retrain, and how reliably",
    fontsize=11,
  )
  fig.tight_layout(rect=(0, 0.06, 1, 0.97))
  fig.savefig(path, dpi=120)
  plt.close(fig)
