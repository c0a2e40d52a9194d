"""Eviction: applying a policy to every layer of a :class:`~headkv_jax.paged_cache.PagedKVCache`.

:func:`compress` is what ``PagedKVCache.compress`` runs: it finds the layers where a head
needs eviction, then one compiled ``fori_loop`` over just those (every layer has the same
shapes). A layer's eviction reads only per-slot *metadata* (positions and the policy's
statistic of each head's slots), asks the policy for a keep mask
(:func:`headkv_jax.policies.select_keep`) over the smallest static view that holds the
layer's longest head, and then moves K/V within the layer's block of each pool: one gather
over the block (``layout.window`` slots), survivors in position order at the front of their
head's region, codes with their scales. Fixed-size regions stay where they
are; adakv's regions are re-packed because its heads' sizes change.

:func:`rechunk` re-packs a cache into the pools of another ``chunk_size`` (prefill's room for a
chunk -> decoding's room for one token), one gather per pool.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax import cache_layout
from headkv_jax import policies as policies_lib
from headkv_jax import slot_pool
from headkv_jax import slot_store
from headkv_jax.jit import traced


def _at(table, layer):
  return jnp.asarray(np.asarray(table))[layer]


def target_budgets(cache, budgets) -> tuple:
  """``budgets`` (None: the cache's own) as the static ``[layers][Hkv]`` nested tuple an
  eviction brings each head to; a head's target may be below its budget (the region stays),
  never above it.

  Raises:
    ValueError: another shape, a target above a head's budget, or one the policy refuses.
  """
  if budgets is None:
    return cache.budgets
  arr = np.asarray(budgets)
  own = np.asarray(cache.budgets)
  if arr.shape != own.shape:
    raise ValueError(f"target budgets must have shape [layers, kv_heads] = {list(own.shape)}, "
                     f"got {list(arr.shape)}.")
  if (arr > own).any():
    l, h = np.argwhere(arr > own)[0]
    raise ValueError(f"target budget {int(arr[l, h])} of layer {l}, KV head {h} is above the "
                     f"head's budget {int(own[l, h])}; an eviction can only shrink a head.")
  cache.policy.check_budgets(arr)
  return cache_layout.nested_ints(arr)


def compress(cache, oracle_scores: Sequence[jnp.ndarray] | None = None,
             headroom: int | None = None, budgets=None):
  """Evicts every layer of ``cache`` that needs it; see ``PagedKVCache.compress``."""
  policy = cache.policy
  if policy.name == "full":
    return cache
  if policy.name == "oracle" and oracle_scores is None:
    raise ValueError("policy 'oracle' needs oracle_scores (per layer [B, H, positions]).")
  if headroom is not None and not 0 < headroom <= cache.chunk_size:
    raise ValueError(f"headroom must be in [1, chunk_size={cache.chunk_size}], got {headroom}.")
  if headroom is not None and budgets is not None:
    raise ValueError("compress takes headroom (amortised eviction to the budgets) or target "
                     "budgets, not both.")
  budgets = target_budgets(cache, budgets)
  oracle = None
  if oracle_scores is not None:
    oracle = jnp.stack([jnp.asarray(o, jnp.float32) for o in oracle_scores])  # [L, B, H, P]
  if traced(cache, oracle):
    return _compress(cache, oracle, headroom, budgets)
  return _compress_jit(cache, oracle, headroom, budgets)  # eager callers: one program


def _compress(cache, oracle, headroom, budgets):
  # The layers that need it, first; a loop over just those (no lax.cond around the pools:
  # XLA:CPU copied every pool into and out of the taken branch, ~4 ms per evicted layer).
  need = needs_eviction_all(cache, headroom, budgets)  # [L]
  order = jnp.argsort(~need, stable=True).astype(jnp.int32)

  def body(i, cache):
    layer = order[i]
    return evict_layer(cache, layer, None if oracle is None else oracle[layer], budgets)

  return jax.lax.fori_loop(0, jnp.sum(need, dtype=jnp.int32), body, cache)


_compress_jit = jax.jit(_compress, static_argnums=(2, 3))


def needs_eviction_all(cache, headroom: int | None, budgets=None):
  """``[L]`` bool, :func:`needs_eviction` of every layer (``budgets``: targets, see
  :func:`target_budgets`; None: the cache's)."""
  n = cache.lengths  # [B, L, Hkv]
  full = jnp.any(n + (headroom or cache.chunk_size) > cache.rooms(), axis=(0, 2))
  if headroom is not None:
    return full
  budgets = jnp.asarray(np.asarray(budgets or cache.budgets), jnp.int32)[None]  # [1, L, Hkv]
  if cache.policy.adaptive:
    over = jnp.any(jnp.sum(n, axis=2) > jnp.sum(budgets, axis=2), axis=0)
  else:
    over = jnp.any(n > budgets, axis=(0, 2))
  return full | over


def needs_eviction(cache, layer, headroom: int | None):
  """Scalar bool: a head of ``layer`` lacks room for ``headroom`` tokens (None: a chunk) or,
  when ``headroom`` is None, is over its budget (adakv: the layer is over its total)."""
  return needs_eviction_all(cache, headroom)[layer]


def oracle_slot_scores(oracle, positions, num_kv_heads: int, gqa_reduce: str):
  """Answer attention by position ``[B, Hq or Hkv, P]`` -> per slot ``[B, Hkv, C]``."""
  if oracle.shape[1] != num_kv_heads:  # per query head: reduce each GQA group
    b, hq, p = oracle.shape
    oracle = policies_lib.reduce_group(
        oracle.reshape(b, num_kv_heads, hq // num_kv_heads, p), gqa_reduce, axis=2)
  idx = jnp.clip(positions, 0, oracle.shape[-1] - 1)  # [B, Hkv, C]
  return jnp.take_along_axis(oracle.astype(jnp.float32), idx, axis=2)


def _rows_gather(x, idx):
  """``x [B, N, ...]`` at ``idx [B, M]`` (in range) -> ``[B, M, ...]``."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _moved(x, src, empty):
  """``x [B, M, ...]`` rebuilt from ``src [B, M]`` (entry ``m`` takes ``x[src[m]]``, or
  ``empty`` where ``src < 0``)."""
  got = _rows_gather(x, jnp.maximum(src, 0))
  keep = (src >= 0).reshape(src.shape + (1,) * (x.ndim - 2))
  return jnp.where(keep, got, jnp.asarray(empty, x.dtype))


def _move_pool(pool, src, start=None, window=None):
  """``pool`` with its slots (or the ``window`` slots from ``start``) rebuilt from ``src``:
  K/V move as stored (codes with their scales), emptied slots get position -1 and zeros."""

  def move(x, empty):
    if start is None:
      return _moved(x, src, empty)
    win = jax.lax.dynamic_slice_in_dim(x, start, window, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(x, _moved(win, src, empty), start, axis=1)

  zero = lambda x: move(x, 0)
  return pool.replace(
      k=slot_store.tree(zero, pool.k), v=slot_store.tree(zero, pool.v),
      positions=move(pool.positions, -1), scores=zero(pool.scores))


def view_sizes(max_region: int) -> tuple[int, ...]:
  """The static per-head view lengths eviction may rank over: 256, 1024, ... below
  ``max_region``, then ``max_region``."""
  sizes, size = [], 256
  while size < max_region:
    sizes.append(size)
    size *= 4
  return tuple(sizes) + (max_region,)


def evict_layer(cache, layer, oracle=None, budgets=None):
  """Applies the policy to one layer (a Python int or traced) -> the new cache, each head
  brought to its ``budgets`` entry (a static nested tuple; None: the cache's budgets).

  The choice (:func:`choose`) ranks the smallest view of :func:`view_sizes` that holds the
  layer's longest head (a ``lax.switch`` over metadata only): a layer of small heads sorts a
  few hundred slots per head, not the model's largest region. Then K/V move as stored (codes
  with their scales) inside the layer's block of each pool, so a survivor's dequantized K/V
  are unchanged.
  """
  sizes = view_sizes(cache.layout.max_region)
  if len(sizes) == 1:
    chosen = choose(cache, layer, oracle, sizes[0], budgets)
  else:
    which = jnp.sum(jnp.asarray(sizes[:-1]) < jnp.max(cache.lengths[:, layer]))
    chosen = jax.lax.switch(
        which, [lambda size=size: choose(cache, layer, oracle, size, budgets) for size in sizes])
  return move_layer(cache, layer, *chosen)


def choose(cache, layer, oracle, size: int, budgets=None):
  """The policy's choice for ``layer`` over per-head views of ``size`` slots, each head
  brought to its ``budgets`` entry (None: the cache's budgets) -> ``(src
  [B, Hkv, max_region]`` pool slot of each survivor in position order (-1 past them),
  ``new lengths [B, Hkv]``, ``new offsets [B, Hkv]``)."""
  lay = cache.layout
  policy = cache.policy
  idx, valid, pc, sc = cache.slot_meta(layer, size)  # [B, Hkv, size]
  n = cache.lengths[:, layer]
  if oracle is not None:
    sc = oracle_slot_scores(oracle, pc, cache.num_kv_heads, policy.gqa_reduce)
  else:
    sc = cache.selection_scores(layer, valid, sc, size)
  targets = np.asarray(budgets or cache.budgets)  # [L, Hkv]
  most = None  # a static bound on what a head evicts: its region's room past its target
  if not lay.adaptive:
    room = lay.region - targets  # [L, Hkv]
    most = max(int(room[int(layer)].max() if isinstance(layer, (int, np.integer))
                   else room.max()), 0)
  keep = policies_lib.select_keep(policy, sc, n, _at(targets, layer), most)
  order, new_n = policies_lib.compact(keep)  # [B, Hkv, size], [B, Hkv]
  kept = jnp.arange(size)[None, None, :] < new_n[..., None]
  src = jnp.where(kept, jnp.take_along_axis(idx, order, axis=2), -1)
  src = jnp.pad(src, ((0, 0), (0, 0), (0, lay.max_region - size)), constant_values=-1)
  off = cache.offsets[:, layer]
  if lay.adaptive:  # head sizes changed: re-pack the layer's block
    c0 = _at(lay.class_of, layer)[0]
    block = jnp.asarray(lay.base)[c0, layer]
    off = block + slot_pool.region_starts(new_n, cache.chunk_size, cache.page_size)
  return src, new_n, off


def move_layer(cache, layer, src, new_n, off):
  """``cache`` with ``layer``'s survivors ``src [B, Hkv, R]`` (pool slots, -1 = none) moved
  to the front of the regions starting at ``off [B, Hkv]``: one gather over the layer's
  block of each pool (``layout.window`` slots); the rest of the block is emptied."""
  lay = cache.layout
  size = src.shape[-1]
  dst = off[..., None] + jnp.arange(size, dtype=jnp.int32)  # [B, Hkv, R]
  pools = []
  for c, pool in enumerate(cache.pools):
    window = lay.window[c]
    num_slots = pool.positions.shape[1]
    base = _at(lay.base[c], layer)
    count = _at(lay.count[c], layer)
    start = jnp.clip(base, 0, num_slots - window)
    w = start + jnp.arange(window, dtype=jnp.int32)  # pool slots of the window
    inside = (w >= base) & (w < base + count)  # this layer's block: rebuilt
    srcmap = jnp.broadcast_to(jnp.where(inside, -1, w - start), (cache.batch, window))
    ok = (src >= 0) & cache.members(layer, c)[None, :, None]
    t_local = jnp.where(ok, dst - start, window).reshape(cache.batch, -1)
    s_local = (src - start).reshape(cache.batch, -1)
    srcmap = jax.vmap(lambda m, t, s: m.at[t].set(s, mode="drop"))(srcmap, t_local, s_local)
    pools.append(_move_pool(pool, srcmap, start, window))
  return cache.replace(pools=tuple(pools), lengths=cache.lengths.at[:, layer].set(new_n),
                       offsets=cache.offsets.at[:, layer].set(off))


def rechunk(cache, chunk_size: int, oracle_scores=None, budgets=None):
  """``cache`` compressed (to ``budgets``, see :func:`target_budgets`) and re-packed with room
  for ``chunk_size`` tokens per head (see ``PagedKVCache.rechunk``)."""
  budgets = target_budgets(cache, budgets)
  fp_room = int(np.min(budgets)) - cache.fp_sinks
  if cache.residual > fp_room and any(p != (16, 16) for p in cache.layout.pairs):
    raise ValueError(
        f"target budgets down to {int(np.min(budgets))} leave room for a full-precision "
        f"residual of {max(fp_room, 0)} tokens, below this cache's {cache.residual}: its "
        "window could not move to the re-packed cache; create the cache with "
        f"residual <= {max(fp_room, 0)}.")
  if not traced(cache, oracle_scores):
    return _rechunk_jit(cache, chunk_size, oracle_scores, budgets)
  return _rechunk(cache, chunk_size, oracle_scores, budgets)


def _rechunk(cache, chunk_size: int, oracle_scores=None, budgets=None):
  budgets = budgets or cache.budgets
  cache = compress(cache, oracle_scores, budgets=budgets)
  new = type(cache).create(
      cache.num_layers, cache.batch, cache.num_kv_heads, cache.head_dim,
      np.asarray(budgets), cache.policy, chunk_size=chunk_size, dtype=cache.dtype,
      page_size=cache.page_size, bits=cache.head_bits, quant_group=cache.quant_group,
      residual=cache.residual, fp_sinks=cache.fp_sinks, attention_impl=cache.attention_impl,
      rope=None if cache.rope_inv_freq is None else cache.rope)
  lay = new.layout
  n = cache.lengths  # [B, L, Hkv]
  offsets = new.offsets
  if lay.adaptive:
    c0 = lay.class_of[:, 0]  # [L]
    block = jnp.asarray(lay.base[c0, np.arange(cache.num_layers)], jnp.int32)  # [L]
    offsets = block[None, :, None] + slot_pool.region_starts(n, chunk_size, cache.page_size)
  size = lay.max_region
  j = jnp.arange(size, dtype=jnp.int32)
  held = j < n[..., None]  # [B, L, Hkv, R]
  pools = []
  for c, (old, pool) in enumerate(zip(cache.pools, new.pools)):
    num_slots = pool.positions.shape[1]
    member = jnp.asarray(lay.class_of == c)[None, :, :, None]  # [1, L, Hkv, 1]
    dst = jnp.where(held & member, offsets[..., None] + j, num_slots).reshape(cache.batch, -1)
    src = (cache.offsets[..., None] + j).reshape(cache.batch, -1)
    srcmap = jnp.full((cache.batch, num_slots), -1, jnp.int32)
    srcmap = jax.vmap(lambda m, t, s: m.at[t].set(s, mode="drop"))(srcmap, dst, src)
    moved = _move_pool(old, srcmap)  # old pool's slots gathered into the new pool's
    pools.append(moved.replace(fp=old.fp))
  return new.replace(pools=tuple(pools), offsets=offsets, lengths=n, dropped=cache.dropped,
                     key_channels=cache.key_channels)


_rechunk_jit = jax.jit(_rechunk, static_argnums=(1, 3))


__all__ = ["target_budgets", "compress", "needs_eviction", "needs_eviction_all",
           "oracle_slot_scores", "view_sizes", "evict_layer", "choose", "move_layer", "rechunk"]
