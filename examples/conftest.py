"""Makes every folder of ``examples/`` importable as a package.

Tests import an example's modules as ``unlearn_digits.model``,
``unlearn_lm.train`` and so on: the package name keeps modules of different
examples apart (each example may have its own ``model.py`` or ``train.py``), so
tests of several examples can run in one pytest process.
"""

import os
import sys

EXAMPLES = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "examples",
)
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)
