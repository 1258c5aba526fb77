"""Tokenizer, fictitious-people generator, encoding and the TOFU-format reader."""

import json

import numpy as np
import pytest

from unlearn_lm.data import (
  PARAPHRASE_CUE,
  encode_prompts,
  encode_qa,
  generate_people,
  load_tofu,
  read_jsonl,
  visible_answer,
)
from unlearn_lm.tokenizer import ByteTokenizer, SubwordTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize(
  "text", ["", "hello world", "Ünïcödé — 東京 🙂", "a\nb\tc"]
)
def test_tokenizer_round_trip(text):
  ids = TOK.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
  assert all(0 <= i < TOK.vocab_size for i in ids)
  assert TOK.decode(ids) == text
  assert TOK.decode(np.asarray(ids + [TOK.pad_id] * 3)) == text


def test_tokenizer_stops_at_eos_and_survives_cut_characters():
  ids = TOK.encode("ab") + [TOK.eos_id] + TOK.encode("zz")
  assert TOK.decode(ids) == "ab"
  cut = TOK.encode("é")[:1]  # half of a two-byte character
  assert TOK.decode(cut) == "\ufffd"
  with pytest.raises(TypeError, match="text"):
    TOK.encode(b"bytes")


def test_subword_tokenizer_round_trips_and_shortens_seen_text():
  pytest.importorskip("tokenizers")
  people = generate_people(12, seed=3)
  texts = [qa.question + " " + qa.answer for qa in people.finetune_set]
  tok = SubwordTokenizer.train(texts, 600)
  assert 259 < tok.vocab_size <= 600
  for text in texts[:5] + ["Ünïcödé — 東京 🙂", ""]:  # unseen characters too
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids + [tok.pad_id] * 2) == text
  assert tok.decode(tok.encode("ab") + [tok.eos_id] + tok.encode("zz")) == "ab"
  # merges learned from the data: a seen text is several times shorter than bytes
  assert len(tok.encode(texts[0])) * 2 < len(TOK.encode(texts[0]))
  again = SubwordTokenizer.from_json(tok.to_json())
  assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
  with pytest.raises(ValueError, match="vocab_size"):
    SubwordTokenizer.train(texts, 100)


def test_generator_is_deterministic_and_well_formed():
  a, b = generate_people(12, seed=3), generate_people(12, seed=3)
  assert a == b
  c = generate_people(12, seed=4)
  assert a.forget != c.forget
  assert len(a.eval_sets["forget"]) == 6  # round(0.1 * 12) = 1 person x 6 facts
  assert (
    len(a.forget) == 12 and len(a.retain) == 11 * 6 * 2
  )  # + paraphrased wording
  people_f = {qa.group for qa in a.forget}
  people_r = {qa.group for qa in a.retain}
  assert people_f and not people_f & people_r
  for qa in (
    a.eval_sets["forget"] + a.eval_sets["retain"] + a.eval_sets["general"]
  ):
    assert len(qa.perturbed_answers) == 3
    assert qa.paraphrase not in qa.perturbed_answers
    assert len(set(qa.perturbed_answers)) == 3
  para_items = [qa for qa in a.forget if qa.question.endswith(PARAPHRASE_CUE)]
  assert len(para_items) == 6 and all(
    qa.answer == qa.paraphrase for qa in para_items
  )
  plain = generate_people(12, seed=3, train_paraphrases=False)
  assert plain.forget == a.eval_sets["forget"]


def test_generator_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_people"):
    generate_people(1)
  with pytest.raises(ValueError, match="forget_fraction"):
    generate_people(10, forget_fraction=1.0)


def test_encode_qa_masks_exactly_the_answer():
  enc = encode_qa(
    TOK, ["Who?", "Where?"], ["Ann.", "Paris, of course."], max_len=64
  )
  assert enc.inputs.shape == enc.targets.shape == enc.mask.shape == (2, 64)
  for i, ans in enumerate(["Ann.", "Paris, of course."]):
    answer_ids = enc.targets[i][enc.mask[i] > 0]
    assert answer_ids[-1] == TOK.eos_id
    assert TOK.decode(answer_ids) == ans
    n = int((enc.inputs[i] != TOK.pad_id).sum())
    # targets are the inputs shifted by one
    np.testing.assert_array_equal(enc.targets[i, : n - 1], enc.inputs[i, 1:n])
  assert TOK.decode(enc.inputs[0]).startswith("Question: Who?\nAnswer: ")


def test_encode_qa_truncates_long_answers_and_prompts():
  q, a = "Q" * 100, "word " * 40
  enc = encode_qa(TOK, [q], [a], max_len=64)
  masked = int(enc.mask.sum())
  assert masked == 64 - 32 + 1  # the prompt keeps max_len // 2 ids
  assert visible_answer(TOK, q, a, 64) == a[:masked]
  prompts, num_pad = encode_prompts(TOK, [q, "Hi?"], max_len=64)
  assert prompts.shape == (2, 32)
  assert num_pad[0] == 0 and TOK.decode(prompts[0]).endswith("\nAnswer: ")
  assert num_pad[1] == 32 - len(TOK.encode("Question: Hi?\nAnswer: ")) - 1
  assert (prompts[1, : num_pad[1]] == TOK.pad_id).all() and prompts[
    1, num_pad[1]
  ] == TOK.bos_id


# ---------------------------------------------------------------------------------------
# TOFU format, on fixture files written here
# ---------------------------------------------------------------------------------------


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _pert(q, a, k=3, **extra):
  return {
    "question": q,
    "answer": a,
    "paraphrased_answer": a + " indeed",
    "perturbed_answer": [f"{a} wrong {j}" for j in range(k)],
    **extra,
  }


@pytest.fixture
def tofu_dir(tmp_path):
  d = tmp_path / "tofu"
  d.mkdir()
  forget = [
    {"task_id": str(t), "question": f"F{t}-{i}?", "answer": f"f{t}{i}"}
    for t in (1, 2)
    for i in range(3)
  ]
  _write(d / "forget01.json", forget)
  _write(
    d / "forget01_perturbed.json",
    [
      _pert(r["question"], r["answer"], 5, task_id=r["task_id"]) for r in forget
    ],
  )
  # retain90 contains forget task 2 (as forget05 tasks lie inside retain90 in TOFU)
  retain = [
    {"question": f"R{i}?", "answer": f"r{i}"} for i in range(10)
  ] + forget[3:]
  _write(d / "retain90.json", retain)
  _write(
    d / "retain_perturbed.json", [_pert(f"R{i}?", f"r{i}", 5) for i in range(4)]
  )
  for name in ("real_authors", "world_facts"):
    rows = [
      {
        "question": f"{name} {i}?",
        "answer": f"a{i}",
        "perturbed_answer": ["x", "y", "z"],
      }
      for i in range(5)
    ]
    _write(d / f"{name}_perturbed.json", rows)
  return d


def test_tofu_reader(tofu_dir):
  data = load_tofu(str(tofu_dir), "forget01", 2)
  assert [qa.question for qa in data.forget] == ["F2-0?", "F2-1?", "F2-2?"]
  # retain = retain90 minus the forget task's questions
  assert len(data.retain) == 10 and all(
    qa.question.startswith("R") for qa in data.retain
  )
  ev = data.eval_sets
  assert set(ev) == {"forget", "retain", "real_authors", "world_facts"}
  assert len(ev["forget"]) == 3 and len(ev["forget"][0].perturbed_answers) == 5
  assert ev["forget"][0].paraphrase == "f20 indeed"
  assert (
    ev["world_facts"][0].paraphrase == ev["world_facts"][0].answer
  )  # as in TOFU
  assert data.eval_kinds["real_authors"] == "heldout"
  assert len(data.extra_train) == 10
  assert not data.notes


def test_tofu_reader_subsamples_and_says_so(tofu_dir):
  data = load_tofu(str(tofu_dir), "forget01", 1, retain_size=6, eval_size=2)
  assert len(data.retain) == 6 and len(data.eval_sets["retain"]) == 2
  retain_q = {qa.question for qa in data.retain}
  assert all(qa.question in retain_q for qa in data.eval_sets["retain"])
  assert len(data.eval_sets["world_facts"]) == 2
  assert any("retain training set: 6 of 13" in n for n in data.notes)
  assert (
    load_tofu(str(tofu_dir), "forget01", 1, retain_size=6, eval_size=2).retain
    == data.retain
  )


def test_tofu_reader_errors(tofu_dir):
  with pytest.raises(ValueError, match="Unknown forget split 'forget07'"):
    load_tofu(str(tofu_dir), "forget07", 1)
  with pytest.raises(ValueError, match=r"Missing data file: .*forget05\.json"):
    load_tofu(str(tofu_dir), "forget05", 1)
  with pytest.raises(
    ValueError,
    match=r"Empty forget set: no rows with task_id=7 .*forget01\.json",
  ):
    load_tofu(str(tofu_dir), "forget01", 7)
  with open(tofu_dir / "retain90.json", "a", encoding="utf-8") as f:
    f.write('{"question": "broken"\n')
  with pytest.raises(
    ValueError, match=r"retain90\.json, line 14: malformed JSON"
  ):
    load_tofu(str(tofu_dir), "forget01", 1)


def test_read_jsonl_names_key_and_line(tmp_path):
  p = tmp_path / "x.json"
  _write(p, [{"question": "a", "answer": "b"}, "", {"question": "c"}])
  with pytest.raises(
    ValueError, match=r"x\.json, line 3: missing key 'answer'"
  ):
    read_jsonl(str(p), {"question": str, "answer": str})
  _write(p, [{"question": "a", "answer": "b", "perturbed_answer": []}])
  with pytest.raises(
    ValueError, match=r"line 1: key 'perturbed_answer' must be a non-empty list"
  ):
    read_jsonl(str(p), {"question": str, "perturbed_answer": list})
  _write(p, ["[1, 2]"])
  with pytest.raises(ValueError, match="line 1: expected a JSON object"):
    read_jsonl(str(p), {})
