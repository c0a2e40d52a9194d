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

Per-head precision (HAQ-KV): ``bits [layers][Hkv]`` holds each KV head's (key bits, value bits)
in {16, 8, 4, 2}. The heads of one layer with the same pair form a *bit class*; each class
keeps its K and V in its own store over its heads' regions (:mod:`headkv_jax.slot_store`:
16-bit = the cache dtype; 8/4/2 = packed codes + one float16 scale and zero per token and
group of ``quant_group`` channels), so a head's bytes follow its own bits. Positions, scores
and the region bookkeeping stay layer-wide. A quantized class also keeps its first
``fp_sinks`` tokens and its ``residual`` most recent tokens in the cache dtype (KIVI's
full-precision residual: without it 2-bit accuracy collapses); attention reads those from the
full-precision window and every other token dequantized. Tokens are quantized once, when
written; compaction, eviction and re-packing move codes with their scales, so a kept token's
dequantized K/V never change. ``view`` returns dequantized per-head views, so attention and
the policies are the same code at every precision.

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

from headkv_jax import attention
from headkv_jax import cache_layout
from headkv_jax import eviction
from headkv_jax import fp_window
from headkv_jax import kernel_decode
from headkv_jax import policies as policies_lib
from headkv_jax import quantization
from headkv_jax import sharding
from headkv_jax import slot_pool
from headkv_jax import slot_store
from headkv_jax.cache_layout import BitClass
from headkv_jax.fp_window import FpWindow
from pallas_kernels import packing

SUPPORTED_BITS = quantization.SUPPORTED_BITS
QUANT_GROUP = 32  # channels sharing one scale + zero (KIVI's group size)
RESIDUAL = 32  # most recent tokens a quantized head keeps in the cache dtype
FP_SINKS = 4  # first tokens a quantized head keeps in the cache dtype


@flax.struct.dataclass
class LayerCache:
  """One layer's pools (see the module docstring for the layout).

  Attributes:
    k, v: per bit class, a :mod:`~headkv_jax.slot_store` store over the class's slots
      ``[B, S_c, ...]``: keys (rotated in "original" mode, un-rotated in "cache_relative")
      and values.
    positions: ``[B, S]`` int32 original position of each slot, ``-1`` when empty.
    scores: ``[B, S]`` float32 the policy's per-slot statistic (0 when unused).
    offsets: ``[B, Hkv]`` int32 first slot of each KV head's region.
    lengths: ``[B, Hkv]`` int32 tokens each KV head holds.
    dropped: ``[B, Hkv]`` int32 tokens lost because a head's region was full (the caller
      skipped ``compress``); stays 0 when the cache is driven as documented.
    fp: per bit class, its :class:`FpWindow` (None for a 16-bit class).
  """

  k: tuple
  v: tuple
  positions: jnp.ndarray
  scores: jnp.ndarray
  offsets: jnp.ndarray
  lengths: jnp.ndarray
  dropped: jnp.ndarray
  fp: tuple = ()


@flax.struct.dataclass
class PagedKVCache:
  """Head-aware compressed KV cache for all layers (a pytree; static config in the treedef).

  Attributes:
    layers: one :class:`LayerCache` per layer.
    policy: the eviction :class:`~headkv_jax.policies.Policy`.
    budgets: ``[layers][Hkv]`` tokens each KV head keeps after a compression.
    bits: ``[layers][Hkv]`` (key bits, value bits) of each KV head, in {16, 8, 4, 2}.
    chunk_size: most new tokens one ``attend`` call may add.
    page_size: slots per page; head regions are page aligned.
    dtype: the cache dtype (16-bit stores, full-precision windows, dequantized views).
    quant_group: channels per scale + zero of a quantized token.
    residual, fp_sinks: recent and first tokens a quantized head keeps in ``dtype``.
    attention_impl: "auto" | "pallas" | "xla", how decode steps attend
      (:mod:`headkv_jax.kernel_decode`): "pallas" = the fused Pallas kernel for ``T == 1`` in
      ``position_mode="original"`` (interpret mode off a GPU), XLA otherwise; "auto" =
      "pallas" on a GPU backend, "xla" elsewhere (the kernel is GPU-only for now).
  """

  layers: tuple[LayerCache, ...]
  policy: policies_lib.Policy = flax.struct.field(pytree_node=False)
  budgets: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)
  bits: tuple[tuple[tuple[int, int], ...], ...] = flax.struct.field(pytree_node=False)
  chunk_size: int = flax.struct.field(pytree_node=False)
  page_size: int = flax.struct.field(pytree_node=False)
  dtype: str = flax.struct.field(pytree_node=False, default="float32")
  quant_group: int = flax.struct.field(pytree_node=False, default=QUANT_GROUP)
  residual: int = flax.struct.field(pytree_node=False, default=RESIDUAL)
  fp_sinks: int = flax.struct.field(pytree_node=False, default=FP_SINKS)
  attention_impl: str = flax.struct.field(pytree_node=False, default="auto")

  # ---- construction ------------------------------------------------------------------------

  @classmethod
  def create(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
             budgets, policy: policies_lib.Policy | str, chunk_size: int,
             dtype=jnp.bfloat16, page_size: int = 16, bits=None, *,
             quant_group: int | None = None, residual: int = RESIDUAL,
             fp_sinks: int = FP_SINKS, attention_impl: str = "auto") -> "PagedKVCache":
    """An empty cache.

    Args:
      num_layers, batch, num_kv_heads, head_dim: model and batch shape.
      budgets: int (every head; pyramidkv spreads it over depth) or ``[layers, Hkv]`` ints.
      policy: a :class:`Policy` or a name from ``POLICY_NAMES`` (default knobs).
      chunk_size: most tokens per ``attend`` call (prompt length for one-shot prefill).
      dtype: the cache dtype (16-bit K/V, full-precision windows).
      page_size: slots per page.
      bits: None (all 16), ``[layers, Hkv]`` (keys = values) or ``[layers, Hkv, 2]``
        (key bits, value bits), in {16, 8, 4, 2}, keys never fewer than values.
      quant_group: channels per scale of a quantized token (divides ``head_dim``; default
        ``min(QUANT_GROUP, head_dim)``).
      residual, fp_sinks: recent / first tokens a quantized head keeps in ``dtype``; the
        residual is capped so the window never exceeds the smallest budget.
      attention_impl: "auto" (default), "pallas" or "xla" (see the class docstring).
    """
    kernel_decode.check_impl(attention_impl)
    if isinstance(policy, str):
      policy = policies_lib.make_policy(policy)
    if quant_group is None:
      quant_group = min(QUANT_GROUP, int(head_dim))
    for name, value in (("chunk_size", chunk_size), ("page_size", page_size),
                        ("num_layers", num_layers), ("batch", batch),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("quant_group", quant_group)):
      if int(value) <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    for name, value in (("residual", residual), ("fp_sinks", fp_sinks)):
      if int(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
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
    bits = cache_layout.as_bits(bits, shape)
    if (bits < 16).any():
      if head_dim % quant_group:
        raise ValueError(f"quant_group={quant_group} must divide head_dim={head_dim}.")
      for b in set(bits[bits < 16].tolist()):
        packing.packed_width(head_dim, b)  # raises for a head_dim it cannot pack
    if policy.adaptive and any(len(set(map(tuple, row))) > 1 for row in bits):
      raise ValueError("Policy 'adakv' moves budget between the heads of a layer, so they "
                       "share one pool: give every head of a layer the same bits (e.g. a "
                       "uniform bit scheme).")
    dtype = jnp.dtype(dtype)
    # A window longer than a head's budget would hold tokens the head never keeps.
    residual = max(0, min(int(residual), int(budgets.min()) - int(fp_sinks)))
    window = int(fp_sinks) + residual

    def layer(row, row_bits):
      classes, _, offsets = cache_layout.layer_layout(row, row_bits, policy.adaptive,
                                                      chunk_size, page_size)
      slots = sum(c.slots for c in classes)
      fp = tuple(fp_window.empty(batch, len(c.heads), window, head_dim, dtype)
                 if min(c.bits) < 16 and window > 0 else None for c in classes)
      return LayerCache(
          k=tuple(slot_store.empty(c.bits[0], (batch, c.slots), head_dim, dtype, quant_group)
                  for c in classes),  # per class [B, S_c, ...]
          v=tuple(slot_store.empty(c.bits[1], (batch, c.slots), head_dim, dtype, quant_group)
                  for c in classes),
          positions=jnp.full((batch, slots), -1, jnp.int32),  # [B, S]
          scores=jnp.zeros((batch, slots), jnp.float32),  # [B, S]
          offsets=jnp.asarray(np.broadcast_to(offsets, (batch, num_kv_heads)), jnp.int32),
          lengths=jnp.zeros((batch, num_kv_heads), jnp.int32),  # [B, Hkv]
          dropped=jnp.zeros((batch, num_kv_heads), jnp.int32),  # [B, Hkv]
          fp=fp,
      )

    row_bits = [tuple((int(k), int(v)) for k, v in row) for row in bits]
    return cls(
        layers=tuple(layer(row, rb) for row, rb in zip(budgets, row_bits)),
        policy=policy,
        budgets=tuple(tuple(int(x) for x in row) for row in budgets),
        bits=tuple(row_bits),
        chunk_size=int(chunk_size),
        page_size=int(page_size),
        dtype=dtype.name,
        quant_group=int(quant_group),
        residual=int(residual),
        fp_sinks=int(fp_sinks),
        attention_impl=attention_impl,
    )

  # ---- inspection --------------------------------------------------------------------------

  @property
  def num_kv_heads(self) -> int:
    return len(self.budgets[0])

  @property
  def nbytes(self) -> int:
    """Real bytes of every array the cache holds (codes, scales, windows, bookkeeping)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

  @property
  def head_bits(self) -> np.ndarray:
    """``[layers, Hkv, 2]`` int32 (key bits, value bits) of every KV head."""
    return np.asarray(self.bits, np.int32)

  def head_effective_bits(self) -> np.ndarray:
    """``[layers, Hkv]`` bits per K/V element a head holds at its budget, scales and the
    full-precision window included (the mean of its keys' and values' figures)."""
    full = quantization.effective_bits(16, 1, self.dtype)
    window = self.fp_sinks + self.residual
    out = np.zeros(self.head_bits.shape[:2])
    for (l, h), budget in np.ndenumerate(np.asarray(self.budgets)):
      kb, vb = self.bits[l][h]
      per = [quantization.effective_bits(b, self.quant_group, self.dtype) for b in (kb, vb)]
      if min(kb, vb) < 16:  # the window's tokens are held quantized and in full precision
        fp = min(window, budget)
        per = [(budget * p + fp * full * (b < 16)) / budget for p, b in zip(per, (kb, vb))]
      out[l, h] = sum(per) / 2
    return out

  @property
  def effective_bits(self) -> float:
    """Budget-weighted mean of :meth:`head_effective_bits`: bits per K/V element kept."""
    budgets = np.asarray(self.budgets, np.float64)
    return float((self.head_effective_bits() * budgets).sum() / budgets.sum())

  @property
  def logical_tokens(self) -> jnp.ndarray:
    """Tokens held per (layer, row, KV head): ``[layers, B, Hkv]`` int32."""
    return jnp.stack([l.lengths for l in self.layers])

  def token_counts(self) -> jnp.ndarray:
    """Same as :attr:`logical_tokens` (the dense cache's spelling)."""
    return self.logical_tokens

  def classes(self, layer: int) -> tuple[BitClass, ...]:
    """Static bit classes of ``layer`` (see :class:`BitClass`)."""
    return cache_layout.layer_layout(self.budgets[layer], self.bits[layer],
                                     self.policy.adaptive, self.chunk_size, self.page_size)[0]

  def uniform(self, layer: int) -> bool:
    """Static: every head of ``layer`` owns a fixed region of one size in one store, so the
    per-head view is a free reshape of the pool (no gather)."""
    return (not self.policy.adaptive and len(set(self.budgets[layer])) == 1
            and len(set(self.bits[layer])) == 1)

  def view_len(self, layer: int) -> int:
    """Static upper bound on one head's tokens in ``layer`` (the per-head view length)."""
    row = self.budgets[layer]
    if not self.policy.adaptive and len(set(row)) == 1:
      return slot_pool.round_up(row[0] + self.chunk_size, self.page_size)
    most = sum(row) if self.policy.adaptive else max(row)
    return most + self.chunk_size

  def _region_ends(self, layer: int) -> jnp.ndarray:
    """``[B, Hkv]`` one past the last slot of each head's region."""
    lc = self.layers[layer]
    _, need, _ = cache_layout.layer_layout(self.budgets[layer], self.bits[layer],
                                           self.policy.adaptive, self.chunk_size,
                                           self.page_size)
    if need is not None:  # fixed regions
      return lc.offsets + jnp.asarray(need, jnp.int32)[None, :]
    return jnp.concatenate(
        [lc.offsets[:, 1:], jnp.full_like(lc.offsets[:, :1], lc.positions.shape[1])], axis=1)

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
    """K and V pools of a 16-bit ``layer`` as pages: ``[B, num_pages, page_size, D]`` each."""
    if len(self.classes(layer)) != 1 or self.bits[layer][0] != (16, 16):
      raise ValueError(f"pages() reads a 16-bit layer of one store; layer {layer} has bits "
                       f"{sorted(set(self.bits[layer]))}.")
    lc = self.layers[layer]
    b, s, d = lc.k[0].shape
    shape = (b, s // self.page_size, self.page_size, d)
    return lc.k[0].reshape(shape), lc.v[0].reshape(shape)

  # ---- per-head views ----------------------------------------------------------------------

  def slot_view(self, layer: int):
    """Positions and scores of each head, position ordered, padded to :meth:`view_len`.

    Returns ``(positions [B, Hkv, C] (-1 empty), scores [B, Hkv, C], slot indices
    [B, Hkv, C] into the layer's slots (S where empty; None for a uniform layer))``.
    """
    lc = self.layers[layer]
    b, num_slots = lc.positions.shape
    if self.uniform(layer):  # empty slots already hold position -1 and score 0
      shape = (b, self.num_kv_heads, self.view_len(layer))
      return lc.positions.reshape(shape), lc.scores.reshape(shape), None
    c = jnp.arange(self.view_len(layer), dtype=jnp.int32)
    valid = c[None, None, :] < lc.lengths[:, :, None]  # [B, Hkv, C]
    idx = jnp.where(valid, lc.offsets[:, :, None] + c, num_slots)  # [B, Hkv, C]
    safe = jnp.minimum(idx, num_slots - 1)
    return (jnp.where(valid, slot_pool.gather(lc.positions, safe), -1),
            jnp.where(valid, slot_pool.gather(lc.scores, safe), 0.0), idx)

  def raw_view(self, layer: int, idx) -> list[tuple]:
    """Per bit class, its heads' K and V stores at ``idx`` (from :meth:`slot_view`):
    ``[(k, v)]`` with leaves ``[B, Hc, C, ...]`` (codes and scales as stored)."""
    lc = self.layers[layer]
    out = []
    for c, cls in enumerate(self.classes(layer)):
      if idx is None:  # uniform: the pool is the view
        lead = (lc.positions.shape[0], self.num_kv_heads, self.view_len(layer))
        fn = lambda x, lead=lead: x.reshape(lead + x.shape[2:])
      else:
        local = jnp.clip(idx[:, cls.heads] - cls.base, 0, cls.slots - 1)  # [B, Hc, C]
        fn = lambda x, local=local: slot_pool.gather(x, local)
      out.append((slot_store.tree(fn, lc.k[c]), slot_store.tree(fn, lc.v[c])))
    return out

  def view(self, layer: int):
    """Per-head views of one layer, position ordered, padded to :meth:`view_len`.

    Returns ``(k, v [B, Hkv, C, D] in the cache dtype (dequantized; full-precision window
    tokens exact), positions [B, Hkv, C] (-1 empty), scores [B, Hkv, C], slot indices
    [B, Hkv, C] into the layer's slots (S where empty; None for a uniform layer))``.
    """
    pc, sc, idx = self.slot_view(layer)
    classes = self.classes(layer)
    ks, vs = [], []
    for cls, (k, v), fp in zip(classes, self.raw_view(layer, idx), self.layers[layer].fp):
      k = slot_store.decode(k, cls.bits[0], self.quant_group, self.dtype)
      v = slot_store.decode(v, cls.bits[1], self.quant_group, self.dtype)
      if fp is not None:
        k, v, _ = fp_window.read(fp, pc[:, cls.heads], k, v, self.fp_sinks, self.residual)
      ks.append(k)
      vs.append(v)
    return (cache_layout.join_classes(ks, classes), cache_layout.join_classes(vs, classes),
            pc, sc, idx)

  # ---- the model contract ------------------------------------------------------------------

  def layer_view(self, layer: int) -> "PagedKVCache":
    """Layer ``layer`` as a one-layer cache (its budgets and bits; for layer-by-layer prefill)."""
    return self.replace(layers=(self.layers[layer],), budgets=(self.budgets[layer],),
                        bits=(self.bits[layer],))

  def with_layer_view(self, layer: int, view: "PagedKVCache") -> "PagedKVCache":
    """This cache with layer ``layer`` taken from the one-layer ``view``."""
    return self.with_layer(layer, view.layers[0])

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
    q, k, v = sharding.replicate_over_model(q, k, v)  # the pools are whole on every device
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
    observed = self._observed_queries(tok_valid, rank)  # [B, T] bool, None: no statistic
    if kernel_decode.uses_kernel(self, t):  # decode through the fused kernel (same results)
      out, probs = kernel_decode.decode_attention(
          self, layer, qg, k_new, vt, positions, pc, need_probs=observed is not None)
      out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)  # [B, T, Hq, D]
      sums = None if observed is None else jnp.sum(
          probs * observed[:, None, None, :, None], axis=3)  # [B, Hkv, G, C + T]
    else:
      out, sums = attention.attention_over_slots(
          qg, k_cached, vc, pc, k_new, vt, positions, num_filled=jnp.max(lc.lengths),
          observed=observed)  # [B, T, Hq, D], [B, Hkv, G, C + T]
    out, = sharding.replicate_over_model(out)  # so o_proj's split does not reach back in here

    cached_scores, new_scores = self._slot_stats(sums, sc, view_len, b, hkv, t)
    if self.policy.uses_novelty:  # KeyDiff: every held key against the head's keys, pre-RoPE
      k_pre = kc if self.policy.position_mode == "cache_relative" else slot_pool.rotate(
          rope, kc, -pc)  # [B, Hkv, C, D] un-rotated (empty slots are masked out below)
      held = jnp.concatenate([pc >= 0, jnp.broadcast_to(tok_valid[:, None], (b, hkv, t))],
                             axis=2)  # [B, Hkv, C + T]
      novelty = policies_lib.key_novelty(
          jnp.concatenate([k_pre, kt.astype(k_pre.dtype)], axis=2), held)
      stat = policies_lib.novelty_scores(
          self.policy, novelty, jnp.concatenate([cached_scores, new_scores], axis=2), held)
      cached_scores, new_scores = stat[..., :view_len], stat[..., view_len:]
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
    new = self._write(layer, self.layers[layer], k, v, positions, scores.astype(jnp.float32))
    return self.with_layer(layer, new)

  def _write(self, layer: int, lc: LayerCache, k_store, v_new, positions,
             new_scores) -> LayerCache:
    """``lc`` with the real tokens of ``positions [B, T]`` appended to each head's region
    (``k_store, v_new [B, Hkv, T, D]``, quantized here once for a quantized class;
    ``new_scores [B, Hkv, T]``); a head whose region is full drops the overflow and counts
    it in ``dropped``."""
    num_slots = lc.positions.shape[1]
    tok_valid = positions >= 0  # [B, T]
    rank = jnp.cumsum(tok_valid, axis=1, dtype=jnp.int32) - 1  # [B, T] slot among real tokens
    new_slot = lc.lengths[:, :, None] + rank[:, None, :]  # [B, Hkv, T]
    stored = tok_valid[:, None, :] & (new_slot < self.room(layer)[:, :, None])  # [B, Hkv, T]
    target = jnp.where(stored, lc.offsets[:, :, None] + new_slot, num_slots)  # [B, Hkv, T]
    new_pos = jnp.broadcast_to(positions[:, None, :], target.shape)
    ks, vs, fps = [], [], []
    for c, cls in enumerate(self.classes(layer)):
      def enc(x, bits):
        return slot_store.encode(x[:, cls.heads], bits, self.quant_group, self.dtype)
      ks.append(self._scatter_class(cls, lc.k[c], target, enc(k_store, cls.bits[0])))
      vs.append(self._scatter_class(cls, lc.v[c], target, enc(v_new, cls.bits[1])))
      fp = lc.fp[c]
      if fp is not None:
        fp = fp_window.write(fp, positions, k_store[:, cls.heads], v_new[:, cls.heads],
                             self.fp_sinks, self.residual)
      fps.append(fp)
    return lc.replace(
        k=tuple(ks), v=tuple(vs), fp=tuple(fps),
        positions=slot_pool.scatter(lc.positions, target, new_pos),
        scores=slot_pool.scatter(lc.scores, target, new_scores),
        lengths=lc.lengths + jnp.sum(stored, axis=-1, dtype=jnp.int32),
        dropped=lc.dropped + jnp.sum(tok_valid[:, None, :] & ~stored, axis=-1, dtype=jnp.int32),
    )

  @staticmethod
  def _scatter_class(cls: BitClass, store, target, values):
    """Writes ``values`` (a store, leaves ``[B, Hc, N, ...]``) at layer slots ``target
    [B, Hkv, N]`` (of every head; ``>= S`` dropped) into one class's ``store``."""
    tgt = target[:, cls.heads]  # [B, Hc, N]
    local = jnp.where((tgt >= cls.base) & (tgt < cls.base + cls.slots), tgt - cls.base,
                      cls.slots)
    return slot_store.tree(lambda p, x: slot_pool.scatter(p, local, x), store, values)

  def write_kv(self, layer: int, lc: LayerCache, raw: Sequence[tuple], target) -> LayerCache:
    """``lc`` with its K/V stores rebuilt from ``raw`` (:meth:`raw_view`-shaped, per class)
    written at layer slots ``target [B, Hkv, C]`` (``>= S`` dropped) into empty stores."""
    ks, vs = [], []
    for c, (cls, (k, v)) in enumerate(zip(self.classes(layer), raw)):
      ks.append(self._scatter_class(cls, slot_store.tree(jnp.zeros_like, lc.k[c]), target, k))
      vs.append(self._scatter_class(cls, slot_store.tree(jnp.zeros_like, lc.v[c]), target, v))
    return lc.replace(k=tuple(ks), v=tuple(vs))

  def _observed_queries(self, tok_valid, rank):
    """``[B, T]`` bool: the queries whose attention the policy's statistic sums (H2O: every
    real query; the SnapKV family: the last ``window`` real ones), None for no statistic."""
    kind = self.policy.score_kind
    if kind in ("none", "keys"):
      return None
    if kind == "accumulate":
      return tok_valid
    n_real = jnp.sum(tok_valid, axis=1, keepdims=True)  # [B, 1]
    return tok_valid & (rank >= n_real - self.policy.window)

  def _slot_stats(self, sums, cached_scores, view_len, b, hkv, t):
    """Per-slot statistics from ``sums [B, Hkv, G, C + T]`` (attention summed over the
    observed queries; None without a statistic) -> (cached slots ``[B, Hkv, C]``, new tokens
    ``[B, Hkv, T]``)."""
    if sums is None:
      return cached_scores, jnp.zeros((b, hkv, t), jnp.float32)
    per = policies_lib.reduce_group(sums, self.policy.gqa_reduce, axis=2)  # [B, Hkv, C + T]
    cached = per[..., :view_len]
    if self.policy.accumulates:
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
    :meth:`compress`); codes move with their scales. Jit-able (all shapes follow from static
    fields).
    """
    cache = self.compress(oracle_scores)
    b = cache.layers[0].positions.shape[0]
    d = self.head_dim
    new = PagedKVCache.create(
        len(self.layers), b, self.num_kv_heads, d, np.asarray(self.budgets), self.policy,
        chunk_size=chunk_size, dtype=self.dtype, page_size=self.page_size,
        bits=self.head_bits, quant_group=self.quant_group, residual=self.residual,
        fp_sinks=self.fp_sinks, attention_impl=self.attention_impl)
    layers = []
    for layer in range(len(self.layers)):
      lc, target_lc = cache.layers[layer], new.layers[layer]
      n = new.view_len(layer)
      pc, sc, idx = cache.slot_view(layer)  # heads within budget
      raw = [slot_store.tree(lambda x: x[:, :, :n], kv) for kv in cache.raw_view(layer, idx)]
      pc, sc = pc[:, :, :n], sc[:, :, :n]
      c = jnp.arange(n, dtype=jnp.int32)
      kept = c[None, None, :] < lc.lengths[:, :, None]  # [B, Hkv, n]
      offsets = target_lc.offsets
      if self.policy.adaptive:
        offsets = slot_pool.region_starts(lc.lengths, chunk_size, self.page_size)
      num_slots = target_lc.positions.shape[1]
      target = jnp.where(kept, offsets[:, :, None] + c, num_slots)  # [B, Hkv, n]
      target_lc = target_lc.replace(
          positions=slot_pool.scatter(target_lc.positions, target, pc),
          scores=slot_pool.scatter(target_lc.scores, target, sc),
          offsets=offsets, lengths=lc.lengths, dropped=lc.dropped, fp=lc.fp)
      layers.append(new.write_kv(layer, target_lc, raw, target))
    return new.replace(layers=tuple(layers))

  @property
  def head_dim(self) -> int:
    store = self.layers[0].k[0]
    if isinstance(store, slot_store.QuantStore):
      return store.scale.shape[-1] * self.quant_group
    return store.shape[-1]


__all__ = ["BitClass", "FpWindow", "LayerCache", "PagedKVCache", "SUPPORTED_BITS",
           "QUANT_GROUP", "RESIDUAL", "FP_SINKS"]
