"""Reference attention of a chunk of new tokens over a compressed cache, in plain jnp.

The numerics oracle the tests hold the library's attention to (the paged cache attends through
the tile loop of :mod:`headkv_jax.attention` over each head's slots, the Pallas kernel
through its own reference): simple, materialises the full probability matrix and returns it, from which the
per-slot statistics of a policy (H2O's accumulated attention, SnapKV's observation window) are
plain sums.

Layout: each KV head's cached tokens are presented as a padded per-head *view*
``[B, Hkv, C, D]`` (slots ``c >= length`` are empty, marked by position ``-1``); the query
heads of a GQA group stay together, ``q [B, Hkv, G, T, D]`` (query head ``h`` belongs to KV
head ``h // G``, as Hugging Face's ``repeat_kv``), so K/V are never repeated per query head.

Visibility comes from original positions: cached key ``s`` is visible to query ``t`` iff
``0 <= pos[s] <= pos[t]``; new key ``u`` iff ``0 <= pos[u] <= pos[t]`` (causal within the
chunk). Padding queries (``pos = -1``) see nothing and get zero output and zero probabilities.
"""

from __future__ import annotations

import jax.numpy as jnp

_NEG_INF = -1e30


def masked_softmax(logits, mask):
  """Softmax over the last axis of the visible entries; a row with none visible is all 0."""
  logits = jnp.where(mask, logits, _NEG_INF)
  p = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def attention_over_cache(q, k_cached, v_cached, cached_positions, k_new, v_new, positions):
  """Softmax attention of new queries over cached + new keys.

  Args:
    q: ``[B, Hkv, G, T, D]`` queries, already rotated as the position mode wants.
    k_cached, v_cached: ``[B, Hkv, C, D]`` per-head views of the cache.
    cached_positions: ``[B, Hkv, C]`` int32 original positions, ``-1`` for an empty slot.
    k_new, v_new: ``[B, Hkv, T, D]`` the chunk's keys (rotated as the mode wants) and values.
    positions: ``[B, T]`` int32 positions of the new tokens, ``-1`` for padding.

  Returns:
    ``out [B, Hkv, G, T, D]`` in ``v_new.dtype`` and ``probs [B, Hkv, G, T, C + T]`` float32
    (cached slots first, then the new tokens).
  """
  d = q.shape[-1]
  b, hkv, num_cached = cached_positions.shape
  new_pos = jnp.broadcast_to(positions[:, None, :], (b, hkv, positions.shape[1]))
  key_pos = jnp.concatenate([cached_positions, new_pos], axis=2)  # [B, Hkv, C+T]
  q_pos = positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
  kp = key_pos[:, :, None, None, :]  # [B, Hkv, 1, 1, C+T]
  mask = (kp >= 0) & (kp <= q_pos) & (q_pos >= 0)  # [B, Hkv, 1, T, C+T]
  qf = q.astype(jnp.float32) * (d**-0.5)
  # Logits against the cache and the chunk separately: K/V are read in place, never copied
  # into one concatenated array.
  logits = jnp.concatenate([
      jnp.einsum("bhgtd,bhsd->bhgts", qf, k_cached, preferred_element_type=jnp.float32),
      jnp.einsum("bhgtd,bhsd->bhgts", qf, k_new, preferred_element_type=jnp.float32),
  ], axis=-1)
  probs = masked_softmax(logits, mask)  # [B, Hkv, G, T, C+T]
  out = (jnp.einsum("bhgts,bhsd->bhgtd", probs[..., :num_cached], v_cached,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bhgts,bhsd->bhgtd", probs[..., num_cached:], v_new,
                      preferred_element_type=jnp.float32))
  return out.astype(v_new.dtype), probs


def paged_decode_attention_reference(q, k_pages, v_pages, lengths, page_table):
  """One query token per row over a paged cache: the oracle for a fused decode kernel.

  Args:
    q: ``[B, Hq, D]`` queries, rotated as the cache's keys were (unscaled).
    k_pages, v_pages: ``[B, num_pages, page_size, D]`` a layer's pools (page ids index the
      row's own pool).
    lengths: ``[B, Hkv]`` int32 tokens held by each KV head.
    page_table: ``[B, Hkv, max_pages]`` int32 page ids of each head's tokens, in order
      (``-1`` past the end).

  Returns:
    ``out [B, Hq, D]`` float32 and ``lse [B, Hq]`` float32, the log-sum-exp of the scaled
    logits (``-inf`` for a head with no tokens) so partial results can be merged.
  """
  b, hq, d = q.shape
  hkv, max_pages = page_table.shape[1:]
  page_size = k_pages.shape[2]
  rows = jnp.arange(b)[:, None, None]
  pages = jnp.maximum(page_table, 0)
  k = k_pages[rows, pages].reshape(b, hkv, max_pages * page_size, d)  # [B, Hkv, S, D]
  v = v_pages[rows, pages].reshape(b, hkv, max_pages * page_size, d)  # [B, Hkv, S, D]
  mask = jnp.arange(max_pages * page_size)[None, None, None, :] < lengths[:, :, None, None]
  qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)  # [B, Hkv, G, D]
  logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32)) * (d**-0.5)
  logits = jnp.where(mask, logits, -jnp.inf)  # [B, Hkv, G, S]
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)
  denom = jnp.sum(p, axis=-1)  # [B, Hkv, G]
  out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32))
  out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
  lse = jnp.log(denom) + m[..., 0]
  return out.reshape(b, hq, d), lse.reshape(b, hq)


__all__ = ["masked_softmax", "attention_over_cache", "paged_decode_attention_reference"]
