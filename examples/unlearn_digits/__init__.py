"""Unlearning benchmark on scikit-learn's handwritten digits (the main job).

Run ``python examples/unlearn_digits/main.py`` (see ``README.md`` here).
Modules:

* :mod:`unlearn_digits.config` — constants, flags and their validation.
* :mod:`unlearn_digits.data` — the digits split and per-seed forget sets
  (random, or a whole class).
* :mod:`unlearn_digits.model` — the small Flax NNX CNN, used functionally.
* :mod:`unlearn_digits.loop` — jitted ``lax.scan`` training/unlearning loops.
* :mod:`unlearn_digits.train` — Original/Retrain training and the unlearning
  runs of every optimizer.
* :mod:`unlearn_digits.stats` — per-seed gaps, lr selection on tuning seeds,
  paired differences and the "can this setting rank methods" verdict.
* :mod:`unlearn_digits.report` — per-seed metrics, the table and the figure.
"""
