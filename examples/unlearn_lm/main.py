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
4. evaluate every ``--eval-every`` steps; write ``results.json``, ``metrics.png`` and
   print a table.

Examples::

  python examples/unlearn_lm/main.py --quick
  python examples/unlearn_lm/main.py --quick --data-dir path/to/tofu --forget-split forget01 --task-id 1
  python examples/unlearn_lm/main.py --quick --mesh data=2,fsdp=4      # 8 simulated CPU devices

``--mesh`` with more devices than exist on a CPU host sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` *before* JAX starts (this
script imports JAX only after parsing its arguments); on a TPU/GPU host the mesh must
fit the real devices.
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
  """Runs the job; returns the exit status (2 on bad input, nothing written)."""
  args = cli.fill_defaults(
    cli.build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
  )
  t_start = time.time()
  try:
    names = cli.validate(args)
    cli.ensure_host_devices(cli.mesh_device_count(args.mesh))
    return run(args, names, t_start)
  except cli.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, names: list[str], t_start: float) -> int:
  """The pipeline; JAX is imported here, after ``XLA_FLAGS`` is final."""
  import jax

  from unlearn_lm import pipeline, report
  from unlearn_lm.metrics import Evaluator
  from unlearn_lm.model import LanguageModel, TransformerConfig
  from unlearn_lm.tokenizer import ByteTokenizer

  log = lambda msg: print(msg, flush=True)
  # ---- everything that can fail on bad input happens before the output directory exists
  mesh = pipeline.make_mesh(args.mesh, args.batch_size)
  data = pipeline.load_data(args)
  tok = ByteTokenizer()
  max_len, len_notes = pipeline.choose_max_len(args, data, tok)
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
  evaluator = Evaluator(lm, tok, data, max_len)

  ckpt_root = os.path.abspath(os.path.join(args.out, "checkpoints"))
  os.makedirs(ckpt_root, exist_ok=True)
  ctx = pipeline.Context(args, lm, tok, max_len, mesh, ckpt_root, log)
  log(f"data: {data.summary()}")
  for n in notes:
    log(f"note: {n}")
  log(
    f"model: {cfg}; devices: {len(jax.devices())}; mesh: {args.mesh or 'none'}"
  )

  # ---- fine-tuned model and retain-only reference model
  ft_params, ft_secs = pipeline.train_or_restore(
    ctx, "finetuned", data.finetune_set
  )
  ro_params, ro_secs = pipeline.train_or_restore(
    ctx, "retain_only", data.retain_only_set
  )
  ref_ratios = evaluator.evaluate(ro_params)["forget_ratios"]
  ro_eval = evaluator.evaluate(ro_params, ref_ratios)
  ft_eval = evaluator.evaluate(ft_params, ref_ratios)
  before = {"step": 0, **report.summarize(ft_eval)}
  log(
    f"fine-tuned: {json.dumps({k: round(v, 4) for k, v in before.items() if v is not None})}"
  )
  for name in ("forget", "retain"):
    ref, gen = ft_eval["sets"][name]["samples"][0]
    log(
      f"  {name} sample: ref={ref!r}\n  {' ' * len(name)}         gen={gen!r}"
    )

  # ---- unlearning, one optimizer at a time from the same fine-tuned model
  udata = pipeline.unlearning_data(ctx, data, ft_params)
  runs = {}
  for name in names:
    runs[name] = pipeline.unlearn(
      ctx, name, ft_params, udata, evaluator, ref_ratios, before
    )
    if runs[name].stopped:
      return 0
  finals = {
    n: next(h for h in reversed(r.history) if "model_utility" in h)
    for n, r in runs.items()
  }

  # ---- outputs
  title = (
    f"{data.source}: {args.forget_loss.upper()}+GD, lr {args.lr:g}, "
    f"{args.forget_freq}:{args.retain_freq} schedule"
  )
  rows = [
    ("fine-tuned (before)", before, ft_secs),
    ("retain-only (reference)", report.summarize(ro_eval), ro_secs),
  ]
  rows += [(cli.LABELS[n], finals[n], runs[n].seconds) for n in names]
  results = {
    "config": vars(args),
    "data": data.summary(),
    "notes": notes,
    "model": vars(cfg),
    "finetuned": before,
    "retain_only": report.summarize(ro_eval),
    "final": finals,
    "history": {n: r.history for n, r in runs.items()},
    "wall_seconds": {
      "finetune": ft_secs,
      "retain_only": ro_secs,
      **{n: r.seconds for n, r in runs.items()},
      "total": time.time() - t_start,
    },
  }
  report.atomic_write_text(
    os.path.join(args.out, "results.json"),
    json.dumps(report.to_jsonable(results), indent=1),
  )
  if not args.no_plot:
    report.plot(
      results["history"], os.path.join(args.out, "metrics.png"), title
    )
  log("\n" + title)
  log(report.format_table(rows))
  log(report.LEGEND)
  log(
    f"total wall time {time.time() - t_start:.0f}s; outputs in {os.path.abspath(args.out)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
