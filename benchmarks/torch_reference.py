"""PyTorch reference points for step_time.py: torch AdamW against bitsandbytes' 8-bit AdamW.

The same tree as step_time.py (``--leaves`` 4096x1024 float32 leaves), the same
hyperparameters (lr 1e-3, weight decay 0.01), gradients fixed at 1e-3. Each step is
``optimizer.step()``; steps are interleaved (A, B, A, B, ...) and timed with the device
synchronized, and the script prints medians and the ratio of each optimizer to
``torch.optim.AdamW(fused=True)`` -- the PyTorch counterpart of step_time.py's ratio of
8-bit DualOptim+ to ``optax.adamw``. It needs PyTorch (and bitsandbytes for its row),
neither of which dualoptax depends on.

    python benchmarks/torch_reference.py [--reps 30] [--leaves 4]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main():
  import torch  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--leaves", type=int, default=4)
  args = parser.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  gen = torch.Generator(device="cpu").manual_seed(0)

  def make_params():
    params = [
      torch.nn.Parameter(torch.randn(4096, 1024, generator=gen).to(device))
      for _ in range(args.leaves)
    ]
    for p in params:
      p.grad = torch.full_like(p, 1e-3)
    return params

  makers = {
    "torch AdamW(fused=True)": lambda ps: torch.optim.AdamW(
      ps, lr=1e-3, weight_decay=0.01, fused=True
    ),
    "torch AdamW(foreach=True)": lambda ps: torch.optim.AdamW(
      ps, lr=1e-3, weight_decay=0.01, foreach=True
    ),
  }
  try:
    import bitsandbytes as bnb  # pylint: disable=import-outside-toplevel

    makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(
      ps, lr=1e-3, weight_decay=0.01
    )
    bnb_version = bnb.__version__
  except ImportError:
    bnb_version = "(not installed)"

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  runs = {}
  for name, make in makers.items():
    opt = make(make_params())
    for _ in range(3):  # warm-up: state allocation, kernel loading
      opt.step()
    sync()
    runs[name] = (opt, [])
  for _ in range(args.reps):
    for opt, times in runs.values():
      sync()
      t0 = time.perf_counter()
      opt.step()
      sync()
      times.append(time.perf_counter() - t0)
  name_dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  print(
    f"torch {torch.__version__}, bitsandbytes {bnb_version}, device {name_dev}; "
    f"{args.leaves * 4096 * 1024 / 1e6:.1f}M params, {args.leaves} leaves "
    f"4096x1024: median of {args.reps} interleaved steps"
  )
  base = statistics.median(runs["torch AdamW(fused=True)"][1])
  print(f"{'optimizer':40s} {'step ms':>9s} {'ratio':>6s}")
  for name, (_, times) in runs.items():
    t = statistics.median(times)
    print(f"{name:40s} {t * 1e3:9.3f} {t / base:6.2f}")


if __name__ == "__main__":
  main()
