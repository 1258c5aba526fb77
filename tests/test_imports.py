"""Importing the library pulls in only its core dependencies.

The applications (models, training loops, checkpoints, plots) live under
``examples/`` with their own dependencies (``pip install 'dualoptax[examples]'``);
``import dualoptax`` must work with jax, optax, chex and numpy alone.
"""

import json
import os
import subprocess
import sys

import pytest

# Top-level modules that only the examples (or optional paths) may import.
OPTIONAL = (
  "flax",
  "orbax",
  "sklearn",
  "scipy",
  "matplotlib",
  "tqdm",
  "rouge_score",
  "tokenizers",
  "nltk",
)
# numba is forbidden too: the compiled CPU kernels that used it are gone, and
# this guards that no import path brings it back. A separate test, so that a
# failure names it.
NUMBA = ("numba",)


def _loaded_top_level_modules() -> set[str]:
  """Top-level names in ``sys.modules`` after a fresh ``import dualoptax``."""
  code = (
    "import json, sys\n"
    "import dualoptax, dualoptax.unlearning\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def loaded() -> set[str]:
  return _loaded_top_level_modules()


def test_import_loads_no_optional_dependency(loaded):
  assert "dualoptax" in loaded and "jax" in loaded  # the probe itself worked
  assert not loaded & set(OPTIONAL), sorted(loaded & set(OPTIONAL))


def test_import_loads_no_numba(loaded):
  assert not loaded & set(NUMBA), sorted(loaded & set(NUMBA))


def test_applications_are_not_in_the_package():
  import dualoptax
  import dualoptax.unlearning as u

  for name in ("lm", "loop", "models"):
    assert not hasattr(u, name), name
  with pytest.raises(ImportError):
    __import__("dualoptax.lm")
  assert dualoptax.unlearning is u
