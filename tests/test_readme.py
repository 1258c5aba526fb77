"""The README's quick start runs as written."""

import pathlib
import re


def test_quick_start_runs():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text[text.index("## Quick start") : text.index("## API")]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2
  scope = {}
  exec(compile("\n".join(blocks), "README.md quick start", "exec"), scope)  # pylint: disable=exec-used
  assert int(scope["state"].count) == 301
  assert scope["params"]["w"].shape == (4, 3)
