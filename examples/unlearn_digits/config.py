"""Constants and command-line flags of the digits job."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import dualoptax

METHODS = {
  "adam_summed": "Adam (summed)",
  "adam_alternating": "Adam (alternating)",
  "dual_optim": "DualOptim",
  "dual_optim_plus": "DualOptim+",
  "dual_optim_plus_8bit": "DualOptim+ 8bit",
}
FORGET_LOSSES = ("ga", "npo", "rl")  # index = the traced loss id of train.py
LOSS_NAMES = {"ga": "GA+GD", "npo": "NPO+GD", "rl": "RL+GD"}
BETAS = dict(b1=0.9, b2=0.95)  # the authors' betas, for every optimizer alike
TRAIN_LR = 1e-3  # Original, Retrain, and the fixed retain lr of unlearning
BATCH, FORGET_BATCH = 64, 32
NPO_BETA = 0.1
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings (the defaults are the full job).

  Attributes:
    seeds: number of seeds (forget set, initialization and batches).
    forget_fraction: fraction of the training split that is forgotten.
    out: output directory.
    quick: whether the smaller ``--quick`` budget was asked for.
    train_steps: Adam steps of Original and Retrain.
    unlearn_steps: unlearning steps (a multiple of the 1 + 5 schedule).
    forget_lrs: forget learning-rate grid; the best by average gap is kept.
    methods: optimizers to compare (keys of :data:`METHODS`).
    losses: forget losses (elements of :data:`FORGET_LOSSES`).
  """

  seeds: int = 5
  forget_fraction: float = 0.1
  out: str = "runs/unlearn_digits"
  quick: bool = False
  train_steps: int = 600
  unlearn_steps: int = 120
  forget_lrs: tuple = (3e-5, 1e-4, 3e-4, 1e-3)
  methods: tuple = tuple(METHODS)
  losses: tuple = FORGET_LOSSES


QUICK = Config(
  seeds=2,
  train_steps=400,
  unlearn_steps=60,
  forget_lrs=(1e-4, 1e-3),
  quick=True,
)


def build_parser(description: str = "") -> argparse.ArgumentParser:
  """The job's flags (defaults of ``None`` are filled from :class:`Config`)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="number of seeds (default 5; 2 with --quick)",
  )
  p.add_argument(
    "--forget-fraction",
    type=float,
    default=0.1,
    help="fraction of the training split to forget, in (0, 1)",
  )
  p.add_argument(
    "--out",
    default="runs/unlearn_digits",
    help="output directory (results.json, summary.png, table.txt)",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="smaller budget: 2 seeds, shorter runs, 2 learning rates",
  )
  p.add_argument(
    "--train-steps",
    type=int,
    default=None,
    help="steps to train Original and Retrain",
  )
  p.add_argument(
    "--unlearn-steps",
    type=int,
    default=None,
    help="unlearning steps (a multiple of 6)",
  )
  p.add_argument(
    "--forget-lrs",
    default=None,
    help="comma-separated forget learning-rate grid",
  )
  p.add_argument(
    "--methods",
    default=",".join(METHODS),
    help=f"subset of {','.join(METHODS)}",
  )
  p.add_argument(
    "--losses",
    default=",".join(FORGET_LOSSES),
    help=f"subset of {','.join(FORGET_LOSSES)}",
  )
  return p


def parse_args(
  argv: Optional[Sequence[str]] = None, description: str = ""
) -> Config:
  """Parses and validates flags; every error exits (status 2) before training."""
  p = build_parser(description)
  a = p.parse_args(argv)
  fail = p.error  # exits with status 2 and the usage line

  if a.seeds is not None and a.seeds < 1:
    fail(f"--seeds must be >= 1, got {a.seeds}")
  if not 0.0 < a.forget_fraction < 1.0:
    fail(f"--forget-fraction must lie in (0, 1), got {a.forget_fraction}")
  methods = tuple(m for m in a.methods.split(",") if m)
  losses = tuple(m for m in a.losses.split(",") if m)
  if not methods or set(methods) - set(METHODS):
    fail(
      f"--methods must be a non-empty subset of {list(METHODS)}, "
      f"got {a.methods!r}"
    )
  if not losses or set(losses) - set(FORGET_LOSSES):
    fail(
      f"--losses must be a non-empty subset of {list(FORGET_LOSSES)}, "
      f"got {a.losses!r}"
    )
  if "dual_optim_plus_8bit" in methods and not hasattr(
    dualoptax, "dual_optim_plus_8bit"
  ):
    methods = tuple(m for m in methods if m != "dual_optim_plus_8bit")
    print(
      "note: dualoptax.dual_optim_plus_8bit is not available; skipping it",
      file=sys.stderr,
    )
  base = QUICK if a.quick else Config()
  try:
    lrs = (
      base.forget_lrs
      if a.forget_lrs is None
      else tuple(float(v) for v in a.forget_lrs.split(","))
    )
  except ValueError:
    fail(f"--forget-lrs must be comma-separated numbers, got {a.forget_lrs!r}")
  if not lrs or min(lrs) <= 0:
    fail(f"--forget-lrs must be positive, got {a.forget_lrs!r}")
  cfg = dataclasses.replace(
    base,
    seeds=a.seeds or base.seeds,
    forget_fraction=a.forget_fraction,
    out=a.out,
    train_steps=a.train_steps or base.train_steps,
    unlearn_steps=a.unlearn_steps or base.unlearn_steps,
    forget_lrs=lrs,
    methods=methods,
    losses=losses,
  )
  if cfg.train_steps < 1 or cfg.unlearn_steps < 1 or cfg.unlearn_steps % 6:
    fail(
      "--train-steps must be >= 1 and --unlearn-steps a positive multiple of 6"
    )
  out = Path(cfg.out)
  try:  # an unwritable --out must fail now, not after minutes of training
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    fail(f"--out {cfg.out!r} is not a writable directory ({e.strerror or e})")
  return cfg
