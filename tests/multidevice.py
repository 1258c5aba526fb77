"""Helpers for tests that need 8 simulated CPU devices.

XLA reads the device count only when its backend starts, so such tests run
their code in a fresh process (this one keeps whatever devices it has).
"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_COLLECTIVE = re.compile(
  r"=\s*([^=]+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all"
  r"|collective-permute)(-start)?\("
)


def collectives(hlo_text: str) -> list:
  """``[(result type, op)]`` of every collective in a compiled HLO text.

  Comments go first: long tuple types carry ``/*index=5*/`` markers whose
  ``=`` would cut the result type short.
  """
  text = re.sub(r"/\*.*?\*/", "", hlo_text)
  return [(m.group(1), m.group(2)) for m in _COLLECTIVE.finditer(text)]


def eight_device_env(**extra: str) -> dict:
  """This process's environment with 8 CPU devices (any other device count
  in ``XLA_FLAGS`` replaced), plus ``extra``."""
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+",
    "",
    os.environ.get("XLA_FLAGS", ""),
  )
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip(),
    **extra,
  }


def run_on_8_devices(code: str, **env: str) -> subprocess.CompletedProcess:
  """Runs ``python -c code`` from the repository root on 8 CPU devices."""
  return subprocess.run(
    [sys.executable, "-c", code],
    env=eight_device_env(**env),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def json_result(code: str) -> dict:
  """Runs ``code`` on 8 devices and returns the JSON it printed on its last
  line starting with ``RESULT ``."""
  result = run_on_8_devices(code)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
  assert lines, result.stdout[-2000:] + result.stderr[-2000:]
  return json.loads(lines[-1][len("RESULT ") :])
