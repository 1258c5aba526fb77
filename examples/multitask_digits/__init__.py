"""Multi-task learning on pairs of scikit-learn digits (MultiDigits).

Run ``python examples/multitask_digits/main.py``. Modules:

* :mod:`multitask_digits.data` — MultiDigits: two 8×8 digits side by side,
  tasks "left", "right" and "sum"; fixed train/validation/test splits.
* :mod:`multitask_digits.model` — a shared MLP trunk with one head per task.
* :mod:`multitask_digits.train` — every method's jitted ``lax.scan`` training
  run, seeds and learning rates ``vmap``-ed.
* :mod:`multitask_digits.report` — accuracies, Δm%, the table, the figure.
"""
