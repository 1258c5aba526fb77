r"""A small decoder-only transformer in Flax NNX, with a functional wrapper.

Pre-LayerNorm blocks, learned absolute positions, multi-head causal self-attention and
a GELU MLP; the output head is untied from the embedding:

.. math::
    h_0 = E[x] + P[\mathrm{pos}], \qquad
    h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h)), \qquad
    h \leftarrow h + W_2\,\mathrm{gelu}(W_1\,\mathrm{LN}(h)), \qquad
    \mathrm{logits} = W_o\,\mathrm{LN}(h).

Training calls the module on right-padded sequences (padding sits after the answer,
so a causal mask alone suffices). Generation left-pads prompts, passes explicit
positions and a key-validity mask, and decodes with a key/value cache, one token per
step inside a :func:`jax.lax.scan`.

:class:`LanguageModel` keeps the NNX graph definition and exposes pure functions of a
*pure-dict* parameter tree (string keys only), which is what optax, Orbax and the
sharding helpers see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["TransformerConfig", "Transformer", "LanguageModel"]

Params = Any
Cache = Any


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of :class:`Transformer`.

  Attributes:
    vocab_size: number of token ids (259 for :class:`~unlearn_lm.tokenizer.ByteTokenizer`).
    max_len: longest sequence (size of the position table).
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: attention heads (must divide ``d_model``).
    d_ff: MLP hidden width (default ``4 * d_model``).
  """

  vocab_size: int = 259
  max_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  d_ff: Optional[int] = None

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(
          f"TransformerConfig.{name} must be a positive int, got {value!r}."
        )
    if self.d_model % self.num_heads:
      raise ValueError(
        f"TransformerConfig.num_heads={self.num_heads} must divide d_model={self.d_model}."
      )

  @property
  def hidden(self) -> int:
    return self.d_ff or 4 * self.d_model


def _attention(q, k, v, mask):
  """Softmax attention. q: [B,L,H,D], k/v: [B,S,H,D], mask: [B,L,S] bool."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("blhd,bshd->bhls", q, k) * scale
  scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhls,bshd->blhd", weights, v)


class Block(nnx.Module):
  """One pre-LN transformer block."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, cfg.hidden, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.hidden, d, rngs=rngs)

  def __call__(self, x, key_valid=None, cache=None, index=None):
    b, n, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (t.reshape(b, n, h, d // h) for t in (q, k, v))
    if cache is None:
      query_slot = jnp.arange(n)
      key_slot = jnp.arange(n)
      new_cache = None
    else:
      # Write this call's keys/values at slots [index, index + n) of the cache.
      k = jax.lax.dynamic_update_slice(cache[0], k, (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache[1], v, (0, index, 0, 0))
      new_cache = (k, v)
      query_slot = index + jnp.arange(n)
      key_slot = jnp.arange(k.shape[1])
    mask = (key_slot[None, :] <= query_slot[:, None])[None]  # causal, [1, L, S]
    if key_valid is not None:
      mask = mask & key_valid[:, None, :]
    att = _attention(q, k, v, mask).reshape(b, n, d)
    x = x + self.proj(att)
    x = x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
    return x, new_cache


class Transformer(nnx.Module):
  """Decoder-only transformer language model.

  Blocks are attributes ``block0, block1, ...`` (not a list) so that the parameter tree
  has string keys only, which Orbax stores and restores without renaming.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = Transformer(TransformerConfig(d_model=32, num_heads=2), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 259)
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
    for i in range(cfg.num_layers):
      setattr(self, f"block{i}", Block(cfg, rngs=rngs))
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(
      cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs
    )

  def __call__(
    self, tokens, positions=None, key_valid=None, cache=None, index=None
  ):
    """Logits ``[B, L, V]`` (and the updated cache when ``cache`` is given).

    Args:
      tokens: ``[B, L]`` int ids.
      positions: ``[B, L]`` position ids (default ``0..L-1``).
      key_valid: ``[B, S]`` bool, False on left padding (generation only).
      cache: per-layer ``(k, v)`` tuples of shape ``[B, S, H, D]``, or None.
      index: first cache slot written by this call (with ``cache``).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    positions = jnp.clip(positions, 0, self.cfg.max_len - 1)
    x = self.embed(tokens) + self.pos_embed(positions)
    new_cache = []
    for i in range(self.cfg.num_layers):
      block = getattr(self, f"block{i}")
      x, layer_cache = block(
        x, key_valid, None if cache is None else cache[i], index
      )
      new_cache.append(layer_cache)
    logits = self.head(self.ln_f(x))
    return logits if cache is None else (logits, tuple(new_cache))


class LanguageModel:
  """Pure functions of a pure-dict parameter tree around :class:`Transformer`.

  Args:
    config: the architecture.

  Examples:
    >>> import jax.numpy as jnp
    >>> lm = LanguageModel(TransformerConfig(d_model=32, num_heads=2, max_len=16))
    >>> params = lm.init(0)
    >>> lm.apply(params, jnp.ones((1, 4), jnp.int32)).shape
    (1, 4, 259)
  """

  def __init__(self, config: TransformerConfig):
    self.config = config
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)

  def init(self, seed: int) -> Params:
    """Fresh parameters (a nested dict of arrays) from an integer seed."""
    model = Transformer(self.config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.split(model)[1])

  def module(self, params: Params) -> Transformer:
    return nnx.merge(self.graphdef, params)

  def apply(self, params: Params, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, L, V]`` of right-padded token sequences ``[B, L]``."""
    return self.module(params)(tokens)

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> Cache:
    cfg = self.config
    shape = (batch, length, cfg.num_heads, cfg.d_model // cfg.num_heads)
    return tuple(
      (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
      for _ in range(cfg.num_layers)
    )

  def generate(
    self,
    params: Params,
    prompts: jax.Array,
    num_pad: jax.Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
  ) -> jax.Array:
    """Greedy decoding with a key/value cache.

    Args:
      params: model parameters.
      prompts: ``[B, P]`` left-padded prompt ids (the last column is the last prompt token).
      num_pad: ``[B]`` number of padding slots at the left of each prompt.
      max_new_tokens: tokens to generate (static); ``P + max_new_tokens`` must not
        exceed ``config.max_len`` plus the padding, so positions stay in range.
      eos_id: generation of a row stops after this id; later slots hold ``pad_id``.
      pad_id: filler id.

    Returns:
      ``[B, max_new_tokens]`` generated ids.
    """
    b, p = prompts.shape
    total = p + max_new_tokens
    model = self.module(params)
    slots = jnp.arange(total)
    key_valid = slots[None, :] >= num_pad[:, None]
    positions = jnp.maximum(slots[None, :] - num_pad[:, None], 0)
    cache = self.init_cache(b, total)
    logits, cache = model(prompts, positions[:, :p], key_valid, cache, 0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(prompts.dtype)

    def step(carry, i):
      token, done, cache = carry
      slot = p + i
      pos = jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1)
      logits, cache = model(token[:, None], pos, key_valid, cache, slot)
      nxt = jnp.argmax(logits[:, -1], axis=-1).astype(token.dtype)
      done = done | (token == eos_id)
      out = jnp.where(done, pad_id, token)
      return (nxt, done, cache), out

    init = (first, jnp.zeros((b,), bool), cache)
    _, out = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    return out.T
