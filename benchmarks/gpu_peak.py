"""Peak device memory and step time of one update, measured on the device.

For adamw, dual_optim_plus, dual_optim_plus_8bit and quantize_state(adamw) on
GPT-2-small shapes (124M params): the device's
``memory_stats()['peak_bytes_in_use']`` in a fresh process per update (after
init, and after one jitted, state-donated step), then the median step time of
``--reps`` interleaved steps in one process. Meant for a GPU/TPU
(``benchmarks/gpu.sh``); a CPU reports no memory stats (printed as nan).

``--apply fused`` takes the step as ``dualoptax.update_and_apply`` (the 8-bit
updates write the params themselves) instead of ``tx.update`` then
``optax.apply_updates``.

    python -m benchmarks.gpu_peak [--reps 20] [--tree gpt2|small]
      [--apply separate|fused]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import memory


def _peak() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan"))


def _shapes(tree: str) -> dict:
  if tree == "gpt2":
    return memory.gpt2_small_shapes()
  return memory.many_leaves_shapes(8)  # a smoke test of the script itself


def _make(name, tree, apply="separate"):
  tx, wrap = memory.cases()[name]
  shapes = _shapes(tree)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  step = memory.train_step(tx, wrap, apply == "fused")
  return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), grads


def _one_peak(name, tree, apply) -> None:
  f, params, state, grads = _make(name, tree, apply)
  jax.block_until_ready(state)
  before = _peak()
  params, state = f(params, state, grads)
  jax.block_until_ready(params)
  print(before, _peak())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--tree", choices=("gpt2", "small"), default="gpt2")
  parser.add_argument(
    "--apply", choices=("separate", "fused"), default="separate"
  )
  parser.add_argument("--peak-of", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.peak_of:
    return _one_peak(args.peak_of, args.tree, args.apply)
  n = sum(x.size for x in jax.tree.leaves(_shapes(args.tree)))
  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
    f"{n / 1e6:.1f}M params, step: "
    + (
      "update + apply_updates"
      if args.apply == "separate"
      else "dualoptax.update_and_apply"
    )
  )
  peaks, runs = {}, {}
  for name in memory.cases():
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "benchmarks.gpu_peak",
        "--peak-of",
        name,
        "--tree",
        args.tree,
        "--apply",
        args.apply,
      ],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.split()
    peaks[name] = (float(out[-2]), float(out[-1]))
  for name in memory.cases():
    f, params, state, grads = _make(name, args.tree, args.apply)
    params, state = f(params, state, grads)
    runs[name] = [f, params, state, grads, []]
  for _ in range(args.reps):
    for r in runs.values():
      t0 = time.perf_counter()
      r[1], r[2] = r[0](r[1], r[2], r[3])
      jax.block_until_ready(r[1])
      r[4].append(time.perf_counter() - t0)
  base = statistics.median(runs["optax.adamw"][4])
  print(
    f"{'update':24s} {'step ms':>8s} {'vs adamw':>9s} {'peak, init GB':>14s} "
    f"{'peak, step GB':>14s} {'step peak B/param':>18s}"
  )
  for name, r in runs.items():
    t = statistics.median(r[4])
    p0, p1 = peaks[name]
    print(
      f"{name:24s} {t * 1e3:8.2f} {t / base:9.2f} {p0 / 1e9:14.2f} "
      f"{p1 / 1e9:14.2f} {p1 / n:18.2f}"
    )


if __name__ == "__main__":
  main()
