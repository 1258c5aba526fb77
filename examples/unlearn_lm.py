r"""TOFU-style unlearning of a small Flax NNX transformer with Adam, DualOptim, DualOptim+
and DualOptim+ 8bit, under the authors' 1:5 alternating schedule.

Pipeline (all shapes static; every loop a jitted ``lax.scan`` chunk):

1. data: generated fictitious people (default) or TOFU-format files (``--data-dir``);
2. fine-tune a byte-level transformer on forget + retain + general-knowledge QA pairs
   (Orbax checkpoint, reused by every optimizer run and by later invocations with the
   same ``--out`` and settings), and train a retain-only model the same way (the
   reference of TOFU's Forget Quality);
3. for each optimizer, unlearn the forget set with NPO+GD (``--forget-loss ga|me`` for
   GA+GD, ME+GD): forget step, 5 retain steps, repeat; Adam keeps one shared state;
   checkpoint after every chunk (``--resume`` continues exactly);
4. evaluate (SPEC §5) every ``--eval-every`` steps; write ``results.json``,
   ``metrics.png`` and print a table.

Examples::

  python examples/unlearn_lm.py --quick
  python examples/unlearn_lm.py --quick --data-dir ../shared/data/tofu --forget-split forget01 --task-id 1
  python examples/unlearn_lm.py --quick --mesh data=2,fsdp=4      # 8 simulated CPU devices

``--mesh`` with more devices than exist on a CPU host sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` *before* JAX starts (the script
imports JAX only after parsing its arguments); on a TPU/GPU host the mesh must fit the
real devices.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Optional

OPTIMIZERS = ("adam", "dual_optim", "dual_optim_plus", "dual_optim_plus_8bit")
LABELS = {"adam": "Adam (shared state)", "dual_optim": "DualOptim",
          "dual_optim_plus": "DualOptim+", "dual_optim_plus_8bit": "DualOptim+ 8bit"}


class UsageError(Exception):
  """Bad input: reported as one line, nothing written."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = p.add_argument_group("data")
  d.add_argument("--data-dir", default=None,
                 help="TOFU-format directory (default: generated fictitious people)")
  d.add_argument("--forget-split", default="forget01", help="forget01 | forget05 | forget10")
  d.add_argument("--task-id", type=int, default=1, help="forget task id inside the split (1..10)")
  d.add_argument("--retain-size", type=int, default=None,
                 help="TOFU: subsample the retain training set (--quick: 200)")
  d.add_argument("--eval-size", type=int, default=None,
                 help="TOFU: subsample non-forget eval sets (--quick: 40)")
  d.add_argument("--num-people", type=int, default=20, help="generated data: people")
  u = p.add_argument_group("unlearning")
  u.add_argument("--forget-loss", default="npo", choices=("npo", "ga", "me"),
                 help="forget objective, paired with GD on the retain set")
  u.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
  u.add_argument("--lr", type=float, default=None, help="unlearning learning rate")
  u.add_argument("--weight-decay", type=float, default=0.01)
  u.add_argument("--unlearn-steps", type=int, default=None)
  u.add_argument("--forget-freq", type=int, default=1)
  u.add_argument("--retain-freq", type=int, default=5)
  u.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
  u.add_argument("--chunk-steps", type=int, default=None,
                 help="steps per jitted chunk (= checkpoint interval; divides --eval-every)")
  m = p.add_argument_group("model and fine-tuning")
  m.add_argument("--d-model", type=int, default=None)
  m.add_argument("--layers", type=int, default=2)
  m.add_argument("--heads", type=int, default=4)
  m.add_argument("--max-len", type=int, default=None,
                 help="sequence length (default: longest example rounded up to 16, capped "
                      "at 128 for generated data and 256 for TOFU, 192 with --quick)")
  m.add_argument("--finetune-steps", type=int, default=None)
  m.add_argument("--finetune-lr", type=float, default=3e-3)
  m.add_argument("--batch-size", type=int, default=16)
  r = p.add_argument_group("run")
  r.add_argument("--quick", action="store_true", help="small settings, <= 10 min on 2 CPU cores")
  r.add_argument("--out", default=None, help="output directory (default runs/unlearn_lm[_tofu])")
  r.add_argument("--resume", action="store_true", help="continue interrupted unlearning runs")
  r.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4: shard over a device mesh")
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--max-chunks", type=int, default=None,
                 help="stop each optimizer run after this many new chunks (simulates an "
                      "interruption; continue with --resume)")
  r.add_argument("--no-plot", action="store_true")
  return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
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
  names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if not names or unknown:
    raise UsageError(f"--optimizers: unknown {unknown or 'empty list'}; choose from {OPTIMIZERS}")
  for name in ("unlearn_steps", "chunk_steps", "eval_every", "finetune_steps", "batch_size",
               "d_model", "layers", "heads", "forget_freq", "retain_freq"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.eval_every % args.chunk_steps:
    raise UsageError(f"--chunk-steps={args.chunk_steps} must divide --eval-every={args.eval_every}")
  if args.unlearn_steps % args.chunk_steps:
    raise UsageError(f"--chunk-steps={args.chunk_steps} must divide "
                     f"--unlearn-steps={args.unlearn_steps}")
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
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def to_jsonable(x: Any) -> Any:
  import numpy as np
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def summarize(ev: dict) -> dict:
  """Flat scalar metrics of an :meth:`Evaluator.evaluate` result."""
  out = {"model_utility": ev["model_utility"], "forget_efficacy": ev["forget_efficacy"],
         "forget_quality": ev["forget_quality"]}
  for name, s in ev["sets"].items():
    for k in ("prob", "rouge_l", "truth_ratio"):
      out[f"{name}/{k}"] = s[k]
  return out


def load_data(args):
  from dualoptax.lm import data as lmdata
  try:
    if args.data_dir is None:
      return lmdata.generate_people(args.num_people, seed=args.seed)
    return lmdata.load_tofu(args.data_dir, args.forget_split, args.task_id,
                            retain_size=args.retain_size, eval_size=args.eval_size,
                            seed=args.seed)
  except (ValueError, TypeError) as e:
    raise UsageError(str(e)) from None


def choose_max_len(args, data, tok) -> tuple[int, list[str]]:
  from dualoptax.lm.data import PROMPT_TEMPLATE
  cap = 128 if args.data_dir is None else (192 if args.quick else 256)
  texts = [(qa.question, a) for qa in data.finetune_set + [x for s in data.eval_sets.values()
                                                              for x in s]
           for a in (qa.answer, qa.paraphrase, *qa.perturbed_answers)]
  lengths = [2 + len(tok.encode(PROMPT_TEMPLATE.format(question=q) + a)) for q, a in texts]
  longest = max(lengths)
  if args.max_len is not None:
    max_len = args.max_len
  else:
    max_len = min(cap, -(-longest // 16) * 16)
  notes = []
  cut = sum(n > max_len + 1 for n in lengths)
  if cut:
    notes.append(f"{cut} of {len(lengths)} encoded QA texts are longer than max_len={max_len} "
                 f"bytes and are truncated (the answer's tail is cut; ROUGE references are "
                 f"the visible part)")
  return max_len, notes


def make_tx(name: str, lr: float, wd: float):
  import optax
  import dualoptax
  if name == "adam":
    return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd), False
  if name == "dual_optim":
    return dualoptax.dual_optim(lr, weight_decay=wd), True
  if name == "dual_optim_plus":
    return dualoptax.dual_optim_plus(lr, weight_decay=wd), True
  fn = getattr(dualoptax, "dual_optim_plus_8bit", None)
  if fn is None:
    from dualoptax.quantized_state import dual_optim_plus_8bit as fn
  return fn(lr, weight_decay=wd), True


def train_or_restore(name, examples, args, lm, tok, mesh, ckpt_root, max_len, log):
  """Fine-tunes (or restores) a model; returns its parameters."""
  import jax
  import jax.numpy as jnp
  import optax
  from dualoptax.lm import train
  from dualoptax.lm.data import encode_qa
  fingerprint = {"examples": [[qa.question, qa.answer] for qa in examples],
                 "model": vars(lm.config), "steps": args.finetune_steps,
                 "lr": args.finetune_lr, "batch_size": args.batch_size, "seed": args.seed}
  path = os.path.join(ckpt_root, name)
  meta = path + ".json"
  init = train.place(lm.init(args.seed), mesh)
  if os.path.isdir(path) and os.path.isfile(meta):
    with open(meta, encoding="utf-8") as f:
      if json.load(f) == fingerprint:
        log(f"[{name}] reusing the Orbax checkpoint {path}")
        return train.restore_pytree(path, init), None
    raise UsageError(f"{path} was trained with other data or settings; use another --out")
  chunk_steps = min(100, args.finetune_steps)
  steps = -(-args.finetune_steps // chunk_steps) * chunk_steps
  warmup = max(1, steps // 20)
  sched = optax.warmup_cosine_decay_schedule(0.0, args.finetune_lr, warmup, steps,
                                             args.finetune_lr * 0.05)
  tx = optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.0)
  enc = jax.tree.map(jnp.asarray, encode_qa(tok, [qa.question for qa in examples],
                                            [qa.answer for qa in examples], max_len))
  chunk = train.make_finetune_chunk(lm, tx, batch_size=args.batch_size, seed=args.seed,
                                    chunk_steps=chunk_steps, mesh=mesh)
  state = train.place(train.TrainState(jnp.int32(0), init, tx.init(init)), mesh)
  t0 = time.time()
  for _ in range(steps // chunk_steps):
    state, losses = chunk(state, enc)
    log(f"[{name}] step {int(state.step):5d}  loss {float(losses.mean()):.4f}  "
        f"({time.time() - t0:.0f}s)")
  seconds = time.time() - t0
  train.save_pytree(path, state.params)
  atomic_write_text(meta, json.dumps(fingerprint))
  return state.params, seconds


def plot(histories: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [("forget/prob", "forget answer probability"), ("forget/rouge_l", "forget ROUGE-L recall"),
            ("forget/truth_ratio", "forget truth ratio (1 - mean min(R, 1/R))"),
            ("forget_quality", "Forget Quality (KS p-value, log)"),
            ("model_utility", "Model Utility"), ("forget_efficacy", "Forget Efficacy")]
  fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
  for ax, (key, label) in zip(axes.ravel(), panels):
    for name, hist in histories.items():
      pts = [(h["step"], h[key]) for h in hist if h.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=LABELS[name])
    if key == "forget_quality":
      ax.set_yscale("log")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("unlearning step")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def format_table(rows: list[tuple[str, dict, Optional[float]]], forget_name="forget") -> str:
  cols = [("FQ", "forget_quality", "{:.3g}"), ("MU", "model_utility", "{:.3f}"),
          ("FE", "forget_efficacy", "{:.3f}"), ("F prob", f"{forget_name}/prob", "{:.3f}"),
          ("F ROUGE", f"{forget_name}/rouge_l", "{:.3f}"),
          ("F TR", f"{forget_name}/truth_ratio", "{:.3f}"),
          ("R prob", "retain/prob", "{:.3f}"), ("R ROUGE", "retain/rouge_l", "{:.3f}")]
  header = f"| {'model':<24} | " + " | ".join(f"{c:>7}" for c, _, _ in cols) + " | wall s |"
  lines = [header, "|" + "|".join("-" * (len(h) + 0) for h in header.split("|")[1:-1]) + "|"]
  for label, m, secs in rows:
    vals = [("—" if m.get(k) is None else f.format(m[k])) for _, k, f in cols]
    wall = "—" if secs is None else f"{secs:.0f}"
    lines.append(f"| {label:<24} | " + " | ".join(f"{v:>7}" for v in vals) + f" | {wall:>6} |")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  args = fill_defaults(build_parser().parse_args(argv))
  t_start = time.time()
  try:
    names = validate(args)
    ensure_host_devices(mesh_device_count(args.mesh))
    return run(args, names, t_start)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run(args, names, t_start) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dualoptax.lm import train
  from dualoptax.lm.data import encode_qa
  from dualoptax.lm.metrics import Evaluator
  from dualoptax.lm.model import LanguageModel, TransformerConfig
  from dualoptax.lm.tokenizer import ByteTokenizer

  log = lambda msg: print(msg, flush=True)
  # ---- everything that can fail on bad input happens before the output directory exists
  mesh = None
  if args.mesh:
    try:
      mesh = train.make_mesh(train.parse_mesh(args.mesh))
    except ValueError as e:
      raise UsageError(str(e)) from None
    if args.batch_size % mesh.size:
      raise UsageError(f"--batch-size={args.batch_size} must be divisible by the mesh size "
                       f"{mesh.size}")
  data = load_data(args)
  tok = ByteTokenizer()
  max_len, len_notes = choose_max_len(args, data, tok)
  notes = list(data.notes) + len_notes
  try:
    cfg = TransformerConfig(vocab_size=tok.vocab_size, max_len=max_len, d_model=args.d_model,
                            num_layers=args.layers, num_heads=args.heads)
  except ValueError as e:
    raise UsageError(str(e)) from None
  lm = LanguageModel(cfg)
  evaluator = Evaluator(lm, tok, data, max_len)

  os.makedirs(args.out, exist_ok=True)
  ckpt_root = os.path.abspath(os.path.join(args.out, "checkpoints"))
  os.makedirs(ckpt_root, exist_ok=True)
  log(f"data: {data.summary()}")
  for n in notes:
    log(f"note: {n}")
  log(f"model: {cfg}; devices: {len(jax.devices())}; mesh: {args.mesh or 'none'}")

  # ---- fine-tuned model and retain-only reference model
  ft_params, ft_secs = train_or_restore("finetuned", data.finetune_set, args, lm, tok, mesh,
                                        ckpt_root, max_len, log)
  ro_params, ro_secs = train_or_restore("retain_only", data.retain_only_set, args, lm, tok,
                                        mesh, ckpt_root, max_len, log)
  ro_eval = evaluator.evaluate(ro_params)
  ref_ratios = ro_eval["forget_ratios"]
  ro_eval = evaluator.evaluate(ro_params, ref_ratios)
  ft_eval = evaluator.evaluate(ft_params, ref_ratios)
  base = {"step": 0, **summarize(ft_eval)}
  log(f"fine-tuned: {json.dumps({k: round(v, 4) for k, v in base.items() if v is not None})}")
  for name, (ref, gen) in (("forget", ft_eval["sets"]["forget"]["samples"][0]),
                           ("retain", ft_eval["sets"]["retain"]["samples"][0])):
    log(f"  {name} sample: ref={ref!r}\n  {' ' * len(name)}         gen={gen!r}")

  # ---- unlearning
  fenc = encode_qa(tok, [qa.question for qa in data.forget], [qa.answer for qa in data.forget],
                   max_len)
  renc = encode_qa(tok, [qa.question for qa in data.retain], [qa.answer for qa in data.retain],
                   max_len)
  udata = {"forget": jax.tree.map(jnp.asarray, fenc), "retain": jax.tree.map(jnp.asarray, renc),
           "ref_nll": train.reference_sequence_nll(lm, ft_params, fenc)}
  histories, walls, finals, stopped = {}, {}, {}, False
  for name in names:
    tx, multi = make_tx(name, args.lr, args.weight_decay)
    params0 = jax.tree.map(lambda x: x.copy(), ft_params)  # the chunk donates its input
    state = train.place(train.TrainState(jnp.int32(0), params0, tx.init(params0)), mesh)
    ckdir = os.path.join(ckpt_root, f"unlearn_{name}_{args.forget_loss}")
    if not args.resume and os.path.isdir(ckdir):
      shutil.rmtree(ckdir)  # a fresh run replaces an old one (use --resume to continue it)
    ck = train.RunCheckpointer(ckdir)
    history = [dict(base)]
    if args.resume and ck.latest_step() is not None:
      state, history = ck.restore(ck.latest_step(), state)
      log(f"[{name}] resumed at step {int(state.step)}")
    chunk = train.make_unlearn_chunk(
        lm, tx, multi_objective=multi, forget_loss=args.forget_loss,
        batch_size=args.batch_size, seed=args.seed + 1, chunk_steps=args.chunk_steps,
        forget_freq=args.forget_freq, retain_freq=args.retain_freq, mesh=mesh)
    t0, done = time.time(), 0
    while int(state.step) < args.unlearn_steps:
      state, (losses, index) = chunk(state, udata)
      step = int(state.step)
      losses, index = np.asarray(losses), np.asarray(index)
      rec = {"step": step,
             "forget_loss": float(losses[index == 0].mean()) if (index == 0).any() else None,
             "retain_loss": float(losses[index == 1].mean()) if (index == 1).any() else None}
      if step % args.eval_every == 0 or step == args.unlearn_steps:
        rec.update(summarize(evaluator.evaluate(state.params, ref_ratios)))
        log(f"[{name}] step {step:4d}  FQ {rec['forget_quality']:.3g}  "
            f"MU {rec['model_utility']:.3f}  FE {rec['forget_efficacy']:.3f}  "
            f"forget prob {rec['forget/prob']:.3f}  ({time.time() - t0:.0f}s)")
      history.append(rec)
      ck.save(step, state, history)
      done += 1
      if args.max_chunks is not None and done >= args.max_chunks and step < args.unlearn_steps:
        stopped = True
        break
    ck.close()
    walls[name] = time.time() - t0
    histories[name] = history
    finals[name] = next(h for h in reversed(history) if "model_utility" in h)
    if stopped:
      log(f"[{name}] stopped after {done} chunk(s) at step {int(state.step)} (--max-chunks); "
          f"rerun with --resume to continue")
      return 0

  # ---- outputs
  title = (f"{data.source}: {args.forget_loss.upper()}+GD, lr {args.lr:g}, "
           f"{args.forget_freq}:{args.retain_freq} schedule")
  rows = [("fine-tuned (before)", base, ft_secs),
          ("retain-only (reference)", summarize(ro_eval), ro_secs)]
  rows += [(LABELS[n], finals[n], walls[n]) for n in names]
  table = format_table(rows)
  results = {
      "config": vars(args), "data": data.summary(), "notes": notes,
      "model": vars(cfg), "finetuned": base, "retain_only": summarize(ro_eval),
      "final": finals, "history": histories, "wall_seconds": {
          "finetune": ft_secs, "retain_only": ro_secs, **walls,
          "total": time.time() - t_start},
  }
  atomic_write_text(os.path.join(args.out, "results.json"),
                    json.dumps(to_jsonable(results), indent=1))
  if not args.no_plot:
    plot(histories, os.path.join(args.out, "metrics.png"), title)
  log("\n" + title)
  log(table)
  log("FQ: Forget Quality (KS p-value vs the retain-only model; higher = closer to never having "
      "seen the forget set); MU: Model Utility; FE: Forget Efficacy; F/R: forget/retain set; "
      "TR: truth-ratio value; wall s: unlearning (or training) time incl. compilation.")
  log(f"total wall time {time.time() - t_start:.0f}s; outputs in {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
