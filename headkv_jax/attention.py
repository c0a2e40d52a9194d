"""Attention primitives in plain jnp: GQA with query-group folding, position masks, LSE merge.

Every attention in the library reduces to :func:`partial_attention` over a set of keys and
:func:`merge_partials` across sets. Masks come from *positions*, not slot indices: key ``s`` is
visible to query ``t`` iff ``0 <= key_pos[s] <= query_pos[t]`` (``-1`` marks an empty slot or a
padding token). Query heads of one GQA group are folded into the rows of their KV head
(``[B, Hkv, T * group, D]``) so K/V are read once per KV head, never repeated.
"""

from __future__ import annotations

import jax.numpy as jnp

_NEG_INF = -1e30


def fold_queries(q: jnp.ndarray, num_kv_heads: int) -> jnp.ndarray:
  """``q [B, T, Hq, D]`` -> ``[B, Hkv, T * group, D]`` (row ``t * group + g``)."""
  b, t, hq, d = q.shape
  group = hq // num_kv_heads
  q = q.reshape(b, t, num_kv_heads, group, d)  # [B, T, Hkv, G, D]
  return q.transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * group, d)


def unfold_outputs(out: jnp.ndarray, num_tokens: int) -> jnp.ndarray:
  """Inverse of :func:`fold_queries`: ``[B, Hkv, T * G, D]`` -> ``[B, T, Hkv * G, D]``."""
  b, hkv, rows, d = out.shape
  group = rows // num_tokens
  out = out.reshape(b, hkv, num_tokens, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, num_tokens, hkv * group, d)


def partial_attention(q_rows, k, v, mask):
  """Unnormalised softmax attention over one key set.

  Args:
    q_rows: ``[B, Hkv, R, D]`` folded queries (already scaled by ``1/sqrt(D)``).
    k, v: ``[B, Hkv, S, D]``.
    mask: bool, broadcastable to ``[B, Hkv, R, S]``.

  Returns:
    ``(o [B, Hkv, R, D] float32, m [B, Hkv, R], l [B, Hkv, R])``: ``o / l`` is the attention
    output, ``m`` the row max of the logits, ``l`` the softmax denominator (0 for rows that see
    no key).
  """
  logits = jnp.einsum(
      "bhrd,bhsd->bhrs", q_rows, k, preferred_element_type=jnp.float32
  )  # [B, Hkv, R, S]
  logits = jnp.where(mask, logits, _NEG_INF)
  m = jnp.max(logits, axis=-1)  # [B, Hkv, R]
  p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bhrs,bhsd->bhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o, m, l


def merge_partials(parts):
  """Log-sum-exp combine of ``(o, m, l)`` triples over disjoint key sets -> ``(o, m, l)``."""
  o, m, l = parts[0]
  for o2, m2, l2 in parts[1:]:
    m_new = jnp.maximum(m, m2)
    a, a2 = jnp.exp(m - m_new), jnp.exp(m2 - m_new)
    o = o * a[..., None] + o2 * a2[..., None]
    l = l * a + l2 * a2
    m = m_new
  return o, m, l


def normalize(o, l):
  """``o / l`` with rows that saw no key set to zero."""
  return o / jnp.where(l > 0, l, 1.0)[..., None]


def position_mask(q_pos_rows, k_pos):
  """``q_pos_rows [B, R]``, ``k_pos [B, S]`` -> bool ``[B, 1, R, S]`` visibility."""
  q = q_pos_rows[:, None, :, None]
  k = k_pos[:, None, None, :]
  return (k >= 0) & (k <= q) & (q >= 0)


def causal_attention(q, k, v, positions, *, block_size: int = 256, key_block: int = 512):
  """Causal self-attention of a chunk over itself, tiled flash-style.

  Query block ``[i, i + block_size)`` only reads keys ``[0, i + block_size)`` (skipping the
  upper triangle), in tiles of ``key_block`` keys merged by log-sum-exp, so the logits of one
  tile stay in cache instead of a ``[rows, T]`` array going through memory (2.4x faster than
  one block of all keys on a 2-core CPU at 2048 tokens). Tiles wholly before the query block
  need no causal mask: real tokens of a chunk are in position order (a right-padded prefix).

  Args:
    q: ``[B, T, Hq, D]`` rotated queries.
    k, v: ``[B, T, Hkv, D]`` rotated keys / values.
    positions: ``[B, T]`` int32, increasing along real tokens, ``-1`` for padding.

  Returns:
    ``(o, m, l)`` with ``o [B, Hkv, T * G, D]`` (see :func:`partial_attention`).
  """
  _, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  q_rows = fold_queries(q * (d**-0.5), hkv)  # [B, Hkv, T*G, D]
  kt = k.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  vt = v.transpose(0, 2, 1, 3)
  q_pos_rows = jnp.repeat(positions, group, axis=1)  # [B, T*G]
  outs = []
  for start in range(0, t, block_size):
    stop = min(start + block_size, t)
    rows = slice(start * group, stop * group)
    q_valid = (q_pos_rows[:, None, rows, None] >= 0)  # [B, 1, R, 1]
    parts = []
    for k_start in range(0, stop, key_block):
      k_stop = min(k_start + key_block, stop)
      if k_stop <= start:  # every real key here precedes every query of the block
        mask = q_valid & (positions[:, None, None, k_start:k_stop] >= 0)
      else:
        mask = position_mask(q_pos_rows[:, rows], positions[:, k_start:k_stop])
      parts.append(partial_attention(
          q_rows[:, :, rows], kt[:, :, k_start:k_stop], vt[:, :, k_start:k_stop], mask))
    outs.append(merge_partials(parts))
  return tuple(jnp.concatenate(x, axis=2) for x in zip(*outs))


def self_attention(q, k, v, positions, rope, *, block_size: int = 256):
  """Plain causal attention without a cache: pre-RoPE ``q, k, v`` -> ``[B, T, Hq, D]``."""
  q = rope.apply(q, positions)
  k = rope.apply(k, positions)
  o, _, l = causal_attention(q, k, v, positions, block_size=block_size)
  return unfold_outputs(normalize(o, l), q.shape[1]).astype(v.dtype)


__all__ = [
    "fold_queries",
    "unfold_outputs",
    "partial_attention",
    "merge_partials",
    "normalize",
    "position_mask",
    "causal_attention",
    "self_attention",
]
