"""Outputs of the LM job: flat metrics, the printed table, the figure, JSON."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from unlearn_lm.cli import LABELS


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to a temporary name, then renames it over ``path``."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def to_jsonable(x: Any) -> Any:
  """``x`` with NumPy arrays and scalars turned into lists and Python numbers."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def summarize(ev: Mapping[str, Any]) -> dict[str, Any]:
  """Flat scalar metrics of an :meth:`Evaluator.evaluate` result."""
  out = {
    "model_utility": ev["model_utility"],
    "forget_efficacy": ev["forget_efficacy"],
    "forget_quality": ev["forget_quality"],
  }
  for name, s in ev["sets"].items():
    for k in ("prob", "rouge_l", "truth_ratio"):
      out[f"{name}/{k}"] = s[k]
  return out


def plot(histories: Mapping[str, list], path: str, title: str) -> None:
  """Six panels of metrics over unlearning steps, one line per optimizer."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
    ("forget/prob", "forget answer probability"),
    ("forget/rouge_l", "forget ROUGE-L recall"),
    ("forget/truth_ratio", "forget truth ratio (1 - mean min(R, 1/R))"),
    ("forget_quality", "Forget Quality (KS p-value, log)"),
    ("model_utility", "Model Utility"),
    ("forget_efficacy", "Forget Efficacy"),
  ]
  fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
  for ax, (key, label) in zip(axes.ravel(), panels):
    for name, hist in histories.items():
      pts = [(h["step"], h[key]) for h in hist if h.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=LABELS[name])
    if key == "forget_quality":
      ax.set_yscale("log")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("unlearning step")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def format_table(
  rows: Sequence[tuple[str, Mapping, Optional[float]]],
  forget_name: str = "forget",
) -> str:
  """A Markdown table of ``(label, flat metrics, wall seconds)`` rows."""
  cols = [
    ("FQ", "forget_quality", "{:.3g}"),
    ("MU", "model_utility", "{:.3f}"),
    ("FE", "forget_efficacy", "{:.3f}"),
    ("F prob", f"{forget_name}/prob", "{:.3f}"),
    ("F ROUGE", f"{forget_name}/rouge_l", "{:.3f}"),
    ("F TR", f"{forget_name}/truth_ratio", "{:.3f}"),
    ("R prob", "retain/prob", "{:.3f}"),
    ("R ROUGE", "retain/rouge_l", "{:.3f}"),
  ]
  header = (
    f"| {'model':<24} | "
    + " | ".join(f"{c:>7}" for c, _, _ in cols)
    + " | wall s |"
  )
  lines = [
    header,
    "|" + "|".join("-" * len(h) for h in header.split("|")[1:-1]) + "|",
  ]
  for label, m, secs in rows:
    vals = [("—" if m.get(k) is None else f.format(m[k])) for _, k, f in cols]
    wall = "—" if secs is None else f"{secs:.0f}"
    lines.append(
      f"| {label:<24} | "
      + " | ".join(f"{v:>7}" for v in vals)
      + f" | {wall:>6} |"
    )
  return "\n".join(lines)


LEGEND = (
  "FQ: Forget Quality (KS p-value vs the retain-only model; higher = closer to "
  "never having seen the forget set); MU: Model Utility; FE: Forget Efficacy; "
  "F/R: forget/retain set; TR: truth-ratio value; wall s: unlearning (or "
  "training) time incl. compilation."
)
