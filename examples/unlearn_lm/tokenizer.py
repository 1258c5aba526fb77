r"""Tokenizers: byte-level (no vocabulary) and byte-level BPE trained on the data.

Both share ids ``0, 1, 2`` for ``PAD``, ``BOS`` and ``EOS`` and the interface
``encode`` / ``decode`` / ``decode_batch`` / ``vocab_size``.

* :class:`ByteTokenizer`: the UTF-8 byte ``b`` has id ``b + 3`` (259 ids); no
  file, no training, every string round-trips.
* :class:`SubwordTokenizer`: a byte-level BPE of the ``tokenizers`` library
  trained on the fine-tuning texts (the 256 byte symbols are in its alphabet,
  so any string still encodes). A TOFU answer is ~4x fewer ids than bytes, so a
  short sequence length truncates almost nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "SubwordTokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 byte tokenizer with three special ids.

  Attributes:
    pad_id: padding id (0); ignored by :meth:`decode`.
    bos_id: beginning-of-sequence id (1); ignored by :meth:`decode`.
    eos_id: end-of-sequence id (2); :meth:`decode` stops at the first one.

  Examples:
    >>> tok = ByteTokenizer()
    >>> ids = tok.encode("héllo", add_bos=True, add_eos=True)
    >>> tok.decode(ids)
    'héllo'
    >>> tok.vocab_size
    259
  """

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  def encode(
    self, text: str, *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int]:
    """Encodes ``text`` as its UTF-8 bytes shifted by :attr:`offset`.

    Args:
      text: any string.
      add_bos: prepend :attr:`bos_id`.
      add_eos: append :attr:`eos_id`.

    Returns:
      A list of ints in ``[0, vocab_size)``.
    """
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}.")
    ids = [b + self.offset for b in text.encode("utf-8")]
    if add_bos:
      ids.insert(0, self.bos_id)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids back to text: stops at ``EOS``, drops ``PAD``/``BOS``.

    A byte sequence cut inside a multi-byte character (e.g. a truncated or
    generated sequence) decodes with U+FFFD replacement characters instead of failing.
    """
    out = bytearray()
    for i in np.asarray(
      list(ids) if not isinstance(ids, np.ndarray) else ids
    ).reshape(-1):
      i = int(i)
      if i == self.eos_id:
        break
      if i >= self.offset:
        out.append(i - self.offset)
    return out.decode("utf-8", errors="replace")

  def decode_batch(
    self, ids: Sequence[Sequence[int]] | np.ndarray
  ) -> list[str]:
    """:meth:`decode` on every row."""
    return [self.decode(row) for row in ids]


class SubwordTokenizer:
  """Byte-level BPE (``tokenizers``) with the special ids of :class:`ByteTokenizer`.

  Build one with :meth:`train` on the texts the model will learn, or restore a
  saved one with :meth:`from_json` (training is only reproducible up to ties,
  so a run saves the tokenizer beside its checkpoints).

  Examples:
    >>> tok = SubwordTokenizer.train(["the cat sat on the mat"] * 4, 300)
    >>> tok.decode(tok.encode("the cat", add_eos=True) + [7])
    'the cat'
  """

  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self, tokenizer):
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [self.pad_id, self.bos_id, self.eos_id]:
      raise ValueError(
        f"special tokens {SPECIAL_TOKENS} must have ids 0, 1, 2, got {ids}."
      )
    self._tok = tokenizer

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "SubwordTokenizer":
    """Trains a byte-level BPE of at most ``vocab_size`` ids on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
      raise ValueError(f"vocab_size must be >= 259, got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return cls(tok)

  @classmethod
  def from_json(cls, text: str) -> "SubwordTokenizer":
    """Restores a tokenizer saved with :meth:`to_json`."""
    from tokenizers import Tokenizer

    return cls(Tokenizer.from_str(text))

  def to_json(self) -> str:
    return self._tok.to_str()

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(
    self, text: str, *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int]:
    """Token ids of ``text`` (no special tokens unless asked for)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}.")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``: stops at ``EOS``, drops ``PAD``/``BOS``; a cut multi-byte
    character decodes as U+FFFD."""
    out = []
    for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids):
      i = int(i)
      if i == self.eos_id:
        break
      if i > self.eos_id:
        out.append(i)
    return self._tok.decode(out, skip_special_tokens=True)

  def decode_batch(
    self, ids: Sequence[Sequence[int]] | np.ndarray
  ) -> list[str]:
    """:meth:`decode` on every row."""
    return [self.decode(row) for row in ids]
