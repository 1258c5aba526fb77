"""TPU figures without a TPU: ahead-of-time compilation for a TPU topology.

With libtpu installed (``pip install -e '.[tpu-aot]'``), XLA's TPU compiler runs
on this CPU machine: every update is jitted as a train step (``update`` then
``optax.apply_updates``, params and state donated) on abstract arguments
(``jax.ShapeDtypeStruct`` with a ``NamedSharding`` on the topology's devices),
compiled for TPU, and read back:

* state bytes per parameter (``dualoptax.state_nbytes``);
* temporaries per parameter (``memory_analysis().temp_size_in_bytes``: TPU's own
  buffer assignment, the step's HBM beyond its inputs and outputs);
* HBM bytes accessed per parameter (``cost_analysis()["bytes accessed"]``), plus,
  where a Pallas kernel is a custom call that XLA does not count, the bytes of its
  operands and results that live in HBM (``kernel B/param``; an operand XLA
  prefetched into VMEM counts once, as that prefetch), so the two add up to
  the step's HBM traffic (``k.all``: every operand and result of the kernels,
  in HBM or not);
* HBM traffic per parameter read from the compiled HLO (``HBM``, see
  :func:`hbm_traffic`): what cost analysis counts, less what XLA moves through
  VMEM;
* lowering + compile time (one cold compile each; ``--compile-rounds N``
  compiles every update N more times, the updates in turn, and prints each
  one's median and its median ratio to the first update's, paired by round:
  the machine's speed drifts by tens of percent within minutes);
* the number of ``gather``, ``transpose`` and ``copy`` instructions in the
  compiled HLO (all three move data through HBM on TPU).

Trees: GPT-2-small shapes (124M; ``gpt2_scan``: its layers stacked, as a
scanned model keeps them), one 4096x4096 leaf, a Llama-shaped tree
of 1.24B parameters (Llama-3.2-1B's shapes), and one or 12 leaves of 768x3072
(``mlp1``, ``mlp12``: how figures grow with the number of leaves). Meshes: one chip, or FSDP over 4
chips (each leaf sharded along its largest axis divisible by 4).

    python benchmarks/tpu_aot.py [--trees gpt2,gpt2_scan,square,llama1b,mlp1,mlp12]
      [--mesh 1,4] [--grads input|step]
      [--updates adamw,q_adamw,...] [--topology v5e:2x2] [--compile-rounds N]
    python benchmarks/tpu_aot.py --check-donation

Gradients, one tree per objective present: arguments of the step that the
caller keeps (``--grads input``, the default), or computed in the step and
dead after the update (``step``: see :func:`measure`; the figures then
include the gradients, 4 B/param each of temporaries and 12 of traffic).

Updates are traced as a process on the mesh's TPU devices traces them
(``dualoptax._kernel.on_tpu``, which here, where JAX's backend is the CPU,
would say no): on one chip, ``kernel="auto"``'s kernels and the non-finite
guards' check kernel; over several chips, the loops and XLA's check under
auto mesh axes, and a kernel per shard under explicit axes (``--axes
explicit``, the mesh entered with ``jax.set_mesh``). Compile times come from a process that has compiled for
the TPU before (see :func:`warm_up`), with JAX's caches cleared before each
update.

Without libtpu this prints how to install it and exits with status 2.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import statistics
import sys
import time
from typing import Optional
from unittest import mock

import jax
import jax.numpy as jnp
import optax

import dualoptax
from benchmarks.memory import gpt2_small_shapes, train_step
from dualoptax import _kernel

_SHAPE = re.compile(
  r"\b(pred|s8|u8|s16|u16|s32|u32|bf16|f16|f32|f64)\[([\d,]*)\](\{[^}]*\})?"
)
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "f64": 8,
}


def llama_1b_shapes() -> dict:
  """Llama-3.2-1B's parameter shapes (tied embedding): 1.236B params."""
  d, ffn, vocab, layers, kv = 2048, 8192, 128256, 16, 512
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"embed": f(vocab, d), "norm": f(d)}
  for i in range(layers):
    tree[f"layer{i:02d}"] = {
      "attn_norm": f(d),
      "q": f(d, d),
      "k": f(d, kv),
      "v": f(d, kv),
      "o": f(d, d),
      "mlp_norm": f(d),
      "gate": f(d, ffn),
      "up": f(d, ffn),
      "down": f(ffn, d),
    }
  return tree


def square_shapes() -> dict:
  return {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}


def mlp_shapes(leaves: int):
  """``leaves`` identical 768x3072 leaves (GPT-2's MLP input): how compile
  time grows with the number of kernels of one shape."""
  return lambda: {
    f"w{i:02d}": jax.ShapeDtypeStruct((768, 3072), jnp.float32)
    for i in range(leaves)
  }


def gpt2_scanned_shapes() -> dict:
  """GPT-2 small with its 12 layers stacked on a leading axis, as a scanned
  model (``nnx.scan``, ``linen.scan``) keeps them: one leaf per layer
  parameter instead of twelve."""
  tree = gpt2_small_shapes()
  layers = [tree.pop(f"h{i}") for i in range(12)]
  tree["h"] = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((len(layers), *x.shape), x.dtype),
    layers[0],
  )
  return tree


TREES = {
  "gpt2": ("GPT-2 small, 124M params", gpt2_small_shapes),
  "gpt2_scan": (
    "GPT-2 small, layers stacked (scanned), 124M params",
    gpt2_scanned_shapes,
  ),
  "square": ("one 4096x4096 leaf, 16.8M params", square_shapes),
  "llama1b": ("Llama-shaped, 1.24B params", llama_1b_shapes),
  "mlp1": ("one 768x3072 leaf, 2.4M params", mlp_shapes(1)),
  "mlp12": ("12 leaves of 768x3072, 28.3M params", mlp_shapes(12)),
}


def updates(kernel: str) -> dict:
  """name -> (transformation, objectives present in the step's gradients).

  ``kernel`` for the kernel-capable updates (``"auto"``: what a TPU
  process picks, see :func:`measure`); the ``_xla`` rows always run XLA's
  ops (the 8-bit ones its loops).
  """
  two = ("forget", "retain")
  q = dict(kernel=kernel)
  return {
    "adamw": (optax.adamw(1e-3, weight_decay=0.01), None),
    "q_adamw": (
      dualoptax.quantize_state(optax.adamw(1e-3, weight_decay=0.01), **q),
      None,
    ),
    "q_adamw_xla": (
      dualoptax.quantize_state(
        optax.adamw(1e-3, weight_decay=0.01), kernel="xla"
      ),
      None,
    ),
    "dual_optim": (dualoptax.dual_optim(1e-3, weight_decay=0.01, **q), two),
    "dual_optim_xla": (
      dualoptax.dual_optim(1e-3, weight_decay=0.01, kernel="xla"),
      two,
    ),
    "dual_optim_plus": (
      dualoptax.dual_optim_plus(1e-3, weight_decay=0.01, **q),
      two,
    ),
    "dual_optim_plus_xla": (
      dualoptax.dual_optim_plus(1e-3, weight_decay=0.01, kernel="xla"),
      two,
    ),
    "8bit_1obj": (
      dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01, **q),
      ("forget",),
    ),
    "8bit_2obj": (
      dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01, **q),
      two,
    ),
    # Without the non-finite guard, whose check reads every gradient before
    # the kernels run.
    "8bit_2obj_nocheck": (
      dualoptax.dual_optim_plus_8bit(
        1e-3, weight_decay=0.01, skip_nonfinite=False, **q
      ),
      two,
    ),
    "8bit_2obj_xla": (
      dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01, kernel="xla"),
      two,
    ),
  }


def fsdp_spec(shape, n: int) -> jax.sharding.PartitionSpec:
  """Shard the largest axis divisible by ``n`` (replicate when none is)."""
  axes = [i for i, s in enumerate(shape) if s % n == 0]
  if n == 1 or not axes:
    return jax.sharding.PartitionSpec()
  best = max(axes, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return jax.sharding.PartitionSpec(*spec)


def place(tree, mesh):
  n = mesh.devices.size

  def one(x):
    s = jax.sharding.NamedSharding(mesh, fsdp_spec(x.shape, n))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(one, tree)


def _all_bytes(shapes: str) -> int:
  return sum(
    _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
    for t, dims, _ in _SHAPE.findall(shapes)
  )


def _hbm_bytes(shapes: str) -> int:
  """Bytes of the arrays in an HLO shape string that live in HBM: a layout
  marked ``S(1)`` is in VMEM, where XLA prefetched it (the copy from HBM is
  an instruction of its own, which cost analysis counts)."""
  return sum(
    _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
    for t, dims, layout in _SHAPE.findall(shapes)
    if "S(1)" not in layout
  )


def _instructions(text: str):
  """``(name, result shape, opcode, operand names, line)`` of each HLO
  instruction in ``text``, in order."""
  for line in text.splitlines():
    line = line.split(", metadata=")[0].split(", backend_config=")[0]
    m = re.match(
      r"\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)", line
    )
    if m:
      name, result, op, rest = m.groups()
      operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])
      yield name, result, op, operands, line


def hlo_counts(text: str) -> dict:
  """Instruction counts by opcode of interest, and the bytes a Pallas kernel
  (a ``tpu_custom_call``, which XLA's cost analysis does not see) reads and
  writes in HBM: its operands' and results' sizes, where they are in HBM."""
  counts = collections.Counter()
  defined, calls = {}, []
  for name, result, op, operands, line in _instructions(text):
    defined[name] = result
    if op in ("gather", "transpose", "copy", "custom-call"):
      counts[op] += 1
    if op == "custom-call" and "tpu_custom_call" in line:
      calls.append((result, operands))

  def total(hbm_only: bool) -> int:
    size = _hbm_bytes if hbm_only else _all_bytes
    return sum(
      size(result) + sum(size(defined.get(o, "")) for o in operands)
      for result, operands in calls
    )

  return {
    "counts": counts,
    "kernel_bytes": total(True),
    "kernel_all_bytes": total(False),
  }


# Bytes of operands and results up to which a loop or conditional counts as
# moving only those (see hbm_traffic).
_SCALARS_ONLY = 64

_NO_TRAFFIC = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
}


def hbm_traffic(text: str) -> Optional[int]:
  """Bytes the step moves across HBM, read from the compiled HLO: per
  instruction of the entry computation, its operands and its result where
  they live in HBM (a layout without ``S(1)``, VMEM). A prefetch or an
  eviction (``copy-start``/``-done``, ``slice-start``/``-done``) counts its
  HBM source once and its HBM destination once (a slice reads only its
  part of the source); VMEM-to-VMEM work counts nothing. Each operand counts
  once per instruction, as a fusion reads it.
  None when the step has a loop (``while``) or a conditional over arrays,
  whose trip counts or taken branches this reading cannot see.

  ``cost_analysis()["bytes accessed"]`` instead counts every operand and
  result wherever it lives, so a value XLA moves into VMEM for the next
  instruction counts as a read, a write and a read again."""
  entry = text[text.index("\nENTRY") :].split("\n", 2)[2]
  defined, total = {}, 0
  for name, result, op, operands, _ in _instructions(entry):
    defined[name] = result
    if op in ("while", "conditional", "call"):
      # Its computations see only its operands: where those and its results
      # are a few scalars (a guard's flag), so is its traffic.
      size = _all_bytes(result)
      size += sum(_all_bytes(defined.get(o, "")) for o in operands)
      if size > _SCALARS_ONLY:
        return None
      total += size
      continue
    if op in _NO_TRAFFIC:
      continue
    # An asynchronous copy or slice (a prefetch into VMEM or an eviction to
    # HBM): its start reads the source, its done writes the destination; the
    # start's result tuple repeats the source, which is not a second read.
    if op == "slice-start":
      # A slice reads only its part of the source: the destination's size
      # (the start's second shape), where the source is in HBM.
      source = defined.get(operands[0], "")
      if _hbm_bytes(source):
        total += _all_bytes(list(_SHAPE.finditer(result))[1].group(0))
      continue
    if op.endswith("-start"):
      total += sum(_hbm_bytes(defined.get(o, "")) for o in set(operands))
      continue
    if op.endswith("-done"):
      total += _hbm_bytes(result)
      continue
    total += _hbm_bytes(result)
    total += sum(_hbm_bytes(defined.get(o, "")) for o in set(operands))
  return total


def warm_up(topo) -> None:
  """Compiles a small XLA step and a small kernel for the TPU: what the
  first compile of a process pays once (the compilers' set-up) is then
  charged to no update measured after."""
  mesh = jax.sharding.Mesh(topo.devices[:1], ("fsdp",))
  params = place({"w": jax.ShapeDtypeStruct((256, 512), jnp.float32)}, mesh)
  for name in ("adamw", "8bit_2obj"):
    measure(*updates("pallas")[name], params)


def measure(
  tx, objectives, params, grads: str = "input", apply: str = "separate"
) -> dict:
  """One train step's figures. ``grads="input"``: the gradients (one tree
  per objective present) are arguments of the step, which the caller keeps;
  ``"step"``: the step computes them, ``p - x_k`` (the gradient of
  ``0.5 * |p - x_k|^2``, materialized behind an optimization barrier as a
  network's are), from arguments ``x_k``, so they are dead after the update.
  ``apply="separate"``: ``tx.update`` then ``optax.apply_updates``;
  ``"fused"``: ``dualoptax.update_and_apply`` (the same for optax's own
  transformations)."""
  state = jax.eval_shape(tx.init, params)
  count = 1 if objectives is None else len(objectives)

  def present(gs):
    return gs[0] if objectives is None else dict(zip(objectives, gs))

  def step(p, s, xs):
    if grads == "step":
      xs = [
        jax.lax.optimization_barrier(jax.tree.map(jnp.subtract, p, x))
        for x in xs
      ]
    return train_step(tx, present, apply == "fused")(p, s, xs)

  # Each update's compile from cold: no trace or lowering (of a kernel or a
  # codec function shared with an update measured before) served from cache.
  jax.clear_caches()
  ndev = max(len(x.sharding.device_set) for x in jax.tree.leaves(params))
  t0 = time.perf_counter()
  jitted = jax.jit(step, donate_argnums=(0, 1))
  with mock.patch.object(_kernel, "on_tpu", lambda: True):
    compiled = jitted.lower(params, state, [params] * count).compile()
  seconds = time.perf_counter() - t0
  n = sum(x.size for x in jax.tree.leaves(params))
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  text = compiled.as_text()
  hlo = hlo_counts(text)
  hbm = hbm_traffic(text)
  # memory_analysis and cost_analysis are per device: scale to the whole step.
  return {
    "state": dualoptax.state_nbytes(state) / n,
    "temp": compiled.memory_analysis().temp_size_in_bytes * ndev / n,
    "accessed": cost.get("bytes accessed", float("nan")) * ndev / n,
    "kernel": hlo["kernel_bytes"] * ndev / n,
    "kernel_all": hlo["kernel_all_bytes"] * ndev / n,
    "hbm": float("nan") if hbm is None else hbm * ndev / n,
    "compile": seconds,
    **{k: hlo["counts"][k] for k in ("gather", "transpose", "copy")},
  }


def check_donation(topo) -> int:
  """Compiles each 8-bit update's kernels for TPU under every usual way of
  returning and donating (``(u, s)``, ``(s, u)``, ``s``, ``(p + u, s)``,
  ``(s, p + u)``, and ``update_and_apply``'s ``(p', s)`` and ``(s, p')``;
  state, state and params, or all donated) and returns the
  number XLA rejects. Kernels pin operands aliased to their outputs in HBM,
  and XLA's verifier rejects some such kernels when the aliased output is
  returned and its operand donated (see benchmarks/RESULTS.md); this says
  whether the library's kernels do, for the libtpu installed."""
  import itertools  # pylint: disable=import-outside-toplevel

  mesh = jax.sharding.Mesh(topo.devices[:1], ("fsdp",))
  params = place(
    {
      "w": jax.ShapeDtypeStruct((768, 768), jnp.float32),
      "v": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
      "b": jax.ShapeDtypeStruct((2048,), jnp.float32),
      # Stored column-major on TPU (a stack of such too): in blocks of 64,
      # their kernels take them transposed (blocks along sublanes).
      "c": jax.ShapeDtypeStruct((300, 192), jnp.float32),
      "s": jax.ShapeDtypeStruct((2, 300, 192), jnp.float32),
    },
    mesh,
  )
  # The measured updates' kernels, Adam's and float32-nu variants (an
  # aliased float32 state beside the codes), and blocks of 64.
  table = updates("pallas")
  adam, adamw = optax.adam(1e-3), optax.adamw(1e-3, weight_decay=0.01)
  nu_f32 = dict(kernel="pallas", select=lambda key, leaf: "nu" not in key)
  txs = {
    "quantize_state(adam)": (
      dualoptax.quantize_state(adam, kernel="pallas"),
      None,
    ),
    "quantize_state(adamw)": table["q_adamw"],
    "quantize_state(adam), nu float32": (
      dualoptax.quantize_state(adam, **nu_f32),
      None,
    ),
    "quantize_state(adamw), nu float32": (
      dualoptax.quantize_state(adamw, **nu_f32),
      None,
    ),
    "dual_optim_plus, float32": table["dual_optim_plus"],
    "dual_optim, float32": table["dual_optim"],
    "dual_optim_plus_8bit, one objective": table["8bit_1obj"],
    "dual_optim_plus_8bit, two objectives": table["8bit_2obj"],
    "quantize_state(adamw), blocks of 64": (
      dualoptax.quantize_state(adamw, block_size=64, kernel="pallas"),
      None,
    ),
    "dual_optim_plus_8bit, two objectives, blocks of 64": (
      dualoptax.dual_optim_plus_8bit(
        1e-3, weight_decay=0.01, block_size=64, kernel="pallas"
      ),
      ("forget", "retain"),
    ),
  }

  def separate(out):  # tx.update, then ``out`` of (p, u, s)
    return lambda tx, p, s, g: out(p, *tx.update(g, s, p))

  def fused(out):  # dualoptax.update_and_apply, then ``out`` of (p', s)
    return lambda tx, p, s, g: out(*dualoptax.update_and_apply(tx, g, s, p))

  returns = {
    "(u, s)": separate(lambda p, u, s: (u, s)),
    "(s, u)": separate(lambda p, u, s: (s, u)),
    "s": separate(lambda p, u, s: s),
    "(p + u, s)": separate(lambda p, u, s: (optax.apply_updates(p, u), s)),
    "(s, p + u)": separate(lambda p, u, s: (s, optax.apply_updates(p, u))),
    "update_and_apply: (p', s)": fused(lambda p, s: (p, s)),
    "update_and_apply: (s, p')": fused(lambda p, s: (s, p)),
  }
  rejected = 0
  for (name, (tx, objectives)), (ret, out), donate in itertools.product(
    txs.items(), returns.items(), [(1,), (0, 1), (0, 1, 2)]
  ):
    state = jax.eval_shape(tx.init, params)
    grads = params if objectives is None else dict.fromkeys(objectives, params)

    def step(p, s, g, tx=tx, out=out):
      return out(tx, p, s, g)

    try:
      # Under the mesh, as measure's compiles: Pallas reads the TPU
      # generation of a kernel's 1-d blocks (the whole-leaf kernels of
      # float32 state) from the context mesh when not on a TPU host.
      with jax.set_mesh(mesh):
        jitted = jax.jit(step, donate_argnums=donate)
        jitted.lower(params, state, grads).compile()
    except jax.errors.JaxRuntimeError as e:
      rejected += 1
      print(f"rejected: {name}, returns {ret}, donated {donate}: {e}"[:300])
  print(f"{rejected} of {len(txs) * len(returns) * 3} compiles rejected")
  return rejected


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", default="gpt2,square")
  parser.add_argument("--mesh", default="1", help="chips: 1, 4 or 1,4")
  parser.add_argument(
    "--updates", default=",".join(updates("xla")), help="comma-separated"
  )
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument(
    "--grads",
    choices=("input", "step"),
    default="input",
    help="gradients passed in (kept by the caller) or computed in the step",
  )
  parser.add_argument(
    "--axes",
    choices=("auto", "explicit"),
    default="auto",
    help="mesh axis types: auto (jax.sharding.Mesh's default) or explicit "
    "(jax.make_mesh's), under which the 8-bit kernels run per shard",
  )
  parser.add_argument(
    "--apply",
    choices=("separate", "fused"),
    default="separate",
    help="the step as tx.update then optax.apply_updates, or as "
    "dualoptax.update_and_apply (params written by the 8-bit kernels)",
  )
  parser.add_argument(
    "--compile-rounds",
    type=int,
    default=0,
    help="then compile every update this many more times, in turn, and "
    "print median seconds and median paired ratios to the first update",
  )
  parser.add_argument(
    "--check-donation",
    action="store_true",
    help="only compile the 8-bit kernels under every usual return and "
    "donation, and exit with status 1 where XLA rejects one",
  )
  args = parser.parse_args()
  try:
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
      platform="tpu", topology_name=args.topology
    )
  except Exception as e:  # libtpu missing or unusable: say how to get it.
    print(
      f"cannot compile for TPU here ({type(e).__name__}: {e}).\n"
      "Install libtpu for this jax: pip install -e '.[tpu-aot]'",
      file=sys.stderr,
    )
    return 2
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, TPU topology "
    f"{args.topology} ({topo.devices[0].device_kind}), compiled ahead of time; "
    "train step ("
    + (
      "update + apply_updates"
      if args.apply == "separate"
      else "dualoptax.update_and_apply"
    )
    + "), params and state donated"
  )
  if args.check_donation:
    import warnings  # pylint: disable=import-outside-toplevel

    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return 1 if check_donation(topo) else 0
  warm_up(topo)
  for key in args.trees.split(","):
    label, make = TREES[key]
    for chips in (int(c) for c in args.mesh.split(",")):
      kind = getattr(jax.sharding.AxisType, args.axes.capitalize())
      mesh = jax.sharding.Mesh(
        topo.devices[:chips], ("fsdp",), axis_types=(kind,)
      )
      params = place(make(), mesh)
      # "auto", traced as for TPU: the kernels on one chip, per shard under
      # explicit axes; under several chips with auto axes, the loops.
      table = updates("auto")
      where = "1 chip" if chips == 1 else f"FSDP over {chips} chips"
      where += f", {args.axes} axes" if chips > 1 else ""
      print(f"\n{label}, {where} (B/param over all chips)")
      print(
        f"{'update':17s} {'state':>6s} {'temp':>7s} {'accessed':>9s} "
        f"{'kernel':>7s} {'k.all':>6s} {'HBM':>6s} {'compile s':>9s} {'gather':>6s} {'transp':>6s} "
        f"{'copy':>5s}"
      )
      compiled = {}  # the updates that compile, for --compile-rounds
      for name in args.updates.split(","):
        tx, objectives = table[name]
        try:
          with jax.set_mesh(mesh):
            r = measure(tx, objectives, params, args.grads, args.apply)
        except jax.errors.JaxRuntimeError as e:  # e.g. more HBM than a chip has
          print(f"{name:17s} does not compile: {str(e).splitlines()[0][:100]}")
          continue
        compiled[name] = table[name]
        print(
          f"{name:17s} {r['state']:6.2f} {r['temp']:7.2f} "
          f"{r['accessed']:9.1f} {r['kernel']:7.1f} {r['kernel_all']:6.1f} "
          f"{r['hbm']:6.1f} "
          f"{r['compile']:9.1f} "
          f"{r['gather']:6d} {r['transpose']:6d} {r['copy']:5d}",
          flush=True,
        )
      if args.compile_rounds > 0:
        with jax.set_mesh(mesh):
          compile_rounds(
            compiled,
            params,
            args.compile_rounds,
            args.grads,
            args.apply,
          )
  return 0


def compile_rounds(
  txs: dict, params, rounds: int, grads: str, apply: str
) -> dict:
  """Compiles each update ``rounds`` times, the updates in turn (each from
  cold, as :func:`measure`), and prints each one's median seconds and the
  median of its ratios to the first update's time in the same round. Returns
  ``{name: [seconds per round]}``."""
  times: dict = {name: [] for name in txs}
  for r in range(rounds):
    for name, (tx, objectives) in txs.items():
      times[name].append(
        measure(tx, objectives, params, grads, apply)["compile"]
      )
    print(
      f"compile round {r + 1}: "
      + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()),
      flush=True,
    )
  first = next(iter(times.values()))
  for name, t in times.items():
    ratios = [a / b for a, b in zip(t, first)]
    print(
      f"{name:17s} compile median {statistics.median(t):5.1f} s, "
      f"{statistics.median(ratios):.2f}x the first "
      f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
    )
  return times


if __name__ == "__main__":
  sys.exit(main())
