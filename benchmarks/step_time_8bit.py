"""Step time of 8-bit optimizer states vs float32 optax.adamw, and bytes per parameter.

A 16.8M-parameter tree (4 leaves of 4096x1024). Every optimizer runs as one jitted
``update + optax.apply_updates`` with its params and state donated; the variants are
timed interleaved (round-robin) and the median per variant is reported, with the ratio
to float32 adamw measured in the same rounds.

Usage:
  python benchmarks/step_time_8bit.py [--rounds 15] [--leaves 4] [--rows 4096] [--cols 1024]

Run it with ``XLA_FLAGS`` unset (one device) on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax


def make_step(tx, multi: bool):
  def step(params, state, grads):
    g = {"forget": grads} if multi else grads
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--leaves", type=int, default=4)
  ap.add_argument("--rows", type=int, default=4096)
  ap.add_argument("--cols", type=int, default=1024)
  ap.add_argument("--with-dual", action="store_true",
                  help="also time dual_optim_plus vs dual_optim_plus_8bit")
  ap.add_argument("--with-searchsorted", action="store_true",
                  help="also time adamw 8-bit with the searchsorted reference encoder")
  args = ap.parse_args()

  shape = (args.rows, args.cols)
  key = jax.random.key(0)
  keys = jax.random.split(key, 2 * args.leaves)
  make_params = lambda: {f"w{i}": jax.random.normal(keys[i], shape) * 0.02
                         for i in range(args.leaves)}
  grads = {f"w{i}": jax.random.normal(keys[args.leaves + i], shape) * 1e-3
           for i in range(args.leaves)}
  n_params = args.leaves * args.rows * args.cols

  variants = {
      "adamw_fp32": (optax.adamw(1e-3, weight_decay=0.01), False),
      "adamw_8bit": (dualoptax.quantize_state(optax.adamw(1e-3, weight_decay=0.01)), False),
  }
  if args.with_dual:
    variants["dual_optim_plus_fp32"] = (
        dualoptax.dual_optim_plus(1e-3, weight_decay=0.01), True)
    variants["dual_optim_plus_8bit"] = (
        dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01), True)

  from dualoptax import quantization as qz  # pylint: disable=g-import-not-at-top
  if args.with_searchsorted:
    variants["adamw_8bit_searchsorted"] = (
        dualoptax.quantize_state(optax.adamw(1e-3, weight_decay=0.01)), False)

  runs = {}
  fast_encoder = qz._encode_normalized
  for name, (tx, multi) in variants.items():
    # The encoder is looked up when the step is traced (first call below).
    qz._encode_normalized = (qz._encode_normalized_searchsorted
                             if name.endswith("searchsorted") else fast_encoder)
    params = make_params()
    state = tx.init(params)
    nbytes = dualoptax.state_nbytes(state)
    step = make_step(tx, multi)
    params, state = step(params, state, grads)  # compile + warm up
    jax.block_until_ready((params, state))
    qz._encode_normalized = fast_encoder
    runs[name] = dict(step=step, params=params, state=state, times=[],
                      bytes_per_param=nbytes / n_params)

  for _ in range(args.rounds):
    for name, r in runs.items():
      t0 = time.perf_counter()
      r["params"], r["state"] = r["step"](r["params"], r["state"], grads)
      jax.block_until_ready((r["params"], r["state"]))
      r["times"].append(time.perf_counter() - t0)

  base = np.median(runs["adamw_fp32"]["times"])
  out = {"device": str(jax.devices()[0]), "n_params": n_params, "rounds": args.rounds}
  for name, r in runs.items():
    med = float(np.median(r["times"]))
    ref = np.median(runs["dual_optim_plus_fp32"]["times"]) if (
        name == "dual_optim_plus_8bit") else base
    out[name] = {"median_ms": round(med * 1e3, 2),
                 "ratio": round(med / float(ref), 3),
                 "bytes_per_param": round(r["bytes_per_param"], 4)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
