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

import dualoptax  # noqa: E402
from unlearn_digits import loop  # noqa: E402
from unlearn_digits import main as example_main  # noqa: E402


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
    (["--forget-class", "10"], "--forget-class must be a class in \\[0, 9\\]"),
    (["--forget-class", "-1"], "--forget-class must be a class in \\[0, 9\\]"),
    (["--forget-class", "3", "--setting", "hard"], "--forget-class forgets"),
    (["--setting", "easy"], "--setting"),
    (["--tune-seeds", "0"], "--tune-seeds must be >= 1"),
    (["--train-size", "5000"], "--train-size must be <= 1437"),
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


TINY = [
  "--seeds",
  "3",
  "--tune-seeds",
  "2",
  "--train-steps",
  "300",
  "--unlearn-steps",
  "12",
  "--forget-lrs",
  "1e-4,1e-3",
  "--max-widen",
  "0",
]


def test_tiny_run_writes_schema_and_retrain_is_calibrated(example, tmp_path):
  out = tmp_path / "run"
  result = example.main(
    TINY
    + [
      "--methods",
      "adam_summed,dual_optim_plus",
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
    "setting",
    "metrics",
    "tune_seeds",
    "report_seeds",
    "n_forget",
    "n_retain",
    "n_test",
    "reference",
    "original",
    "methods",
    "verdicts",
    "edge_choices",
    "wall_time_s",
  } <= set(on_disk)
  # The lr is chosen on seeds that are not reported.
  assert on_disk["report_seeds"] == [0, 1, 2]
  assert not set(on_disk["tune_seeds"]) & set(on_disk["report_seeds"])
  assert on_disk["n_forget"] == round(0.1 * 1437)
  metric_names = {"UA", "RA", "TA", "MIA"}
  for block in (on_disk["reference"], on_disk["original"]):
    assert set(block["mean"]) == set(block["std"]) == metric_names
    assert len(block["per_seed"]) == 3
  assert len(on_disk["original"]["gaps"]) == 3
  assert [(r["loss"], r["method"]) for r in on_disk["methods"]] == [
    ("GA+GD", "Adam (summed)"),
    ("GA+GD", "DualOptim+"),
    ("NPO+GD", "Adam (summed)"),
    ("NPO+GD", "DualOptim+"),
  ]
  retrain = on_disk["reference"]["per_seed"]
  for row in on_disk["methods"]:
    assert row["forget_lr"] in (1e-4, 1e-3)
    assert [lr for lr, _ in row["tried"]] == [1e-4, 1e-3]
    assert row["tune_gap"] == min(g for _, g in row["tried"])
    assert row["edge"] in ("low", "high")  # a 2-point grid: always an edge
    assert len(row["per_seed"]) == len(row["gaps"]) == 3
    # The avg gap is the mean over seeds of the per-seed gap to that seed's
    # Retrain.
    gaps = [
      np.mean([abs(a[m] - b[m]) for m in ("UA", "RA", "TA", "MIA")])
      for a, b in zip(row["per_seed"], retrain)
    ]
    np.testing.assert_allclose(row["gaps"], gaps)
    np.testing.assert_allclose(row["avg_gap"], np.mean(gaps))
    if row["method"] == "Adam (summed)":
      d = row["vs_baseline"]
      assert d["n"] == 3 and d["lo"] <= d["mean"] <= d["hi"]
    else:
      assert "vs_baseline" not in row
  assert set(on_disk["verdicts"]) == {"GA+GD", "NPO+GD"}
  for v in on_disk["verdicts"].values():
    assert v["best"] in ("Adam (summed)", "DualOptim+")
    assert v["original_minus_best"]["can_rank"] == (
      v["original_minus_best"]["lo"] > 0
    )
  # GD-only fine-tuning (forget lr 0) is scored on the reported seeds too.
  assert len(on_disk["finetune"]["gaps"]) == 3
  assert on_disk["edge_choices"]  # flagged explicitly
  ref = on_disk["reference"]["mean"]
  # Retrain never saw the forget set: its forget accuracy (100 - UA) is test-like.
  assert abs((100.0 - ref["UA"]) - ref["TA"]) < 3.0
  assert ref["TA"] > 85.0 and ref["RA"] > 95.0
  # The Original did see it: it fits the forget set at least as well as the test set.
  assert (
    100.0 - on_disk["original"]["mean"]["UA"]
    >= on_disk["original"]["mean"]["TA"]
  )
  table = (out / "table.txt").read_text()
  assert "EDGE" in table and "Δ gap vs DualOptim+" in table
  assert "RANK" in table


# Adam (summed) also runs GD-only fine-tuning: one compiled program per run.
CLASS_RUN = ["--forget-class", "3", "--methods", "adam_summed"]
CLASS_RUN += ["--losses", "rl"]


@pytest.fixture(scope="module")
def class_run(example, tmp_path_factory):
  out = tmp_path_factory.mktemp("class")
  return example.main(TINY + CLASS_RUN + ["--out", str(out)]), out


def test_class_wise_run_retrain_never_sees_the_class(class_run):
  result, out = class_run
  assert result["metrics"] == ["UA", "RA", "TA_other", "TA_class", "MIA"]
  n3 = int((np.asarray(_split().y_train) == 3).sum())
  assert result["n_forget"] == n3 and result["n_retain"] == 1437 - n3
  ref = result["reference"]
  for run in ref["per_seed"]:  # Retrain never predicts the class it never saw
    assert run["TA_class"] == 0.0 and run["UA"] == 100.0
  assert ref["mean"]["TA_other"] > 85.0
  orig = result["original"]["mean"]
  assert orig["TA_class"] > 80.0 and orig["UA"] < 10.0
  assert "TA on 3" in (out / "table.txt").read_text()


def test_lr_choice_does_not_depend_on_the_reported_seeds(
  example, class_run, tmp_path
):
  # Report 2 seeds instead of 3: the tuning seeds, their gaps and the chosen
  # lr are unchanged, and seeds 0 and 1 give the same figures.
  three, _ = class_run
  argv = TINY + CLASS_RUN + ["--seeds", "2", "--out", str(tmp_path)]
  two = example.main(argv)
  assert two["tune_seeds"] == three["tune_seeds"] == [1000, 1001]
  (r2,), (r3,) = two["methods"], three["methods"]
  assert r2["tried"] == r3["tried"] and r2["forget_lr"] == r3["forget_lr"]
  assert r2["per_seed"] == r3["per_seed"][:2]


@functools.cache
def _split():
  from unlearn_digits import data

  return data.load_digits_split()


def test_class_forget_set_is_exactly_the_class():
  from unlearn_digits import data

  split = _split()
  y = np.asarray(split.y_train)
  s = data.class_forget_sets(split, 2, 7)
  for k in range(2):
    assert sorted(np.asarray(s.forget_idx[k])) == sorted(np.flatnonzero(y == 7))
    assert set(np.asarray(s.sets["retain"][1][k]).tolist()) == (
      set(range(10)) - {7}
    )
  assert np.all(np.asarray(s.sets["forget"][1]) == 7)
  assert s.forget_idx.shape[1] + s.retain_idx.shape[1] == y.size


def test_hard_setting_draws_480_and_forgets_30_percent():
  from unlearn_digits import config, data

  cfg = config.parse_args(["--setting", "hard", "--out", "/tmp"])
  assert (cfg.train_size, cfg.forget_fraction) == (480, 0.3)
  assert _split().x_train.shape[0] == config.N_TRAIN
  keys = jax.random.split(jax.random.key(0), 3)
  s = data.forget_sets(_split(), keys, 144, 480)
  assert s.forget_idx.shape == (3, 144) and s.retain_idx.shape == (3, 336)
  for f, r in zip(np.asarray(s.forget_idx), np.asarray(s.retain_idx)):
    assert len(set(f) | set(r)) == 480  # disjoint
  assert not np.array_equal(s.forget_idx[0], s.forget_idx[1])


# --- statistics ---------------------------------------------------------------------


def test_paired_difference_is_the_t_interval():
  from scipy import stats as sps

  from unlearn_digits import stats

  rng = np.random.default_rng(0)
  a, b = rng.normal(1.0, 1.0, 10), rng.normal(0.0, 1.0, 10)
  d = stats.paired_difference(a, b)
  diff = a - b
  half = sps.t.ppf(0.975, 9) * diff.std(ddof=1) / np.sqrt(10)
  np.testing.assert_allclose(
    [d["lo"], d["hi"]], [diff.mean() - half, diff.mean() + half]
  )
  ci = sps.ttest_rel(a, b).confidence_interval(0.95)
  np.testing.assert_allclose([d["lo"], d["hi"]], [ci.low, ci.high])
  assert d["significant"] == (ci.low > 0 or ci.high < 0)
  assert stats.paired_difference(b, a)["mean"] == pytest.approx(-d["mean"])
  same = stats.paired_difference([1.0, 2.0], [0.5, 1.5])
  assert same["lo"] == same["hi"] == 0.5 and same["significant"]
  assert not stats.paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.0])[
    "significant"
  ]
  assert not stats.paired_difference([1.0], [0.0])["significant"]


def test_cannot_rank_verdict():
  from unlearn_digits import stats

  rng = np.random.default_rng(1)
  best = rng.normal(1.0, 0.3, 10)
  # The Original is as close to Retrain as the best method: cannot rank.
  assert not stats.ranking_verdict(best + rng.normal(0, 0.3, 10), best)[
    "can_rank"
  ]
  # The Original is clearly farther: the setting ranks.
  far = stats.ranking_verdict(best + 3.0 + rng.normal(0, 0.3, 10), best)
  assert far["can_rank"] and far["lo"] > 0
  # An Original closer than the best method cannot rank either.
  assert not stats.ranking_verdict(best - 1.0, best)["can_rank"]


def _fake_evaluate(best_lr, seeds, calls):
  """Runs whose gap to a zero Retrain is |log10(lr / best_lr)| on every seed."""

  def evaluate(lrs):
    calls.append(tuple(lrs))
    return [
      [{"UA": abs(np.log10(lr / best_lr)), "RA": 0.0}] * seeds for lr in lrs
    ]

  return evaluate


def test_lr_tuning_widens_past_an_edge_and_flags_what_remains():
  from unlearn_digits import stats

  ref = [{"UA": 0.0, "RA": 0.0}] * 2
  grid = (1e-4, 1e-3, 1e-2)
  calls = []
  c = stats.tune_forget_lr(
    _fake_evaluate(0.3, 2, calls), grid, ref, ("UA", "RA"), 2
  )
  # One block beyond the top edge: 1e-1, 1, 10 (same size, one program).
  np.testing.assert_allclose(calls[1], (1e-1, 1.0, 10.0))
  assert c["forget_lr"] == pytest.approx(0.1) and c["edge"] is None
  assert len(calls) == 2 and len(c["tried"]) == 6
  calls = []
  c = stats.tune_forget_lr(
    _fake_evaluate(1e-9, 2, calls), grid, ref, ("UA", "RA"), 1
  )
  assert len(calls) == 2 and c["edge"] == "low"  # still on the edge: flagged
  assert c["forget_lr"] == pytest.approx(1e-7)
  calls = []
  c = stats.tune_forget_lr(
    _fake_evaluate(1e-3, 2, calls), grid, ref, ("UA", "RA"), 2
  )
  assert len(calls) == 1 and c["forget_lr"] == 1e-3 and c["edge"] is None


def test_lr_is_chosen_on_the_tuning_seeds_only():
  from unlearn_digits import stats

  # Tuning seeds favour 1e-3; the reported seeds would favour 1e-2, but
  # tune_forget_lr only ever sees the tuning seeds' runs and Retrains.
  calls = []
  tune_ref = [{"UA": 0.0}] * 2
  c = stats.tune_forget_lr(
    _fake_evaluate(1e-3, 2, calls), (1e-4, 1e-3, 1e-2), tune_ref, ("UA",), 0
  )
  assert c["forget_lr"] == 1e-3
  with pytest.raises(ValueError, match="runs but"):
    stats.tune_forget_lr(
      _fake_evaluate(1e-3, 3, []), (1e-4, 1e-3), tune_ref, ("UA",), 0
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
