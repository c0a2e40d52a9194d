"""Eviction: applying a policy to every layer of a :class:`~headkv_jax.paged_cache.PagedKVCache`.

:func:`compress` is what ``PagedKVCache.compress`` runs. Per layer it decides (on device, with
``lax.cond`` under ``jit``) whether any head needs eviction; if so it reads each head's view,
asks the policy for a keep mask (:func:`headkv_jax.policies.select_keep`), and writes the
survivors, in position order, to the front of their head's region. Fixed-size regions stay
where they are; adakv's regions are re-packed because its heads' sizes change.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from headkv_jax import policies as policies_lib
from headkv_jax import slot_pool
from headkv_jax import slot_store


def compress(cache, oracle_scores: Sequence[jnp.ndarray] | None = None,
             headroom: int | None = None):
  """Evicts every layer of ``cache`` that needs it; see ``PagedKVCache.compress``."""
  policy = cache.policy
  if policy.name == "full":
    return cache
  if policy.name == "oracle" and oracle_scores is None:
    raise ValueError("policy 'oracle' needs oracle_scores (per layer [B, H, positions]).")
  if headroom is not None and not 0 < headroom <= cache.chunk_size:
    raise ValueError(f"headroom must be in [1, chunk_size={cache.chunk_size}], got {headroom}.")
  out = cache
  for i, layer_cache in enumerate(cache.layers):
    oracle = None if oracle_scores is None else oracle_scores[i]
    evict = lambda lc, o, i=i: compress_layer(out.with_layer(i, lc), i, o)
    needed = needs_eviction(cache, i, headroom)
    if isinstance(needed, jax.core.Tracer):
      new = jax.lax.cond(needed, evict, lambda lc, o: lc, layer_cache, oracle)
    else:  # eager: decide in Python (an eager lax.cond would recompile on every call)
      new = evict(layer_cache, oracle) if bool(needed) else layer_cache
    out = out.with_layer(i, new)
  return out


def needs_eviction(cache, layer: int, headroom: int | None):
  """Scalar bool: a head of ``layer`` lacks room for ``headroom`` tokens (None: a chunk) or,
  when ``headroom`` is None, is over its budget (adakv: the layer is over its total)."""
  lc = cache.layers[layer]
  full = jnp.any(lc.lengths + (headroom or cache.chunk_size) > cache.room(layer))
  if headroom is not None:
    return full
  budgets = jnp.asarray(cache.budgets[layer], jnp.int32)  # [Hkv]
  if cache.policy.adaptive:
    over = jnp.any(jnp.sum(lc.lengths, axis=1) > jnp.sum(budgets))
  else:
    over = jnp.any(lc.lengths > budgets[None, :])
  return full | over


def oracle_slot_scores(oracle, positions, num_kv_heads: int, gqa_reduce: str):
  """Answer attention by position ``[B, Hq or Hkv, P]`` -> per slot ``[B, Hkv, C]``."""
  if oracle.shape[1] != num_kv_heads:  # per query head: reduce each GQA group
    b, hq, p = oracle.shape
    oracle = policies_lib.reduce_group(
        oracle.reshape(b, num_kv_heads, hq // num_kv_heads, p), gqa_reduce, axis=2)
  idx = jnp.clip(positions, 0, oracle.shape[-1] - 1)  # [B, Hkv, C]
  return jnp.take_along_axis(oracle.astype(jnp.float32), idx, axis=2)


def compress_layer(cache, layer: int, oracle=None):
  """Applies the policy to one layer -> its new ``LayerCache``.

  The policy reads positions and scores only; K/V move as stored (codes with their scales),
  so a survivor's dequantized K/V are unchanged.
  """
  lc = cache.layers[layer]
  num_slots = lc.positions.shape[1]
  pc, sc, view_idx = cache.slot_view(layer)  # [B, Hkv, C]
  if oracle is not None:
    sc = oracle_slot_scores(oracle, pc, cache.num_kv_heads, cache.policy.gqa_reduce)
  keep = policies_lib.select_keep(cache.policy, sc, lc.lengths, cache.budgets[layer])
  idx, lengths = policies_lib.compact(keep)  # [B, Hkv, C], [B, Hkv]
  c = jnp.arange(idx.shape[-1], dtype=jnp.int32)
  kept = c < lengths[:, :, None]  # [B, Hkv, C]

  def take(x, empty, heads=slice(None)):  # survivors to the front, the rest emptied
    i, k = idx[:, heads], kept[:, heads]
    x = jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 3)), axis=2)
    return jnp.where(k.reshape(k.shape + (1,) * (x.ndim - 3)), x, empty)

  raw = [slot_store.tree(lambda x, h=cls.heads: take(x, 0, h), kv)
         for cls, kv in zip(cache.classes(layer), cache.raw_view(layer, view_idx))]
  kept_pos, kept_sc = take(pc, -1), take(sc, 0.0)
  if view_idx is None:  # uniform fixed regions: the view *is* the pool
    (k, v), = raw
    flat = lambda x, like: x.reshape(like.shape)
    return lc.replace(k=(slot_store.tree(flat, k, lc.k[0]),),
                      v=(slot_store.tree(flat, v, lc.v[0]),),
                      positions=kept_pos.reshape(lc.positions.shape),
                      scores=kept_sc.reshape(lc.scores.shape), lengths=lengths)
  offsets = lc.offsets
  if cache.policy.adaptive:  # head sizes changed: re-pack the regions
    offsets = slot_pool.region_starts(lengths, cache.chunk_size, cache.page_size)  # [B, Hkv]
  target = jnp.where(kept, offsets[:, :, None] + c, num_slots)  # [B, Hkv, C]
  new = lc.replace(
      positions=slot_pool.scatter(jnp.full_like(lc.positions, -1), target, kept_pos),
      scores=slot_pool.scatter(jnp.zeros_like(lc.scores), target, kept_sc),
      offsets=offsets,
      lengths=lengths,
  )
  return cache.write_kv(layer, new, raw, target)


__all__ = ["compress", "needs_eviction", "oracle_slot_scores", "compress_layer"]
