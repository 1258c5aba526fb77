"""The stages of an LM unlearning run, each resumable from its checkpoint.

Imported only after :mod:`unlearn_lm.cli` has set ``XLA_FLAGS`` (it imports JAX).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import dualoptax
from unlearn_lm import data as lmdata
from unlearn_lm import train
from unlearn_lm.cli import UsageError
from unlearn_lm.metrics import Evaluator
from unlearn_lm.model import LanguageModel
from unlearn_lm.report import atomic_write_text, summarize
from unlearn_lm.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage of one invocation shares.

  Attributes:
    args: the filled and validated flags.
    lm: the model.
    tok: its tokenizer.
    max_len: sequence length.
    mesh: the device mesh, or ``None`` on one device.
    ckpt_root: absolute path of the ``checkpoints/`` folder.
    log: prints one progress line.
  """

  args: argparse.Namespace
  lm: LanguageModel
  tok: ByteTokenizer
  max_len: int
  mesh: Optional[Mesh]
  ckpt_root: str
  log: Callable[[str], None]


def make_mesh(spec: Optional[str], batch_size: int) -> Optional[Mesh]:
  """The ``--mesh`` mesh (``None`` without one); bad specs raise :class:`UsageError`."""
  if not spec:
    return None
  try:
    mesh = train.make_mesh(train.parse_mesh(spec))
  except ValueError as e:
    raise UsageError(str(e)) from None
  if batch_size % mesh.size:
    raise UsageError(
      f"--batch-size={batch_size} must be divisible by the mesh size "
      f"{mesh.size}"
    )
  return mesh


def load_data(args: argparse.Namespace) -> lmdata.UnlearningData:
  """Generated people (default) or the TOFU-format files of ``--data-dir``."""
  try:
    if args.data_dir is None:
      return lmdata.generate_people(args.num_people, seed=args.seed)
    return lmdata.load_tofu(
      args.data_dir,
      args.forget_split,
      args.task_id,
      retain_size=args.retain_size,
      eval_size=args.eval_size,
      seed=args.seed,
    )
  except (ValueError, TypeError) as e:
    raise UsageError(str(e)) from None


def choose_max_len(
  args: argparse.Namespace, data: lmdata.UnlearningData, tok: ByteTokenizer
) -> tuple[int, list[str]]:
  """``--max-len`` or the longest encoded example rounded up to 16 (capped);
  plus a note when some texts are truncated."""
  cap = 128 if args.data_dir is None else (192 if args.quick else 256)
  texts = [
    (qa.question, a)
    for qa in data.finetune_set
    + [x for s in data.eval_sets.values() for x in s]
    for a in (qa.answer, qa.paraphrase, *qa.perturbed_answers)
  ]
  lengths = [
    2 + len(tok.encode(lmdata.PROMPT_TEMPLATE.format(question=q) + a))
    for q, a in texts
  ]
  longest = max(lengths)
  if args.max_len is not None:
    max_len = args.max_len
  else:
    max_len = min(cap, -(-longest // 16) * 16)
  notes = []
  cut = sum(n > max_len + 1 for n in lengths)
  if cut:
    notes.append(
      f"{cut} of {len(lengths)} encoded QA texts are longer than max_len={max_len} "
      f"bytes and are truncated (the answer's tail is cut; ROUGE references are "
      f"the visible part)"
    )
  return max_len, notes


def make_tx(
  name: str, lr: float, wd: float
) -> tuple[optax.GradientTransformation, bool]:
  """The unlearning optimizer ``name`` and whether it takes ``{objective: grads}``."""
  if name == "adam":
    return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd), False
  if name == "dual_optim":
    return dualoptax.dual_optim(lr, weight_decay=wd), True
  if name == "dual_optim_plus":
    return dualoptax.dual_optim_plus(lr, weight_decay=wd), True
  if name == "dual_optim_plus_8bit":
    return dualoptax.dual_optim_plus_8bit(lr, weight_decay=wd), True
  raise ValueError(f"unknown optimizer {name!r}")


def train_or_restore(
  ctx: Context, name: str, examples: Sequence[lmdata.QA]
) -> tuple[Any, Optional[float]]:
  """Fine-tunes a model from scratch on ``examples``, or restores the Orbax
  checkpoint of an earlier invocation with the same data and settings.

  Returns:
    ``(params, seconds)``; ``seconds`` is ``None`` for a restored model.
  """
  args, lm, tok, mesh = ctx.args, ctx.lm, ctx.tok, ctx.mesh
  fingerprint = {
    "examples": [[qa.question, qa.answer] for qa in examples],
    "model": vars(lm.config),
    "steps": args.finetune_steps,
    "lr": args.finetune_lr,
    "batch_size": args.batch_size,
    "seed": args.seed,
  }
  path = os.path.join(ctx.ckpt_root, name)
  meta = path + ".json"
  init = train.place(lm.init(args.seed), mesh)
  if os.path.isdir(path) and os.path.isfile(meta):
    with open(meta, encoding="utf-8") as f:
      if json.load(f) == fingerprint:
        ctx.log(f"[{name}] reusing the Orbax checkpoint {path}")
        return train.restore_pytree(path, init), None
    raise UsageError(
      f"{path} was trained with other data or settings; use another --out"
    )
  chunk_steps = min(100, args.finetune_steps)
  steps = -(-args.finetune_steps // chunk_steps) * chunk_steps
  warmup = max(1, steps // 20)
  sched = optax.warmup_cosine_decay_schedule(
    0.0, args.finetune_lr, warmup, steps, args.finetune_lr * 0.05
  )
  tx = optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.0)
  enc = jax.tree.map(
    jnp.asarray,
    lmdata.encode_qa(
      tok,
      [qa.question for qa in examples],
      [qa.answer for qa in examples],
      ctx.max_len,
    ),
  )
  chunk = train.make_finetune_chunk(
    lm,
    tx,
    batch_size=args.batch_size,
    seed=args.seed,
    chunk_steps=chunk_steps,
    mesh=mesh,
  )
  state = train.place(train.TrainState(jnp.int32(0), init, tx.init(init)), mesh)
  t0 = time.time()
  for _ in range(steps // chunk_steps):
    state, losses = chunk(state, enc)
    ctx.log(
      f"[{name}] step {int(state.step):5d}  loss {float(losses.mean()):.4f}  "
      f"({time.time() - t0:.0f}s)"
    )
  seconds = time.time() - t0
  train.save_pytree(path, state.params)
  atomic_write_text(meta, json.dumps(fingerprint))
  return state.params, seconds


def unlearning_data(
  ctx: Context, data: lmdata.UnlearningData, ft_params: Any
) -> dict:
  """Encoded forget and retain sets and the fine-tuned model's forget NLL (NPO's
  frozen reference)."""
  enc = lambda qas: lmdata.encode_qa(
    ctx.tok, [qa.question for qa in qas], [qa.answer for qa in qas], ctx.max_len
  )
  fenc, renc = enc(data.forget), enc(data.retain)
  return {
    "forget": jax.tree.map(jnp.asarray, fenc),
    "retain": jax.tree.map(jnp.asarray, renc),
    "ref_nll": train.reference_sequence_nll(ctx.lm, ft_params, fenc),
  }


@dataclasses.dataclass
class UnlearnResult:
  """One optimizer's run: its history (one record per chunk), the seconds it
  took, and whether ``--max-chunks`` stopped it early."""

  history: list
  seconds: float
  stopped: bool


def unlearn(
  ctx: Context,
  name: str,
  ft_params: Any,
  udata: dict,
  evaluator: Evaluator,
  ref_ratios: np.ndarray,
  before: dict,
) -> UnlearnResult:
  """Unlearns from ``ft_params`` with optimizer ``name``, one jitted chunk at a
  time, evaluating every ``--eval-every`` steps and checkpointing every chunk
  (``--resume`` continues from the latest checkpoint)."""
  args, mesh = ctx.args, ctx.mesh
  tx, multi = make_tx(name, args.lr, args.weight_decay)
  params0 = jax.tree.map(
    lambda x: x.copy(), ft_params
  )  # the chunk donates its input
  state = train.place(
    train.TrainState(jnp.int32(0), params0, tx.init(params0)), mesh
  )
  ckdir = os.path.join(ctx.ckpt_root, f"unlearn_{name}_{args.forget_loss}")
  if not args.resume and os.path.isdir(ckdir):
    shutil.rmtree(
      ckdir
    )  # a fresh run replaces an old one (use --resume to continue it)
  ck = train.RunCheckpointer(ckdir)
  history = [dict(before)]
  if args.resume and ck.latest_step() is not None:
    state, history = ck.restore(ck.latest_step(), state)
    ctx.log(f"[{name}] resumed at step {int(state.step)}")
  chunk = train.make_unlearn_chunk(
    ctx.lm,
    tx,
    multi_objective=multi,
    forget_loss=args.forget_loss,
    batch_size=args.batch_size,
    seed=args.seed + 1,
    chunk_steps=args.chunk_steps,
    forget_freq=args.forget_freq,
    retain_freq=args.retain_freq,
    mesh=mesh,
  )
  t0, done, stopped = time.time(), 0, False
  while int(state.step) < args.unlearn_steps:
    state, (losses, index) = chunk(state, udata)
    step = int(state.step)
    losses, index = np.asarray(losses), np.asarray(index)
    rec = {
      "step": step,
      "forget_loss": float(losses[index == 0].mean())
      if (index == 0).any()
      else None,
      "retain_loss": float(losses[index == 1].mean())
      if (index == 1).any()
      else None,
    }
    if step % args.eval_every == 0 or step == args.unlearn_steps:
      rec.update(summarize(evaluator.evaluate(state.params, ref_ratios)))
      ctx.log(
        f"[{name}] step {step:4d}  FQ {rec['forget_quality']:.3g}  "
        f"MU {rec['model_utility']:.3f}  FE {rec['forget_efficacy']:.3f}  "
        f"forget prob {rec['forget/prob']:.3f}  ({time.time() - t0:.0f}s)"
      )
    history.append(rec)
    ck.save(step, state, history)
    done += 1
    if (
      args.max_chunks is not None
      and done >= args.max_chunks
      and step < args.unlearn_steps
    ):
      stopped = True
      ctx.log(
        f"[{name}] stopped after {done} chunk(s) at step {step} (--max-chunks); "
        f"rerun with --resume to continue"
      )
      break
  ck.close()
  return UnlearnResult(history, time.time() - t0, stopped)
