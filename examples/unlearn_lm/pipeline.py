"""The stages of an LM unlearning run, each resumable from its checkpoint.

Imported only after :mod:`unlearn_lm.cli` has set ``XLA_FLAGS`` (it imports JAX).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax
from unlearn_lm import data as lmdata
from unlearn_lm import train
from unlearn_lm.cli import UsageError
from unlearn_lm.metrics import Evaluator
from unlearn_lm.model import LanguageModel
from unlearn_lm.report import atomic_write_text, summarize
from unlearn_lm.tokenizer import ByteTokenizer, SubwordTokenizer

Tokenizer = ByteTokenizer | SubwordTokenizer


@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage of one invocation shares.

  Attributes:
    args: the filled and validated flags.
    lm: the model.
    tok: its tokenizer.
    max_len: sequence length.
    ckpt_root: absolute path of the ``checkpoints/`` folder.
    log: prints one progress line.
  """

  args: argparse.Namespace
  lm: LanguageModel
  tok: Tokenizer
  max_len: int
  ckpt_root: str
  log: Callable[[str], None]


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


def make_tokenizer(
  args: argparse.Namespace, data: lmdata.UnlearningData, saved: str
) -> Tokenizer:
  """``--tokenizer``: bytes, or a BPE of ``--vocab-size`` ids trained on the
  fine-tuning texts (prompt + answer); a BPE saved at ``saved`` by an earlier
  invocation is reused, so its checkpoints stay valid."""
  if args.tokenizer == "byte":
    return ByteTokenizer()
  if os.path.isfile(saved):
    with open(saved, encoding="utf-8") as f:
      return SubwordTokenizer.from_json(f.read())
  texts = [
    lmdata.PROMPT_TEMPLATE.format(question=qa.question) + qa.answer
    for qa in data.finetune_set
  ]
  return SubwordTokenizer.train(texts, args.vocab_size)


def choose_lengths(
  args: argparse.Namespace, data: lmdata.UnlearningData, tok: Tokenizer
) -> tuple[int, int, list[str]]:
  """Sequence length, generation-prompt width and notes.

  The length is ``--max-len``, or the smallest multiple of 16 that truncates at
  most 1% of the encoded texts (every answer, paraphrase and perturbed answer of
  the training and evaluation sets), capped at 256. The prompt width is the
  longest encoded prompt rounded up to 8 (at most half the length), so greedy
  answers get the rest.
  """
  texts = [
    (qa.question, a)
    for qa in data.finetune_set
    + [x for s in data.eval_sets.values() for x in s]
    for a in (qa.answer, qa.paraphrase, *qa.perturbed_answers)
  ]
  prompt = lambda q: tok.encode(lmdata.PROMPT_TEMPLATE.format(question=q))
  lengths = np.array(
    [2 + len(prompt(q)) + len(tok.encode(a)) for q, a in texts]
  )
  if args.max_len is not None:
    max_len = args.max_len
  else:
    need = int(np.ceil(np.quantile(lengths - 1, 0.99)))
    max_len = min(256, max(16, -(-need // 16) * 16))
  widest = max(1 + len(prompt(q)) for q, _ in texts)
  prompt_len = min(max_len // 2, -(-widest // 8) * 8)
  cut = int(np.sum(lengths > max_len + 1))
  notes = [
    f"tokenizer: {type(tok).__name__} ({tok.vocab_size} ids); sequence length "
    f"{max_len}: {cut} of {len(lengths)} encoded QA texts ({cut / len(lengths):.1%}) "
    f"are longer and truncated (the answer's tail is cut; ROUGE references are "
    f"the visible part); generation prompts {prompt_len} ids"
  ]
  return max_len, prompt_len, notes


_FACTORIES = {
  "adam": (
    lambda learning_rate, weight_decay: optax.adamw(
      learning_rate, b1=0.9, b2=0.95, weight_decay=weight_decay
    ),
    False,
  ),
  "dual_optim": (dualoptax.dual_optim, True),
  "dual_optim_plus": (dualoptax.dual_optim_plus, True),
  "dual_optim_plus_unstable": (
    functools.partial(dualoptax.dual_optim_plus, stable=False),
    True,
  ),
  "dual_optim_plus_8bit": (dualoptax.dual_optim_plus_8bit, True),
}


def make_tx(
  name: str, lr: Any, wd: float
) -> tuple[optax.GradientTransformation, bool]:
  """The unlearning optimizer ``name`` and whether it takes ``{objective: grads}``.

  The learning rate and weight decay are injected hyperparameters
  (``optax.inject_hyperparams``): they live in the state, so a sweep can stack
  states of different learning rates and ``vmap`` one update over them. Adam
  keeps one state for both objectives; its betas are the authors' (0.9, 0.95),
  the defaults of DualOptim(+).
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown optimizer {name!r}")
  factory, multi = _FACTORIES[name]
  static = dualoptax.STATIC_8BIT_ARGS if name.endswith("8bit") else ()
  inject = optax.inject_hyperparams(factory, static_args=static)
  return inject(learning_rate=lr, weight_decay=wd), multi


def train_or_restore(
  ctx: Context, name: str, examples: Sequence[lmdata.QA]
) -> tuple[Any, Optional[float]]:
  """Fine-tunes a model from scratch on ``examples``, or restores the Orbax
  checkpoint of an earlier invocation with the same data and settings.

  Returns:
    ``(params, seconds)``; ``seconds`` is ``None`` for a restored model.
  """
  args, lm, tok = ctx.args, ctx.lm, ctx.tok
  fingerprint = {
    "tokenizer": hashlib.sha256(
      getattr(tok, "to_json", lambda: "bytes")().encode()
    ).hexdigest(),
    "examples": [[qa.question, qa.answer] for qa in examples],
    "model": vars(lm.config),
    "steps": args.finetune_steps,
    "lr": args.finetune_lr,
    "batch_size": args.batch_size,
    "seed": args.seed,
  }
  path = os.path.join(ctx.ckpt_root, name)
  meta = path + ".json"
  init = lm.init(args.seed)
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
  )
  state = train.TrainState(jnp.int32(0), init, tx.init(init))
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
class SweepResult:
  """The runs of one optimizer and forget loss over the learning rates and seeds.

  Attributes:
    runs: one dict per (lr, seed): ``optimizer``, ``forget_loss``, ``lr``,
      ``seed``, the final ``forget_efficacy``, ``model_utility``,
      ``forget_quality``, and ``history`` (one record per chunk; the
      evaluated ones hold every metric, the last of them the final values).
    seconds: wall time, compilation included.
    stopped: whether ``--max-chunks`` stopped it early.
  """

  runs: list
  seconds: float
  stopped: bool


def sweep(
  ctx: Context,
  name: str,
  forget_loss: str,
  ft_params: Any,
  udata: dict,
  evaluator: Evaluator,
  ref_ratios: np.ndarray,
  before: dict,
) -> SweepResult:
  """Unlearns from ``ft_params`` with optimizer ``name`` at every ``--lrs`` and
  ``--seeds`` at once: their states are stacked on a leading member axis and one
  ``vmap``-ed chunk advances them all (seed ``s`` draws the batch order; every
  lr sees the same orders). Evaluates every ``--eval-every`` steps and
  checkpoints every chunk (``--resume`` continues from the latest checkpoint).
  """
  args = ctx.args
  members = [(lr, seed) for lr in args.lrs for seed in range(args.seeds)]
  lrs = jnp.asarray([lr for lr, _ in members], jnp.float32)
  seeds = jnp.asarray([1000 + seed for _, seed in members], jnp.int32)
  tx, multi = make_tx(name, 1.0, args.weight_decay)
  stack = lambda x: jnp.repeat(x[None], len(members), axis=0)
  params = jax.tree.map(stack, ft_params)
  opt_state = jax.vmap(
    lambda p, lr: make_tx(name, lr, args.weight_decay)[0].init(p)
  )(params, lrs)
  state = train.TrainState(jnp.int32(0), params, opt_state)
  ckdir = os.path.join(ctx.ckpt_root, f"unlearn_{name}_{forget_loss}")
  if not args.resume and os.path.isdir(ckdir):
    shutil.rmtree(ckdir)  # a fresh run replaces an old one
  ck = train.RunCheckpointer(ckdir)
  histories = [[dict(before)] for _ in members]
  if args.resume and ck.latest_step() is not None:
    state, histories = ck.restore(ck.latest_step(), state)
    ctx.log(f"[{name} {forget_loss}] resumed at step {int(state.step)}")
  chunk = train.make_unlearn_sweep_chunk(
    ctx.lm,
    tx,
    multi_objective=multi,
    forget_loss=forget_loss,
    batch_size=args.batch_size,
    chunk_steps=args.chunk_steps,
    forget_freq=args.forget_freq,
    retain_freq=args.retain_freq,
  )
  t0, done, stopped = time.time(), 0, False
  while int(state.step) < args.unlearn_steps:
    state, (losses, index) = chunk(state, seeds, udata)
    step = int(state.step)
    losses, index = np.asarray(losses), np.asarray(index[0])
    recs = [
      {
        "step": step,
        "forget_loss": _mean_or_none(losses[i][index == 0]),
        "retain_loss": _mean_or_none(losses[i][index == 1]),
      }
      for i in range(len(members))
    ]
    if step % args.eval_every == 0 or step == args.unlearn_steps:
      evals = evaluator.evaluate_many(state.params, ref_ratios)
      for rec, ev in zip(recs, evals):
        rec.update(summarize(ev))
      fe = np.array([r["forget_efficacy"] for r in recs])
      mu = np.array([r["model_utility"] for r in recs])
      ctx.log(
        f"[{name} {forget_loss}] step {step:4d}  FE {fe.min():.3f}..{fe.max():.3f}  "
        f"MU {mu.min():.3f}..{mu.max():.3f}  ({time.time() - t0:.0f}s)"
      )
    for hist, rec in zip(histories, recs):
      hist.append(rec)
    ck.save(step, state, histories)
    done += 1
    if (
      args.max_chunks is not None
      and done >= args.max_chunks
      and step < args.unlearn_steps
    ):
      stopped = True
      ctx.log(
        f"[{name} {forget_loss}] stopped after {done} chunk(s) at step {step} "
        f"(--max-chunks); rerun with --resume to continue"
      )
      break
  ck.close()
  runs = []
  for (lr, seed), hist in zip(members, histories):
    final = next(h for h in reversed(hist) if "model_utility" in h)
    runs.append(
      {
        "optimizer": name,
        "forget_loss": forget_loss,
        "lr": lr,
        "seed": seed,
        "forget_efficacy": final["forget_efficacy"],
        "model_utility": final["model_utility"],
        "forget_quality": final["forget_quality"],
        "history": hist,
      }
    )
  return SweepResult(runs, time.time() - t0, stopped)


def _mean_or_none(x: np.ndarray) -> Optional[float]:
  return float(x.mean()) if x.size else None
