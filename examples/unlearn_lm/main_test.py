"""Unlearning loop: sharded == single-device, a vmapped sweep == its runs one by
one, exact resume, a tiny end-to-end study, bad input.

The sharding checks need 8 devices. They run in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this process may have
any number of devices; XLA reads the flag only when its backend starts).
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

for _name in (
  "flax",
  "orbax.checkpoint",
  "scipy",
  "rouge_score",
  "matplotlib",
  "tokenizers",
):
  pytest.importorskip(_name)

import dualoptax  # noqa: E402
from tests import multidevice  # noqa: E402
from unlearn_lm import cli, train  # noqa: E402
from unlearn_lm import main as script  # noqa: E402
from unlearn_lm.data import encode_qa, generate_people  # noqa: E402
from unlearn_lm.model import LanguageModel, TransformerConfig  # noqa: E402
from unlearn_lm.tokenizer import ByteTokenizer  # noqa: E402

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
EXAMPLES = os.path.join(ROOT, "examples")
TOK = ByteTokenizer()
L = 64


def _setup(dtype=jnp.float32):
  data = generate_people(4, num_general=2)
  lm = LanguageModel(
    TransformerConfig(max_len=L, d_model=32, num_heads=2, num_layers=1)
  )
  enc = lambda qas: encode_qa(
    TOK, [q.question for q in qas], [q.answer for q in qas], L
  )
  fenc, renc = enc(data.forget), enc(data.retain)
  params = jax.tree.map(lambda x: x.astype(dtype), lm.init(0))
  udata = {
    "forget": jax.tree.map(jnp.asarray, fenc),
    "retain": jax.tree.map(jnp.asarray, renc),
  }
  udata = jax.tree.map(
    lambda x: x.astype(dtype) if x.dtype == np.float32 else x, udata
  )
  udata["ref_nll"] = train.reference_sequence_nll(lm, params, fenc).astype(
    dtype
  )
  return lm, params, udata


def _run_on_8_devices(check: str, x64: bool = False) -> None:
  """Runs this module's function ``check`` in a fresh 8-device CPU process."""
  code = textwrap.dedent(f"""
      import importlib.util
      spec = importlib.util.spec_from_file_location("lm_sharding_checks", {__file__!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      module.{check}()
  """)
  r = multidevice.run_on_8_devices(
    code,
    JAX_ENABLE_X64="1" if x64 else "0",
    PYTHONPATH=os.pathsep.join([ROOT, EXAMPLES]),
  )
  assert r.returncode == 0, (
    f"{check} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
  )


def _mesh():
  assert len(jax.devices()) == 8, jax.devices()
  return train.make_mesh(train.parse_mesh("data=2,fsdp=4"))


def _batch_sharding(mesh):
  return jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(("data", "fsdp"))
  )


def _leaves(tree):
  return {
    jax.tree_util.keystr(path): np.asarray(x)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def check_sharded_gradients():
  """float32 gradients of one batch: sharded (batch over data x fsdp, params over
  fsdp) == single device, up to float32 reduction-order noise."""
  lm, params, udata = _setup()
  mesh = _mesh()
  b = jax.tree.map(lambda x: x[:8], udata["retain"])
  loss = lambda p, b: dualoptax.unlearning.gd_loss(
    lm.apply(p, b.inputs), b.targets, b.mask
  )
  g1 = _leaves(jax.jit(jax.grad(loss))(params, b))
  g8 = _leaves(
    jax.jit(jax.grad(loss))(
      train.place(params, mesh), jax.device_put(b, _batch_sharding(mesh))
    )
  )
  # Every gradient element is a sum over the batch's B*T = n token positions, added
  # in another order (other partial sums per device) when the batch is split. Any
  # order is off from the exact sum by about eps * sqrt(n) times the size of the
  # summed terms (rounding errors add like a random walk), however small the element
  # itself is: elements that nearly cancel differ by far more than any relative
  # tolerance (1.7e-4 relative was seen). So the tolerance is absolute, per leaf,
  # with the leaf's largest gradient standing for the size of its terms, times 8 for
  # headroom (differences of up to ~2.4 eps * max|g| were measured). A sharding
  # error (a missing, doubled or misplaced shard) is O(max|g|) and still fails.
  n = b.inputs.size
  eps = float(np.finfo(np.float32).eps)
  assert g8.keys() == g1.keys()
  for name, c in g1.items():
    assert c.dtype == np.float32, name
    atol = 8 * eps * math.sqrt(n) * float(np.max(np.abs(c)))
    np.testing.assert_allclose(g8[name], c, rtol=0, atol=atol, err_msg=name)


def check_sharded_unlearning_chunk():
  """Six alternating DualOptim+ steps, sharded == single device, in float64."""
  assert jax.config.jax_enable_x64
  lm, params, udata = _setup(jnp.float64)
  lr = 1e-3
  tx = dualoptax.dual_optim_plus(lr, weight_decay=0.01)
  kw = dict(
    multi_objective=True, forget_loss="npo", batch_size=8, seed=0, chunk_steps=6
  )
  mesh = _mesh()
  single = train.TrainState(
    jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params)
  )
  single, (loss_1, idx_1) = train.make_unlearn_chunk(lm, tx, **kw)(
    single, udata
  )
  p = train.place(jax.tree.map(jnp.copy, params), mesh)
  sharded = train.place(train.TrainState(jnp.int32(0), p, tx.init(p)), mesh)
  sharded, (loss_8, idx_8) = train.make_unlearn_chunk(lm, tx, mesh=mesh, **kw)(
    sharded, udata
  )

  qkv = sharded.params["block0"]["qkv"]["kernel"]  # [32, 96]: split over fsdp=4
  assert qkv.dtype == jnp.float64
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert qkv.addressable_shards[0].data.shape == (8, 96)
  assert (
    sharded.opt_state.base_nu["block0"]["qkv"]["kernel"].sharding.spec
    == qkv.sharding.spec
  )
  np.testing.assert_array_equal(idx_1, [0, 1, 1, 1, 1, 1])  # the 1:5 schedule
  np.testing.assert_array_equal(idx_1, idx_8)
  assert int(sharded.step) == int(single.step) == 6
  # Why float64: normalized (Adam-like) steps divide by sqrt(nu) + eps, eps = 1e-8,
  # so float32 reduction-order noise (~1e-8 on gradients of size ~0.1) on
  # near-zero gradient elements becomes differences of up to O(lr) per step, by an
  # amount that depends on the machine's summation order (0.75 lr was measured). In
  # float64 that noise (~1e-17) is far below eps. The largest difference left is
  # the sharded embedding gradient (the scatter-add of the token lookup), which
  # XLA's partitioned program computes to ~1e-7 of its largest element even in
  # float64; it moved parameters by at most 6e-6 lr over the six steps. The bound
  # 1e-3 lr leaves headroom for that; a sharding error (a missing, doubled or
  # misplaced shard or batch row) moves parameters by O(lr) and fails it.
  assert loss_1.dtype == jnp.float64  # the losses keep float64 logits float64
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-7)
  a, c = _leaves(sharded.params), _leaves(single.params)
  p0 = _leaves(params)
  for name in c:
    moved = np.max(np.abs(c[name] - p0[name]))
    assert moved > 0.1 * lr, (name, moved)  # the steps really moved every leaf
    np.testing.assert_allclose(
      a[name], c[name], rtol=0, atol=1e-3 * lr, err_msg=name
    )


def check_sharded_8bit_state_update():
  """Two 8-bit DualOptim+ updates, sharded == single device."""
  tx = dualoptax.dual_optim_plus_8bit(1e-3, weight_decay=0.01, min_size=1024)
  mesh = _mesh()
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "w": jax.random.normal(keys[0], (64, 512)),
    "v": jax.random.normal(keys[1], (16, 256)),
    "b": jnp.zeros((512,)),
  }
  grads = [
    jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), params)
    for k in keys[2:]
  ]

  def run(params, grads):
    state = tx.init(params)
    step = jax.jit(
      lambda g, s, p, name: tx.update({name: g}, s, p), static_argnums=3
    )
    for g, name in zip(grads, ("forget", "retain")):
      updates, state = step(g, state, params, name)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state

  p1, s1 = run(params, grads)
  p8, s8 = run(train.place(params, mesh), [train.place(g, mesh) for g in grads])
  codes = s8.base_mu["w"].codes
  assert codes.dtype == jnp.uint8 and "fsdp" in tuple(codes.sharding.spec)
  assert codes.addressable_shards[0].data.shape[0] == 64 // 4
  # The sharded program may round some float32 value one ulp apart (other fusion,
  # other partial sums), which can move a value across a code boundary: a rare
  # neighbouring code, hence a rare update difference below lr; all else agrees.
  for a, c in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
    a, c = np.asarray(a), np.asarray(c)
    if a.dtype == np.uint8:
      assert (
        np.mean(a != c) < 1e-3
        and np.max(np.abs(a.astype(int) - c.astype(int))) <= 1
      )
    else:
      assert np.mean(~np.isclose(a, c, rtol=1e-5, atol=1e-7)) < 1e-3
      assert np.max(np.abs(a - c)) < 1e-3 * max(1.0, float(np.max(np.abs(c))))


def test_sharded_gradients_equal_single_device():
  _run_on_8_devices("check_sharded_gradients")


def test_sharded_unlearning_chunk_equals_single_device():
  _run_on_8_devices("check_sharded_unlearning_chunk", x64=True)


def test_sharded_8bit_state_update_equals_single_device():
  _run_on_8_devices("check_sharded_8bit_state_update")


def test_resume_from_checkpoint_is_exact(tmp_path):
  lm, params, udata = _setup()
  tx = dualoptax.dual_optim_plus(1e-3, weight_decay=0.01)
  chunk = train.make_unlearn_chunk(
    lm,
    tx,
    multi_objective=True,
    forget_loss="ga",
    batch_size=4,
    seed=1,
    chunk_steps=3,
  )
  fresh = lambda: train.TrainState(
    jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params)
  )
  straight, _ = chunk(fresh(), udata)
  straight, _ = chunk(straight, udata)

  first, _ = chunk(fresh(), udata)
  ck = train.RunCheckpointer(str(tmp_path / "run"))
  ck.save(int(first.step), first, [{"step": 3}])
  ck.close()
  ck = train.RunCheckpointer(str(tmp_path / "run"))
  assert ck.latest_step() == 3
  restored, history = ck.restore(3, fresh())
  ck.close()
  assert history == [{"step": 3}]
  assert isinstance(
    restored.opt_state, dualoptax.DualOptimPlusState
  )  # not a dict
  resumed, _ = chunk(restored, udata)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def test_sweep_members_take_the_steps_of_single_runs():
  """The vmapped sweep chunk (lr injected in each member's state, one seed per
  member) takes exactly the steps of make_unlearn_chunk run alone per member."""
  from unlearn_lm import pipeline

  lm, params, udata = _setup()
  # two members that differ in both lr and seed: a member given the other's
  # lr or seed takes other steps
  lrs, seeds = [1e-3, 1e-2], [5, 6]
  kw = dict(
    multi_objective=True, forget_loss="npo", batch_size=4, chunk_steps=6
  )
  # One multi-objective optimizer (the 8-bit one: its codes and absmax are
  # vmapped too) and one single-objective one.
  for name in ("dual_optim_plus_8bit", "adam"):
    tx, multi = pipeline.make_tx(name, 1.0, 0.01)
    kw["multi_objective"] = multi
    stacked = jax.tree.map(lambda x: jnp.stack([x] * len(lrs)), params)
    opt = jax.vmap(lambda p, lr: pipeline.make_tx(name, lr, 0.01)[0].init(p))(
      stacked, jnp.asarray(lrs)
    )
    sweep = train.make_unlearn_sweep_chunk(lm, tx, **kw)
    out, (losses, _) = sweep(
      train.TrainState(jnp.int32(0), stacked, opt),
      jnp.asarray(seeds, jnp.int32),
      udata,
    )
    assert int(out.step) == 6
    for i, (lr, seed) in enumerate(zip(lrs, seeds)):
      tx_i = pipeline.make_tx(name, lr, 0.01)[0]
      one = train.make_unlearn_chunk(lm, tx_i, seed=seed, **kw)
      alone, (loss_i, _) = one(
        train.TrainState(
          jnp.int32(0), jax.tree.map(jnp.copy, params), tx_i.init(params)
        ),
        udata,
      )
      # The same batches and steps. vmapped matmuls round differently in
      # float32, and a normalized step turns that noise on a near-zero
      # gradient element into up to O(lr) (see the sharded check above): so
      # almost every element agrees to 1e-3 lr and none is off by lr. A wrong
      # lr or seed moves most elements by O(lr) and fails.
      np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
      got = jax.tree.map(lambda x: x[i], out.params)
      for a, c in zip(jax.tree.leaves(alone.params), jax.tree.leaves(got)):
        diff = np.abs(np.asarray(a) - np.asarray(c))
        assert np.mean(diff > 1e-3 * lr) < 0.01 and diff.max() < lr, name
    moved = np.abs(
      out.params["embed"]["embedding"][1] - params["embed"]["embedding"]
    )
    assert moved.max() > 1e-3, name  # the lr-1e-2 member really moved


TINY = [
  "--num-people",
  "4",
  "--d-model",
  "32",
  "--heads",
  "2",
  "--layers",
  "1",
  "--finetune-steps",
  "20",
  "--unlearn-steps",
  "12",
  "--chunk-steps",
  "6",
  "--eval-every",
  "6",
  "--batch-size",
  "8",
  "--max-len",
  "64",
  "--lrs",
  "1e-3,1e-2",
  "--seeds",
  "2",
  "--forget-losses",
  "npo",
]


def test_end_to_end_tiny_study_and_resume(tmp_path, capsys):
  out = str(tmp_path / "run")
  args = TINY + ["--out", out, "--optimizers", "adam,dual_optim_plus"]
  # interrupted after the first chunk of the first optimizer: no results yet
  assert script.main(args + ["--max-chunks", "1"]) == 0
  assert not os.path.exists(os.path.join(out, "results.json"))
  assert os.path.isdir(os.path.join(out, "checkpoints", "finetuned"))
  assert script.main(args + ["--resume"]) == 0
  captured = capsys.readouterr()
  log, progress = captured.out, captured.err
  # progress lines go to stderr, the results to stdout
  assert (
    "reusing the Orbax checkpoint" in progress
    and "[adam npo] resumed at step 6" in progress
    and "] step " in progress
  )
  assert "] step " not in log and "reusing" not in log
  assert "fine-tuned: forget ROUGE-L" in log and "total wall time" in log
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  for key in ("finetuned", "retain_only"):
    for m in (
      "forget/rouge_l",
      "retain/rouge_l",
      "model_utility",
      "forget_efficacy",
    ):
      assert 0.0 <= res[key][m] <= 1.0, (key, m)
  runs = res["runs"]
  assert sorted((r["optimizer"], r["lr"], r["seed"]) for r in runs) == sorted(
    (n, lr, s)
    for n in ("adam", "dual_optim_plus")
    for lr in (1e-3, 1e-2)
    for s in (0, 1)
  )
  for r in runs:
    assert r["forget_loss"] == "npo"
    assert [h["step"] for h in r["history"]] == [0, 6, 12]
    for key in ("model_utility", "forget_efficacy", "forget_quality"):
      assert np.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (r["optimizer"], key)
      assert r[key] == r["history"][-1][key]
  # seeds are batch orders: two seeds at one lr end in different models
  fe = {
    (r["optimizer"], r["lr"], r["seed"]): r["forget_efficacy"] for r in runs
  }
  assert fe[("dual_optim_plus", 1e-2, 0)] != fe[("dual_optim_plus", 1e-2, 1)]
  for png in ("fe_mu.png", "fq_mu.png"):
    assert os.path.getsize(os.path.join(out, png)) > 10_000
  assert "| DualOptim+ |" in log and "best FE among the lrs with MU >=" in log
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def _filled(argv):
  args = cli.fill_defaults(cli.build_parser().parse_args(argv))
  return args, cli.validate(args)


def test_quick_settings_are_the_readme_s():
  # --quick is budgeted at ~3 min on 2 CPU cores; the README states its settings
  args, names = _filled(["--quick"])
  assert names == ["adam", "dual_optim_plus"]
  assert args.forget_losses == ["npo"] and args.seeds == 1
  assert args.lrs == [3e-4, 3e-3, 3e-2]
  assert (args.finetune_steps, args.unlearn_steps, args.eval_every) == (
    300,
    60,
    60,
  )
  assert (args.d_model, args.layers, args.retain_size) == (128, 2, None)
  tofu, _ = _filled(["--quick", "--data-dir", "x"])
  assert tofu.lrs == [1e-3, 1e-2]
  assert (tofu.retain_size, tofu.eval_size, tofu.finetune_steps) == (
    100,
    20,
    200,
  )
  assert (tofu.unlearn_steps, tofu.eval_every) == (30, 30)
  full, names = _filled(["--data-dir", "x"])
  assert len(names) == 5 and full.seeds == 3 and len(full.lrs) == 5
  assert (full.finetune_steps, full.eval_every, full.retain_size) == (
    1000,
    30,
    200,
  )
  # flags given with --quick win
  mine, _ = _filled(["--quick", "--seeds", "2", "--finetune-steps", "500"])
  assert (mine.seeds, mine.finetune_steps) == (2, 500)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  quick = re.search(r"`--quick`: (.*?)\.", readme, re.S).group(1)
  for fact in (
    "300 fine-tuning steps (TOFU: 200",
    "Adam and DualOptim+ only",
    "NPO+GD",
    "lrs 3e-4, 3e-3, 3e-2 (generated) or 1e-3, 1e-2 (TOFU)",
    "1 seed",
    "one evaluation",
    "100 retain pairs",
    "20 questions",
    "30 unlearning steps",
  ):
    assert fact in " ".join(quick.split()), fact


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--data-dir", "{missing}"], "Data directory does not exist"),
    (
      ["--data-dir", "{tofu}", "--forget-split", "forget10"],
      r"Missing data file: .*forget10\.json",
    ),
    (
      ["--data-dir", "{tofu}", "--forget-split", "forget99"],
      "Unknown forget split",
    ),
    (["--data-dir", "{tofu}", "--task-id", "3"], "Empty forget set"),
    (["--data-dir", "{bad}"], r"forget01\.json, line 2: malformed JSON"),
    (["--optimizers", "sgd"], "unknown"),
    (["--forget-losses", "kl"], "--forget-losses: unknown"),
    (["--lrs", "1e-3,x"], "--lrs: expected comma-separated numbers"),
    (["--lrs", "0"], "--lrs: need positive"),
  ],
)
def test_bad_input_fails_cleanly(tmp_path, capsys, extra, message):
  tofu = tmp_path / "tofu"
  tofu.mkdir()
  row = {"task_id": "1", "question": "q?", "answer": "a"}
  pert = {
    "question": "q?",
    "answer": "a",
    "paraphrased_answer": "b",
    "perturbed_answer": ["c"],
  }
  (tofu / "forget01.json").write_text(json.dumps(row) + "\n")
  (tofu / "forget01_perturbed.json").write_text(
    json.dumps({**pert, "task_id": "1"}) + "\n"
  )
  (tofu / "retain90.json").write_text(
    json.dumps({"question": "r?", "answer": "r"}) + "\n"
  )
  for name in ("retain", "real_authors", "world_facts"):
    (tofu / f"{name}_perturbed.json").write_text(
      json.dumps({**pert, "question": "r?"}) + "\n"
    )
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "forget01.json").write_text(json.dumps(row) + "\n{oops\n")
  extra = [
    e.format(missing=str(tmp_path / "nope"), tofu=str(tofu), bad=str(bad))
    for e in extra
  ]
  out = tmp_path / "out"
  assert script.main(TINY + ["--out", str(out)] + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ")
  assert re.search(message, err), err
  assert not out.exists()


def test_runs_as_a_script_from_the_repo_root():
  # `python examples/unlearn_lm/main.py` (not a package import): the script makes
  # its folder importable itself (PYTHONPATH names only the library). An unknown
  # forget split fails after the flags are read, before any output.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      "examples/unlearn_lm/main.py",
      "--data-dir",
      "examples",
      "--forget-split",
      "forget99",
      "--out",
      "runs/never_written",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2, r.stderr
  assert "Unknown forget split" in r.stderr
  assert not os.path.exists(os.path.join(ROOT, "runs", "never_written"))
