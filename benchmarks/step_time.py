"""Step time of DualOptim+ (float32 and 8-bit) against optax.adamw, side by side.

Each optimizer's step (``update`` + ``optax.apply_updates``) is jitted with the params
and state donated, and the timings are interleaved (A, B, A, B, ...) so machine noise
hits both alike. Prints medians and ratios; see benchmarks/RESULTS.md.

Three kinds of step: "update" takes the gradients as a (non-donated) jit argument, as
the issue specifies; "update, grads donated" donates them too (as when they come from
a separate jitted gradient function) and returns what occupies their buffers after the
step — the gradients for optax.adamw, the update for dualoptax — so that JAX can
use the donation; "train
step" computes them inside the jit from a cheap loss ``0.5 * sum((θ - x)**2)``.
"faults/step" counts the
process's minor page faults per timed step: XLA:CPU maps a large temporary afresh on
every execution, and touching it page by page costs more than the copy itself on a
virtual machine. Setting ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35,
transparent huge pages in "madvise" mode) makes those mappings use huge pages; the
header prints the setting in effect. The run closes with the 8-bit target's ratio
(``dual_optim_plus_8bit`` against ``optax.adamw``, 16.8M params, grads donated) over
``--rounds`` separate rounds, and their median.

    python benchmarks/step_time.py [--reps 30] [--quick] [--leaves 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax


def make_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {
    f"w{i:03d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    for i, s in enumerate(shapes)
  }


def make_step(tx, wrap, kind="update"):
  """A jitted, donating step: (params, state, grads_or_targets) -> (params, state, ...).

  ``kind``: "update", "donated" (grads donated; returns the tree that lives in their
  buffers: the update for dualoptax, the gradients otherwise) or "train".
  """
  returns_update = wrap is not _same

  def step(params, state, grads):
    if kind == "train":  # ``grads`` are the targets x of 0.5 * sum((θ - x)**2)
      loss = lambda p: sum(
        0.5 * jnp.sum(jnp.square(a - b))
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(grads))
      )
      grads = jax.grad(loss)(params)
    updates, state = tx.update(wrap(grads), state, params)
    new_params = optax.apply_updates(params, updates)
    if kind == "donated":
      return new_params, state, (updates if returns_update else grads)
    return new_params, state

  return jax.jit(
    step, donate_argnums=(0, 1, 2) if kind == "donated" else (0, 1)
  )


def _same(g):
  return g


def _forget(g):
  return {"forget": g}


def state_bytes(tx, params) -> int:
  return dualoptax.state_nbytes(jax.eval_shape(tx.init, params))


def bench(cases, params, reps, kind="update"):
  """Interleaved median step time (s), compile time (s), XLA temporaries (MB) and
  minor page faults per step of each case."""
  fresh = lambda: jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  grads = fresh()
  runs = {}
  for name, (tx, wrap) in cases.items():
    step = make_step(tx, wrap, kind)
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    # A first trace, reported apart, so that the compile time below is XLA's.
    t0 = time.perf_counter()
    jax.make_jaxpr(step)(p, s, grads)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step.lower(p, s, grads).compile()
    compile_s = time.perf_counter() - t0
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    if build_s > 0.5:
      print(f"  ({name}: first trace {build_s:.1f} s)")
    g = fresh() if kind == "donated" else grads
    p, s = compiled(p, s, g)[:2]  # warm-up
    jax.block_until_ready(p)
    runs[name] = {
      "fn": compiled,
      "p": p,
      "s": s,
      "times": [],
      "compile": compile_s,
      "temp": temp_mb,
      "faults": 0,
    }
  for _ in range(reps):
    for r in runs.values():
      g = grads
      if (
        kind == "donated"
      ):  # donated buffers are consumed: new ones, made untimed
        g = jax.block_until_ready(fresh())
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      r["p"], r["s"] = r["fn"](r["p"], r["s"], g)[:2]
      jax.block_until_ready(r["p"])
      r["times"].append(time.perf_counter() - t0)
      r["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
  return {
    n: (
      statistics.median(r["times"]),
      r["compile"],
      r["temp"],
      r["faults"] / reps,
    )
    for n, r in runs.items()
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument(
    "--quick", action="store_true", help="small trees, few reps"
  )
  parser.add_argument(
    "--leaves",
    type=int,
    default=4,
    help="4096x1024 leaves of the big tree (4: the issue's 16.8M)",
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=5,
    help="rounds of the closing adamw vs 8-bit (grads donated) check",
  )
  args = parser.parse_args()
  big = [(4096, 1024)] * args.leaves
  many = [(64, 64 + i % 7) for i in range(200)]
  if args.quick:
    big, args.reps = [(512, 256)] * 4, 5
  forget, same = _forget, _same
  cases = {
    "optax.adamw": (optax.adamw(1e-3, weight_decay=0.01), same),
    "dual_optim_plus": (
      dualoptax.dual_optim_plus(1e-3, weight_decay=0.01),
      forget,
    ),
    "dual_optim_plus(skip_nonfinite=False)": (
      dualoptax.dual_optim_plus(1e-3, weight_decay=0.01, skip_nonfinite=False),
      forget,
    ),
    "dual_optim": (dualoptax.dual_optim(1e-3, weight_decay=0.01), forget),
  }
  cases["quantize_state(optax.adamw)"] = (
    dualoptax.quantize_state(optax.adamw(1e-3, weight_decay=0.01)),
    same,
  )
  cases["dual_optim_plus_8bit"] = (
    dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01),
    forget,
  )
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, backend "
    f"{jax.default_backend()}, device {jax.devices()[0].device_kind}, "
    f"{jax.device_count()} device(s), GLIBC_TUNABLES="
    f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}"
  )
  train_cases = {
    k: v
    for k, v in cases.items()
    if k in ("optax.adamw", "dual_optim_plus", "dual_optim_plus_8bit")
  }
  donated_cases = {
    k: v
    for k, v in cases.items()
    if k
    in (
      "optax.adamw",
      "dual_optim_plus",
      "dual_optim_plus(skip_nonfinite=False)",
      "dual_optim",
      "dual_optim_plus_8bit",
    )
  }
  many_label = f"{sum(a * b for a, b in many) / 1e6:.2f}M params, 200 leaves"
  big_label = (
    f"{sum(a * b for a, b in big) / 1e6:.1f}M params, {len(big)} leaves "
    f"{big[0][0]}x{big[0][1]}"
  )
  for label, shapes, kind, subset in (
    (big_label + ", update", big, "update", cases),
    (big_label + ", update, grads donated", big, "donated", donated_cases),
    (big_label + ", train step", big, "train", train_cases),
    (many_label + ", update", many, "update", cases),
  ):
    params = make_params(shapes)
    n = sum(x.size for x in jax.tree.leaves(params))
    results = bench(subset, params, args.reps, kind)
    base_t, base_c = results["optax.adamw"][:2]
    print(f"\n{label}: median of {args.reps} interleaved steps")
    print(
      f"{'optimizer':40s} {'step ms':>9s} {'ratio':>6s} {'compile s':>10s} "
      f"{'ratio':>6s} {'state B/param':>14s} {'XLA temp MB':>12s} "
      f"{'faults/step':>12s}"
    )
    for name, (t, c, temp, faults) in results.items():
      tx = cases[name][0]
      print(
        f"{name:40s} {t * 1e3:9.2f} {t / base_t:6.2f} {c:10.2f} {c / base_c:6.2f} "
        f"{state_bytes(tx, params) / n:14.2f} {temp:12.1f} {faults:12.0f}"
      )
  # The 8-bit target's ratio, repeated: the ratio of one run moves with the machine's
  # load (both sides are interleaved, but a round is short), so report each round's
  # and their median.
  if args.rounds:
    pair = {k: cases[k] for k in ("optax.adamw", "dual_optim_plus_8bit")}
    params = make_params(big)
    ratios = []
    for _ in range(args.rounds):
      r = bench(pair, params, args.reps, "donated")
      ratios.append(r["dual_optim_plus_8bit"][0] / r["optax.adamw"][0])
    print(
      f"\n{big_label}, grads donated: dual_optim_plus_8bit / optax.adamw over "
      f"{args.rounds} rounds of {args.reps} interleaved steps: "
      f"{' '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
  main()
