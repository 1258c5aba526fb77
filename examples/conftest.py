"""Makes every folder of ``examples/`` importable as a package.

Each example's tests sit beside its code (``unlearn_lm/main.py`` and
``unlearn_lm/main_test.py``, as flax keeps ``train_test.py`` beside
``train.py``). They import an example's modules as ``unlearn_digits.model``,
``unlearn_lm.train`` and so on: the package name keeps modules of different
examples apart (each example has its own ``main.py`` and ``main_test.py``), so
tests of several examples can run in one pytest process.
"""

import os
import sys

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)
