"""The MultiDigits benchmark (examples/multitask_digits), at toy size."""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# The examples folder is importable as packages (also done by conftest.py).
EXAMPLES = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "examples",
)
if EXAMPLES not in sys.path:
  sys.path.insert(0, EXAMPLES)

from multitask_digits import data as D  # noqa: E402
from multitask_digits import main as mtl_main  # noqa: E402
from multitask_digits import report, train  # noqa: E402

# One method per code path of train.py (summed loss, one task per step, every
# task's gradient per call); each costs a compile, the budget is < 60 s.
TOY_METHODS = ("adam_sum", "dual_optim_plus_alt", "pcgrad")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("multitask_digits")
  result = mtl_main.main(
    [
      "--quick",
      "--seeds",
      "2",
      "--steps",
      "40",
      "--lrs",
      "0.003,0.01",
      "--methods",
      ",".join(TOY_METHODS),
      "--out",
      str(out),
    ]
  )
  return out, result


def test_outputs_exist_and_are_sane(toy_run):
  out, result = toy_run
  assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["methods"] == json.loads(json.dumps(result["methods"]))
  table = (out / "table.txt").read_text()
  rows = {r["method"]: r for r in result["methods"]}
  assert list(rows) == ["single", *TOY_METHODS]
  for r in rows.values():
    assert r["label"] in table
    for task in D.TASKS:
      acc = r["test_acc"][task]
      assert 0.0 <= acc["mean"] <= 100.0 and acc["std"] >= 0.0
      assert len(r["per_seed"]["test_acc"]) == 2
    assert math.isfinite(r["delta_m"]["mean"])
    lrs = r["lr"].values() if isinstance(r["lr"], dict) else [r["lr"]]
    assert set(lrs) <= {0.003, 0.01}
  assert rows["single"]["delta_m"] == {"mean": 0.0, "std": 0.0}
  # Even 40 steps learn the digit tasks far above chance (10%).
  # (Accuracies are means of float32 0/1 hits; Δm is recomputed in float64.)
  for task in ("left", "right"):
    assert rows["single"]["test_acc"][task]["mean"] > 40.0
    assert rows["adam_sum"]["test_acc"][task]["mean"] > 40.0
  # The reported Δm is the formula applied to the reported accuracies.
  single = np.array(rows["single"]["per_seed"]["test_acc"])
  for r in rows.values():
    acc = np.array(r["per_seed"]["test_acc"])
    np.testing.assert_allclose(
      report.delta_m(acc, single),
      r["per_seed"]["delta_m"],
      rtol=1e-9,
      atol=1e-9,
    )
  assert rows["adam_sum"]["vs_baseline"] is None
  vs = rows["pcgrad"]["vs_baseline"]
  want = np.mean(
    np.subtract(
      rows["pcgrad"]["per_seed"]["delta_m"],
      rows["adam_sum"]["per_seed"]["delta_m"],
    )
  )
  assert vs["mean"] == pytest.approx(want)


def test_data_splits():
  splits = D.load(300, 100, 200)
  for split, n in zip(splits, (300, 100, 200)):
    assert split.x.shape == (n, 8, 16) and split.x.dtype == np.float32
    assert 0.0 <= split.x.min() and split.x.max() <= 1.0
    np.testing.assert_array_equal(
      split.y["sum"], split.y["left"] + split.y["right"]
    )
    assert split.y["left"].max() <= 9 and split.y["sum"].max() <= 18
  again = D.load(300, 100, 200)
  np.testing.assert_array_equal(splits.test.x, again.test.x)  # fixed
  # Pools are disjoint: no test half-image is an exact training half-image.
  train_halves = {
    h.tobytes() for x in splits.train.x for h in (x[:, :8], x[:, 8:])
  }
  test_halves = [
    h.tobytes() for x in splits.test.x for h in (x[:, :8], x[:, 8:])
  ]
  assert np.mean([h in train_halves for h in test_halves]) < 0.05


def test_delta_m_and_paired_interval():
  single = np.array([0.9, 0.8])
  acc = np.array([0.81, 0.84])  # -10% on task 1, +5% on task 2
  assert report.delta_m(acc, single) == pytest.approx((10.0 - 5.0) / 2)
  mean, half = report.paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  assert mean == pytest.approx(2.0)
  assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
  assert report.choose_lr(np.array([[1.0, 1.0], [0.5, 0.7]]), False) == 1


def test_single_task_run_leaves_other_heads_untouched():
  splits = D.load(200, 50, 50)
  run = train.make_run("single", 5, 16, (8,))
  params = run(
    jnp.array([1e-2]),
    jax.vmap(jax.random.key)(jnp.arange(1)),
    jnp.asarray(splits.train.x),
    splits.train.y,
  )
  heads = params["heads"]  # leaves [K, L, S, ...]: model k trained task k
  for k, task in enumerate(D.TASKS):
    for other in D.TASKS:
      moved = bool(jnp.any(heads[other]["b"][k, 0, 0] != 0))  # init: zeros
      assert moved == (other == task), (task, other)


def test_flags_are_checked():
  with pytest.raises(SystemExit):
    mtl_main.parse_args(["--methods", "adam_sum,nope"])
  with pytest.raises(SystemExit):
    mtl_main.parse_args(["--seeds", "0"])
  cfg = mtl_main.parse_args(["--quick"])
  assert cfg.quick and cfg.seeds == 2 and len(cfg.lrs) == 2
  assert mtl_main.parse_args([]).seeds >= 3
