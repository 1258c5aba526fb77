"""Flags of the LM unlearning job, their defaults and validation.

Imports no JAX: ``--mesh`` on a CPU host asks XLA for more host devices, which
only works before JAX starts (:func:`ensure_host_devices`).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional

OPTIMIZERS = ("adam", "dual_optim", "dual_optim_plus", "dual_optim_plus_8bit")
LABELS = {
  "adam": "Adam (shared state)",
  "dual_optim": "DualOptim",
  "dual_optim_plus": "DualOptim+",
  "dual_optim_plus_8bit": "DualOptim+ 8bit",
}


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
    help="TOFU: subsample the retain training set (--quick: 200)",
  )
  d.add_argument(
    "--eval-size",
    type=int,
    default=None,
    help="TOFU: subsample non-forget eval sets (--quick: 40)",
  )
  d.add_argument(
    "--num-people", type=int, default=20, help="generated data: people"
  )
  u = p.add_argument_group("unlearning")
  u.add_argument(
    "--forget-loss",
    default="npo",
    choices=("npo", "ga", "me"),
    help="forget objective, paired with GD on the retain set",
  )
  u.add_argument(
    "--optimizers",
    default=",".join(OPTIMIZERS),
    help=f"comma-separated subset of {','.join(OPTIMIZERS)}",
  )
  u.add_argument(
    "--lr", type=float, default=None, help="unlearning learning rate"
  )
  u.add_argument("--weight-decay", type=float, default=0.01)
  u.add_argument("--unlearn-steps", type=int, default=None)
  u.add_argument("--forget-freq", type=int, default=1)
  u.add_argument("--retain-freq", type=int, default=5)
  u.add_argument(
    "--eval-every", type=int, default=None, help="steps between evaluations"
  )
  u.add_argument(
    "--chunk-steps",
    type=int,
    default=None,
    help="steps per jitted chunk (= checkpoint interval; divides --eval-every)",
  )
  m = p.add_argument_group("model and fine-tuning")
  m.add_argument("--d-model", type=int, default=None)
  m.add_argument("--layers", type=int, default=2)
  m.add_argument("--heads", type=int, default=4)
  m.add_argument(
    "--max-len",
    type=int,
    default=None,
    help="sequence length (default: longest example rounded up to 16, capped "
    "at 128 for generated data and 256 for TOFU, 192 with --quick)",
  )
  m.add_argument("--finetune-steps", type=int, default=None)
  m.add_argument("--finetune-lr", type=float, default=3e-3)
  m.add_argument("--batch-size", type=int, default=16)
  r = p.add_argument_group("run")
  r.add_argument(
    "--quick",
    action="store_true",
    help="small settings, <= 10 min on 2 CPU cores",
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
    "--mesh", default=None, help="e.g. data=2,fsdp=4: shard over a device mesh"
  )
  r.add_argument("--seed", type=int, default=0)
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
    d_model=64 if q else 128,
    finetune_steps=(700 if tofu else 500) if q else (4000 if tofu else 1500),
    unlearn_steps=60 if q else 300,
    chunk_steps=6 if q else 25,
    eval_every=12 if q else 50,
    lr=1e-3,
  )
  if tofu and q:
    defaults.update(retain_size=200, eval_size=40)
  for k, v in defaults.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  if args.out is None:
    args.out = os.path.join("runs", "unlearn_lm_tofu" if tofu else "unlearn_lm")
  return args


def validate(args: argparse.Namespace) -> list[str]:
  """Checks the flags; returns the optimizer names. Raises :class:`UsageError`."""
  names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if not names or unknown:
    raise UsageError(
      f"--optimizers: unknown {unknown or 'empty list'}; choose from {OPTIMIZERS}"
    )
  for name in (
    "unlearn_steps",
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
  return names


def mesh_device_count(spec: Optional[str]) -> int:
  """Devices a ``--mesh`` spec needs (parsed again, fully, once JAX is imported)."""
  if not spec:
    return 1
  n = 1
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(data|fsdp)\s*=\s*(\d+)\s*", part)
    if not m or int(m.group(2)) < 1:
      raise UsageError(f"--mesh {spec!r}: expected e.g. data=2,fsdp=4")
    n *= int(m.group(2))
  return n


def ensure_host_devices(n: int) -> None:
  """Asks XLA for ``n`` CPU devices; only effective before JAX initializes a backend."""
  if n <= 1:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  if m and int(m.group(1)) >= n:
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  os.environ["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={n}".strip()
  )
