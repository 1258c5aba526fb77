"""The digits random-forgetting example and the loops it runs on."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

for _name in ("flax", "sklearn", "matplotlib", "tqdm"):
  pytest.importorskip(_name)

from unlearn_digits import loop  # noqa: E402
from unlearn_digits import main as example_main  # noqa: E402

import dualoptax  # noqa: E402


@pytest.fixture(scope="module")
def example():
  return example_main


# --- loops --------------------------------------------------------------------------

LOSS_FNS = {
  "forget": lambda p, b: -jnp.mean((p - b) ** 2),
  "retain": lambda p, b: jnp.mean((p - 2.0 * b) ** 2),
}


def _batch_fns():
  return {
    k: (lambda key, k=k: jax.random.normal(key, (4,)) + (k == "forget"))
    for k in LOSS_FNS
  }


def _reference(tx, steps, key, multi_objective, scales=None):
  """The same schedule as a plain Python loop, one step at a time."""

  @functools.partial(jax.jit, static_argnums=0)
  def step(name, params, state, step_key):
    g = jax.grad(LOSS_FNS[name])(params, _batch_fns()[name](step_key))
    if multi_objective:
      updates, state = tx.update({name: g}, state, params)
    else:
      updates, state = tx.update(g, state, params)
      updates = jax.tree.map(lambda u: scales[name] * u, updates)
    return optax.apply_updates(params, updates), state

  params = jnp.zeros(4)
  state = tx.init(params)
  keys = jax.random.split(key, steps)
  for s in range(steps):
    name = ("forget", "retain")[dualoptax.alternating_index(s, 1, 5)]
    params, state = step(name, params, state, keys[s])
  return params


def test_alternating_scan_matches_python_loop():
  key = jax.random.key(0)
  tx = dualoptax.dual_optim_plus({"forget": 1e-2, "retain": 3e-2})
  got, state, losses = jax.jit(
    lambda k: loop.alternating_scan(
      jnp.zeros(4), tx, LOSS_FNS, _batch_fns(), k, 8
    )
  )(key)
  np.testing.assert_allclose(
    got, _reference(tx, 8, key, True), rtol=1e-5, atol=1e-7
  )
  assert losses.shape == (8,)
  assert (
    int(state.deltas["forget"].count) == 2
    and int(state.deltas["retain"].count) == 6
  )


def test_alternating_scan_shared_state_uses_step_scales():
  key = jax.random.key(1)
  tx = optax.adam(1.0)
  scales = {"forget": 1e-3, "retain": 1e-2}
  got, _, _ = loop.alternating_scan(
    jnp.zeros(4),
    tx,
    LOSS_FNS,
    _batch_fns(),
    key,
    8,
    multi_objective=False,
    step_scales=scales,
  )
  np.testing.assert_allclose(
    got, _reference(tx, 8, key, False, scales), rtol=1e-5, atol=1e-7
  )


def test_summed_scan_takes_weighted_sum():
  key = jax.random.key(2)
  weights = {"forget": 0.5, "retain": 1.0}
  got, _, losses = loop.summed_scan(
    jnp.zeros(4),
    optax.sgd(0.1),
    LOSS_FNS,
    _batch_fns(),
    key,
    3,
    weights=weights,
  )
  params = jnp.zeros(4)
  for step_key in jax.random.split(key, 3):
    kf, kr = jax.random.split(step_key)
    bf, br = _batch_fns()["forget"](kf), _batch_fns()["retain"](kr)
    g = jax.grad(
      lambda p: 0.5 * LOSS_FNS["forget"](p, bf) + LOSS_FNS["retain"](p, br)
    )(params)
    params = params - 0.1 * g
  np.testing.assert_allclose(got, params, rtol=1e-5, atol=1e-7)


def test_sample_batch_draws_only_from_the_first_size_rows():
  # Retrain relies on this: rows past `size` (the forget set) are never drawn.
  data = jnp.arange(100)
  draw = jax.jit(lambda k, n: loop.sample_batch(data, 4000, size=n)(k))
  rows = np.asarray(draw(jax.random.key(0), 90))
  assert rows.max() == 89 and rows.min() == 0
  assert len(np.unique(rows)) == 90


def test_loop_argument_errors():
  with pytest.raises(ValueError, match="exactly two"):
    loop.alternating_scan(
      jnp.zeros(2),
      optax.sgd(1.0),
      {"a": LOSS_FNS["forget"]},
      {"a": lambda k: 0.0},
      jax.random.key(0),
      2,
    )
  with pytest.raises(ValueError, match="batch_fns"):
    loop.summed_scan(
      jnp.zeros(2),
      optax.sgd(1.0),
      LOSS_FNS,
      {"forget": lambda k: 0.0},
      jax.random.key(0),
      2,
    )
  with pytest.raises(ValueError, match="step_scales"):
    loop.alternating_scan(
      jnp.zeros(4),
      dualoptax.dual_optim_plus(1.0),
      LOSS_FNS,
      _batch_fns(),
      jax.random.key(0),
      2,
      step_scales={"forget": 1.0, "retain": 1.0},
    )
  with pytest.raises(ValueError, match="num_steps"):
    loop.summed_scan(
      jnp.zeros(4), optax.sgd(1.0), LOSS_FNS, _batch_fns(), jax.random.key(0), 0
    )
  with pytest.raises(ValueError, match="size"):
    loop.sample_batch(jnp.zeros((5, 2)), 3, size=6)


# --- the example --------------------------------------------------------------------


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--forget-fraction", "0"], "--forget-fraction must lie in \\(0, 1\\)"),
    (["--forget-fraction", "1"], "--forget-fraction must lie in \\(0, 1\\)"),
    (["--forget-fraction", "-0.2"], "--forget-fraction must lie in \\(0, 1\\)"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--methods", "sgd"], "--methods"),
    (["--forget-lrs", "0.1,x"], "--forget-lrs"),
  ],
)
def test_bad_flags_fail_before_training(
  example, tmp_path, capsys, argv, message
):
  with pytest.raises(SystemExit) as e:
    example.main(argv + ["--out", str(tmp_path)])
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_unwritable_out_fails_before_training(example, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(SystemExit) as e:
    example.main(["--out", str(blocker / "sub")])
  assert e.value.code == 2
  assert "is not a writable directory" in capsys.readouterr().err
  if os.geteuid() != 0:  # root ignores permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
      example.main(["--out", str(locked / "out")])


def test_tiny_run_writes_schema_and_retrain_is_calibrated(example, tmp_path):
  out = tmp_path / "run"
  result = example.main(
    [
      "--seeds",
      "2",
      "--train-steps",
      "300",
      "--unlearn-steps",
      "12",
      "--forget-lrs",
      "1e-4,1e-3",
      "--methods",
      "dual_optim_plus",
      "--losses",
      "ga,npo",
      "--out",
      str(out),
    ]
  )
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert (out / "summary.png").stat().st_size > 10_000
  assert {
    "config",
    "n_train",
    "n_forget",
    "n_test",
    "reference",
    "original",
    "methods",
    "grid",
    "wall_time_s",
  } <= set(on_disk)
  assert on_disk["n_forget"] == round(0.1 * on_disk["n_train"])
  metric_names = {"UA", "RA", "TA", "MIA"}
  for block in (on_disk["reference"], on_disk["original"]):
    assert set(block["mean"]) == set(block["std"]) == metric_names
    assert len(block["per_seed"]) == 2
  assert [(r["loss"], r["method"]) for r in on_disk["methods"]] == [
    ("GA+GD", "DualOptim+"),
    ("NPO+GD", "DualOptim+"),
  ]
  for row in on_disk["methods"]:
    assert {
      "loss",
      "method",
      "forget_lr",
      "mean",
      "std",
      "avg_gap",
      "avg_std",
      "per_seed",
    } <= set(row)
    assert row["forget_lr"] in (1e-4, 1e-3)
    grid = next(
      g["grid"]
      for g in on_disk["grid"]
      if (g["loss"], g["method"]) == (row["loss"], row["method"])
    )
    assert row["avg_gap"] == min(
      g["avg_gap"] for g in grid
    )  # selected by average gap
    for m in metric_names:
      assert 0.0 <= row["mean"][m] <= 100.0
  ref = on_disk["reference"]["mean"]
  # Retrain never saw the forget set: its forget accuracy (100 - UA) is test-like.
  assert abs((100.0 - ref["UA"]) - ref["TA"]) < 3.0
  assert ref["TA"] > 85.0 and ref["RA"] > 95.0
  # The Original did see it: it fits the forget set at least as well as the test set.
  assert (
    100.0 - on_disk["original"]["mean"]["UA"]
    >= on_disk["original"]["mean"]["TA"]
  )


def test_runs_as_a_script_from_the_repo_root():
  # `python examples/unlearn_digits/main.py` (not a package import): the
  # script makes its folder importable itself (PYTHONPATH names only the
  # library); a bad flag exits before training.
  root = Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=str(root))
  r = subprocess.run(
    [sys.executable, "examples/unlearn_digits/main.py", "--seeds", "0"],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2, r.stderr
  assert "--seeds must be >= 1" in r.stderr
