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
  "dual_optim_plus_unstable": "DualOptim+ (stable=False)",
  "dual_optim_plus_8bit": "DualOptim+ 8bit",
}
DEFAULT_METHODS = tuple(m for m in METHODS if m != "dual_optim_plus_8bit")
BASELINE = "dual_optim_plus"  # every paired difference is taken against it
FORGET_LOSSES = ("ga", "npo", "rl")  # index = the traced loss id of train.py
LOSS_NAMES = {"ga": "GA+GD", "npo": "NPO+GD", "rl": "RL+GD"}
BETAS = dict(b1=0.9, b2=0.95)  # the authors' betas, for every optimizer alike
TRAIN_LR = 1e-3  # Original, Retrain, and the fixed retain lr of unlearning
BATCH, FORGET_BATCH = 64, 32
NPO_BETA = 0.1
NUM_CLASSES = 10
N_TRAIN = 1437  # training images of the fixed 80/20 split (data.py)
TUNE_SEED_OFFSET = 1000  # tuning seeds are 1000, 1001, ...; reported 0, 1, ...
SETTINGS = {  # --setting: (training images used, fraction of them forgotten)
  "default": (None, 0.1),
  "hard": (480, 0.3),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings (the defaults are the full job).

  Attributes:
    seeds: number of reported seeds (0, 1, ...): forget set, initialization
      and batches.
    tune_seeds: number of tuning seeds (``TUNE_SEED_OFFSET``, ...), disjoint
      from the reported ones; the forget lr is chosen on them only.
    setting: ``"default"`` or ``"hard"`` (random forgetting; hard: fewer
      images, more forgotten), or ``"class"`` (every training image of
      ``forget_class``).
    forget_class: the forgotten class of the class-wise setting, else None.
    forget_fraction: fraction of the used training images that is forgotten
      (random settings).
    train_size: training images used per seed (None: the whole split).
    out: output directory.
    quick: whether the smaller ``--quick`` budget was asked for.
    train_steps: Adam steps of Original and Retrain.
    unlearn_steps: unlearning steps (a multiple of the 1 + 5 schedule).
    forget_lrs: starting forget learning-rate grid (geometric).
    max_widen: times the grid may be extended by one block when the chosen lr
      lies on its edge.
    confidence: level of the paired-difference intervals.
    methods: optimizers to compare (keys of :data:`METHODS`).
    losses: forget losses (elements of :data:`FORGET_LOSSES`).
  """

  seeds: int = 10
  tune_seeds: int = 5
  setting: str = "default"
  forget_class: Optional[int] = None
  forget_fraction: float = 0.1
  train_size: Optional[int] = None
  out: str = "runs/unlearn_digits"
  quick: bool = False
  train_steps: int = 600
  unlearn_steps: int = 120
  forget_lrs: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  max_widen: int = 2
  confidence: float = 0.95
  methods: tuple = DEFAULT_METHODS
  losses: tuple = FORGET_LOSSES


QUICK = Config(
  seeds=3,
  tune_seeds=2,
  train_steps=400,
  unlearn_steps=60,
  forget_lrs=(1e-4, 1e-3),
  max_widen=0,
  quick=True,
)


def build_parser(description: str = "") -> argparse.ArgumentParser:
  """The job's flags (defaults of ``None`` are filled from :class:`Config`)."""
  p = argparse.ArgumentParser(description=description)
  add = p.add_argument
  add("--seeds", type=int, help="reported seeds (default 10; 3 with --quick)")
  add(
    "--tune-seeds",
    type=int,
    help="tuning seeds, disjoint from the reported ones (default 5; 2 quick)",
  )
  add(
    "--setting",
    choices=tuple(SETTINGS),
    default="default",
    help="default: forget a random 10%% of the 1,437 training images; hard: "
    "a random 30%% of 480 drawn per seed",
  )
  add(
    "--forget-class",
    type=int,
    help="class-wise forgetting: forget every training image of this class",
  )
  add(
    "--forget-fraction",
    type=float,
    help="fraction of the training images to forget, in (0, 1)",
  )
  add("--train-size", type=int, help="training images used per seed")
  add(
    "--out",
    default="runs/unlearn_digits",
    help="output directory (results.json, summary.png, table.txt)",
  )
  add(
    "--quick",
    action="store_true",
    help="smaller budget: 3+2 seeds, shorter runs, 2 learning rates",
  )
  add("--train-steps", type=int, help="steps to train Original and Retrain")
  add("--unlearn-steps", type=int, help="unlearning steps (a multiple of 6)")
  add("--forget-lrs", help="comma-separated starting forget lr grid")
  add("--max-widen", type=int, help="grid extensions allowed on an edge")
  add("--methods", help=f"subset of {','.join(METHODS)}")
  add("--losses", help=f"subset of {','.join(FORGET_LOSSES)}")
  return p


def _names(value, default, allowed, flag, fail):
  names = default if value is None else tuple(m for m in value.split(",") if m)
  if not names or set(names) - set(allowed):
    fail(f"{flag} must be a non-empty subset of {list(allowed)}, got {value!r}")
  return names


def parse_args(
  argv: Optional[Sequence[str]] = None, description: str = ""
) -> Config:
  """Parses and validates flags; every error exits (status 2) before training."""
  p = build_parser(description)
  a = p.parse_args(argv)
  fail = p.error  # exits with status 2 and the usage line
  base = QUICK if a.quick else Config()

  for flag, value, low in (
    ("--seeds", a.seeds, 1),
    ("--tune-seeds", a.tune_seeds, 1),
    ("--train-size", a.train_size, 2),
    ("--max-widen", a.max_widen, 0),
  ):
    if value is not None and value < low:
      fail(f"{flag} must be >= {low}, got {value}")
  if a.train_size is not None and a.train_size > N_TRAIN:
    fail(f"--train-size must be <= {N_TRAIN}, got {a.train_size}")
  if a.seeds is not None and a.seeds > TUNE_SEED_OFFSET:
    fail(f"--seeds must be <= {TUNE_SEED_OFFSET}, got {a.seeds}")
  if a.forget_class is not None:
    if not 0 <= a.forget_class < NUM_CLASSES:
      fail(
        f"--forget-class must be a class in [0, {NUM_CLASSES - 1}], "
        f"got {a.forget_class}"
      )
    if a.setting != "default" or a.forget_fraction or a.train_size:
      fail(
        "--forget-class forgets a whole class of the full training split; "
        "it takes no --setting, --forget-fraction or --train-size"
      )
  size, fraction = SETTINGS[a.setting]
  fraction = a.forget_fraction if a.forget_fraction is not None else fraction
  if not 0.0 < fraction < 1.0:
    fail(f"--forget-fraction must lie in (0, 1), got {fraction}")
  methods = _names(a.methods, base.methods, METHODS, "--methods", fail)
  losses = _names(a.losses, base.losses, FORGET_LOSSES, "--losses", fail)
  if "dual_optim_plus_8bit" in methods and not hasattr(
    dualoptax, "dual_optim_plus_8bit"
  ):
    methods = tuple(m for m in methods if m != "dual_optim_plus_8bit")
    print(
      "note: dualoptax.dual_optim_plus_8bit is not available; skipping it",
      file=sys.stderr,
    )
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
    tune_seeds=a.tune_seeds or base.tune_seeds,
    setting="class" if a.forget_class is not None else a.setting,
    forget_class=a.forget_class,
    forget_fraction=fraction,
    train_size=a.train_size or size,
    out=a.out,
    train_steps=a.train_steps or base.train_steps,
    unlearn_steps=a.unlearn_steps or base.unlearn_steps,
    forget_lrs=tuple(sorted(set(lrs))),
    max_widen=base.max_widen if a.max_widen is None else a.max_widen,
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
