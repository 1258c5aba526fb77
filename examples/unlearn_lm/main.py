r"""TOFU-style unlearning study of a small Flax NNX transformer: Adam, DualOptim,
DualOptim+ (stable default and the published ``stable=False`` rule) and
DualOptim+ 8bit, under the authors' 1:5 alternating schedule, over a sweep of
learning rates and seeds.

1. data: generated fictitious people (default) or TOFU-format files
   (``--data-dir``, ``--forget-split``, ``--task-id``); a byte-level BPE
   tokenizer trained on the fine-tuning texts (``--tokenizer byte``: raw bytes);
2. fine-tune the model on forget + retain + general-knowledge QA pairs and
   check that it learned them (greedy ROUGE-L >= 0.9 on the forget set, >= 0.8 on
   the retain set), and train a retain-only model with the same recipe (the
   reference of TOFU's Forget Quality); both are Orbax checkpoints reused by
   later invocations with the same ``--out`` and settings;
3. for every forget loss (``--forget-losses``, NPO+GD and GA+GD by default) and
   optimizer, unlearn the fine-tuned model at every ``--lrs`` and ``--seeds``
   (batch orders) at once (``vmap``): forget step, 5 retain steps, repeat;
   Adam keeps one shared state; evaluate every ``--eval-every`` steps;
   checkpoint every chunk (``--resume`` continues exactly);
4. write ``results.json`` (``finetuned``, ``retain_only``, every run's final
   and per-evaluation metrics), ``fe_mu.png`` and ``fq_mu.png`` (the FE–MU and
   FQ–MU fronts over the sweep), and print each optimizer at its best Forget
   Efficacy among the learning rates whose Model Utility is >= 0.9 x the
   fine-tuned model's. Progress lines go to stderr, results to stdout.

Examples::

  python examples/unlearn_lm/main.py --quick
  python examples/unlearn_lm/main.py --data-dir path/to/tofu --forget-split forget01 --task-id 1 --out runs/tofu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

if not __package__:  # run as a script: make the folder importable as a package
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from unlearn_lm import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the study; returns the exit status (2 on bad input, nothing written)."""
  args = cli.fill_defaults(
    cli.build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
  )
  t_start = time.time()
  try:
    names = cli.validate(args)
    return run(args, names, t_start)
  except cli.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


ROUGE_TARGETS = {"forget": 0.9, "retain": 0.8}


def run(args: argparse.Namespace, names: list[str], t_start: float) -> int:
  """The study (JAX is imported here, after the flags are checked)."""
  from unlearn_lm import pipeline, report
  from unlearn_lm.metrics import Evaluator, forget_quality
  from unlearn_lm.model import LanguageModel, TransformerConfig

  # progress lines (training steps, checkpoints) go to stderr, results to stdout
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  say = lambda msg: print(msg, flush=True)
  # ---- everything that can fail on bad input happens before the output directory exists
  data = pipeline.load_data(args)
  ckpt_root = os.path.abspath(os.path.join(args.out, "checkpoints"))
  tok_path = os.path.join(ckpt_root, "tokenizer.json")
  tok = pipeline.make_tokenizer(args, data, tok_path)
  max_len, prompt_len, len_notes = pipeline.choose_lengths(args, data, tok)
  notes = list(data.notes) + len_notes
  try:
    cfg = TransformerConfig(
      vocab_size=tok.vocab_size,
      max_len=max_len,
      d_model=args.d_model,
      num_layers=args.layers,
      num_heads=args.heads,
    )
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  lm = LanguageModel(cfg)
  evaluator = Evaluator(lm, tok, data, max_len, prompt_len=prompt_len)

  os.makedirs(ckpt_root, exist_ok=True)
  if hasattr(tok, "to_json") and not os.path.isfile(tok_path):
    report.atomic_write_text(tok_path, tok.to_json())
  ctx = pipeline.Context(args, lm, tok, max_len, ckpt_root, log)
  say(f"data: {data.summary()}")
  for n in notes:
    say(f"note: {n}")
  say(f"model: {cfg}")

  # ---- fine-tuned model and retain-only reference model
  ft_params, ft_secs = pipeline.train_or_restore(
    ctx, "finetuned", data.finetune_set
  )
  ro_params, ro_secs = pipeline.train_or_restore(
    ctx, "retain_only", data.retain_only_set
  )
  ro_raw = evaluator.evaluate(ro_params)  # evaluated once: its FQ is vs itself
  ref_ratios = ro_raw["forget_ratios"]
  ro_raw["forget_quality"] = forget_quality(ref_ratios, ref_ratios)
  ro_eval = report.summarize(ro_raw)
  ft_raw = evaluator.evaluate(ft_params, ref_ratios)
  before = {"step": 0, **report.summarize(ft_raw)}
  learned = {k: before[f"{k}/rouge_l"] >= v for k, v in ROUGE_TARGETS.items()}
  say(
    "fine-tuned: "
    + ", ".join(f"{k} ROUGE-L {before[f'{k}/rouge_l']:.3f}" for k in learned)
    + f", MU {before['model_utility']:.3f}; learned its data ("
    + ", ".join(f"{k} >= {v:g}" for k, v in ROUGE_TARGETS.items())
    + f"): {'yes' if all(learned.values()) else 'NO'}"
  )
  if not all(learned.values()):
    say(
      f"warning: after {args.finetune_steps} fine-tuning steps the model has not "
      "learned its data: part of the FE below is what it never learned"
      + (
        "; --quick fine-tunes briefly: rerun without it (or with more "
        "--finetune-steps and another --out)"
        if args.quick
        else "; rerun with more --finetune-steps and another --out"
      )
    )
  say(
    f"retain-only: forget ROUGE-L {ro_eval['forget/rouge_l']:.3f}, "
    f"retain ROUGE-L {ro_eval['retain/rouge_l']:.3f}, FE "
    f"{ro_eval['forget_efficacy']:.3f}, MU {ro_eval['model_utility']:.3f}"
  )
  for name in ("forget", "retain"):
    ref, gen = ft_raw["sets"][name]["samples"][0]
    say(
      f"  {name} sample: ref={ref!r}\n  {' ' * len(name)}         gen={gen!r}"
    )

  # ---- unlearning sweeps, all from the same fine-tuned model
  udata = pipeline.unlearning_data(ctx, data, ft_params)
  runs, seconds = [], {}
  for loss in args.forget_losses:
    for name in names:
      res = pipeline.sweep(
        ctx, name, loss, ft_params, udata, evaluator, ref_ratios, before
      )
      if res.stopped:
        return 0
      runs += res.runs
      seconds[f"{name}/{loss}"] = res.seconds

  # ---- outputs
  table, rows = report.study_table(runs, before["model_utility"])
  title = (
    f"{data.source}: {args.unlearn_steps} steps, "
    f"{args.forget_freq}:{args.retain_freq} schedule, {args.seeds} seed(s)"
  )
  results = {
    "config": vars(args),
    "data": data.summary(),
    "notes": notes,
    "model": vars(cfg),
    "finetuned": {**before, "learned_its_data": all(learned.values())},
    "retain_only": ro_eval,
    "runs": runs,
    "table": rows,
    "wall_seconds": {
      "finetune": ft_secs,
      "retain_only": ro_secs,
      **seconds,
      "total": time.time() - t_start,
    },
  }
  report.atomic_write_text(
    os.path.join(args.out, "results.json"),
    json.dumps(report.to_jsonable(results), indent=1),
  )
  if not args.no_plot:
    for y, file in (
      ("forget_efficacy", "fe_mu.png"),
      ("forget_quality", "fq_mu.png"),
    ):
      report.plot_fronts(
        runs, before, ro_eval, os.path.join(args.out, file), y, title
      )
  say("\n" + title)
  say(table)
  say(report.LEGEND)
  say(
    f"total wall time {time.time() - t_start:.0f}s; outputs in {os.path.abspath(args.out)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
