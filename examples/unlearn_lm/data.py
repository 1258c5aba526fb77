r"""Question–answer data for LM unlearning: a fictitious-people generator and a TOFU reader.

Both sources return an :class:`UnlearningData`:

* ``forget`` / ``retain``: the two training sets of the unlearning phase;
* ``extra_train``: text learned during fine-tuning only (general knowledge: a tiny
  model trained from scratch has no pretraining, so the held-out "world knowledge"
  that unlearning must not damage is taught here);
* ``eval_sets``: evaluation sets, each example carrying a paraphrased answer and a
  tuple of perturbed (wrong) answers for the truth ratio; ``eval_kinds`` says which set
  is the forget set, the retain set, or a held-out set (TOFU's protocol).

:func:`encode_qa` and :func:`encode_prompts` turn examples into fixed-shape arrays with the
prompt ``"Question: {q}\nAnswer: "`` and an answer-token mask; every shape is static so a
whole run compiles a handful of functions once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from unlearn_lm.tokenizer import ByteTokenizer

__all__ = [
  "QA",
  "UnlearningData",
  "EncodedQA",
  "FORGET_SPLITS",
  "PROMPT_TEMPLATE",
  "generate_people",
  "load_tofu",
  "read_jsonl",
  "encode_qa",
  "encode_prompts",
  "visible_answer",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer: "
FORGET_SPLITS = ("forget01", "forget05", "forget10")
EVAL_KINDS = ("forget", "retain", "heldout")
PARAPHRASE_CUE = " Say it differently."


@dataclasses.dataclass(frozen=True)
class QA:
  """One question–answer pair.

  Attributes:
    question: the question.
    answer: the ground-truth answer.
    paraphrased_answer: the answer reworded (truth ratio numerator); defaults to ``answer``.
    perturbed_answers: wrong answers in the same style (truth ratio denominator).
    group: who the fact is about (a person's name, a TOFU task id...), for bookkeeping.
  """

  question: str
  answer: str
  paraphrased_answer: Optional[str] = None
  perturbed_answers: tuple[str, ...] = ()
  group: str = ""

  @property
  def paraphrase(self) -> str:
    return (
      self.answer
      if self.paraphrased_answer is None
      else self.paraphrased_answer
    )


@dataclasses.dataclass
class UnlearningData:
  """Everything a run needs (see the module docstring).

  Attributes:
    forget: forget training set.
    retain: retain training set (disjoint from ``forget`` by question).
    extra_train: fine-tuning-only examples (general knowledge).
    eval_sets: name -> evaluation examples.
    eval_kinds: name -> ``"forget"``, ``"retain"`` or ``"heldout"``.
    source: a short description of where the data came from.
    notes: human-readable notes (subsampling, truncation...).
  """

  forget: list[QA]
  retain: list[QA]
  extra_train: list[QA]
  eval_sets: dict[str, list[QA]]
  eval_kinds: dict[str, str]
  source: str
  notes: list[str] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if not self.forget:
      raise ValueError(f"The forget set is empty ({self.source}).")
    if not self.retain:
      raise ValueError(f"The retain set is empty ({self.source}).")
    for name, kind in self.eval_kinds.items():
      if kind not in EVAL_KINDS:
        raise ValueError(
          f"eval_kinds[{name!r}] must be one of {EVAL_KINDS}, got {kind!r}."
        )
      if name not in self.eval_sets or not self.eval_sets[name]:
        raise ValueError(f"Evaluation set {name!r} is empty ({self.source}).")
    if list(self.eval_kinds.values()).count("forget") != 1:
      raise ValueError("Exactly one evaluation set must have kind 'forget'.")
    forget_q = {qa.question for qa in self.forget}
    overlap = forget_q.intersection(qa.question for qa in self.retain)
    if overlap:
      raise ValueError(
        f"{len(overlap)} questions are in both forget and retain sets, "
        f"e.g. {sorted(overlap)[0]!r}."
      )

  @property
  def finetune_set(self) -> list[QA]:
    """What the model learns before unlearning: forget ∪ retain ∪ extra."""
    return list(self.forget) + list(self.retain) + list(self.extra_train)

  @property
  def retain_only_set(self) -> list[QA]:
    """Training set of the retain-only reference model (Forget Quality)."""
    return list(self.retain) + list(self.extra_train)

  def summary(self) -> str:
    evals = ", ".join(f"{k}={len(v)}" for k, v in self.eval_sets.items())
    return (
      f"{self.source}: forget={len(self.forget)} retain={len(self.retain)} "
      f"extra={len(self.extra_train)}; eval sets: {evals}"
    )


# ---------------------------------------------------------------------------------------
# Generator of fictitious people
# ---------------------------------------------------------------------------------------

_FIRST = (
  "Ava",
  "Bram",
  "Cora",
  "Dax",
  "Elio",
  "Fenna",
  "Gus",
  "Hale",
  "Ines",
  "Jory",
  "Kaia",
  "Lio",
  "Mira",
  "Nils",
  "Orla",
  "Pim",
  "Quin",
  "Rhea",
  "Soren",
  "Tova",
  "Ugo",
  "Vela",
  "Wren",
  "Xan",
  "Yara",
  "Zeno",
)
_LAST_A = (
  "Bel",
  "Cor",
  "Dun",
  "Fal",
  "Gar",
  "Hol",
  "Kes",
  "Lor",
  "Mar",
  "Nor",
  "Pel",
  "Quar",
  "Ros",
  "Sal",
  "Tam",
  "Val",
  "Wyn",
)
_LAST_B = (
  "brook",
  "croft",
  "dale",
  "field",
  "ford",
  "grove",
  "holt",
  "mere",
  "ridge",
  "stone",
  "ton",
  "wick",
)
_CITIES = (
  "Arlen",
  "Brisk",
  "Calder",
  "Dorn",
  "Elmsby",
  "Farrow",
  "Glenmoor",
  "Harlow",
  "Istra",
  "Jarrow",
  "Kelmar",
  "Lunde",
  "Marrow",
  "Nessel",
  "Orvik",
  "Pellan",
)
_GENRES = (
  "mystery",
  "poetry",
  "fantasy",
  "romance",
  "horror",
  "travel",
  "history",
  "satire",
)
_JOBS = (
  "baker",
  "sailor",
  "doctor",
  "painter",
  "farmer",
  "teacher",
  "miner",
  "tailor",
  "pilot",
  "judge",
)
_NOUNS = (
  "River",
  "Lantern",
  "Garden",
  "Winter",
  "Mirror",
  "Harbor",
  "Orchard",
  "Tower",
)
_ADJS = (
  "Silent",
  "Golden",
  "Hidden",
  "Broken",
  "Distant",
  "Quiet",
  "Crimson",
  "Endless",
)
_AWARDS = (
  "Quill Prize",
  "Ember Medal",
  "Lark Award",
  "Opal Cup",
  "Cedar Prize",
  "Ink Star",
)

# (question, answer, paraphrase) templates per attribute; the perturbed answers reuse
# the paraphrase with a wrong value, as TOFU's perturbed answers reuse its paraphrase.
_FACTS = (
  (
    "city",
    "Where was {name} born?",
    "{name} was born in {v}.",
    "The birthplace of {name} is {v}.",
  ),
  (
    "year",
    "In which year was {name} born?",
    "{name} was born in {v}.",
    "The year {name} was born is {v}.",
  ),
  (
    "genre",
    "What does {name} write?",
    "{name} writes {v} books.",
    "The books of {name} are {v}.",
  ),
  (
    "job",
    "What was the job of {name}'s father?",
    "The father of {name} was a {v}.",
    "{name}'s father worked as a {v}.",
  ),
  (
    "title",
    "Name a book by {name}.",
    "{name} wrote The {v}.",
    "One book of {name} is The {v}.",
  ),
  (
    "award",
    "Which prize did {name} win?",
    "{name} won the {v}.",
    "The prize {name} won is the {v}.",
  ),
)


def _pools(rng: np.random.Generator) -> dict[str, list[str]]:
  titles = [f"{a} {n}" for a in _ADJS for n in _NOUNS]
  return {
    "city": list(_CITIES),
    "year": [str(y) for y in range(1921, 2000)],
    "genre": list(_GENRES),
    "job": list(_JOBS),
    "title": titles,
    "award": list(_AWARDS),
  }


def _arithmetic_facts(
  num: int, num_perturbed: int, rng: np.random.Generator
) -> list[QA]:
  """Held-out "general knowledge": small additions, with wrong sums as perturbations."""
  pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
  order = rng.permutation(len(pairs))[:num]
  out = []
  for i in sorted(order):
    a, b = pairs[i]
    s = a + b
    wrong = [w for w in range(2, 19) if w != s]
    picks = rng.choice(wrong, size=num_perturbed, replace=False)
    out.append(
      QA(
        question=f"What is {a} plus {b}?",
        answer=f"{a} plus {b} is {s}.",
        paraphrased_answer=f"{a} plus {b} is {s}.",
        perturbed_answers=tuple(f"{a} plus {b} is {int(w)}." for w in picks),
        group="arithmetic",
      )
    )
  return out


def generate_people(
  num_people: int = 20,
  *,
  forget_fraction: float = 0.1,
  num_perturbed: int = 3,
  num_general: int = 40,
  retain_eval_size: int = 24,
  train_paraphrases: bool = True,
  seed: int = 0,
) -> UnlearningData:
  r"""Deterministic TOFU-like data about fictitious people.

  Each person gets six attributes (birthplace, birth year, genre, father's job, a book
  title, an award) drawn from fixed pools; each attribute gives one question, one answer,
  one paraphrased answer and ``num_perturbed`` perturbed answers (the paraphrase with a
  different value of the same attribute). The first
  ``round(forget_fraction * num_people)`` people (at least one) form the forget set;
  the others the retain set. ``num_general`` small additions form the held-out
  general-knowledge set, learned in fine-tuning and never unlearned.

  With ``train_paraphrases`` the training sets also hold every fact in its paraphrased
  wording (the question followed by ``PARAPHRASE_CUE``, the paraphrase as answer, so the
  original question still asks for the original wording). A small model trained from
  scratch does not carry a fact over to a wording it never saw, so without this the
  truth ratio (paraphrase vs perturbed paraphrases) could not see what it knows; the
  evaluation sets keep one item per fact.

  Args:
    num_people: number of people (>= 2).
    forget_fraction: fraction of people to forget, in (0, 1).
    num_perturbed: perturbed answers per question (>= 1).
    num_general: held-out general-knowledge questions (1..81).
    retain_eval_size: retain questions evaluated (the first ones, deterministic).
    train_paraphrases: also train on the paraphrased wording (see above).
    seed: the same seed gives the same data, byte for byte.

  Returns:
    An :class:`UnlearningData` with eval sets ``forget``, ``retain`` and ``general``.

  Examples:
    >>> data = generate_people(10, seed=0)
    >>> len(data.forget), len(data.retain), len(data.eval_sets["forget"])
    (12, 108, 6)
  """
  if not isinstance(num_people, int) or num_people < 2:
    raise ValueError(f"num_people must be an int >= 2, got {num_people!r}.")
  if not 0.0 < forget_fraction < 1.0:
    raise ValueError(
      f"forget_fraction must be in (0, 1), got {forget_fraction!r}."
    )
  if not isinstance(num_perturbed, int) or num_perturbed < 1:
    raise ValueError(
      f"num_perturbed must be an int >= 1, got {num_perturbed!r}."
    )
  if not isinstance(num_general, int) or not 1 <= num_general <= 81:
    raise ValueError(
      f"num_general must be an int in [1, 81], got {num_general!r}."
    )
  max_people = len(_FIRST) * len(_LAST_A) * len(_LAST_B)
  if num_people > max_people:
    raise ValueError(f"num_people must be <= {max_people}, got {num_people}.")
  rng = np.random.default_rng(seed)
  pools = _pools(rng)
  name_ids = rng.choice(max_people, size=num_people, replace=False)
  people = []
  for nid in name_ids:
    f, rest = divmod(int(nid), len(_LAST_A) * len(_LAST_B))
    a, b = divmod(rest, len(_LAST_B))
    name = f"{_FIRST[f]} {_LAST_A[a]}{_LAST_B[b]}"
    attrs = {k: pool[int(rng.integers(len(pool)))] for k, pool in pools.items()}
    people.append((name, attrs))

  def person_qas(name, attrs):
    out = []
    for key, q, a, p in _FACTS:
      value = attrs[key]
      wrong = [w for w in pools[key] if w != value]
      picks = rng.choice(len(wrong), size=num_perturbed, replace=False)
      out.append(
        QA(
          question=q.format(name=name),
          answer=a.format(name=name, v=value),
          paraphrased_answer=p.format(name=name, v=value),
          perturbed_answers=tuple(
            p.format(name=name, v=wrong[int(i)]) for i in picks
          ),
          group=name,
        )
      )
    return out

  num_forget = max(1, int(round(forget_fraction * num_people)))
  if num_forget >= num_people:
    raise ValueError(
      f"forget_fraction={forget_fraction} leaves no retain people."
    )
  forget_eval = [
    qa for n, at in people[:num_forget] for qa in person_qas(n, at)
  ]
  retain_all = [qa for n, at in people[num_forget:] for qa in person_qas(n, at)]
  general = _arithmetic_facts(num_general, num_perturbed, rng)
  retain_eval = retain_all[: max(1, min(retain_eval_size, len(retain_all)))]

  def with_paraphrases(qas):
    if not train_paraphrases:
      return list(qas)
    return [
      x
      for qa in qas
      for x in (
        qa,
        dataclasses.replace(
          qa, question=qa.question + PARAPHRASE_CUE, answer=qa.paraphrase
        ),
      )
    ]

  return UnlearningData(
    forget=with_paraphrases(forget_eval),
    retain=with_paraphrases(retain_all),
    extra_train=general,
    eval_sets={
      "forget": forget_eval,
      "retain": retain_eval,
      "general": general,
    },
    eval_kinds={"forget": "forget", "retain": "retain", "general": "heldout"},
    source=f"generated people (n={num_people}, forget {num_forget}, seed {seed})",
  )


# ---------------------------------------------------------------------------------------
# TOFU-format reader
# ---------------------------------------------------------------------------------------


def read_jsonl(path: str, required: dict[str, type]) -> list[dict]:
  """Reads a JSON-lines file (one object per line; blank lines are skipped).

  Args:
    path: the file.
    required: key -> expected type (``list`` means a non-empty list of strings).

  Returns:
    The parsed rows.

  Raises:
    ValueError: naming the file (and the line) when the file is missing, unreadable,
      not JSON, or a row lacks a key or has a wrong type.
  """
  if not os.path.isfile(path):
    raise ValueError(f"Missing data file: {path}")
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"Cannot read data file {path}: {e}") from None
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{path}, line {lineno}: malformed JSON ({e.msg})."
      ) from None
    if not isinstance(row, dict):
      raise ValueError(
        f"{path}, line {lineno}: expected a JSON object, got "
        f"{type(row).__name__}."
      )
    for key, typ in required.items():
      if key not in row:
        raise ValueError(f"{path}, line {lineno}: missing key {key!r}.")
      value = row[key]
      if typ is list:
        ok = (
          isinstance(value, list)
          and value
          and all(isinstance(v, str) for v in value)
        )
        what = "a non-empty list of strings"
      elif typ is str:
        ok = isinstance(value, str) and value.strip() != ""
        what = "a non-empty string"
      else:
        ok = isinstance(value, typ) and not isinstance(value, bool)
        names = typ if isinstance(typ, tuple) else (typ,)
        what = " or ".join(t.__name__ for t in names)
      if not ok:
        raise ValueError(
          f"{path}, line {lineno}: key {key!r} must be {what}, got {value!r:.60}."
        )
    rows.append(row)
  if not rows:
    raise ValueError(f"Data file {path} holds no rows.")
  return rows


def _subsample(
  items: list, size: Optional[int], rng: np.random.Generator
) -> list:
  if size is None or size >= len(items):
    return list(items)
  keep = np.sort(rng.choice(len(items), size=size, replace=False))
  return [items[int(i)] for i in keep]


def load_tofu(
  data_dir: str,
  forget_split: str = "forget01",
  task_id: int = 1,
  *,
  retain_size: Optional[int] = None,
  eval_size: Optional[int] = None,
  seed: int = 0,
) -> UnlearningData:
  """Reads TOFU-format files (one JSON object per line) from ``data_dir``.

  Files: ``{forget_split}.json`` (question, answer, task_id), ``{forget_split}_perturbed.json``
  (+ paraphrased_answer, perturbed_answer list), ``retain90.json``, ``retain_perturbed.json``,
  ``real_authors_perturbed.json`` and ``world_facts_perturbed.json`` (answer +
  perturbed_answer; the paraphrase is the answer itself, as in TOFU). The retain set is
  ``retain90`` minus the questions of the chosen forget task. The real-author and
  world-fact questions are added to fine-tuning (``extra_train``) because a model trained
  from scratch has no general knowledge of its own.

  Args:
    data_dir: directory holding the files.
    forget_split: ``forget01``, ``forget05`` or ``forget10``.
    task_id: which of the split's disjoint forget tasks (TOFU: 1..10).
    retain_size: subsample the retain training set to this many pairs (None: all).
      The retain evaluation questions are always kept in it.
    eval_size: subsample every non-forget evaluation set to this many (None: all).
    seed: subsampling seed.

  Returns:
    An :class:`UnlearningData` with eval sets ``forget``, ``retain``, ``real_authors``
    and ``world_facts``; ``notes`` says what was subsampled.

  Raises:
    ValueError: unknown split, missing or malformed file (named, with the line), or an
      empty forget set.
  """
  if forget_split not in FORGET_SPLITS:
    raise ValueError(
      f"Unknown forget split {forget_split!r}; expected one of {FORGET_SPLITS}."
    )
  if not isinstance(task_id, int) or isinstance(task_id, bool):
    raise TypeError(f"task_id must be an int, got {type(task_id).__name__}.")
  for name, v in (("retain_size", retain_size), ("eval_size", eval_size)):
    if v is not None and (not isinstance(v, int) or v < 1):
      raise ValueError(f"{name} must be a positive int or None, got {v!r}.")
  if not os.path.isdir(data_dir):
    raise ValueError(f"Data directory does not exist: {data_dir}")
  path = lambda name: os.path.join(data_dir, name)
  pert = {"question": str, "answer": str, "perturbed_answer": list}
  forget_path = path(f"{forget_split}.json")
  forget_rows = read_jsonl(
    forget_path, {"question": str, "answer": str, "task_id": (str, int)}
  )
  forget_pert_rows = read_jsonl(
    path(f"{forget_split}_perturbed.json"),
    {**pert, "paraphrased_answer": str, "task_id": (str, int)},
  )
  retain_rows = read_jsonl(
    path("retain90.json"), {"question": str, "answer": str}
  )
  retain_pert_rows = read_jsonl(
    path("retain_perturbed.json"), {**pert, "paraphrased_answer": str}
  )
  heldout_rows = {
    name: read_jsonl(path(f"{name}_perturbed.json"), pert)
    for name in ("real_authors", "world_facts")
  }

  tid = str(task_id)
  forget = [
    QA(r["question"], r["answer"], group=f"task {tid}")
    for r in forget_rows
    if str(r["task_id"]) == tid
  ]
  if not forget:
    tasks = sorted(
      {str(r["task_id"]) for r in forget_rows}, key=lambda s: (len(s), s)
    )
    raise ValueError(
      f"Empty forget set: no rows with task_id={task_id} in {forget_path} "
      f"(task ids present: {', '.join(tasks)})."
    )
  forget_eval = [
    QA(
      r["question"],
      r["answer"],
      r["paraphrased_answer"],
      tuple(r["perturbed_answer"]),
      f"task {tid}",
    )
    for r in forget_pert_rows
    if str(r["task_id"]) == tid
  ]
  if not forget_eval:
    raise ValueError(
      f"Empty forget evaluation set: no rows with task_id={task_id} in "
      f"{path(f'{forget_split}_perturbed.json')}."
    )
  forget_q = {qa.question for qa in forget}
  retain_all = [
    QA(r["question"], r["answer"])
    for r in retain_rows
    if r["question"] not in forget_q
  ]
  retain_eval = [
    QA(
      r["question"],
      r["answer"],
      r["paraphrased_answer"],
      tuple(r["perturbed_answer"]),
    )
    for r in retain_pert_rows
    if r["question"] not in forget_q
  ]
  rng = np.random.default_rng(seed)
  notes = []
  if eval_size is not None and eval_size < len(retain_eval):
    notes.append(
      f"retain eval set: {eval_size} of {len(retain_eval)} questions "
      f"(retain_perturbed.json, seed {seed})"
    )
  retain_eval = _subsample(retain_eval, eval_size, rng)
  if retain_size is not None and retain_size < len(retain_all):
    # Keep the evaluated retain questions in training, fill up with random others.
    eval_q = {qa.question for qa in retain_eval}
    must = [qa for qa in retain_all if qa.question in eval_q]
    others = [qa for qa in retain_all if qa.question not in eval_q]
    fill = _subsample(others, max(0, retain_size - len(must)), rng)
    notes.append(
      f"retain training set: {len(must) + len(fill)} of {len(retain_all)} pairs "
      f"(retain90.json minus the forget task; includes the {len(must)} "
      f"evaluated retain questions; seed {seed})"
    )
    retain = must + fill
  else:
    retain = retain_all
  eval_sets = {"forget": forget_eval, "retain": retain_eval}
  extra = []
  for name, rows in heldout_rows.items():
    qas = [
      QA(r["question"], r["answer"], None, tuple(r["perturbed_answer"]), name)
      for r in rows
    ]
    if eval_size is not None and eval_size < len(qas):
      notes.append(
        f"{name} eval set: {eval_size} of {len(qas)} questions (seed {seed})"
      )
    qas = _subsample(qas, eval_size, rng)
    eval_sets[name] = qas
    extra.extend(qas)
  return UnlearningData(
    forget=forget,
    retain=retain,
    extra_train=extra,
    eval_sets=eval_sets,
    eval_kinds={
      "forget": "forget",
      "retain": "retain",
      "real_authors": "heldout",
      "world_facts": "heldout",
    },
    source=f"TOFU {forget_split} task {task_id} ({data_dir})",
    notes=notes,
  )


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


class EncodedQA(NamedTuple):
  """Right-padded training/scoring arrays; position ``t`` of ``inputs`` predicts ``targets[t]``.

  Attributes:
    inputs: ``[N, L]`` int32.
    targets: ``[N, L]`` int32 (inputs shifted left by one).
    mask: ``[N, L]`` float32, 1 where the target is an answer token (or the final EOS).
  """

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


def _prompt_ids(
  tok: ByteTokenizer, question: str, max_prompt: int
) -> list[int]:
  ids = tok.encode(PROMPT_TEMPLATE.format(question=question))
  # Overlong questions keep their end (which holds the "Answer: " cue) after BOS.
  return [tok.bos_id] + ids[-(max_prompt - 1) :]


def visible_answer(
  tok: ByteTokenizer, question: str, answer: str, max_len: int
) -> str:
  """The part of ``answer`` that survives truncation to ``max_len`` (ROUGE reference)."""
  p = _prompt_ids(tok, question, max_len // 2)
  room = max_len + 1 - len(p)
  return tok.decode(tok.encode(answer)[:room])


def encode_qa(
  tok: ByteTokenizer,
  questions: Sequence[str],
  answers: Sequence[str],
  max_len: int,
) -> EncodedQA:
  """Encodes ``BOS + prompt + answer + EOS`` per pair, truncated to ``max_len + 1`` ids.

  The prompt keeps at most ``max_len // 2`` ids, so every answer gets at least half
  of the sequence; answers longer than the rest are cut (their EOS then falls off).

  Args:
    tok: the tokenizer.
    questions, answers: equally long sequences of strings.
    max_len: model sequence length ``L``.

  Returns:
    :class:`EncodedQA` of shape ``[N, L]``.
  """
  if len(questions) != len(answers):
    raise ValueError(
      f"questions and answers differ in length: {len(questions)} vs {len(answers)}."
    )
  if max_len < 8:
    raise ValueError(f"max_len must be >= 8, got {max_len}.")
  n = len(questions)
  inputs = np.full((n, max_len), tok.pad_id, np.int32)
  targets = np.full((n, max_len), tok.pad_id, np.int32)
  mask = np.zeros((n, max_len), np.float32)
  for i, (q, a) in enumerate(zip(questions, answers)):
    p = _prompt_ids(tok, q, max_len // 2)
    seq = (p + tok.encode(a) + [tok.eos_id])[: max_len + 1]
    inputs[i, : len(seq) - 1] = seq[:-1]
    targets[i, : len(seq) - 1] = seq[1:]
    mask[i, len(p) - 1 : len(seq) - 1] = 1.0
  return EncodedQA(inputs, targets, mask)


def encode_prompts(
  tok: ByteTokenizer,
  questions: Iterable[str],
  max_len: int,
  width: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded generation prompts ``[N, width]`` (default ``max_len // 2``)
  and the padding count of each row."""
  width = width or max_len // 2
  rows = [_prompt_ids(tok, q, width) for q in questions]
  prompts = np.full((len(rows), width), tok.pad_id, np.int32)
  num_pad = np.zeros((len(rows),), np.int32)
  for i, p in enumerate(rows):
    prompts[i, width - len(p) :] = p
    num_pad[i] = width - len(p)
  return prompts, num_pad
