"""Memory and compile time of one optimizer update, from XLA's buffer assignment.

For each update (``tx.update`` jitted with the optimizer state donated), on abstract
inputs (nothing is allocated), prints:

* state bytes per parameter (``dualoptax.state_nbytes`` of ``jax.eval_shape(init)``);
* temporaries per parameter: ``compiled.memory_analysis().temp_size_in_bytes``,
  the scratch memory XLA assigns to the step beyond its inputs and outputs;
* peak = state + temporaries (the step's memory on top of params, gradients and
  the update, which every optimizer holds alike);
* lowering + compile time, and its ratio to ``optax.adamw``'s.

Trees: GPT-2-small shapes (124M params, 148 leaves) and 200 leaves of 64x64..70.
``--step train`` measures a train step instead: ``update`` and
``optax.apply_updates`` in one jit, params and state donated (the update is then
a temporary unless it fuses into the parameter write); ``--step train-grad``
also computes the gradients inside, of ``0.5 * sum((θ - x)**2)``;
``--step train-fused`` is ``--step train`` as ``dualoptax.update_and_apply``
(the 8-bit steps write the params themselves).

    python benchmarks/memory.py [--trees gpt2,many] [--repeat 1]
      [--step update|train|train-grad|train-fused]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import dualoptax


def gpt2_small_shapes() -> dict:
  """GPT-2 small's parameter shapes (124,439,808 params) as ShapeDtypeStructs."""
  d, v, n_ctx, layers = 768, 50257, 1024, 12
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"wte": f(v, d), "wpe": f(n_ctx, d), "ln_f": {"g": f(d), "b": f(d)}}
  for i in range(layers):
    tree[f"h{i}"] = {
      "ln_1": {"g": f(d), "b": f(d)},
      "ln_2": {"g": f(d), "b": f(d)},
      "attn": {
        "c_attn": {"w": f(d, 3 * d), "b": f(3 * d)},
        "c_proj": {"w": f(d, d), "b": f(d)},
      },
      "mlp": {
        "c_fc": {"w": f(d, 4 * d), "b": f(4 * d)},
        "c_proj": {"w": f(4 * d, d), "b": f(d)},
      },
    }
  return tree


def many_leaves_shapes(n: int = 200) -> dict:
  return {
    f"w{i:03d}": jax.ShapeDtypeStruct((64, 64 + i % 7), jnp.float32)
    for i in range(n)
  }


def cases() -> dict:
  forget = lambda g: {"forget": g}
  same = lambda g: g
  return {
    "optax.adamw": (optax.adamw(1e-3, weight_decay=0.01), same),
    "quantize_state(adamw)": (
      dualoptax.quantize_state(optax.adamw(1e-3, weight_decay=0.01)),
      same,
    ),
    "dual_optim_plus": (
      dualoptax.dual_optim_plus(1e-3, weight_decay=0.01),
      forget,
    ),
    "dual_optim_plus_8bit": (
      dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01),
      forget,
    ),
  }


def variants() -> dict:
  """The gradient-buffer reuse of the chunked loops, off and on, with and
  without a conditional around the update."""
  forget = lambda g: {"forget": g}
  same = lambda g: g
  adamw = lambda: optax.adamw(1e-3, weight_decay=0.01)
  q = dualoptax.quantize_state
  return {
    "8bit, skip_nonfinite=False": (
      dualoptax.dual_optim_plus_8bit(
        1e-3, weight_decay=0.01, skip_nonfinite=False
      ),
      forget,
    ),
    "q(adamw), no reuse": (q(adamw(), reuse_gradient_buffers=False), same),
    "apply_if_finite(q(adamw))": (optax.apply_if_finite(q(adamw()), 3), same),
    "apply_if_finite, no reuse": (
      optax.apply_if_finite(q(adamw(), reuse_gradient_buffers=False), 3),
      same,
    ),
  }


def train_step(tx, wrap, fused: bool = False):
  """``(params, state, grads) -> (params, state)``: ``tx.update`` then
  ``optax.apply_updates``, or ``dualoptax.update_and_apply`` where
  ``fused``."""

  def step(p, s, g):
    if fused:
      return dualoptax.update_and_apply(tx, wrap(g), s, p)
    updates, s = tx.update(wrap(g), s, p)
    return optax.apply_updates(p, updates), s

  return step


def measure(tx, wrap, params, step: str = "update") -> dict:
  state = jax.eval_shape(tx.init, params)

  def update(p, s, g):
    return tx.update(wrap(g), s, p)

  def train_grad_step(p, s, x):
    loss = lambda q: sum(
      0.5 * jnp.sum((a - x) ** 2) for a in jax.tree.leaves(q)
    )
    return train_step(tx, wrap)(p, s, jax.grad(loss)(p))

  if step == "update":
    jitted, third = jax.jit(update, donate_argnums=1), params
  elif step in ("train", "train-fused"):
    fused = step == "train-fused"
    jitted = jax.jit(train_step(tx, wrap, fused), donate_argnums=(0, 1))
    third = params
  else:
    jitted = jax.jit(train_grad_step, donate_argnums=(0, 1))
    third = jax.ShapeDtypeStruct((), jnp.float32)
  t0 = time.perf_counter()
  compiled = jitted.lower(params, state, third).compile()
  seconds = time.perf_counter() - t0
  analysis = compiled.memory_analysis()
  n = sum(x.size for x in jax.tree.leaves(params))
  state_b = dualoptax.state_nbytes(state) / n
  temp_b = analysis.temp_size_in_bytes / n
  return {
    "state": state_b,
    "temp": temp_b,
    "peak": state_b + temp_b,
    "compile": seconds,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", default="gpt2,many")
  parser.add_argument(
    "--repeat", type=int, default=1, help="compiles per case (median)"
  )
  parser.add_argument(
    "--step",
    choices=("update", "train", "train-grad", "train-fused"),
    default="update",
    help="jit update alone (state donated) or a train step (params and "
    "state donated; train-grad: gradients computed inside)",
  )
  parser.add_argument(
    "--variants",
    action="store_true",
    help="also the gradient-buffer reuse switched off, and on under a guard",
  )
  args = parser.parse_args()
  rows = cases()
  if args.variants:
    rows.update(variants())
  trees = {"gpt2": ("GPT-2 small, 124M params, 148 leaves", gpt2_small_shapes)}
  trees["many"] = ("200 leaves of 64x64..70, 0.85M params", many_leaves_shapes)
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, backend "
    f"{jax.default_backend()}, {jax.device_count()} device(s)"
  )
  for key in args.trees.split(","):
    label, make = trees[key]
    params = make()
    what = {
      "update": "update jitted with the state donated",
      "train": "train step (update + apply_updates), params and state donated",
      "train-grad": "train step with its gradients computed inside, params "
      "and state donated",
      "train-fused": "train step (dualoptax.update_and_apply), params and "
      "state donated",
    }[args.step]
    print(f"\n{label}: {what}")
    print(
      f"{'update':26s} {'state B/param':>14s} {'temp B/param':>13s} "
      f"{'peak B/param':>13s} {'compile s':>10s} {'vs adamw':>9s}"
    )
    base = None
    for name, (tx, wrap) in rows.items():
      runs = [measure(tx, wrap, params, args.step) for _ in range(args.repeat)]
      r = runs[0]
      r["compile"] = statistics.median(x["compile"] for x in runs)
      base = base or r["compile"]
      print(
        f"{name:26s} {r['state']:14.2f} {r['temp']:13.2f} {r['peak']:13.2f} "
        f"{r['compile']:10.2f} {r['compile'] / base:9.2f}"
      )


if __name__ == "__main__":
  main()
