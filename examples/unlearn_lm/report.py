"""Outputs of the LM study: flat metrics, the study table, the figures, JSON."""

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


def lr_points(runs: Sequence[Mapping]) -> dict:
  """``{(forget_loss, optimizer): [point per lr]}``: each point holds the lr,
  the ``seeds`` in order, and for each of the final FE, MU and FQ its per-seed
  values (under the metric's name) and their ``_mean`` and ``_std``."""
  groups: dict = {}
  for r in runs:
    groups.setdefault((r["forget_loss"], r["optimizer"]), {}).setdefault(
      r["lr"], []
    ).append(r)
  out = {}
  for key, by_lr in groups.items():
    pts = []
    for lr in sorted(by_lr):
      rs = sorted(by_lr[lr], key=lambda r: r["seed"])
      pt = {"lr": lr, "seeds": [r["seed"] for r in rs]}
      for m in ("forget_efficacy", "model_utility", "forget_quality"):
        v = np.array([r[m] for r in rs], np.float64)
        pt[m] = v
        pt[m + "_mean"], pt[m + "_std"] = float(v.mean()), float(v.std(ddof=0))
      pts.append(pt)
    out[key] = pts
  return out


def select(points: Sequence[Mapping], mu_floor: float) -> Optional[dict]:
  """The lr of best mean FE among those whose mean MU is >= ``mu_floor`` (None
  if none is), with ``edge`` set when it is the smallest or largest lr tried."""
  ok = [p for p in points if p["model_utility_mean"] >= mu_floor]
  if not ok:
    return None
  best = max(ok, key=lambda p: p["forget_efficacy_mean"])
  lrs = [p["lr"] for p in points]
  return {**best, "edge": best["lr"] in (min(lrs), max(lrs))}


MU_RATIO = 0.9  # the table's utility floor, as a fraction of the fine-tuned MU


def study_table(
  runs: Sequence[Mapping],
  finetuned_mu: float,
  reference: str = "dual_optim_plus",
  mu_ratio: float = MU_RATIO,
) -> tuple[str, list[dict]]:
  """Each optimizer at its best FE among the lrs whose MU is >= ``mu_ratio`` x
  the fine-tuned model's, as a Markdown table per forget loss, and the rows.

  ``ΔFE`` is the paired difference to ``reference`` at its own chosen lr, over
  the same seeds (mean ± std); it is marked ``*`` when its mean exceeds the seed
  spread, the larger of the two optimizers' FE stds. With one seed there is no
  spread: the values are shown alone, nothing is marked, and the footer says so.
  """
  floor = mu_ratio * finetuned_mu
  points = lr_points(runs)
  one_seed = all(len(pts["seeds"]) == 1 for v in points.values() for pts in v)
  pm = lambda mean, std, f=".3f", fs=".3f": (
    f"{mean:{f}}" if one_seed else f"{mean:{f}} ± {std:{fs}}"
  )
  rows, lines = [], []
  for loss in dict.fromkeys(r["forget_loss"] for r in runs):
    names = [n for (fl, n) in points if fl == loss]
    chosen = {n: select(points[(loss, n)], floor) for n in names}
    ref = chosen.get(reference)
    lines += [
      f"\n{loss.upper()}+GD: best FE among the lrs with MU >= {floor:.3f} "
      f"({mu_ratio:g} x fine-tuned MU {finetuned_mu:.3f}); final values, "
      + ("1 seed: no spread" if one_seed else "mean ± std over seeds"),
      "| optimizer | lr | FE | MU | FQ | ΔFE vs "
      f"{LABELS.get(reference, reference)} |",
      "|---|---|---|---|---|---|",
    ]
    for n in names:
      c = chosen[n]
      if c is None:
        lines.append(
          f"| {LABELS.get(n, n)} | none meets the MU floor | | | | |"
        )
        rows.append({"forget_loss": loss, "optimizer": n, "lr": None})
        continue
      fmt = lambda m, f=".3f", fs=".3f": pm(
        c[m + "_mean"], c[m + "_std"], f, fs
      )
      delta, mark = "—", ""
      row = {
        "forget_loss": loss,
        "optimizer": n,
        "lr": c["lr"],
        "edge": c["edge"],
        **{
          k: c[k]
          for k in c
          if k.endswith("_mean") or k.endswith("_std") or k == "seeds"
        },
      }
      if ref is not None and n != reference and c["seeds"] == ref["seeds"]:
        d = c["forget_efficacy"] - ref["forget_efficacy"]
        spread = max(c["forget_efficacy_std"], ref["forget_efficacy_std"])
        big = len(d) > 1 and abs(d.mean()) > spread
        mark = " *" if big else ""
        delta = pm(d.mean(), d.std(ddof=0), "+.3f") + mark
        row.update(
          delta_fe_mean=float(d.mean()),
          delta_fe_std=float(d.std()),
          exceeds_spread=bool(big),
        )
      lr = f"{c['lr']:g}" + (" (edge)" if c["edge"] else "")
      lines.append(
        f"| {LABELS.get(n, n)} | {lr} | {fmt('forget_efficacy')} | "
        f"{fmt('model_utility')} | {fmt('forget_quality', '.3g', '.2g')} | "
        f"{delta} |"
      )
      rows.append(row)
  lines.append(
    "\n(edge): the chosen lr is at an end of the sweep; "
    + (
      "1 seed: no spread, so no ΔFE is marked (--seeds 2 or more give one)"
      if one_seed
      else "* : the paired FE difference exceeds the seed spread"
    )
  )
  return "\n".join(lines).lstrip("\n"), rows


def _log10(p):
  return np.log10(np.maximum(p, 1e-300))  # a KS p-value can underflow to 0


def plot_fronts(
  runs: Sequence[Mapping],
  finetuned: Mapping,
  retain_only: Mapping,
  path: str,
  y: str,
  title: str,
) -> None:
  """One panel per forget loss: ``y`` (FE, or FQ as log10) against MU, one
  line per optimizer through its learning rates (mean ± std over seeds), with
  the fine-tuned and the retain-only (the ideal) models as stars."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = lr_points(runs)
  losses = list(dict.fromkeys(r["forget_loss"] for r in runs))
  fig, axes = plt.subplots(
    1, len(losses), figsize=(6.5 * len(losses), 5), squeeze=False
  )
  for ax, loss in zip(axes[0], losses):
    for (fl, name), pts in points.items():
      if fl != loss:
        continue
      if y == "forget_quality":  # p-values span decades: log10 per seed
        ys = [_log10(p[y]) for p in pts]
        ym, ye = [v.mean() for v in ys], [v.std() for v in ys]
      else:
        ym, ye = [p[y + "_mean"] for p in pts], [p[y + "_std"] for p in pts]
      ax.errorbar(
        [p["model_utility_mean"] for p in pts],
        ym,
        xerr=[p["model_utility_std"] for p in pts],
        yerr=ye,
        marker="o",
        ms=4,
        capsize=2,
        label=LABELS.get(name, name),
      )
      ax.annotate(
        f"{pts[-1]['lr']:g}",
        (pts[-1]["model_utility_mean"], ym[-1]),
        fontsize=7,
      )
    for model, style, label in (
      (finetuned, "k*", "fine-tuned (before)"),
      (retain_only, "g*", "retain-only (never saw the forget set)"),
    ):
      value = _log10(model[y]) if y == "forget_quality" else model[y]
      ax.plot([model["model_utility"]], [value], style, ms=12, label=label)
    ax.axvline(
      MU_RATIO * finetuned["model_utility"], color="gray", ls="--", lw=1
    )
    ax.set_xlabel("Model Utility (final)")
    ax.set_ylabel(
      {
        "forget_efficacy": "Forget Efficacy",
        "forget_quality": "log10 Forget Quality (KS p-value)",
      }[y]
    )
    one_seed = all(len(p["seeds"]) == 1 for v in points.values() for p in v)
    ax.set_title(
      f"{loss.upper()}+GD (points: lrs; "
      + ("1 seed: no spread)" if one_seed else "bars: std over seeds)"),
      fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


LEGEND = (
  "FE: Forget Efficacy (1 - mean of the forget set's answer probability, "
  "ROUGE-L recall and truth-ratio value; higher = more forgotten); MU: Model "
  "Utility (harmonic mean of the same scores on the retain and held-out sets); "
  "FQ: Forget Quality (KS p-value vs the retain-only model; higher = closer to "
  "never having seen the forget set)."
)
