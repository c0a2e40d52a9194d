"""The compressed KV cache: model-wide page pools, one per bit class, per-head regions.

Layout (:mod:`headkv_jax.cache_layout`; ``c`` = a bit class, ``S_c`` its slots)::

    pools[c].k, .v     [B, S_c, ...]  K / V of every (layer, head) of class c (a store:
                                      the cache dtype at 16 bits, else packed codes + scales)
    pools[c].positions [B, S_c]       int32 original position of each slot, -1 when empty
    pools[c].scores    [B, S_c]       float32 the policy's per-slot statistic
    pools[c].fp        FpWindow       sinks + recent residual of quantized heads, cache dtype
    offsets            [B, L, Hkv]    int32 first slot of each head's region in its pool
    key_channels       [B, L, Hkv, 2, D] float16 per-channel key (shift, scale) of each
                                      quantized head (None when no head quantizes keys)
    lengths            [B, L, Hkv]    int32 tokens each head holds
    dropped            [B, L, Hkv]    int32 tokens lost to a full region (0 when driven as
                                      documented)

A head's region is a run of whole pages of its class's pool holding only its own tokens, in
position order at its front: ``round_up(budget + chunk_size, page_size)`` slots, so the
allocated bytes are the sum of the budgets' regions (nothing padded to the largest head or
layer) and K/V are stored once per KV head, never per query head. The page table of a head
is implied by its offset (:meth:`PagedKVCache.page_table`, what the Pallas kernel reads):
eviction compacts a head in place, so its pages never fragment.

**Every layer has the same array shapes.** Budgets and bits move between layers through the
layout's tables (block offsets and sizes, indexed by the layer), not through shapes, so
``attend``, ``append`` and eviction take the layer as a Python int *or a traced int32*: one
compiled program serves every layer (layer-by-layer prefill calls one program 30 times;
``compress`` is one ``fori_loop`` over the layers that need eviction).

Attention reads each head's own slots tile by tile, each tile one contiguous run of its
region (:func:`headkv_jax.attention.tile_loop`), over as many tiles as the layer's longest
head of the class holds: no per-head K/V view padded to the largest head is materialised.
A decode step of a static layer reads a loop's heads in one tile each, their whole regions
(static slices: a decode cache's region is its budget and a page of headroom).
Eviction ranks per-slot metadata over the smallest static view that holds the layer's
longest head and moves K/V within the layer's block (:mod:`headkv_jax.eviction`).

Per-head precision (HAQ-KV): ``bits [L][Hkv]`` gives each head's (key bits, value bits) in
{16, 8, 4, 2}; heads of one pair share a pool (one kernel launch sees one bit width).
Quantized slots hold packed codes and one float16 scale + zero per token and group of
``quant_group`` channels (:mod:`headkv_jax.slot_store`). Keys are normalised on KIVI's
channel axis first: a head quantizes ``(k - shift) / scale`` per token, with one shift and
scale per channel (``key_channels``: the mean and standard deviation of that channel over the
head's first written tokens, fixed from then on), so an outlier channel (keys have a few, large
in every token) no longer spends a token's levels and erases the rest of its group. A
quantized head also keeps its
first ``fp_sinks`` and its ``residual`` most recent tokens in the cache dtype (KIVI's
residual), read from the window wherever it holds a slot's position. A token is quantized
once, when written; eviction and re-packing move codes with their scales, so **a kept token's
dequantized K/V never change**.

Driving the cache (``budgets`` is ``[layers, Hkv]`` or one int)::

    cache = PagedKVCache.create(L, B, Hkv, D, budgets, policy, chunk_size=C)
    # (a) one shot: chunk_size >= the (bucketed) prompt length
    logits, cache = model(prompt, positions, cache); cache = cache.compress()
    # (b) chunked prefill: per chunk of <= chunk_size tokens (peak = budget + chunk per head)
    for chunk, pos in chunks:
      logits, cache = model(chunk, pos, cache); cache = cache.compress()
    # (c) decoding: one token per step, then compress: a head over its budget is evicted ...
    logits, cache = model(tok, pos, cache); cache = cache.compress()
    #     ... or amortised: evict only when a head has no room left for the next token
    cache = cache.compress(headroom=1)
    # oracle: cache.compress(oracle_scores=[per layer [B, Hq or Hkv, P] attention by position])

``attend`` requires ``T <= chunk_size``; a head that would overflow its region (the caller
skipped ``compress``) drops the overflowing tokens and counts them in ``dropped``. In
``position_mode="cache_relative"`` keys are stored un-rotated and rotated by their slot in
their head's region (StreamingLLM's rolling positions).
"""

from __future__ import annotations

import math

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
from headkv_jax import rope as rope_lib
from headkv_jax import sharding
from headkv_jax import slot_pool
from headkv_jax import slot_store
from headkv_jax.fp_window import FpWindow
from headkv_jax.jit import traced
from pallas_kernels import packing

SUPPORTED_BITS = quantization.SUPPORTED_BITS
QUANT_GROUP = 32  # channels sharing one scale + zero (KIVI's group size)
RESIDUAL = fp_window.RESIDUAL  # most recent tokens a quantized head keeps in the cache dtype
FP_SINKS = fp_window.SINKS  # first tokens a quantized head keeps in the cache dtype
KEY_SCALE_FLOOR = 2.0**-14  # float16's smallest normal: a channel's scale when it is all zero
TILE = 256  # slots per attention tile


@flax.struct.dataclass
class Pool:
  """One bit class's slots, for every layer (see the module docstring).

  Attributes:
    k, v: :mod:`~headkv_jax.slot_store` stores ``[B, S_c, ...]``: keys (rotated in "original"
      mode, un-rotated in "cache_relative") and values.
    positions: ``[B, S_c]`` int32, ``-1`` when empty.
    scores: ``[B, S_c]`` float32 the policy's statistic (0 when unused).
    fp: the class's :class:`FpWindow` ``[B, rows, F, D]`` (None for a 16-bit class).
  """

  k: object
  v: object
  positions: jnp.ndarray
  scores: jnp.ndarray
  fp: FpWindow | None = None


def _at(table, layer):
  """Row ``layer`` (Python int or traced) of a numpy layout table, as a jnp array."""
  if isinstance(layer, (int, np.integer)):
    return jnp.asarray(table[int(layer)])
  return jnp.asarray(table)[layer]


def _run_of(heads) -> int | None:
  """The first of static ``heads`` that follow one another (e.g. ``(1, 2)``), else None."""
  heads = [int(h) for h in heads]
  return heads[0] if heads == list(range(heads[0], heads[0] + len(heads))) else None


def _pick(x, heads, axis: int = 1):
  """``x`` restricted to the static ``heads`` along ``axis`` (all of it for None): a static
  slice where the heads follow one another (a decode step does this per tile loop and
  layer; a slice fuses into its reader, a gather is a kernel of its own)."""
  if heads is None:
    return x
  first = _run_of(heads)
  if first is not None:
    return jax.lax.slice_in_dim(x, first, first + len(heads), axis=axis)
  return jnp.take(x, jnp.asarray(heads, jnp.int32), axis=axis)


def _put(x, heads, part, axis: int = 1):
  """``x`` with the static ``heads`` along ``axis`` replaced by ``part`` (``part`` for None):
  an in-place update of a slice where the heads follow one another, else a scatter."""
  if heads is None:
    return part
  first = _run_of(heads)
  if first is not None:
    return jax.lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), first, axis=axis)
  index = (slice(None),) * axis + (jnp.asarray(heads, jnp.int32),)
  return x.at[index].set(part)


def _first_key_channels(old, k, stored):
  """``old [B, Hkv, 2, D]`` float16 key channel (shift, scale) of one layer, with each head
  that has none yet (scale all 0) and stores tokens now given the mean and the standard
  deviation (floored at a tenth of the head's mean deviation) of its stored keys ``k [B, Hkv,
  T, D]`` per channel (``stored [B, Hkv, T]``); set once, so a kept key's dequantized value
  never changes."""
  x = k.astype(jnp.float32)
  if k.shape[2] == 1:  # one token (a decode step): its mean is itself, its deviation 0
    mean = jnp.where(stored, x[:, :, 0], 0.0)  # [B, Hkv, D]
    scale = jnp.full(mean.shape, KEY_SCALE_FLOOR, jnp.float32)
  else:
    count = jnp.maximum(jnp.sum(stored, axis=-1, dtype=jnp.int32), 1)[..., None]  # [B, Hkv, 1]
    mean = jnp.sum(jnp.where(stored[..., None], x, 0.0), axis=2) / count  # [B, Hkv, D]
    var = jnp.sum(jnp.where(stored[..., None], jnp.square(x - mean[:, :, None]), 0.0),
                  axis=2) / count
    std = jnp.sqrt(var)
    scale = jnp.maximum(std, jnp.maximum(0.1 * jnp.mean(std, axis=-1, keepdims=True),
                                         KEY_SCALE_FLOOR))
  new = jnp.stack([mean, scale], axis=2).astype(old.dtype)  # [B, Hkv, 2, D]
  unset = jnp.all(old[:, :, 1] == 0, axis=-1) & jnp.any(stored, axis=-1)  # [B, Hkv]
  return jnp.where(unset[..., None, None], new, old)


def _record_tile(buf, s, values, valid, pad: int):
  """``buf [B, Hkv, R, pad + N]`` with a tile's per-slot ``values [B, Hkv, R, tile]`` written
  at index ``pad + slot`` where ``valid [B, Hkv, tile]``; ``s [B, Hkv, tile]`` are the tile's
  slots in their regions, consecutive from ``s[..., 0]`` (clipped: a tile past a head's
  region writes nothing valid)."""
  last = buf.shape[-1] - values.shape[-1]
  if isinstance(s, np.ndarray) and (s[..., 0] == s.flat[0]).all():  # one static start
    at = min(max(int(s.flat[0]) + pad, 0), last)
    old = jax.lax.slice_in_dim(buf, at, at + values.shape[-1], axis=3)
    new = jnp.where(valid[:, :, None, :], values.astype(buf.dtype), old)
    return jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=3)
  at = jnp.clip(s[..., 0] + pad, 0, last)
  return slot_pool.update_runs(buf, at, values, valid[:, :, None, :])


@flax.struct.dataclass
class PagedKVCache:
  """Head-aware compressed KV cache for all layers (a pytree; static config in the treedef).

  Attributes:
    pools: one :class:`Pool` per bit class (``layout.pairs``).
    offsets, lengths, dropped: ``[B, L, Hkv]`` int32 per-head bookkeeping.
    policy: the eviction :class:`~headkv_jax.policies.Policy`.
    budgets: ``[layers][Hkv]`` tokens each KV head keeps after a compression.
    bits: ``[layers][Hkv]`` (key bits, value bits) of each KV head, in {16, 8, 4, 2}.
    chunk_size: most new tokens one ``attend`` call may add.
    page_size: slots per page; head regions are page aligned.
    dtype: the cache dtype (16-bit stores, full-precision windows, dequantized tiles).
    quant_group: channels per scale + zero of a quantized token.
    residual, fp_sinks: recent and first tokens a quantized head keeps in ``dtype``.
    key_channels: ``[B, L, Hkv, 2, D]`` float16 per-channel (shift, scale) a quantized-key
      head normalises its keys by before quantizing them (0 until the head's first token is
      written); None when every head stores 16-bit keys.
    attention_impl: "auto" | "pallas" | "xla", how decode steps attend
      (:mod:`headkv_jax.kernel_decode`): "pallas" = the fused Pallas kernel for ``T == 1`` in
      ``position_mode="original"`` (interpret mode off a GPU), XLA otherwise; "auto" =
      "pallas" on a GPU backend, "xla" elsewhere.
  """

  pools: tuple[Pool, ...]
  offsets: jnp.ndarray
  lengths: jnp.ndarray
  dropped: jnp.ndarray
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
  rope_inv_freq: tuple | None = flax.struct.field(pytree_node=False, default=None)
  key_channels: jnp.ndarray | None = None

  # Model code may pass a traced layer index to attend (one program for every layer).
  traced_layers = True

  # ---- construction ------------------------------------------------------------------------

  @classmethod
  def create(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
             budgets, policy: policies_lib.Policy | str, chunk_size: int,
             dtype=jnp.bfloat16, page_size: int = 16, bits=None, *,
             quant_group: int | None = None, residual: int = RESIDUAL,
             fp_sinks: int = FP_SINKS, attention_impl: str = "auto",
             rope: rope_lib.RoPE | None = None) -> "PagedKVCache":
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
      quant_group: channels per scale of a quantized token (default :data:`QUANT_GROUP`),
        capped at ``head_dim`` (a larger group is one scale per token); it must divide it.
      residual, fp_sinks: recent / first tokens a quantized head keeps in ``dtype``; the
        residual is capped so the window never exceeds the smallest budget.
      attention_impl: "auto" (default), "pallas" or "xla" (see the class docstring).
      rope: the model's RoPE; the KeyDiff score modes in "original" mode need it (they rank
        keys before rotation, and the cache stores them rotated).
    """
    kernel_decode.check_impl(attention_impl)
    if isinstance(policy, str):
      policy = policies_lib.make_policy(policy)
    quant_group = min(QUANT_GROUP if quant_group is None else int(quant_group), int(head_dim))
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
    if (policy.uses_novelty and policy.position_mode == "original" and rope is None):
      raise ValueError(f"score_mode={policy.score_mode!r} in position_mode='original' ranks "
                       "keys before RoPE and the cache stores them rotated: pass the model's "
                       "RoPE (rope=config.make_rope()).")
    if rope is not None and rope.attention_scaling != 1.0:
      raise ValueError(f"rope.attention_scaling={rope.attention_scaling}: the cache "
                       "un-rotates keys with unscaled rotations; only 1.0 is supported.")
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
    budgets_t = cache_layout.nested_ints(budgets)
    bits_t = tuple(tuple((int(k), int(v)) for k, v in row) for row in bits)
    lay = cache_layout.layout(budgets_t, bits_t, policy.adaptive, int(chunk_size),
                              int(page_size))
    pools = []
    for c, (kb, vb) in enumerate(lay.pairs):
      lead = (batch, lay.slots[c])
      fp = None
      if lay.quantized(c) and window > 0:
        fp = fp_window.empty(batch, lay.fp_rows[c], window, head_dim, dtype)
      pools.append(Pool(
          k=slot_store.empty(kb, lead, head_dim, dtype, quant_group),  # [B, S_c, ...]
          v=slot_store.empty(vb, lead, head_dim, dtype, quant_group),
          positions=jnp.full(lead, -1, jnp.int32),  # [B, S_c]
          scores=jnp.zeros(lead, jnp.float32),  # [B, S_c]
          fp=fp))
    per_head = (batch,) + shape
    return cls(
        pools=tuple(pools),
        offsets=jnp.asarray(np.broadcast_to(lay.first_slot, per_head), jnp.int32),  # [B, L, Hkv]
        lengths=jnp.zeros(per_head, jnp.int32),
        dropped=jnp.zeros(per_head, jnp.int32),
        policy=policy, budgets=budgets_t, bits=bits_t, chunk_size=int(chunk_size),
        page_size=int(page_size), dtype=dtype.name, quant_group=int(quant_group),
        residual=int(residual), fp_sinks=int(fp_sinks), attention_impl=attention_impl,
        rope_inv_freq=None if rope is None else tuple(
            float(x) for x in np.asarray(rope.inv_freq)),
        key_channels=(jnp.zeros(per_head + (2, head_dim), quantization.SCALE_DTYPE)
                      if (bits[..., 0] < 16).any() else None))  # [B, L, Hkv, 2, D]

  # ---- inspection --------------------------------------------------------------------------

  @property
  def layout(self) -> cache_layout.Layout:
    return cache_layout.layout(self.budgets, self.bits, self.policy.adaptive, self.chunk_size,
                               self.page_size)

  @property
  def num_layers(self) -> int:
    return len(self.budgets)

  @property
  def num_kv_heads(self) -> int:
    return len(self.budgets[0])

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def head_dim(self) -> int:
    store = self.pools[0].k
    if isinstance(store, slot_store.QuantStore):
      return store.scale.shape[-1] * self.quant_group
    return store.shape[-1]

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
      if kb < 16:  # a float16 shift and scale per channel of the head
        per[0] += 32 / budget
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
    return self.lengths.transpose(1, 0, 2)

  def token_counts(self) -> jnp.ndarray:
    """Same as :attr:`logical_tokens` (the dense cache's spelling)."""
    return self.logical_tokens

  def members(self, layer, c: int) -> jnp.ndarray:
    """``[Hkv]`` bool: the heads of ``layer`` in class ``c``."""
    return _at(self.layout.class_of, layer) == c

  def region_ends(self) -> jnp.ndarray:
    """``[B, L, Hkv]`` one past the last slot of each head's region in its pool."""
    lay = self.layout
    if not lay.adaptive:
      return self.offsets + jnp.asarray(lay.region, jnp.int32)[None]
    # adakv: one class per layer; a head's region runs to the next head's, the last to the
    # end of the layer's block.
    c = lay.class_of[:, 0]
    layers = np.arange(self.num_layers)
    block_end = jnp.asarray(lay.base[c, layers] + lay.count[c, layers], jnp.int32)  # [L]
    return jnp.concatenate([self.offsets[:, :, 1:], jnp.broadcast_to(
        block_end[None, :, None], self.offsets[:, :, :1].shape)], axis=2)

  def region_end(self, layer) -> jnp.ndarray:
    """``[B, Hkv]`` :meth:`region_ends` of ``layer``."""
    return self.region_ends()[:, layer]

  def rooms(self) -> jnp.ndarray:
    """``[B, L, Hkv]`` slots each head may fill."""
    return jnp.minimum(self.region_ends() - self.offsets, self.layout.max_region)

  def room(self, layer) -> jnp.ndarray:
    """``[B, Hkv]`` :meth:`rooms` of ``layer``."""
    return self.rooms()[:, layer]

  def page_table(self, layer) -> jnp.ndarray:
    """``[B, Hkv, max_pages]`` int32 page ids of each head's region in its class's pool (a
    row's pool seen as ``[S_c / page_size, page_size, ...]`` pages), ``-1`` past its end."""
    ps = self.page_size
    max_pages = math.ceil(self.layout.max_region / ps)
    page = self.offsets[:, layer][..., None] // ps + jnp.arange(max_pages, dtype=jnp.int32)
    return jnp.where(page * ps < self.region_end(layer)[..., None], page, -1)

  def pages(self, layer: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """K and V of a 16-bit ``layer``'s pool as pages ``[B, S_c / page_size, page_size, D]``."""
    classes = self._layer_classes(int(layer))
    if len(classes) != 1 or self.bits[layer][0] != (16, 16):
      raise ValueError(f"pages() reads a 16-bit layer of one pool; layer {layer} has bits "
                       f"{sorted(set(self.bits[layer]))}.")
    pool = self.pools[classes[0]]
    b, s, d = pool.k.shape
    shape = (b, s // self.page_size, self.page_size, d)
    return pool.k.reshape(shape), pool.v.reshape(shape)

  # ---- reading slots -----------------------------------------------------------------------

  def _fp_rows(self, layer, c: int, heads=None):
    """Class ``c``'s full-precision window rows of ``layer``'s heads (``[B, Hkv, F, ...]``;
    rows of heads outside the class are arbitrary and never read), or of the static
    ``heads`` only (:meth:`_class_heads`)."""
    fp = self.pools[c].fp
    if fp is None:
      return None
    if isinstance(layer, (int, np.integer)):  # static rows: slices where they follow on
      rows = np.clip(self.layout.fp_row[int(layer)], 0, fp.pos.shape[1] - 1)  # [Hkv]
      rows = rows if heads is None else rows[list(heads)]
      return jax.tree_util.tree_map(lambda x: _pick(x, tuple(rows.tolist())), fp)
    rows = _pick(jnp.maximum(_at(self.layout.fp_row, layer), 0), heads, axis=0)  # [Hkv]
    return FpWindow(k=fp.k[:, rows], v=fp.v[:, rows], pos=fp.pos[:, rows])

  def _key_channels(self, layer, c: int, heads=None):
    """``[B, Hkv, 1, 2, D]`` :attr:`key_channels` of ``layer``'s heads (or of the static
    ``heads``) when class ``c`` quantizes its keys, else None (rows of heads outside the
    class are never read)."""
    if self.key_channels is None or self.layout.pairs[c][0] == 16:
      return None
    return _pick(self.key_channels[:, layer], heads)[:, :, None]

  def read(self, c: int, idx, valid, fp=None, values: bool = True, channels=None):
    """Slots ``idx [B, Hkv, N]`` of pool ``c`` -> ``(k, v, positions)``: keys and values
    ``[B, Hkv, N, D]`` in the cache dtype (dequantized, keys un-normalised by ``channels`` =
    :meth:`_key_channels`; tokens the window ``fp`` holds read exact), positions (``-1`` where
    not ``valid``); ``v`` None unless ``values``."""
    safe = jnp.clip(idx, 0, self.pools[c].positions.shape[1] - 1)
    return self._read_slots(c, lambda x: slot_pool.gather(x, safe), valid, fp, values,
                            channels)

  def read_run(self, c: int, start, size: int, valid, fp=None, values: bool = True,
               channels=None, planar: bool = False):
    """:meth:`read` of the ``size`` consecutive slots of pool ``c`` from ``start [B, Hkv]``
    (``<= S_c - size``): one contiguous block per head. ``planar`` (no ``fp``): quantized
    keys and values ``[B, Hkv, N, n, D / n]``, their channels split into the planes of their
    codes (:func:`headkv_jax.slot_store.decode`), as attention's tile dots take them."""
    return self._read_slots(c, lambda x: slot_pool.runs(x, start, size), valid, fp, values,
                            channels, planar)

  def _read_slots(self, c: int, take, valid, fp, values: bool, channels,
                  planar: bool = False):
    """:meth:`read` of the slots ``take(pool array)`` selects (``[B, Hkv, N, ...]``)."""
    if planar and fp is not None:
      raise ValueError("A planar read cannot take the full-precision window's copies.")
    pool = self.pools[c]
    kb, vb = self.layout.pairs[c]
    pos = jnp.where(valid, take(pool.positions), -1)
    k = slot_store.decode(slot_store.tree(take, pool.k), kb, self.quant_group, self.dtype,
                          channels, planar)
    v = None
    if values:
      v = slot_store.decode(slot_store.tree(take, pool.v), vb, self.quant_group, self.dtype,
                            planar=planar)
    if fp is not None:
      k, v_fp, _ = fp_window.read(fp, pos, k, k if v is None else v, self.fp_sinks,
                                  self.residual)
      v = v_fp if values else None
    return k, v, pos

  def _layer_classes(self, layer) -> tuple[int, ...]:
    """The classes with heads in ``layer``: all of them for a traced layer (one program
    serves every layer), only those it has for a Python int (a decode step's unrolled
    layers skip the rest)."""
    if isinstance(layer, (int, np.integer)):
      return tuple(sorted(set(np.asarray(self.layout.class_of[int(layer)]).tolist())))
    return tuple(range(len(self.pools)))

  def _class_heads(self, layer, c: int) -> tuple[int, ...] | None:
    """The heads of a Python-int ``layer`` in class ``c`` when they are not all of its
    heads, else None (every head; a traced layer does not know its classes). A layer whose
    heads span several classes reads each class's tiles for its own heads only, not for
    every head with the others masked out."""
    if not isinstance(layer, (int, np.integer)):
      return None
    heads = tuple(int(h) for h in np.flatnonzero(self.layout.class_of[int(layer)] == c))
    return None if len(heads) == self.num_kv_heads else heads

  def _class_lengths(self, layer, c: int):
    """``[B, Hkv]`` tokens each head of ``layer`` holds in pool ``c`` (0 outside the class)."""
    return jnp.where(self.members(layer, c)[None, :], self.lengths[:, layer], 0)

  def view(self, layer):
    """Per-head views of one layer, position ordered, padded to ``layout.max_region``.

    An inspection and test helper (attention and eviction never build it). Returns ``(k, v
    [B, Hkv, C, D]`` in the cache dtype (dequantized; full-precision window tokens exact),
    ``positions [B, Hkv, C]`` (-1 empty), ``scores [B, Hkv, C]`` (the statistic the policy
    ranks by, :meth:`selection_scores`), ``slot indices [B, Hkv, C]`` into each head's pool).
    """
    size = self.layout.max_region
    idx = self.offsets[:, layer][..., None] + jnp.arange(size, dtype=jnp.int32)
    k = v = pos = None
    for c in range(len(self.pools)):
      n_c = self._class_lengths(layer, c)
      valid = jnp.arange(size)[None, None, :] < n_c[..., None]
      kc, vc, pc = self.read(c, idx, valid, self._fp_rows(layer, c),
                             channels=self._key_channels(layer, c))
      m = self.members(layer, c)[None, :, None]
      k = kc if k is None else jnp.where(m[..., None], kc, k)
      v = vc if v is None else jnp.where(m[..., None], vc, v)
      pos = pc if pos is None else jnp.where(m, pc, pos)
    return k, v, pos, self.selection_scores(layer), idx

  def raw_view(self, layer):
    """Per class, ``(members [Hkv] bool, k, v)``: its stores at each head's view slots
    ``[B, Hkv, C, ...]`` as stored (codes and scales; rows of other classes arbitrary)."""
    size = self.layout.max_region
    idx = self.offsets[:, layer][..., None] + jnp.arange(size, dtype=jnp.int32)
    out = []
    for c, pool in enumerate(self.pools):
      safe = jnp.clip(idx, 0, pool.positions.shape[1] - 1)
      take = lambda x, safe=safe: slot_pool.gather(x, safe)
      out.append((self.members(layer, c), slot_store.tree(take, pool.k),
                  slot_store.tree(take, pool.v)))
    return out

  def slot_meta(self, layer, size: int | None = None):
    """Positions and stored scores of each head's first ``size`` slots (default
    ``layout.max_region``) -> ``(idx, valid, positions, scores)``, each ``[B, Hkv, size]``
    (the per-slot metadata eviction ranks; no K/V)."""
    size = size or self.layout.max_region
    n = self.lengths[:, layer]
    idx = self.offsets[:, layer][..., None] + jnp.arange(size, dtype=jnp.int32)
    valid = jnp.arange(size)[None, None, :] < n[..., None]
    pos = jnp.full(idx.shape, -1, jnp.int32)
    sc = jnp.zeros(idx.shape, jnp.float32)
    for c, pool in enumerate(self.pools):
      safe = jnp.clip(idx, 0, pool.positions.shape[1] - 1)
      m = self.members(layer, c)[None, :, None] & valid
      pos = jnp.where(m, slot_pool.gather(pool.positions, safe), pos)
      sc = jnp.where(m, slot_pool.gather(pool.scores, safe), sc)
    return idx, valid, pos, sc

  def selection_scores(self, layer, valid=None, scores=None, size: int | None = None):
    """``[B, Hkv, max_region]`` the statistic the policy ranks each held slot by: the stored
    scores, or for the KeyDiff modes the key novelty of the keys held now (``"keydiff"``,
    :meth:`held_novelty`) or its union rank with the stored window attention
    (``"keydiff_window"``). ``valid`` / ``scores`` are :meth:`slot_meta`'s of the same
    ``size`` when known."""
    if valid is None:
      _, valid, _, scores = self.slot_meta(layer, size)
    if self.policy.uses_novelty:
      nov = self.held_novelty(layer, valid.shape[-1])
      return policies_lib.novelty_scores(self.policy, nov, scores, valid)
    return scores

  def held_novelty(self, layer, size: int | None = None):
    """KeyDiff: every held key of ``layer`` (before RoPE) scored by
    :func:`~headkv_jax.policies.key_novelty` among its head's held keys -> ``[B, Hkv,
    size]`` by slot (0 where empty; ``size`` >= the layer's longest head, default
    ``layout.max_region``). Computed when a head is ranked (eviction), so decode steps
    between evictions pay nothing for it: one pass of tiles un-rotates the held keys into a
    ``[B, Hkv, size, D]`` scratch of unit keys, whose per-head mean is the anchor."""
    pad = self._tile_size()  # slot s at index pad + s
    view = size or self.layout.max_region
    rope = self.rope if self.policy.position_mode == "original" else None
    b, hkv, d = self.batch, self.num_kv_heads, self.head_dim
    units = jnp.zeros((b, hkv, d, self._slot_buffer(view)), jnp.float32)
    turns = None if rope is None else rope.digit_turns()  # outside the loops: see rotate
    for c in range(len(self.pools)):
      ks = self._key_channels(layer, c)
      for num_tiles, slots, size, fp in self._passes(layer, c)[2]:

        def unit(j, units, c=c, slots=slots, size=size, fp=fp, ks=ks):
          s, start, valid = slots(j)
          kb, _, kp = self.read_run(c, start, size, valid, fp, values=False, channels=ks)
          kb = kb if rope is None else slot_pool.rotate(rope, kb, -kp, turns)
          u = policies_lib.unit_keys(kb).transpose(0, 1, 3, 2)  # [B, Hkv, D, size]
          return _record_tile(units, s, u, valid, pad)

        units = jax.lax.fori_loop(0, num_tiles, unit, units)
    units = units[..., pad:pad + view].transpose(0, 1, 3, 2)  # [B, Hkv, view, D]
    anchor = policies_lib.unit_keys(jnp.sum(units, axis=2, keepdims=True))  # [B, Hkv, 1, D]
    held = jnp.arange(view)[None, None, :] < self.lengths[:, layer][..., None]
    return jnp.where(held, 1.0 - jnp.sum(units * anchor, axis=-1), 0.0)

  @property
  def rope(self):
    """The model's :class:`~headkv_jax.rope.RoPE` the cache un-rotates keys with (KeyDiff
    in "original" mode), from ``rope_inv_freq``."""
    if self.rope_inv_freq is None:
      raise ValueError(f"score_mode={self.policy.score_mode!r} in position_mode='original' "
                       "un-rotates the stored keys: create the cache with the model's RoPE "
                       "(PagedKVCache.create(..., rope=config.make_rope())).")
    return rope_lib.RoPE(inv_freq=np.asarray(self.rope_inv_freq, np.float32))

  # ---- the model contract ------------------------------------------------------------------

  def attend(self, layer, q, k, v, positions, rope):
    """Attention of new tokens over this layer's cache + themselves; appends them.

    Args:
      layer: a Python int or a traced int32 scalar.
      q: ``[B, T, Hq, D]`` pre-RoPE queries; ``k, v``: ``[B, T, Hkv, D]`` pre-RoPE.
      positions: ``[B, T]`` int32 absolute positions, ``-1`` for padding (not stored).
      rope: a :class:`headkv_jax.rope.RoPE`.

    Returns:
      ``(out [B, T, Hq, D], new cache)``.
    """
    if not traced(self, layer, q, k, v, positions, rope):
      # Eager callers get one compiled program per shape (the layer traced, so one for every
      # layer), not an op-by-op dispatch that also re-traces each loop body on every call.
      return _attend_jit(self, jnp.asarray(layer, jnp.int32), q, k, v, positions, rope)
    return self._attend(layer, q, k, v, positions, rope)

  def _attend(self, layer, q, k, v, positions, rope):
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
    rolled = self.policy.position_mode == "cache_relative"
    tok_valid = positions >= 0  # [B, T]
    rank = jnp.cumsum(tok_valid, axis=1, dtype=jnp.int32) - 1  # [B, T] slot among real tokens
    new_slot = self.lengths[:, layer][:, :, None] + rank[:, None, :]  # [B, Hkv, T]
    kt = k.transpose(0, 2, 1, 3)  # [B, Hkv, T, D] pre-RoPE
    vt = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    if not rolled:
      qr = rope.apply(q, positions)  # [B, T, Hq, D]
      k_new = rope.apply(k, positions).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
      k_store = k_new
    else:  # cache_relative: rotate by slot index inside the head's (compacted) region.
      qg = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
      qg = slot_pool.rotate(rope, qg, new_slot[:, :, None, :])
      qr = qg.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
      k_new = slot_pool.rotate(rope, kt, new_slot)
      k_store = kt
    q_rows = attention.fold_queries(qr * (d**-0.5), hkv)  # [B, Hkv, T * G, D]
    q_pos_rows = jnp.repeat(positions, group, axis=1)  # [B, T * G]

    # The cached slots, then the chunk itself, merged by log-sum-exp.
    observed = self._observed_queries(tok_valid, rank)  # [B, T] bool, None: no statistic
    kernel = kernel_decode.uses_kernel(self, t)
    cache = self  # the pools as the tile loops pass them on (written in place after them)
    logits = None  # a decode step keeps its slot logits for the statistic (one pass)
    if t == 1 and observed is not None and not kernel:
      logits = jnp.full((b, hkv, group, self._slot_buffer(self._layer_view(layer))),
                        -jnp.inf, jnp.float32)
    if kernel:  # the fused Pallas kernel reads the codes in place
      cached, cache = kernel_decode.cached_partial(self, layer, q_rows, positions)
    else:
      cached = attention.empty_partial(b, hkv, t * group, d)
      for c, heads in self._layer_loops(layer):  # the middle slots, loop by loop
        cached, logits, cache = cache._attend_pool(layer, c, q_rows, q_pos_rows, rope,
                                                   cached, logits, edges=False, heads=heads,
                                                   whole=t == 1)
      for c in self._layer_classes(layer):  # the full-precision edges, class by class
        if cache.pools[c].fp is not None:
          cached, logits, cache = cache._attend_pool(layer, c, q_rows, q_pos_rows, rope,
                                                     cached, logits, edges="only")
    k_t = k_new.transpose(0, 2, 1, 3)  # [B, T, Hkv, D]
    own = attention.causal_attention(qr, k_t, v, positions)
    o, m, l = attention.merge_partials([cached, own])
    out = attention.unfold_outputs(attention.normalize(o, l), t).astype(v.dtype)
    out, = sharding.replicate_over_model(out)  # so o_proj's split does not reach back in here

    new_scores = jnp.zeros((b, hkv, t), jnp.float32)
    if observed is not None:
      lse = jnp.where(jnp.repeat(observed, group, axis=1)[:, None, :],
                      attention.row_lse(m, l), jnp.inf)  # [B, Hkv, T * G]
      # A row this call observes nothing of (its prompt ended in an earlier chunk) keeps its
      # scores: "latest" replaces them only with a window that exists.
      seen = jnp.any(observed, axis=1)  # [B]
      # A "window" statistic of a chunk longer than the window reads the window's rows only.
      windowed = self.policy.score_kind == "window" and 0 < self.policy.window < t
      rows = (q_rows, q_pos_rows, lse)
      if windowed:
        rows = self._window_rows(tok_valid, group, *rows)
      if logits is not None:  # a decode step (t == 1: never windowed)
        cache = cache._scores_from_logits(layer, logits[..., self._tile_size():], lse, seen)
      else:
        for c, heads in self._layer_loops(layer):
          cache = cache._collect_scores(layer, c, heads, *rows, rope, group, seen)
      if windowed:  # the window's rows over the chunk's own keys
        tile = min(TILE, t)
        sums = attention.tiled_key_sums(*rows[:2], k_new, positions, rows[2], group=group,
                                        tile=tile, num_tiles=-(-t // tile))
      else:
        sums = attention.causal_key_sums(qr, k_t, positions, lse)  # [B, Hkv, G, T]
      new_scores = policies_lib.reduce_group(sums, self.policy.gqa_reduce, axis=2)
    return out, cache._write(layer, k_store, vt, positions, new_scores)

  def append(self, layer, k, v, positions, scores) -> "PagedKVCache":
    """Stores tokens without attending: the write half of :meth:`attend`.

    For callers that computed attention elsewhere (the shared one-shot prefill of
    :mod:`headkv_jax.prompt_stats`). Requires ``T <= chunk_size``.

    Args:
      layer: Python int or traced int32.
      k, v: ``[B, Hkv, T, D]`` keys as this cache stores them (rotated at their positions in
        "original" mode) and values.
      positions: ``[B, T]`` int32 positions, ``-1`` for padding (not stored).
      scores: ``[B, Hkv, T]`` float32 the policy's per-slot statistic of each token.
    """
    if k.shape[2] > self.chunk_size:
      raise ValueError(f"{k.shape[2]} new tokens exceed chunk_size={self.chunk_size}.")
    return self._write(layer, k, v, positions, scores.astype(jnp.float32))

  def _passes(self, layer, c: int, edges: bool | str = True, heads=None,
              whole: bool = False):
    """How the held slots of ``layer``'s class-``c`` heads are read: a list of passes
    ``(num_tiles, slots, size, fp)``. ``slots(j) -> (s, start, valid)`` is tile ``j`` of the
    pass for every head: the run of ``size`` pool slots from ``start [B, Hkv]``, ``s [B,
    Hkv, size]`` their slots in the head's region, ``valid`` the held slots this tile reads
    (a run that would pass the pool's end is shifted back, its slots read by an earlier tile
    not valid; a head done before tile ``j`` re-reads its first slots, never valid); read
    them with :meth:`read_run` and the window ``fp``.

    A 16-bit class is one pass of tiles over every held slot. A quantized class with a
    full-precision window reads its middle slots ``[lo, hi)`` (all but the first
    ``fp_sinks`` and the last ``residual``) from their codes alone, tile by tile, and the
    edge slots in one run each through the window (its copy where it holds the slot's
    position): a head's tokens are in position order, so every token the window holds is
    an edge slot, and no tile pays for the window. ``edges=False`` gives the middle pass
    only, ``edges="only"`` the edge runs only (the Pallas path reads the middle itself).
    ``heads``: the static heads to read (:meth:`_class_heads`; ``Hkv`` above is then their
    number), None for all. ``whole``: the middle pass may be one tile over each head's whole
    region (:meth:`_whole_region`). Returns ``(lo, hi, passes)``, ``lo, hi [B, Hkv]``."""
    n = _pick(self._class_lengths(layer, c), heads)
    off = _pick(self.offsets[:, layer], heads)
    num_slots = self.pools[c].positions.shape[1]
    fp = self._fp_rows(layer, c, heads)

    def run(first, lo, hi, size):
      start = jnp.minimum(off + first, num_slots - size)
      s = (start - off)[..., None] + jnp.arange(size, dtype=jnp.int32)  # [B, Hkv, size]
      return s, start, (s >= lo[..., None]) & (s < hi[..., None])

    if fp is None:
      lo, hi = jnp.zeros_like(n), n
    else:
      lo = jnp.minimum(self.fp_sinks, n)
      hi = jnp.maximum(n - self.residual, lo)
    passes = []
    region = self._whole_region(layer, heads, num_slots) if whole else None
    if edges != "only" and region is not None:
      start, size = region  # static: the region's slots are s = 0 .. size - 1
      s = np.broadcast_to(np.arange(size, dtype=np.int32), start.shape + (size,))
      valid = (s >= lo[..., None]) & (s < hi[..., None])
      passes.append((1, lambda j: (s, start, valid), size, None))
    elif edges != "only":
      tile = min(self._tile_size(), num_slots)

      def tiles(j):
        first = lo + j * tile
        return run(jnp.where(first < hi, first, 0), first, hi, tile)

      passes.append(((jnp.max(hi - lo) + tile - 1) // tile, tiles, tile, None))
    if fp is not None and edges:
      for first, last, size in ((jnp.zeros_like(n), lo, self.fp_sinks),
                                (hi, n, self.residual)):
        if size:
          size = min(size, num_slots)
          passes.append((1, lambda j, a=first, z=last, k=size: run(a, a, z, k), size, fp))
    return lo, hi, passes

  def _whole_region(self, layer, heads, num_slots: int):
    """A decode step's read of a static ``layer``'s heads (``heads``, None: all) as one tile
    per head over its whole region -> ``(start [B, Hkv] numpy, size)``, or None where tiles
    are better. A region is static where the layout is (not adakv's, whose regions move), so
    the tile is a static slice of the pool, no gather (:func:`headkv_jax.slot_pool.runs`):
    XLA:CPU ran SmolLM2's decode step's 256-slot tile loops 1.7x slower than one read per
    region. Only where the region is no longer than the tiles a held budget needs (a decode
    cache's region is its budget and a page of headroom) and every head's read stays inside
    its pool."""
    regions = self._fixed_regions(layer)
    if regions is None:
      return None
    hs = list(range(self.num_kv_heads)) if heads is None else list(heads)
    size = int(regions[hs].max())
    first = self.layout.first_slot[int(layer), hs].astype(np.int32)  # [Hkv]
    need = int(self._decode_tiles()[int(layer), hs].max()) * self._tile_size()
    if size <= 0 or size > need or int(first.max()) + size > num_slots:
      return None
    return np.broadcast_to(first, (self.batch, len(hs))), size

  def _fixed_regions(self, layer):
    """``layout.region[layer]`` (numpy ``[Hkv]``) where it is static: a Python int layer of
    a layout whose regions never move (every layout but adakv's); else None."""
    if not isinstance(layer, (int, np.integer)) or self.layout.adaptive:
      return None
    return self.layout.region[int(layer)]

  def _layer_view(self, layer) -> int:
    """The most slots a head of ``layer`` can hold, static: its largest region for a Python
    int layer of fixed regions (head-aware's heads at 20,000 tokens and budget 1,024 hold
    36 .. 10,986 slots: a layer of short heads sums a decode step's statistic over its own
    regions, not the model's longest), else ``layout.max_region``."""
    regions = self._fixed_regions(layer)
    return self.layout.max_region if regions is None else max(int(regions.max()), 1)

  def _decode_tiles(self) -> np.ndarray:
    """``[L, Hkv]`` tiles a head's budget plus a page of decode headroom fills."""
    return -(-(np.asarray(self.budgets) + self.page_size) // self._tile_size())

  def _tile_size(self) -> int:
    return min(TILE, self.layout.max_region)

  def _slot_buffer(self, view: int) -> int:
    """Length of a per-slot scratch (:func:`_record_tile`) for heads of at most ``view``
    slots: slot ``s`` at index ``tile + s``, room for a shifted-back first run before and a
    whole last tile after (one that starts up to ``fp_sinks`` slots in, :meth:`_passes`)."""
    tile = self._tile_size()
    window = self.fp_sinks if any(p.fp is not None for p in self.pools) else 0
    return tile + -(-view // tile) * tile + window

  def _turns(self, rope):
    """A rolled cache's rotation table (``rope.turns``) for :meth:`_read_tile`, over every
    slot a run can start at (``-size < first <= max_region``); None in "original" mode.
    Made outside the tile loops, so no trigonometry is done per tile (and XLA shares the
    one table between a step's layers)."""
    if self.policy.position_mode != "cache_relative":
      return None
    return rope.turns(max(self.layout.max_region, self._tile_size(), self.fp_sinks,
                          self.residual) + 1)

  def _read_tile(self, c, tile, size: int, fp, channels, q_pos, rope, turns,
                 values: bool = True):
    """A tile ``(s, start, valid)`` of a :meth:`_passes` pass of pool ``c`` as attention
    reads it -> ``(k, v, mask)``: keys rotated by slot in "cache_relative" mode (``turns``:
    :meth:`_turns`); a quantized tile read without the window in "original" mode split
    into planes (:meth:`read_run`'s ``planar``, which attention's tile dots take as is);
    ``mask [B, Hkv, R, size]`` the held slots each query row ``q_pos [B, 1,
    R, 1]`` may see."""
    s, start, valid = tile
    rolled = self.policy.position_mode == "cache_relative"
    kb, vb, kp = self.read_run(c, start, size, valid, fp, values=values, channels=channels,
                               planar=fp is None and not rolled)
    if rolled:  # s: runs of consecutive slots
      kb = slot_pool.rotate_run(rope, kb, s[..., 0], turns)
    return kb, vb, valid[:, :, None, :] & (kp[:, :, None, :] <= q_pos) & (q_pos >= 0)

  def _attend_pool(self, layer, c, q_rows, q_pos_rows, rope, init, logits=None,
                   edges: bool | str = True, heads="class", whole: bool = False):
    """Folds the held slots of ``layer``'s class-``c`` heads into the online softmax ->
    ``(part, logits, cache)``. ``logits [B, Hkv, R, N]`` (:meth:`_slot_buffer` of
    :meth:`_layer_view`): also records each held slot's logit there (by slot in its region;
    a decode step's statistics then need no second pass). ``edges``: which slots (:meth:`_passes`). ``heads``: the static heads to
    read (a :meth:`_layer_loops` loop's; None: all), by default the class's
    (:meth:`_class_heads`). ``cache`` is this cache with pool ``c`` as the tile loops return
    it (:func:`~headkv_jax.attention.tile_loop`'s ``through``): write into it, not into
    ``self``, and XLA updates the pool in place. ``whole``: a decode step (:meth:`_passes`)."""
    pad = self._tile_size()
    if heads == "class":  # a mixed layer reads each class's own heads only
      heads = self._class_heads(layer, c)
    ks = self._key_channels(layer, c, heads)
    q_pos = q_pos_rows[:, None, :, None]  # [B, 1, R, 1]
    q_rows = _pick(q_rows, heads)
    part = tuple(_pick(x, heads) for x in init)
    buf = None if logits is None else _pick(logits, heads)
    pool = self.pools[c]
    turns = self._turns(rope)
    for num_tiles, slots, size, fp in self._passes(layer, c, edges, heads, whole)[2]:

      def fetch(j, pool, slots=slots, size=size, fp=fp):
        return self._with_pool(c, pool)._read_tile(c, slots(j), size, fp, ks, q_pos, rope,
                                                   turns)

      def keep(j, tile_logits, buf, slots=slots):  # slot s at index pad + s (see attend)
        s, _, valid = slots(j)
        return _record_tile(buf, s, tile_logits, valid, pad)

      if buf is None:
        part, pool = attention.tile_loop(q_rows, fetch, num_tiles, part, through=pool)
      else:
        (part, buf), pool = attention.tile_loop(q_rows, fetch, num_tiles, part,
                                                record=(keep, buf), through=pool)
    part = tuple(_put(x, heads, p) for x, p in zip(init, part))
    return (part, None if logits is None else _put(logits, heads, buf),
            self._with_pool(c, pool))

  def _layer_loops(self, layer):
    """How ``layer``'s middle slots are read: a tuple of tile loops ``(c, heads)``, each over
    the static ``heads`` of class ``c`` (None: every head of the layer).

    A loop runs as many tiles as its longest head needs and reads that many for each of its
    heads, so heads of very different budgets (head-aware's 36 .. 10,986 at an average of
    1,024) are better read in loops of their own, and heads of like budgets together (one
    iteration's fixed cost shared). Costs are counted as ``tiles * (1 + heads)`` per loop,
    one iteration's fixed cost as one head's tile, with tiles from the budgets plus a page
    of decode headroom. For a Python-int layer the split is static: each class's heads
    sorted by budget, cut into the runs of least total cost (classes never share a loop: a
    tile gathered from two pools costs more than a second loop). A traced layer (one program
    for every layer) knows neither its budgets nor its classes, so every layer runs the same
    loops: one per class over every head, or one per (class, head) running its own head's
    tiles (none outside the class), whichever costs less summed over the layers.
    """
    classes = self._layer_classes(layer)
    tiles = self._decode_tiles()  # [L, Hkv]
    hkv = self.num_kv_heads
    if not isinstance(layer, (int, np.integer)):
      class_of = np.asarray(self.layout.class_of)  # [L, Hkv]
      # Summed over the layers: a loop per class reads each class's longest head for all
      # heads; a loop per (class, head) reads each head's own tiles, once per class.
      together = (1 + hkv) * sum(
          int(np.where(class_of[i] == c, tiles[i], 0).max()) for i in range(len(tiles))
          for c in classes)
      apart = 2 * int(tiles.sum()) + (len(classes) - 1) * hkv * len(tiles)
      if apart < together:
        return tuple((c, (h,)) for c in classes for h in range(hkv))
      return tuple((c, None) for c in classes)
    layer = int(layer)
    loops = []
    for c in classes:
      heads = np.flatnonzero(self.layout.class_of[layer] == c)
      heads = heads[np.argsort(tiles[layer][heads], kind="stable")]
      cost = tiles[layer][heads]  # ascending
      n = len(heads)
      best, cut = [0] + [None] * n, [0] * (n + 1)
      for i in range(1, n + 1):  # best[i]: the first i heads; a run j..i-1 costs cost[i-1]
        best[i], cut[i] = min((best[j] + int(cost[i - 1]) * (1 + i - j), j) for j in range(i))
      i = n
      while i:
        run = tuple(sorted(int(h) for h in heads[cut[i]:i]))
        loops.append((c, None if run == tuple(range(hkv)) else run))
        i = cut[i]
    return tuple(loops)

  def _scores_from_logits(self, layer, logits, lse, seen) -> "PagedKVCache":
    """A decode step's statistic from the slot logits :meth:`_attend_pool` recorded
    (``[B, Hkv, G, N]``) and the merged row log-sum-exps ``lse [B, Hkv, G]`` (+inf on rows
    the policy does not observe): written to every held slot's score of the batch rows
    ``seen [B]``, as :meth:`_collect_scores` would."""
    per = policies_lib.reduce_group(jnp.exp(logits - lse[..., None]), self.policy.gqa_reduce,
                                    axis=2)  # [B, Hkv, N]
    size = per.shape[-1]
    idx = self.offsets[:, layer][..., None] + jnp.arange(size, dtype=jnp.int32)
    valid = jnp.arange(size)[None, None, :] < self.lengths[:, layer][..., None]
    cache = self
    for c in self._layer_classes(layer):
      pool = self.pools[c]
      num_slots = pool.positions.shape[1]
      ok = valid & self.members(layer, c)[None, :, None] & seen[:, None, None]
      value = per
      if self.policy.accumulates:
        value = per + slot_pool.gather(pool.scores, jnp.minimum(idx, num_slots - 1))
      scores = slot_pool.scatter(pool.scores, jnp.where(ok, idx, num_slots), value)
      cache = cache._with_pool(c, pool.replace(scores=scores))
    return cache

  def _collect_scores(self, layer, c, heads, q_rows, q_pos_rows, lse, rope, group: int,
                      seen) -> "PagedKVCache":
    """The policy's statistic of the class-``c`` slots of ``layer``'s static ``heads`` (None:
    all; :meth:`_layer_loops`' members) from this call's observed
    queries (``lse`` = +inf elsewhere): replaces (SnapKV) or adds to (H2O, "accumulate")
    each held slot's score in its pool, in the batch rows ``seen [B]`` (a row with no
    observed query keeps its scores)."""
    q_pos = q_pos_rows[:, None, :, None]
    ks = self._key_channels(layer, c, heads)
    q_rows, lse = _pick(q_rows, heads), _pick(lse, heads)
    pool = self.pools[c]
    num_slots = pool.positions.shape[1]
    accumulates = self.policy.accumulates
    turns = self._turns(rope)
    for num_tiles, slots, size, fp in self._passes(layer, c, heads=heads)[2]:

      def body(j, pool, slots=slots, size=size, fp=fp):
        _, start, valid = tile = slots(j)  # (the pool carried: written in place)
        idx = start[..., None] + jnp.arange(size, dtype=jnp.int32)  # [B, Hkv, size]
        kb, _, mask = self._with_pool(c, pool)._read_tile(c, tile, size, fp, ks, q_pos, rope,
                                                          turns, values=False)
        part = attention.tile_key_sums(q_rows, kb, mask, lse, group)
        per = policies_lib.reduce_group(part, self.policy.gqa_reduce, axis=2)  # [B, Hkv, size]
        target = jnp.where(valid & seen[:, None, None], idx, num_slots)
        if accumulates:
          per = per + slot_pool.gather(pool.scores, jnp.minimum(idx, num_slots - 1))
        return pool.replace(scores=slot_pool.scatter(pool.scores, target, per))

      pool = jax.lax.fori_loop(0, num_tiles, body, pool)
    return self._with_pool(c, pool)

  def _write(self, layer, k_store, v_new, positions, new_scores):
    """The real tokens of ``positions [B, T]`` appended to each head's region of ``layer``
    (``k_store, v_new [B, Hkv, T, D]``, quantized here once for a quantized class;
    ``new_scores [B, Hkv, T]``); a head whose region is full drops the
    overflow and counts it in ``dropped``."""
    lay = self.layout
    n = self.lengths[:, layer]
    tok_valid = positions >= 0  # [B, T]
    rank = jnp.cumsum(tok_valid, axis=1, dtype=jnp.int32) - 1  # [B, T] slot among real tokens
    new_slot = n[:, :, None] + rank[:, None, :]  # [B, Hkv, T]
    stored = tok_valid[:, None, :] & (new_slot < self.room(layer)[:, :, None])  # [B, Hkv, T]
    target = self.offsets[:, layer][:, :, None] + new_slot  # [B, Hkv, T]
    new_pos = jnp.broadcast_to(positions[:, None, :], target.shape)
    key_channels, ks = self.key_channels, None
    if key_channels is not None:  # a head's first written keys fix its channels
      ks = _first_key_channels(key_channels[:, layer], k_store, stored)  # [B, Hkv, 2, D]
      key_channels = key_channels.at[:, layer].set(ks)
      ks = ks[:, :, None]
    pools = list(self.pools)
    for c in self._layer_classes(layer):
      pool = self.pools[c]
      kb, vb = lay.pairs[c]
      member = self.members(layer, c)
      num_slots = pool.positions.shape[1]
      tgt = jnp.where(stored & member[None, :, None], target, num_slots)  # [B, Hkv, T]
      put = lambda p, x, tgt=tgt: slot_pool.scatter(p, tgt, x)
      enc = lambda x, bits, channel=None: slot_store.encode(x, bits, self.quant_group,
                                                            self.dtype, channel)
      fp = pool.fp
      if fp is not None:
        rows = jnp.where(member, _at(lay.fp_row, layer), fp.pos.shape[1])  # [Hkv]
        fp = fp_window.write(fp, rows, positions, k_store, v_new, self.fp_sinks,
                                  self.residual)
      pools[c] = pool.replace(
          k=slot_store.tree(put, pool.k, enc(k_store, kb, ks)),
          v=slot_store.tree(put, pool.v, enc(v_new, vb)),
          positions=put(pool.positions, new_pos),
          scores=put(pool.scores, new_scores),
          fp=fp)
    n_new = n + jnp.sum(stored, axis=-1, dtype=jnp.int32)
    lost = jnp.sum(tok_valid[:, None, :] & ~stored, axis=-1, dtype=jnp.int32)
    return self.replace(
        pools=tuple(pools),
        lengths=self.lengths.at[:, layer].set(n_new),
        dropped=self.dropped.at[:, layer].add(lost),
        key_channels=key_channels)

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

  def _window_rows(self, tok_valid, group: int, q_rows, q_pos_rows, lse):
    """The folded query rows of each batch row's observation window -> ``(q_rows [B, Hkv,
    W * G, D], q_pos_rows [B, W * G], lse [B, Hkv, W * G])``, ``W = window``.

    A "window" statistic sums the attention of a chunk's last ``window`` real queries only
    (every other row has ``lse = +inf`` and adds exact zeros), so its passes over the held
    slots and over the chunk's own keys read these rows instead of all ``T * G``: a
    1,024-token chunk's statistic costs 32 rows, not 1,024. A row's real tokens are a
    prefix of the chunk, so its window is the ``W`` tokens ending at its last real one; a
    row with fewer real tokens reads its padding too, whose rows see no key (position
    ``-1``) and count nothing (``lse = +inf``).
    """
    b, t = tok_valid.shape
    w = self.policy.window
    first = jnp.maximum(jnp.sum(tok_valid, axis=1) - w, 0)  # [B]
    tok = first[:, None] + jnp.arange(w, dtype=jnp.int32)  # [B, W], < T
    idx = (tok[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(b, w * group)
    return (jnp.take_along_axis(q_rows, idx[:, None, :, None], axis=2),
            jnp.take_along_axis(q_pos_rows, idx, axis=1),
            jnp.take_along_axis(lse, idx[:, None, :], axis=2))

  def _with_pool(self, c: int, pool: Pool) -> "PagedKVCache":
    return self.replace(pools=self.pools[:c] + (pool,) + self.pools[c + 1:])

  # ---- eviction ----------------------------------------------------------------------------

  def compress(self, oracle_scores=None, *, headroom: int | None = None,
               budgets=None) -> "PagedKVCache":
    """Evicts every head back to its budget (policy's choice), survivors in position order.

    Heads within budget keep everything (adakv: layers within their total). A layer where no
    head needs eviction is left as it is (a ``lax.cond`` inside one compiled loop over the
    layers). ``full`` is a no-op.

    Args:
      oracle_scores: oracle only: per layer ``[B, Hq or Hkv, P]`` attention the answer tokens
        pay to each *position* ``0..P-1``.
      headroom: None (default) evicts every head over its budget. An int ``n`` evicts a layer
        only when one of its heads could not take ``n`` more tokens: decoding with
        ``headroom=1`` amortises eviction, and heads hold up to their region (budget +
        ``chunk_size``, page rounded) in between.
      budgets: ``[layers, Hkv]`` targets at or below the budgets (None: the budgets): every
        head over its target is evicted to it (the region keeps its size). A chunked prefill
        with staging budgets ends this way (:meth:`rechunk`).
    """
    return eviction.compress(self, oracle_scores, headroom, budgets)

  evict = compress

  def rechunk(self, chunk_size: int, oracle_scores=None, budgets=None) -> "PagedKVCache":
    """This cache re-packed into pools with room for ``chunk_size`` new tokens per head.

    Prefill in chunks of C needs ``budget + C`` slots per head; decoding needs one. Call
    ``cache.rechunk(1)`` after prefill so the bytes held while decoding are the budgets'
    bytes, not the prefill chunk's. Heads are compressed to their budgets first (the oracle
    needs its ``oracle_scores``, as in :meth:`compress`); codes move with their scales.
    ``budgets`` (``[layers, Hkv]``, at or below the budgets) makes them the new cache's
    budgets: a prefill that kept staging budgets between its chunks ends at the method's.
    """
    return eviction.rechunk(self, chunk_size, oracle_scores, budgets)


_attend_jit = jax.jit(lambda cache, *args: cache._attend(*args))  # pylint: disable=protected-access


__all__ = ["FpWindow", "Pool", "PagedKVCache", "SUPPORTED_BITS", "QUANT_GROUP", "RESIDUAL",
           "FP_SINKS", "KEY_SCALE_FLOOR", "TILE"]
