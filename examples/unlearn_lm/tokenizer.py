r"""A byte-level tokenizer: no vocabulary file, no download, every string round-trips.

Ids ``0, 1, 2`` are ``PAD``, ``BOS`` and ``EOS``; the UTF-8 byte ``b`` has id ``b + 3``,
so the vocabulary has ``256 + 3 = 259`` entries. Any Unicode string encodes (as its
UTF-8 bytes) and decodes back exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ByteTokenizer"]


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
