"""The compressed KV cache: per-layer page pools sized from per-head budgets.

Layout (per layer ``l``, one pool per array, batch rows side by side)::

    k, v       [B, S_l, D]   slot pool; a page is ``page_size`` consecutive slots
    positions  [B, S_l]      int32 original position of each slot, -1 when empty
    scores     [B, S_l]      float32 per-slot statistic of the policy (H2O / SnapKV)
    offsets    [B, Hkv]      int32 first slot of each KV head's region (page aligned)
    lengths    [B, Hkv]      int32 tokens each KV head holds

KV head ``h`` of row ``b`` owns the contiguous, page-aligned region
``[offsets[b, h], offsets[b, h + 1])`` and keeps its tokens in position order at its front.
A region holds the head's budget plus room for one chunk of new tokens,
``round_up(budget[l, h] + chunk_size, page_size)`` slots, and ``S_l`` is their sum: the
allocated bytes fall with the budgets (no padding to the largest budget, no masked-out
full-length arrays), and K/V are stored once per KV head, never per query head.

Why contiguous regions rather than free-listed pages: eviction compacts a head anyway, so a
head's pages never fragment; the page table is implied by ``offsets`` (see
:meth:`PagedKVCache.page_table` for a kernel) and every read or write is a gather, scatter or
reshape of static shape. When all heads of a layer share one budget (the common case) the
per-head view ``[B, Hkv, region, D]`` is a free reshape of the pool, so attention reads K/V in
place. adakv moves budget between the heads of a layer, so its heads' sizes change: its pool
holds ``round_up(sum_h budget[l, h] + Hkv * (chunk_size + page_size - 1), page_size)`` slots and
every eviction re-packs the regions to ``round_up(length + chunk_size, page_size)`` each.

Per-layer pools (layers unrolled in Python) rather than one model-wide pool: the layers' totals
may differ (pyramidkv, model-wide budgets) and unrolled layers decoded fastest here.
Quantization hook: ``bits [layers][Hkv]`` is carried in the static fields; only 16 (pages in
``dtype``) exists now. A later issue stores each bit-class in its own pool.

Driving the cache (``budgets`` is ``[layers, Hkv]`` or one int)::

    cache = PagedKVCache.create(L, B, Hkv, D, budgets, policy, chunk_size=C)
    # (a) one shot: chunk_size >= the (bucketed) prompt length
    logits, cache = model(prompt, positions, cache); cache = cache.compress()
    # (b) chunked prefill: per chunk of <= chunk_size tokens (peak = budget + chunk per head)
    for chunk, pos in chunks:
      logits, cache = model(chunk, pos, cache); cache = cache.compress()
    # (c) decoding: one token per step, then compress: a head over its budget is evicted
    #     (h2o, and every policy once full, then evicts one token per step) ...
    logits, cache = model(tok, pos, cache); cache = cache.compress()
    #     ... or amortised: evict only when a head has no room left for the next token, i.e.
    #     about once per chunk_size steps (heads hold budget..budget+chunk_size in between)
    cache = cache.compress(headroom=1)
    # oracle: cache.compress(oracle_scores=[per layer [B, Hq or Hkv, P] attention by position])

Every call is jit-able (``jax.jit(step)`` with the cache as an argument; all shapes static;
a layer that needs no eviction skips it through ``lax.cond``). ``attend`` requires
``T <= chunk_size``; a head that would overflow its region (the caller skipped ``compress``)
drops the overflowing tokens and counts them in ``LayerCache.dropped``. In ``position_mode="cache_relative"`` compaction changes the
slots, hence the rotation, of the survivors (StreamingLLM's rolling positions).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax import cache_attention
from headkv_jax import eviction
from headkv_jax import policies as policies_lib
from headkv_jax import slot_pool

SUPPORTED_BITS = (16,)


@flax.struct.dataclass
class LayerCache:
  """One layer's pool (see the module docstring for the layout).

  Attributes:
    k, v: ``[B, S, D]`` keys (rotated in "original" mode, un-rotated in "cache_relative") and
      values, in the cache dtype.
    positions: ``[B, S]`` int32 original position of each slot, ``-1`` when empty.
    scores: ``[B, S]`` float32 the policy's per-slot statistic (0 when unused).
    offsets: ``[B, Hkv]`` int32 first slot of each KV head's region.
    lengths: ``[B, Hkv]`` int32 tokens each KV head holds.
    dropped: ``[B, Hkv]`` int32 tokens lost because a head's region was full (the caller
      skipped ``compress``); stays 0 when the cache is driven as documented.
  """

  k: jnp.ndarray
  v: jnp.ndarray
  positions: jnp.ndarray
  scores: jnp.ndarray
  offsets: jnp.ndarray
  lengths: jnp.ndarray
  dropped: jnp.ndarray


@flax.struct.dataclass
class PagedKVCache:
  """Head-aware compressed KV cache for all layers (a pytree; static config in the treedef).

  Attributes:
    layers: one :class:`LayerCache` per layer.
    policy: the eviction :class:`~headkv_jax.policies.Policy`.
    budgets: ``[layers][Hkv]`` tokens each KV head keeps after a compression.
    bits: ``[layers][Hkv]`` storage bits per KV head (16 only, for now).
    chunk_size: most new tokens one ``attend`` call may add.
    page_size: slots per page; head regions are page aligned.
  """

  layers: tuple[LayerCache, ...]
  policy: policies_lib.Policy = flax.struct.field(pytree_node=False)
  budgets: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)
  bits: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)
  chunk_size: int = flax.struct.field(pytree_node=False)
  page_size: int = flax.struct.field(pytree_node=False)

  # ---- construction ------------------------------------------------------------------------

  @classmethod
  def create(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
             budgets, policy: policies_lib.Policy | str, chunk_size: int,
             dtype=jnp.bfloat16, page_size: int = 16, bits=None) -> "PagedKVCache":
    """An empty cache.

    Args:
      num_layers, batch, num_kv_heads, head_dim: model and batch shape.
      budgets: int (every head; pyramidkv spreads it over depth) or ``[layers, Hkv]`` ints.
      policy: a :class:`Policy` or a name from ``POLICY_NAMES`` (default knobs).
      chunk_size: most tokens per ``attend`` call (prompt length for one-shot prefill).
      dtype: K/V storage dtype.
      page_size: slots per page.
      bits: ``[layers, Hkv]`` storage bits or None (all 16).
    """
    if isinstance(policy, str):
      policy = policies_lib.make_policy(policy)
    for name, value in (("chunk_size", chunk_size), ("page_size", page_size),
                        ("num_layers", num_layers), ("batch", batch),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
      if int(value) <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    shape = (num_layers, num_kv_heads)
    if np.ndim(budgets) == 0:
      if policy.name == "pyramidkv":
        budgets = policies_lib.pyramid_budgets(
            int(budgets), num_layers, num_kv_heads, min_budget=policy.min_budget)
      else:
        budgets = np.full(shape, int(budgets))
    budgets = np.asarray(budgets)
    if budgets.shape != shape:
      raise ValueError(
          f"budgets must have shape [layers, kv_heads] = {list(shape)}, got {list(budgets.shape)}.")
    policy.check_budgets(budgets)
    bits = np.full(shape, 16) if bits is None else np.asarray(bits)
    if bits.shape != shape:
      raise ValueError(f"bits must have shape {list(shape)}, got {list(bits.shape)}.")
    bad = sorted(set(bits.ravel().tolist()) - set(SUPPORTED_BITS))
    if bad:
      raise ValueError(f"Unsupported bits {bad}; supported now: {list(SUPPORTED_BITS)}.")

    def layer(row):
      need = np.array([slot_pool.round_up(int(x) + chunk_size, page_size) for x in row])
      offsets = np.cumsum(need) - need  # [Hkv] first slot of each head
      slots = int(need.sum())  # fixed regions: budget + chunk each, page aligned
      if policy.adaptive:  # re-packed regions: any split of the layer's total must fit
        slack = num_kv_heads * (chunk_size + page_size - 1)
        slots = slot_pool.round_up(int(row.sum()) + slack, page_size)
      return LayerCache(
          k=jnp.zeros((batch, slots, head_dim), dtype),  # [B, S, D]
          v=jnp.zeros((batch, slots, head_dim), dtype),  # [B, S, D]
          positions=jnp.full((batch, slots), -1, jnp.int32),  # [B, S]
          scores=jnp.zeros((batch, slots), jnp.float32),  # [B, S]
          offsets=jnp.asarray(np.broadcast_to(offsets, (batch, num_kv_heads)), jnp.int32),
          lengths=jnp.zeros((batch, num_kv_heads), jnp.int32),  # [B, Hkv]
          dropped=jnp.zeros((batch, num_kv_heads), jnp.int32),  # [B, Hkv]
      )

    return cls(
        layers=tuple(layer(row) for row in budgets),
        policy=policy,
        budgets=tuple(tuple(int(x) for x in row) for row in budgets),
        bits=tuple(tuple(int(x) for x in row) for row in bits),
        chunk_size=int(chunk_size),
        page_size=int(page_size),
    )

  # ---- inspection --------------------------------------------------------------------------

  @property
  def num_kv_heads(self) -> int:
    return len(self.budgets[0])

  @property
  def nbytes(self) -> int:
    """Real bytes of every array the cache holds."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

  @property
  def logical_tokens(self) -> jnp.ndarray:
    """Tokens held per (layer, row, KV head): ``[layers, B, Hkv]`` int32."""
    return jnp.stack([l.lengths for l in self.layers])

  def token_counts(self) -> jnp.ndarray:
    """Same as :attr:`logical_tokens` (the dense cache's spelling)."""
    return self.logical_tokens

  def uniform(self, layer: int) -> bool:
    """Static: every head of ``layer`` owns a fixed region of one size, so the per-head view
    is a free reshape of the pool (no gather)."""
    return not self.policy.adaptive and len(set(self.budgets[layer])) == 1

  def view_len(self, layer: int) -> int:
    """Static upper bound on one head's tokens in ``layer`` (the per-head view length)."""
    row = self.budgets[layer]
    if self.uniform(layer):
      return slot_pool.round_up(row[0] + self.chunk_size, self.page_size)
    most = sum(row) if self.policy.adaptive else max(row)
    return most + self.chunk_size

  def _region_ends(self, layer: int) -> jnp.ndarray:
    """``[B, Hkv]`` one past the last slot of each head's region."""
    lc = self.layers[layer]
    return jnp.concatenate(
        [lc.offsets[:, 1:], jnp.full_like(lc.offsets[:, :1], lc.k.shape[1])], axis=1)

  def room(self, layer: int) -> jnp.ndarray:
    """``[B, Hkv]`` slots each head may fill (its region, capped by :meth:`view_len`)."""
    lc = self.layers[layer]
    return jnp.minimum(self._region_ends(layer) - lc.offsets, self.view_len(layer))

  def page_table(self, layer: int) -> jnp.ndarray:
    """``[B, Hkv, max_pages]`` int32 page ids of each head's region, ``-1`` past its end."""
    lc = self.layers[layer]
    ends = self._region_ends(layer)
    max_pages = math.ceil(self.view_len(layer) / self.page_size)
    first = lc.offsets // self.page_size  # [B, Hkv]
    page = first[:, :, None] + jnp.arange(max_pages, dtype=jnp.int32)  # [B, Hkv, P]
    return jnp.where(page * self.page_size < ends[:, :, None], page, -1)

  def pages(self, layer: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """K and V pools of ``layer`` as pages: ``[B, num_pages, page_size, D]`` each (no copy)."""
    lc = self.layers[layer]
    b, s, d = lc.k.shape
    shape = (b, s // self.page_size, self.page_size, d)
    return lc.k.reshape(shape), lc.v.reshape(shape)

  def view(self, layer: int):
    """Per-head views of one layer, position ordered, padded to :meth:`view_len`.

    Returns ``(k, v [B, Hkv, C, D], positions [B, Hkv, C] (-1 empty), scores [B, Hkv, C],
    slot indices [B, Hkv, C] into the pool (S where empty; None for a uniform layer))``.
    """
    lc = self.layers[layer]
    b, num_slots, d = lc.k.shape
    if self.uniform(layer):  # empty slots already hold position -1 and score 0
      shape = (b, self.num_kv_heads, self.view_len(layer))
      return (lc.k.reshape(shape + (d,)), lc.v.reshape(shape + (d,)),
              lc.positions.reshape(shape), lc.scores.reshape(shape), None)
    c = jnp.arange(self.view_len(layer), dtype=jnp.int32)
    valid = c[None, None, :] < lc.lengths[:, :, None]  # [B, Hkv, C]
    idx = jnp.where(valid, lc.offsets[:, :, None] + c, num_slots)  # [B, Hkv, C]
    safe = jnp.minimum(idx, num_slots - 1)
    return (slot_pool.gather(lc.k, safe), slot_pool.gather(lc.v, safe),
            jnp.where(valid, slot_pool.gather(lc.positions, safe), -1),
            jnp.where(valid, slot_pool.gather(lc.scores, safe), 0.0), idx)

  # ---- the model contract ------------------------------------------------------------------

  def attend(self, layer: int, q, k, v, positions, rope):
    """Attention of new tokens over this layer's cache + themselves; appends them.

    Args:
      layer: Python int.
      q: ``[B, T, Hq, D]`` pre-RoPE queries; ``k, v``: ``[B, T, Hkv, D]`` pre-RoPE.
      positions: ``[B, T]`` int32 absolute positions, ``-1`` for padding (not stored).
      rope: a :class:`headkv_jax.rope.RoPE`.

    Returns:
      ``(out [B, T, Hq, D], new cache)``.
    """
    b, t, hq, d = q.shape
    hkv = self.num_kv_heads
    if k.shape != (b, t, hkv, d) or v.shape != k.shape:
      raise ValueError(f"k, v must be [B, T, Hkv, D] = {[b, t, hkv, d]}; got "
                       f"{list(k.shape)} and {list(v.shape)}.")
    if hq % hkv:
      raise ValueError("Number of Q heads must be divisible by number of KV heads. "
                       f"Got {hq} and {hkv}.")
    if t > self.chunk_size:
      raise ValueError(f"{t} new tokens exceed chunk_size={self.chunk_size}; call attend "
                       "with at most chunk_size tokens (and compress between calls).")
    group = hq // hkv
    lc = self.layers[layer]
    view_len = self.view_len(layer)
    kc, vc, pc, sc, view_idx = self.view(layer)  # [B, Hkv, C, ...]

    tok_valid = positions >= 0  # [B, T]
    rank = jnp.cumsum(tok_valid, axis=1, dtype=jnp.int32) - 1  # [B, T] slot among real tokens
    new_slot = lc.lengths[:, :, None] + rank[:, None, :]  # [B, Hkv, T]
    kt = k.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vt = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    if self.policy.position_mode == "original":
      qg = rope.apply(q, positions)
      k_new = rope.apply(k, positions).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
      k_cached, k_store = kc, k_new
    else:  # cache_relative: rotate by slot index inside the (compacted) cache.
      qg = q
      k_new = slot_pool.rotate(rope, kt, new_slot)
      k_cached = slot_pool.rotate(rope, kc, jnp.broadcast_to(jnp.arange(view_len), pc.shape))
      k_store = kt
    qg = qg.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    if self.policy.position_mode == "cache_relative":
      qg = slot_pool.rotate(rope, qg, new_slot[:, :, None, :])
    out, probs = cache_attention.attention_over_cache(
        qg, k_cached, vc, pc, k_new, vt, positions)  # [B, Hkv, G, T, D], [.., C + T]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)  # [B, T, Hq, D]

    cached_scores, new_scores = self._slot_stats(probs, sc, tok_valid, rank, view_len)
    if self.policy.score_kind == "none":
      scores = lc.scores
    elif view_idx is None:
      scores = cached_scores.reshape(lc.scores.shape)
    else:
      scores = slot_pool.scatter(lc.scores, view_idx, cached_scores)
    new = self._write(layer, lc.replace(scores=scores), k_store, vt, positions, new_scores)
    return out, self.with_layer(layer, new)

  def append(self, layer: int, k, v, positions, scores) -> "PagedKVCache":
    """Stores tokens without attending: the write half of :meth:`attend`.

    For callers that computed attention elsewhere (the shared one-shot prefill of
    :mod:`headkv_jax.prompt_stats`). Requires ``T <= chunk_size``.

    Args:
      layer: Python int.
      k, v: ``[B, Hkv, T, D]`` keys as this cache stores them (rotated at their positions in
        "original" mode) and values.
      positions: ``[B, T]`` int32 positions, ``-1`` for padding (not stored).
      scores: ``[B, Hkv, T]`` float32 the policy's per-slot statistic of each token.
    """
    if k.shape[2] > self.chunk_size:
      raise ValueError(f"{k.shape[2]} new tokens exceed chunk_size={self.chunk_size}.")
    lc = self.layers[layer]
    new = self._write(layer, lc, k.astype(lc.k.dtype), v.astype(lc.v.dtype), positions,
                      scores.astype(jnp.float32))
    return self.with_layer(layer, new)

  def _write(self, layer: int, lc: LayerCache, k_store, v_new, positions,
             new_scores) -> LayerCache:
    """``lc`` with the real tokens of ``positions [B, T]`` appended to each head's region
    (``k_store, v_new [B, Hkv, T, D]``, ``new_scores [B, Hkv, T]``); a head whose region is
    full drops the overflow and counts it in ``dropped``."""
    num_slots = lc.k.shape[1]
    tok_valid = positions >= 0  # [B, T]
    rank = jnp.cumsum(tok_valid, axis=1, dtype=jnp.int32) - 1  # [B, T] slot among real tokens
    new_slot = lc.lengths[:, :, None] + rank[:, None, :]  # [B, Hkv, T]
    stored = tok_valid[:, None, :] & (new_slot < self.room(layer)[:, :, None])  # [B, Hkv, T]
    target = jnp.where(stored, lc.offsets[:, :, None] + new_slot, num_slots)  # [B, Hkv, T]
    new_pos = jnp.broadcast_to(positions[:, None, :], target.shape)
    return lc.replace(
        k=slot_pool.scatter(lc.k, target, k_store),
        v=slot_pool.scatter(lc.v, target, v_new),
        positions=slot_pool.scatter(lc.positions, target, new_pos),
        scores=slot_pool.scatter(lc.scores, target, new_scores),
        lengths=lc.lengths + jnp.sum(stored, axis=-1, dtype=jnp.int32),
        dropped=lc.dropped + jnp.sum(tok_valid[:, None, :] & ~stored, axis=-1, dtype=jnp.int32),
    )

  def _slot_stats(self, probs, cached_scores, tok_valid, rank, view_len):
    """Per-slot statistics -> (cached slots ``[B, Hkv, C]``, new tokens ``[B, Hkv, T]``)."""
    kind = self.policy.score_kind
    if kind == "none":
      b, hkv, _, t, _ = probs.shape
      return cached_scores, jnp.zeros((b, hkv, t), jnp.float32)
    if kind == "accumulate":
      queries = tok_valid
    else:  # the observation window: the last `window` real queries of this call
      n_real = jnp.sum(tok_valid, axis=1, keepdims=True)  # [B, 1]
      queries = tok_valid & (rank >= n_real - self.policy.window)
    per = jnp.sum(probs * queries[:, None, None, :, None], axis=3)  # [B, Hkv, G, C + T]
    per = policies_lib.reduce_group(per, self.policy.gqa_reduce, axis=2)  # [B, Hkv, C + T]
    cached = per[..., :view_len]
    if kind == "accumulate":
      cached = cached + cached_scores
    return cached, per[..., view_len:]

  def with_layer(self, layer: int, new: LayerCache) -> "PagedKVCache":
    """This cache with ``layers[layer]`` replaced."""
    return self.replace(layers=self.layers[:layer] + (new,) + self.layers[layer + 1:])

  # ---- eviction ----------------------------------------------------------------------------

  def compress(self, oracle_scores: Sequence[jnp.ndarray] | None = None, *,
               headroom: int | None = None) -> "PagedKVCache":
    """Evicts every head back to its budget (policy's choice), survivors in position order.

    Heads within budget keep everything (adakv: layers within their total). A layer where no
    head needs eviction is left as it is (``lax.cond`` under ``jit``). ``full`` is a no-op.

    Args:
      oracle_scores: oracle only: per layer ``[B, Hq or Hkv, P]`` attention the answer tokens
        pay to each *position* ``0..P-1``.
      headroom: None (default) evicts every head over its budget. An int ``n`` evicts a layer
        only when one of its heads could not take ``n`` more tokens: decoding with
        ``headroom=1`` amortises eviction over about ``chunk_size`` steps, and heads hold up
        to ``budget + chunk_size`` tokens in between (the pools already have that room).
    """
    return eviction.compress(self, oracle_scores, headroom)

  evict = compress

  def rechunk(self, chunk_size: int,
              oracle_scores: Sequence[jnp.ndarray] | None = None) -> "PagedKVCache":
    """This cache re-packed into pools with room for ``chunk_size`` new tokens per head.

    Prefill in chunks of C needs ``budget + C`` slots per head; decoding needs one. Call
    ``cache.rechunk(1)`` (or a page, to amortise eviction with ``headroom``) after prefill so
    the bytes held while decoding are the budgets' bytes, not the prefill chunk's. Heads are
    compressed to their budgets first (the oracle needs its ``oracle_scores``, as in
    :meth:`compress`). Jit-able (all shapes follow from static fields).
    """
    cache = self.compress(oracle_scores)
    lc0 = cache.layers[0]
    b, _, d = lc0.k.shape
    new = PagedKVCache.create(
        len(self.layers), b, self.num_kv_heads, d, np.asarray(self.budgets), self.policy,
        chunk_size=chunk_size, dtype=lc0.k.dtype, page_size=self.page_size,
        bits=np.asarray(self.bits))
    layers = []
    for layer in range(len(self.layers)):
      lc, target_lc = cache.layers[layer], new.layers[layer]
      n = new.view_len(layer)
      kc, vc, pc, sc, _ = cache.view(layer)  # [B, Hkv, C_old, ...], heads within budget
      kc, vc, pc, sc = kc[:, :, :n], vc[:, :, :n], pc[:, :, :n], sc[:, :, :n]
      c = jnp.arange(n, dtype=jnp.int32)
      kept = c[None, None, :] < lc.lengths[:, :, None]  # [B, Hkv, n]
      offsets = target_lc.offsets
      if self.policy.adaptive:
        offsets = slot_pool.region_starts(lc.lengths, chunk_size, self.page_size)
      num_slots = target_lc.k.shape[1]
      target = jnp.where(kept, offsets[:, :, None] + c, num_slots)  # [B, Hkv, n]
      layers.append(target_lc.replace(
          k=slot_pool.scatter(target_lc.k, target, kc),
          v=slot_pool.scatter(target_lc.v, target, vc),
          positions=slot_pool.scatter(target_lc.positions, target, pc),
          scores=slot_pool.scatter(target_lc.scores, target, sc),
          offsets=offsets, lengths=lc.lengths, dropped=lc.dropped))
    return new.replace(layers=tuple(layers))


__all__ = ["LayerCache", "PagedKVCache", "SUPPORTED_BITS"]
