"""Flags of the LM unlearning study, their defaults and validation (no JAX)."""

from __future__ import annotations

import argparse
import os

OPTIMIZERS = (
  "adam",
  "dual_optim",
  "dual_optim_plus",
  "dual_optim_plus_unstable",
  "dual_optim_plus_8bit",
)
LABELS = {
  "adam": "Adam (shared state)",
  "dual_optim": "DualOptim",
  "dual_optim_plus": "DualOptim+",
  "dual_optim_plus_unstable": "DualOptim+ stable=False",
  "dual_optim_plus_8bit": "DualOptim+ 8bit",
}
FORGET_LOSSES = ("npo", "ga", "me")
QUICK_OPTIMIZERS = ("adam", "dual_optim_plus")
# --quick (generated people: under 1 min on 2 idle CPU cores; TOFU: about
# 2.5 min): what it changes from the defaults. 300 fine-tuning steps are
# enough for the fine-tuned model to learn both data sets (the run checks and
# prints it); one evaluation per unlearning run (at its end); Adam and
# DualOptim+, the comparison the study is about (not DualOptim, the
# stable=False and 8-bit variants); NPO+GD only, 3 learning rates, 1 seed.
# TOFU's answers are longer (sequence length ~128 vs 32): half the retain
# training and non-forget evaluation sets (the smaller set is learned in 200
# steps), 2 learning rates and 30 unlearning steps.
QUICK = dict(
  finetune_steps=300,
  eval_every=60,
  optimizers=",".join(QUICK_OPTIMIZERS),
  forget_losses="npo",
  seeds=1,
)
QUICK_TOFU = dict(
  retain_size=100,
  eval_size=20,
  finetune_steps=200,
  lrs="1e-3,1e-2",
  unlearn_steps=30,
  eval_every=30,
)


class UsageError(Exception):
  """Bad input: reported as one line, nothing written."""


def build_parser(description: str = "") -> argparse.ArgumentParser:
  """All flags; defaults of ``None`` are filled by :func:`fill_defaults`."""
  p = argparse.ArgumentParser(
    description=description,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  d = p.add_argument_group("data")
  d.add_argument(
    "--data-dir",
    default=None,
    help="TOFU-format directory (default: generated fictitious people)",
  )
  d.add_argument(
    "--forget-split", default="forget01", help="forget01 | forget05 | forget10"
  )
  d.add_argument(
    "--task-id",
    type=int,
    default=1,
    help="forget task id inside the split (1..10)",
  )
  d.add_argument(
    "--retain-size",
    type=int,
    default=None,
    help="TOFU: subsample the retain training set (default 200; --quick: 100)",
  )
  d.add_argument(
    "--eval-size",
    type=int,
    default=None,
    help="TOFU: subsample non-forget eval sets (default 40; --quick: 20)",
  )
  d.add_argument(
    "--num-people", type=int, default=20, help="generated data: people"
  )
  u = p.add_argument_group("unlearning")
  u.add_argument(
    "--forget-losses",
    default=None,
    help="comma-separated forget objectives, each paired with GD on the "
    "retain set: npo, ga, me (default npo,ga; --quick: npo)",
  )
  u.add_argument(
    "--optimizers",
    default=None,
    help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all; "
    f"--quick: {','.join(QUICK_OPTIMIZERS)})",
  )
  u.add_argument(
    "--lrs",
    default=None,
    help="comma-separated unlearning learning rates, the same sweep for every "
    "optimizer and loss (default: 5 values, 1e-4..1e-2 (TOFU) or 3e-4..3e-2 "
    "(generated); --quick: 3 (generated) or 2 (TOFU))",
  )
  u.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="unlearning seeds (batch orders) per learning rate (default 3; "
    "--quick: 1)",
  )
  u.add_argument("--weight-decay", type=float, default=0.01)
  u.add_argument("--unlearn-steps", type=int, default=None)
  u.add_argument("--forget-freq", type=int, default=1)
  u.add_argument("--retain-freq", type=int, default=5)
  u.add_argument(
    "--eval-every",
    type=int,
    default=None,
    help="steps between evaluations (default 30; --quick: 60, i.e. at the end)",
  )
  u.add_argument(
    "--chunk-steps",
    type=int,
    default=None,
    help="steps per jitted chunk (= checkpoint interval; divides --eval-every)",
  )
  m = p.add_argument_group("model and fine-tuning")
  m.add_argument(
    "--tokenizer",
    default="subword",
    choices=("subword", "byte"),
    help="byte-level BPE trained on the fine-tuning texts, or raw bytes",
  )
  m.add_argument("--vocab-size", type=int, default=4000, help="BPE ids")
  m.add_argument("--d-model", type=int, default=None)
  m.add_argument("--layers", type=int, default=None)
  m.add_argument("--heads", type=int, default=4)
  m.add_argument(
    "--max-len",
    type=int,
    default=None,
    help="sequence length (default: the smallest multiple of 16 that "
    "truncates <= 1%% of the texts, capped at 256)",
  )
  m.add_argument(
    "--finetune-steps",
    type=int,
    default=None,
    help="AdamW steps of each fine-tuning (default 1000; --quick: 300, TOFU 200)",
  )
  m.add_argument("--finetune-lr", type=float, default=3e-3)
  m.add_argument("--batch-size", type=int, default=16)
  r = p.add_argument_group("run")
  r.add_argument(
    "--quick",
    action="store_true",
    help="a short study (under 1 min on generated people, about 2.5 min on "
    "TOFU, 2 idle CPU cores): 300 fine-tuning steps, Adam and DualOptim+, "
    "NPO+GD, 3 learning rates, 1 seed, one evaluation per run; TOFU: 200 "
    "fine-tuning steps, 2 learning rates, 30 unlearning steps, 100 retain "
    "pairs, 20 questions per non-forget eval set",
  )
  r.add_argument(
    "--out",
    default=None,
    help="output directory (default runs/unlearn_lm[_tofu])",
  )
  r.add_argument(
    "--resume", action="store_true", help="continue interrupted unlearning runs"
  )
  r.add_argument(
    "--seed", type=int, default=0, help="data subsampling and model seed"
  )
  r.add_argument(
    "--max-chunks",
    type=int,
    default=None,
    help="stop each optimizer run after this many new chunks (simulates an "
    "interruption; continue with --resume)",
  )
  r.add_argument("--no-plot", action="store_true")
  return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
  """Fills the flags left at ``None`` (they depend on ``--quick`` and the data)."""
  q = args.quick
  tofu = args.data_dir is not None
  defaults = dict(
    d_model=128,
    layers=2,
    finetune_steps=1000,
    unlearn_steps=60,
    chunk_steps=30,
    eval_every=30,
    optimizers=",".join(OPTIMIZERS),
    forget_losses="npo,ga",
    lrs=(
      "1e-4,3e-4,1e-3,3e-3,1e-2"
      if tofu
      else ("3e-4,3e-3,3e-2" if q else "3e-4,1e-3,3e-3,1e-2,3e-2")
    ),
    seeds=3,
  )
  if tofu:
    defaults.update(retain_size=200, eval_size=40)
  if q:
    defaults.update(QUICK, **(QUICK_TOFU if tofu else {}))
  for k, v in defaults.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  if args.out is None:
    args.out = os.path.join("runs", "unlearn_lm_tofu" if tofu else "unlearn_lm")
  return args


def validate(args: argparse.Namespace) -> list[str]:
  """Checks the flags; returns the optimizer names. Raises :class:`UsageError`."""
  names = _names("--optimizers", args.optimizers, OPTIMIZERS)
  args.forget_losses = _names(
    "--forget-losses", args.forget_losses, FORGET_LOSSES
  )
  if isinstance(args.lrs, str):
    try:
      args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
      raise UsageError(
        f"--lrs: expected comma-separated numbers, got {args.lrs!r}"
      ) from None
  if not args.lrs or any(not lr > 0 for lr in args.lrs):
    raise UsageError(f"--lrs: need positive learning rates, got {args.lrs}")
  for name in (
    "unlearn_steps",
    "seeds",
    "chunk_steps",
    "eval_every",
    "finetune_steps",
    "batch_size",
    "d_model",
    "layers",
    "heads",
    "forget_freq",
    "retain_freq",
  ):
    if getattr(args, name) < 1:
      raise UsageError(
        f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
      )
  if args.eval_every % args.chunk_steps:
    raise UsageError(
      f"--chunk-steps={args.chunk_steps} must divide --eval-every={args.eval_every}"
    )
  if args.unlearn_steps % args.chunk_steps:
    raise UsageError(
      f"--chunk-steps={args.chunk_steps} must divide "
      f"--unlearn-steps={args.unlearn_steps}"
    )
  if args.max_len is not None and not 16 <= args.max_len <= 1024:
    raise UsageError(f"--max-len must be in [16, 1024], got {args.max_len}")
  if args.max_chunks is not None and args.max_chunks < 1:
    raise UsageError(f"--max-chunks must be >= 1, got {args.max_chunks}")
  if args.tokenizer == "subword" and args.vocab_size < 259:
    raise UsageError(f"--vocab-size must be >= 259, got {args.vocab_size}")
  return names


def _names(flag: str, value: str, choices: tuple[str, ...]) -> list[str]:
  names = [s.strip() for s in value.split(",") if s.strip()]
  unknown = [n for n in names if n not in choices]
  if not names or unknown:
    raise UsageError(
      f"{flag}: unknown {unknown or 'empty list'}; choose from {choices}"
    )
  return names
