"""The published rule's hazard (docs/algorithm.md section 1.3): the published DualOptim+ step on a noisy two-objective
quadratic, against the stable default, DualOptim and Adam.

Forget loss ``½‖θ − a‖²``, retain loss ``½‖θ − b‖²`` with ``a, b ~ N(0, I)``; each step
sees its objective's gradient plus N(0, σ²) noise; 1 forget : 5 retain steps,
authors' betas, lr 1e-2, 300 steps, 65,536 float32 parameters. The whole run is one
jitted ``lax.scan`` whose step picks the objective with a traced index.

    python benchmarks/stress.py [--n 65536] [--steps 300] [--seeds 3]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import dualoptax

OBJECTIVES = ("forget", "retain")


def run(tx, n=65536, steps=300, lr=1e-2, noise=1.0, seed=0, mapping=True):
  """Returns (largest |Δθ|/lr over the run, final forget loss, final retain loss)."""
  key_a, key_b, key_t, key_n = jax.random.split(jax.random.PRNGKey(seed), 4)
  targets = {
    "forget": jax.random.normal(key_a, (n,)),
    "retain": jax.random.normal(key_b, (n,)),
  }
  theta0 = jax.random.normal(key_t, (n,))

  def step(carry, s):
    theta, state = carry
    idx = dualoptax.alternating_index(s, 1, 5)
    noise_s = noise * jax.random.normal(jax.random.fold_in(key_n, s), (n,))

    def branch(name):
      g = theta - targets[name] + noise_s
      grads = {name: g} if mapping else g
      return tx.update(grads, state, theta)

    updates, state = dualoptax.switch_objective(idx, OBJECTIVES, branch)
    return (theta + updates, state), jnp.max(jnp.abs(updates)) / lr

  @jax.jit
  def go():
    (theta, _), ratios = jax.lax.scan(
      step, (theta0, tx.init(theta0)), jnp.arange(steps)
    )
    loss = {k: 0.5 * jnp.mean((theta - t) ** 2) for k, t in targets.items()}
    return jnp.max(ratios), loss["forget"], loss["retain"]

  return tuple(float(x) for x in go())


def optimizers(lr):
  return {
    "dual_optim_plus (stable, default)": (dualoptax.dual_optim_plus(lr), True),
    "dual_optim_plus (stable=False, published)": (
      dualoptax.dual_optim_plus(lr, stable=False),
      True,
    ),
    "dual_optim": (dualoptax.dual_optim(lr), True),
    "optax.adam (shared state)": (optax.adam(lr, b1=0.9, b2=0.95), False),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=65536)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  lr = 1e-2
  print(
    f"n={args.n}, steps={args.steps}, lr={lr}, 1:5 schedule, noise sd 1, "
    f"float32; per seed: max |Δθ|/lr, final forget loss, final retain loss"
  )
  for name, (tx, mapping) in optimizers(lr).items():
    rows = [
      run(tx, args.n, args.steps, lr, seed=s, mapping=mapping)
      for s in range(args.seeds)
    ]
    cells = "  ".join(f"{r:9.1f} {f:.4f} {t:.4f}" for r, f, t in rows)
    print(f"{name:44s} {cells}")


if __name__ == "__main__":
  main()
