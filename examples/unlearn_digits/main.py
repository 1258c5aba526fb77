r"""Main job: unlearning benchmark on scikit-learn's handwritten digits.

    pip install -e '.[examples]' && python examples/unlearn_digits/main.py

1. Split the 1,797 bundled 8×8 digits 80/20 into train/test (fixed split).
2. Per seed, build a forget set: a random 10% of the training split
   (``--setting default``), a random 30% of 480 images drawn per
   seed (``--setting hard``: the Original lies far from Retrain), or every
   training image of one class (``--forget-class C``). Train the *Original*
   CNN on the forget and retain sets and *Retrain* one from scratch on the
   retain set alone (the gold standard).
3. Unlearn the Original with the same step budget under every optimizer —
   Adam on the summed loss, Adam alternating forget/retain steps with one
   shared state, DualOptim, DualOptim+ and the published DualOptim+ rule
   (``stable=False``) — for GA, NPO and RL, each with GD on the retain set
   (alternating methods: 1 forget : 5 retain steps). GD-only fine-tuning
   (forget lr 0) is scored as a reference.
4. Score UA, RA, TA, MIA (×100; class-wise: TA on the other classes and on
   C separately) against the same seed's Retrain. Only the forget lr is tuned,
   per method and loss, the same way for all: the lowest avg gap on *tuning*
   seeds (1000, 1001, ...), disjoint from the reported ones (0, 1, ...); the
   grid is extended while the choice lies on its edge. On the reported seeds
   each method is compared to DualOptim+ by the paired difference of per-seed
   gaps with a 95% t-interval, and the Original (doing nothing) against the
   best method says whether the setting can rank methods at all.

Every run (all steps) is one jitted ``lax.scan``; seeds, losses and lrs are
``vmap``-ed in one padded batch, so each optimizer compiles one program
(``README.md`` here has the protocol and measured tables). Output: a
table on stdout, and ``results.json``, ``summary.png`` and ``table.txt`` under
``--out``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if not __package__:  # run as a script: make the folder importable as a package
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from unlearn_digits import config as C
from unlearn_digits import data, report, stats, train


def build_sets(cfg: C.Config, split: data.Split, keys: jax.Array):
  """The per-seed sets of the chosen setting and a one-line description."""
  if cfg.forget_class is not None:
    sets = data.class_forget_sets(split, keys.shape[0], cfg.forget_class).sets
    n_f = sets["forget"][1].shape[1]
    return (
      sets,
      f"class-wise forgetting: forget all {n_f} training images of "
      f"class {cfg.forget_class}",
    )
  n_use = cfg.train_size or split.x_train.shape[0]  # "random" or "hard"
  n_forget = max(1, round(cfg.forget_fraction * n_use))
  sets = data.forget_sets(split, keys, n_forget, n_use).sets
  return (
    sets,
    f"{cfg.setting} random forgetting: forget {n_forget} of {n_use} "
    "training images",
  )


def chunks(xs: Sequence, k: int) -> list[list]:
  """``xs`` cut into ``k`` consecutive equal parts."""
  n = len(xs) // k
  return [list(xs[i * n : (i + 1) * n]) for i in range(k)]


def method_rows(method, cfg, evaluate, retrain_runs, names, done) -> list:
  """One table row per forget loss of ``method``.

  The forget lr of each loss is chosen on the tuning seeds (indices
  ``0..T-1``; :func:`stats.tune_forget_lr`), then every loss runs at its lr
  on the reported seeds (``T..T+S-1``) in one batch.
  ``evaluate(loss_ids, lrs, seed_idx)`` returns one metric dict per run.
  """
  T, S = cfg.tune_seeds, cfg.seeds
  ids = [C.FORGET_LOSSES.index(loss) for loss in cfg.losses]
  chosen = []
  for loss_id in ids:
    grid = lambda lrs: chunks(
      evaluate(
        [loss_id] * T * len(lrs),
        np.repeat(lrs, T),
        np.tile(np.arange(T), len(lrs)),
      ),
      len(lrs),
    )
    chosen.append(
      stats.tune_forget_lr(
        grid, cfg.forget_lrs, retrain_runs[:T], names, cfg.max_widen
      )
    )
    done(1)
  lrs = [c["forget_lr"] for c in chosen]
  seeds = np.tile(np.arange(T, T + S), len(ids))
  reported = chunks(
    evaluate(np.repeat(ids, S), np.repeat(lrs, S), seeds), len(ids)
  )
  return [
    dict(
      loss=C.LOSS_NAMES[loss],
      method=C.METHODS[method],
      **choice,
      **report.summary(runs, retrain_runs[T:], names),
    )
    for loss, choice, runs in zip(cfg.losses, chosen, reported)
  ]


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the job; returns what it writes to ``results.json``."""
  cfg = C.parse_args(argv, description=__doc__.split("\n\n")[0])
  start = time.time()

  # Seeds: tuning seeds first, then the reported ones; one key set per seed.
  T, S = cfg.tune_seeds, cfg.seeds
  seeds = np.r_[C.TUNE_SEED_OFFSET + np.arange(T), np.arange(S)]
  tune, rep = slice(0, T), slice(T, T + S)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 5))(
    jnp.asarray(seeds)
  )  # [T + S, 5]: forget set, Original, Retrain, RL labels, unlearning
  split = data.load_digits_split()
  try:
    sets, setting = build_sets(cfg, split, keys[:, 0])
  except ValueError as e:
    sys.exit(f"error: {e}")
  names = report.metric_names(cfg.forget_class)
  score = lambda logits, sets: report.seed_metrics(
    logits, sets, cfg.forget_class
  )
  bar = tqdm(
    total=2 + len(cfg.methods) * len(cfg.losses),
    unit="job",
    desc="Original, Retrain, then each method's losses",
  )  # on stderr (tqdm's default): stdout holds only the results

  # Original and Retrain of every seed, scored against that seed's Retrain.
  models = train.train_original_and_retrain(
    keys[:, 1], keys[:, 2], sets, cfg.train_steps
  )
  sets2 = jax.tree.map(lambda a: jnp.concatenate([a, a]), sets)
  runs = score(jax.jit(jax.vmap(train.sets_logits))(models, sets2), sets2)
  n = T + S
  original_runs, retrain_runs = runs[:n], runs[n:]
  reference = report.summary(retrain_runs[rep], None, names)
  original = report.summary(original_runs[rep], retrain_runs[rep], names)
  originals = jax.tree.map(lambda a: a[:n], models)
  bar.update(1)

  # Unlearning: forget lr chosen on the tuning seeds, scored on the others.
  # Tuning (lrs × tuning seeds) and reporting (losses × reported seeds) batches
  # are padded to one size, so each method compiles one program.
  forget = train.forget_data(originals, sets["forget"], keys[:, 3])
  per_seed = (originals, forget, sets["retain"], keys[:, 4], sets)
  size = max(T * len(cfg.forget_lrs), len(cfg.losses) * S)

  def evaluate(run, loss_ids, lrs, idx):
    """Metric dicts of the runs ``(loss_ids[b], lrs[b], seed index idx[b])``."""
    logits = train.run_padded(run, size, loss_ids, lrs, idx, per_seed)
    return score(logits, jax.tree.map(lambda a: a[np.asarray(idx)], sets))

  programs = {m: train.make_run(m, cfg.unlearn_steps) for m in C.METHODS}
  # GD-only fine-tuning, the do-little reference: Adam (summed) with forget lr
  # 0, i.e. the same unlearning steps on the retain set alone.
  gd_only = programs["adam_summed"]
  finetune = evaluate(gd_only, [0] * S, [0.0] * S, np.arange(T, T + S))
  finetune = report.summary(finetune, retrain_runs[rep], names)
  bar.update(1)
  rows = []
  for method in cfg.methods:
    bar.set_description(C.METHODS[method])
    run = programs[method]
    evaluate_method = lambda *a: evaluate(run, *a)
    rows += method_rows(
      method, cfg, evaluate_method, retrain_runs, names, bar.update
    )
  rows.sort(key=lambda r: list(C.LOSS_NAMES.values()).index(r["loss"]))
  bar.close()
  verdicts = report.compare(
    rows, original, finetune, retrain_runs[rep], names, cfg.confidence
  )
  wall = time.time() - start

  # Report.
  table = report.table(
    reference, original, finetune, rows, names, cfg.forget_class
  )
  verdict = report.verdict_lines(verdicts, cfg.confidence)
  edges = [f"{r['loss']} {r['method']}" for r in rows if r["edge"]]
  if edges:
    verdict += "\nWARNING: forget lr on the edge of every lr tried for "
    verdict += "; ".join(edges)
  print(
    f"\nDigits, {setting}; {S} reported seeds (0..{S - 1}), forget lr chosen "
    f"per method and loss by avg gap on {T} other seeds ({C.TUNE_SEED_OFFSET}.."
    f"{C.TUNE_SEED_OFFSET + T - 1}) from {list(cfg.forget_lrs)}, extended up to "
    f"{cfg.max_widen} times past an edge. {cfg.unlearn_steps} unlearning steps "
    f"(alternating 1 forget : 5 retain; Adam (summed) takes both losses every "
    f"step), retain lr {C.TRAIN_LR:g}. Metrics ×100, mean ± std over seeds; avg "
    f"gap = mean over seeds of mean |metric − same seed's Retrain| over "
    f"{', '.join(names)}.\n"
  )
  print(table + "\n\n" + verdict)
  print(f"\nwall time: {wall:.1f} s")
  result = {
    "config": dataclasses.asdict(cfg),
    "setting": setting,
    "metrics": list(names),
    "tune_seeds": seeds[tune].tolist(),
    "report_seeds": seeds[rep].tolist(),
    "n_forget": int(sets["forget"][1].shape[1]),
    "n_retain": int(sets["retain"][1].shape[1]),
    "n_test": int(split.x_test.shape[0]),
    "reference": reference,
    "original": original,
    "finetune": finetune,
    "methods": rows,
    "verdicts": verdicts,
    "edge_choices": edges,
    "wall_time_s": wall,
    "devices": str(jax.devices()[0].platform),
  }
  paths = report.write(Path(cfg.out), result, table + "\n\n" + verdict)
  print("wrote " + ", ".join(map(str, paths)))
  return result


if __name__ == "__main__":
  main()
