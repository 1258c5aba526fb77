"""Unlearning loop: sharded == single-device, exact resume, a tiny end-to-end run, bad input."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualoptax
from dualoptax.lm import train
from dualoptax.lm.data import encode_qa, generate_people
from dualoptax.lm.model import LanguageModel, TransformerConfig
from dualoptax.lm.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
L = 64


def _setup():
  data = generate_people(4, num_general=2)
  lm = LanguageModel(TransformerConfig(max_len=L, d_model=32, num_heads=2, num_layers=1))
  enc = lambda qas: encode_qa(TOK, [q.question for q in qas], [q.answer for q in qas], L)
  fenc, renc = enc(data.forget), enc(data.retain)
  params = lm.init(0)
  udata = {"forget": jax.tree.map(jnp.asarray, fenc), "retain": jax.tree.map(jnp.asarray, renc),
           "ref_nll": train.reference_sequence_nll(lm, params, fenc)}
  return lm, params, udata


def _tx_8bit():
  fn = getattr(dualoptax, "dual_optim_plus_8bit", None)
  if fn is None:
    from dualoptax.quantized_state import dual_optim_plus_8bit as fn
  return fn(1e-3, weight_decay=0.01, min_size=1024)


def _mesh():
  assert len(jax.devices()) >= 8, "tests/conftest.py must request 8 host devices"
  return train.make_mesh(train.parse_mesh("data=2,fsdp=4"))


def test_sharded_unlearning_chunk_equals_single_device():
  lm, params, udata = _setup()
  lr = 1e-3
  tx = dualoptax.dual_optim_plus(lr, weight_decay=0.01)
  kw = dict(multi_objective=True, forget_loss="npo", batch_size=8, seed=0, chunk_steps=6)
  mesh = _mesh()

  # gradients of one batch: sharded (batch over data x fsdp, params over fsdp) == single
  b = jax.tree.map(lambda x: x[:8], udata["retain"])
  loss = lambda p, b: dualoptax.unlearning.gd_loss(lm.apply(p, b.inputs), b.targets, b.mask)
  g1 = jax.jit(jax.grad(loss))(params, b)
  g8 = jax.jit(jax.grad(loss))(train.place(params, mesh),
                               jax.device_put(b, jax.sharding.NamedSharding(
                                   mesh, jax.sharding.PartitionSpec(("data", "fsdp")))))
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-8), g8, g1)

  single = train.TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
  single, (loss_1, idx_1) = train.make_unlearn_chunk(lm, tx, **kw)(single, udata)
  p = train.place(jax.tree.map(jnp.copy, params), mesh)
  sharded = train.place(train.TrainState(jnp.int32(0), p, tx.init(p)), mesh)
  sharded, (loss_8, idx_8) = train.make_unlearn_chunk(lm, tx, mesh=mesh, **kw)(sharded, udata)

  qkv = sharded.params["block0"]["qkv"]["kernel"]  # [32, 96]: split over fsdp=4
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert qkv.addressable_shards[0].data.shape == (8, 96)
  assert sharded.opt_state.base_nu["block0"]["qkv"]["kernel"].sharding.spec == qkv.sharding.spec
  np.testing.assert_array_equal(idx_1, [0, 1, 1, 1, 1, 1])  # the 1:5 schedule
  np.testing.assert_array_equal(idx_1, idx_8)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  assert int(sharded.step) == int(single.step) == 6
  # Normalized (Adam-like) steps turn float reduction-order noise on near-zero gradient
  # elements into O(lr) differences, so a few elements may differ by < lr; the rest agree
  # to a small fraction of lr.
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(sharded.params)])
  p0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
  c = np.concatenate([np.ravel(x) for x in jax.tree.leaves(single.params)])
  assert np.max(np.abs(a - c)) < lr
  assert np.median(np.abs(c - p0)) > 100 * np.median(np.abs(a - c))  # real movement
  assert np.mean(np.isclose(a, c, rtol=1e-5, atol=2e-5)) > 0.99  # 2% of lr


def test_sharded_8bit_state_update_equals_single_device():
  tx = _tx_8bit()
  mesh = _mesh()
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"w": jax.random.normal(keys[0], (64, 512)), "v": jax.random.normal(keys[1], (16, 256)),
            "b": jnp.zeros((512,))}
  grads = [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), params) for k in keys[2:]]

  def run(params, grads):
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, name: tx.update({name: g}, s, p), static_argnums=3)
    for g, name in zip(grads, ("forget", "retain")):
      updates, state = step(g, state, params, name)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state

  p1, s1 = run(params, grads)
  p8, s8 = run(train.place(params, mesh), [train.place(g, mesh) for g in grads])
  codes = s8.base_mu["w"].codes
  assert codes.dtype == jnp.uint8 and "fsdp" in tuple(codes.sharding.spec)
  assert codes.addressable_shards[0].data.shape[0] == 64 // 4
  # Float reduction-order noise can move a value across a code boundary: a rare
  # neighbouring code, hence a rare update difference below lr; all else agrees.
  for a, c in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
    a, c = np.asarray(a), np.asarray(c)
    if a.dtype == np.uint8:
      assert np.mean(a != c) < 1e-3 and np.max(np.abs(a.astype(int) - c.astype(int))) <= 1
    else:
      assert np.mean(~np.isclose(a, c, rtol=1e-5, atol=1e-7)) < 1e-3
      assert np.max(np.abs(a - c)) < 1e-3 * max(1.0, float(np.max(np.abs(c))))


def test_resume_from_checkpoint_is_exact(tmp_path):
  lm, params, udata = _setup()
  tx = dualoptax.dual_optim_plus(1e-3, weight_decay=0.01)
  chunk = train.make_unlearn_chunk(lm, tx, multi_objective=True, forget_loss="ga",
                                   batch_size=4, seed=1, chunk_steps=3)
  fresh = lambda: train.TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
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
  assert isinstance(restored.opt_state, dualoptax.DualOptimPlusState)  # not a dict
  resumed, _ = chunk(restored, udata)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def _script():
  spec = importlib.util.spec_from_file_location("unlearn_lm", os.path.join(ROOT, "examples",
                                                                           "unlearn_lm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


TINY = ["--num-people", "4", "--d-model", "32", "--heads", "2", "--layers", "1",
        "--finetune-steps", "20", "--unlearn-steps", "12", "--chunk-steps", "6",
        "--eval-every", "6", "--batch-size", "8", "--max-len", "64"]


def test_end_to_end_tiny_run_and_resume(tmp_path, capsys):
  script = _script()
  out = str(tmp_path / "run")
  args = TINY + ["--out", out, "--optimizers", "adam,dual_optim_plus"]
  # interrupted after the first chunk of the first optimizer: no results yet
  assert script.main(args + ["--max-chunks", "1"]) == 0
  assert not os.path.exists(os.path.join(out, "results.json"))
  assert os.path.isdir(os.path.join(out, "checkpoints", "finetuned"))
  assert script.main(args + ["--resume"]) == 0
  log = capsys.readouterr().out
  assert "reusing the Orbax checkpoint" in log and "[adam] resumed at step 6" in log
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  assert set(res["final"]) == {"adam", "dual_optim_plus"}
  for name, hist in res["history"].items():
    assert [h["step"] for h in hist] == [0, 6, 12]
    final = res["final"][name]
    for key in ("model_utility", "forget_efficacy", "forget_quality", "forget/prob",
                "forget/rouge_l", "forget/truth_ratio", "general/prob"):
      assert np.isfinite(final[key]) and 0.0 <= final[key] <= 1.0, (name, key)
  assert os.path.getsize(os.path.join(out, "metrics.png")) > 10_000
  assert "| DualOptim+" in log and "Forget Quality" in log
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("extra, message", [
    (["--data-dir", "{missing}"], "Data directory does not exist"),
    (["--data-dir", "{tofu}", "--forget-split", "forget10"], r"Missing data file: .*forget10\.json"),
    (["--data-dir", "{tofu}", "--forget-split", "forget99"], "Unknown forget split"),
    (["--data-dir", "{tofu}", "--task-id", "3"], "Empty forget set"),
    (["--data-dir", "{bad}"], r"forget01\.json, line 2: malformed JSON"),
    (["--optimizers", "sgd"], "unknown"),
])
def test_bad_input_fails_cleanly(tmp_path, capsys, extra, message):
  tofu = tmp_path / "tofu"
  tofu.mkdir()
  row = {"task_id": "1", "question": "q?", "answer": "a"}
  pert = {"question": "q?", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c"]}
  (tofu / "forget01.json").write_text(json.dumps(row) + "\n")
  (tofu / "forget01_perturbed.json").write_text(json.dumps({**pert, "task_id": "1"}) + "\n")
  (tofu / "retain90.json").write_text(json.dumps({"question": "r?", "answer": "r"}) + "\n")
  for name in ("retain", "real_authors", "world_facts"):
    (tofu / f"{name}_perturbed.json").write_text(json.dumps({**pert, "question": "r?"}) + "\n")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "forget01.json").write_text(json.dumps(row) + "\n{oops\n")
  extra = [e.format(missing=str(tmp_path / "nope"), tofu=str(tofu), bad=str(bad)) for e in extra]
  out = tmp_path / "out"
  assert _script().main(TINY + ["--out", str(out)] + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ")
  import re
  assert re.search(message, err), err
  assert not out.exists()
