r"""Multi-task learning benchmark on MultiDigits (pairs of sklearn digits).

    pip install -e '.[examples]' && python examples/multitask_digits/main.py

1. Build MultiDigits: two 8×8 digits side by side; tasks "left" (10-way),
   "right" (10-way) and "sum" (19-way); fixed train/validation/test splits.
2. Train the same shared-trunk MLP (one head per task) with every method, for
   the same number of steps on the same mini-batches: each task alone (the
   single-task references), Adam on the summed loss, DualOptim and DualOptim+
   (every task's gradient in every call), DualOptim+ alternating (one task per
   step, round-robin), and PCGrad, MGDA and CAGrad, each chained before Adam.
3. Every method gets the same learning-rate grid; the lr is chosen on the
   validation split (a task's accuracy for the references, Δm% for the rest)
   and the test split is reported: per-task accuracy and Δm% (mean relative
   drop against the single-task references, lower is better), mean ± std over
   seeds, and each method's paired Δm difference to Adam with a 95% t-interval.

Each method is one jitted ``lax.scan`` over steps, ``vmap``-ed over the lr grid
and the seeds. Output: the table on stdout, and ``results.json``,
``table.txt`` and ``summary.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if not __package__:  # run as a script: make the folder importable
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

import jax
import jax.numpy as jnp
import numpy as np

from multitask_digits import data as D
from multitask_digits import report, train


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings; the defaults are the full benchmark."""

  seeds: int = 5
  out: str = "runs/multitask_digits"
  quick: bool = False
  steps: int = 2000
  batch: int = 128
  lrs: tuple = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
  hidden: tuple = (128, 128)
  methods: tuple = tuple(train.METHODS)
  sizes: tuple = (4000, 1000, 2000)  # train / validation / test pairs


QUICK = dict(seeds=2, steps=300, lrs=(3e-3, 1e-2), sizes=(2000, 500, 1000))


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
  """Flags; every error is raised before any training."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="number of seeds (default 5; 2 with --quick)",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="smaller budget: 2 seeds, 300 steps, 2 lrs, less data",
  )
  p.add_argument("--out", default=Config.out, help="output directory")
  p.add_argument("--steps", type=int, default=None, help="steps per run")
  p.add_argument(
    "--lrs",
    default=None,
    help="comma-separated learning-rate grid (every method)",
  )
  p.add_argument(
    "--methods",
    default=",".join(Config.methods),
    help=f"subset of {','.join(train.METHODS)}",
  )
  a = p.parse_args(argv)
  kw = dict(QUICK) if a.quick else {}
  kw.update(
    out=a.out,
    quick=a.quick,
    methods=tuple(m for m in a.methods.split(",") if m),
  )
  if a.seeds is not None:
    kw["seeds"] = a.seeds
  if a.steps is not None:
    kw["steps"] = a.steps
  if a.lrs is not None:
    kw["lrs"] = tuple(float(x) for x in a.lrs.split(","))
  cfg = Config(**kw)
  unknown = sorted(set(cfg.methods) - set(train.METHODS))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(train.METHODS)}")
  if cfg.seeds < 1 or cfg.steps < 1 or not cfg.lrs or min(cfg.lrs) <= 0:
    p.error("--seeds and --steps must be >= 1 and the lrs positive")
  return cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark; returns what it writes to ``results.json``."""
  cfg = parse_args(argv)
  start = time.time()
  splits = D.load(*cfg.sizes)
  keys = jax.vmap(jax.random.key)(jnp.arange(cfg.seeds))
  lrs = jnp.asarray(cfg.lrs, jnp.float32)
  val = (jnp.asarray(splits.val.x), splits.val.y)
  test = (jnp.asarray(splits.test.x), splits.test.y)
  train_xy = (jnp.asarray(splits.train.x), splits.train.y)

  def scores(method):
    """Validation and test accuracies ``[(K,) L, S, K]`` of one method."""
    t0 = time.time()
    run = train.make_run(method, cfg.steps, cfg.batch, cfg.hidden)
    params = run(lrs, keys, *train_xy)
    if method == "single":  # one model grid per task
      grids = [
        jax.tree.map(lambda a, k=k: a[k], params) for k in range(len(D.TASKS))
      ]
    else:
      grids = [params]
    out = [
      np.stack([np.asarray(train.accuracies(g, *s)) for g in grids])
      for s in (val, test)
    ]
    print(
      f"  {method:<22} {time.time() - t0:6.1f} s (compile included)", flush=True
    )
    return out if method == "single" else [o[0] for o in out]

  # Single-task references: each task alone, its lr chosen on its accuracy.
  print(f"{cfg.seeds} seeds x {len(cfg.lrs)} lrs, {cfg.steps} steps each:")
  v, t = scores("single")  # [K, L, S, K]
  chosen = [
    report.choose_lr(v[k, ..., k], higher_is_better=True)
    for k in range(len(D.TASKS))
  ]
  single_val = np.stack([v[k, i, :, k] for k, i in enumerate(chosen)], -1)
  single_test = np.stack([t[k, i, :, k] for k, i in enumerate(chosen)], -1)
  rows = [report.single_row(cfg.lrs, chosen, single_test)]

  # The multi-task methods, lr chosen on validation Δm%.
  for method in cfg.methods:
    v, t = scores(method)
    rows.append(
      report.method_row(
        method, train.METHODS[method], cfg.lrs, v, t, single_val, single_test
      )
    )
  report.add_paired(rows)
  wall = time.time() - start

  table = report.table(rows)
  print(
    f"\nMultiDigits test split ({len(splits.test.x)} pairs), {cfg.seeds} "
    f"seeds, {cfg.steps} steps of batch {cfg.batch}, lr grid "
    f"{list(cfg.lrs)} chosen on validation. Accuracy %, mean ± std over "
    "seeds; Δm − Adam: paired difference to Adam (summed loss), 95% "
    "t-interval.\n"
  )
  print(table)
  print(f"\nwall time: {wall:.1f} s")
  result = {
    "config": dataclasses.asdict(cfg),
    "tasks": list(D.TASKS),
    "sizes": {
      "train": len(splits.train.x),
      "val": len(splits.val.x),
      "test": len(splits.test.x),
    },
    "methods": rows,
    "wall_time_s": wall,
    "device": jax.devices()[0].platform,
  }
  paths = report.write(Path(cfg.out), result, table)
  print("wrote " + ", ".join(map(str, paths)))
  return result


if __name__ == "__main__":
  main()
