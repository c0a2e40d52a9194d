"""Attention primitives in plain jnp: GQA with query-group folding, position masks, LSE merge.

Every attention in the library reduces to :func:`tile_loop` (an online softmax over key tiles
that a ``fetch`` function produces, returning ``(o, m, l)``): over slices of a dense cache
(:func:`tiled_attention`), over each head's slots gathered from a paged cache's pools
(``headkv_jax.paged_cache``), over a chunk's causal triangle (:func:`causal_attention`), and
:func:`merge_partials` across key sets. Per-key statistics come from the row log-sum-exps,
one tile at a time (:func:`tile_key_sums`). Masks come from *positions*, not slot indices: key ``s`` is
visible to query ``t`` iff ``0 <= key_pos[s] <= query_pos[t]`` (``-1`` marks an empty slot or a
padding token). Query heads of one GQA group are folded into the rows of their KV head
(``[B, Hkv, T * group, D]``) so K/V are read once per KV head, never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30
NEG_INF = _NEG_INF  # the logit of a masked key (finite: merges never see -inf - -inf)


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


def empty_partial(batch: int, num_kv_heads: int, rows: int, head_dim: int):
  """The ``(o, m, l)`` of a key set with no visible key (the identity of :func:`merge_partials`)."""
  return (jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32),
          jnp.full((batch, num_kv_heads, rows), _NEG_INF, jnp.float32),
          jnp.zeros((batch, num_kv_heads, rows), jnp.float32))


def _key_positions(k_pos):
  """Key positions ``[B, S]`` or ``[B, Hkv, S]`` -> broadcastable ``[B, 1 or Hkv, 1, S]``."""
  return k_pos[:, None, None, :] if k_pos.ndim == 2 else k_pos[:, :, None, :]


def tile_logits(q_rows, kb):
  """``q_rows [B, Hkv, R, D]`` against a tile's keys ``kb [B, Hkv, tile, D]``, or ``[B, Hkv,
  tile, n, D / n]`` with the channels split into the planes of their packed codes (a
  quantized tile, :func:`headkv_jax.slot_store.decode`'s ``planar``) -> ``[B, Hkv, R,
  tile]`` float32 logits."""
  if kb.ndim == 5:  # the queries split the same way: a reshape
    q = q_rows.reshape(q_rows.shape[:-1] + kb.shape[-2:])
    return jnp.einsum("bhrnw,bhsnw->bhrs", q, kb, preferred_element_type=jnp.float32)
  return jnp.einsum("bhrd,bhsd->bhrs", q_rows, kb, preferred_element_type=jnp.float32)


def _tile_mix(p, vb):
  """Weights ``p [B, Hkv, R, tile]`` times a tile's values (``[B, Hkv, tile, D]`` or split
  into planes as in :func:`tile_logits`) -> ``[B, Hkv, R, D]`` float32."""
  if vb.ndim == 5:
    o = jnp.einsum("bhrs,bhsnw->bhrnw", p.astype(vb.dtype), vb,
                   preferred_element_type=jnp.float32)
    return o.reshape(o.shape[:-2] + (-1,))
  return jnp.einsum("bhrs,bhsd->bhrd", p.astype(vb.dtype), vb,
                    preferred_element_type=jnp.float32)


def _own_logits(q, k):
  """A one-token chunk's logit against its own key: ``q [B, 1, Hq, D]`` (unscaled), ``k [B,
  1, Hkv, D]`` -> ``[B, Hkv, G]`` float32, as a tile loop over that chunk computes it."""
  q_rows = fold_queries(q * (q.shape[-1]**-0.5), k.shape[2])  # [B, Hkv, G, D]
  return tile_logits(q_rows, k.transpose(0, 2, 1, 3))[..., 0]


def _online_update(carry, q_rows, kb, vb, mask=None):
  """One key tile folded into an online softmax ``(o, m, l)``; ``mask`` None = all visible."""
  return _online_logits(carry, tile_logits(q_rows, kb), vb, mask)


def _online_logits(carry, logits, vb, mask=None):
  """:func:`_online_update` from the tile's logits ``[B, Hkv, R, tile]``."""
  o, m, l = carry
  if mask is not None:
    logits = jnp.where(mask, logits, _NEG_INF)
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [B, Hkv, R]
  p = jnp.exp(logits - m_new[..., None])
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  scale = jnp.exp(m - m_new)
  o = o * scale[..., None] + _tile_mix(p, vb)
  return o, m_new, l * scale + jnp.sum(p, axis=-1)


def tile_loop(q_rows, fetch, num_tiles, init, *, record=None, through=None):
  """Online-softmax attention of folded queries over the key tiles ``fetch(0 .. num_tiles-1)``.

  The one loop every attention of the library runs: ``fetch(j) -> (k, v, mask)`` produces
  tile ``j`` (``k, v [B, Hkv, tile, D]``, or with the channels split into planes,
  :func:`tile_logits`; ``mask [B, 1 or Hkv, R, tile]`` bool or None for
  all visible), from slices of a dense cache or gathers from a paged cache's pools. One
  compiled loop body whatever the number of keys (``num_tiles`` may be traced), and a tile's
  logits ``[B, Hkv, R, tile]`` stay in cache instead of a ``[R, S]`` array in memory.

  Args:
    q_rows: ``[B, Hkv, R, D]`` folded queries, already scaled by ``1/sqrt(D)``.
    fetch: ``j -> (k, v, mask)``; with ``through``, ``(j, through) -> (k, v, mask)``.
    num_tiles: a Python int or a traced int32 scalar.
    init: ``(o, m, l)`` to continue from (:func:`empty_partial` to start).
    record: optional ``(update, state)``: ``update(j, logits, state) -> state`` sees each
      tile's logits (a decode step keeps them to sum its statistics without a second pass).
    through: optional pytree the tiles are read from (a cache's pools), carried unchanged
      through the loop and returned: a caller that then writes into the returned arrays
      lets XLA update them in place. Read from a closure instead, a donated buffer is live
      both inside the loop and after it, and XLA:CPU copies it whole on every call.

  Returns:
    ``(o [B, Hkv, R, D] float32, m [B, Hkv, R], l [B, Hkv, R])``: ``o / l`` is the attention
    output, ``m`` the row max of the logits, ``l`` the softmax denominator (0 for rows that see
    no key); with ``record``, ``((o, m, l), state)``; with ``through``, that and ``through``
    as a pair.
  """
  def step(j, carry):
    part, state, held = carry
    kb, vb, mask = fetch(j) if through is None else fetch(j, held)
    logits = tile_logits(q_rows, kb)
    if record is not None:
      state = record[0](j, logits, state)
    if through is not None:  # not forwarded by jax as loop-invariant (that was the copy)
      held = jax.lax.optimization_barrier(held)
    return _online_logits(part, logits, vb, mask), state, held

  carry = (init, None if record is None else record[1], through)
  if isinstance(num_tiles, int) and num_tiles == 1:
    carry = step(0, carry)
  else:
    carry = jax.lax.fori_loop(0, num_tiles, step, carry)
  out = carry[0] if record is None else carry[:2]
  return out if through is None else (out, carry[2])


def tile_key_sums(q_rows, kb, mask, lse_rows, group: int):
  """One key tile's share of each key's attention, summed over query rows, per query head.

  ``sum_r exp(q_r . k_s - lse_r)`` over the visible ``(r, s)`` of ``mask [B, 1 or Hkv, R,
  tile]``: the statistic H2O accumulates and SnapKV reads from its observation window,
  from the row log-sum-exps the attention already computed (a row with ``lse = +inf``
  contributes nothing: rows a policy does not observe, rows that saw no key).

  Args:
    q_rows: ``[B, Hkv, R, D]`` folded queries (row ``t * group + g``), scaled by 1/sqrt(D).
    kb: ``[B, Hkv, tile, D]`` keys (or split into planes, :func:`tile_logits`).
    lse_rows: ``[B, Hkv, R]`` float32 each row's log-sum-exp over *all* its keys.
    group: query heads per KV head.

  Returns:
    ``[B, Hkv, group, tile]`` float32.
  """
  b, hkv, rows, _ = q_rows.shape
  logits = tile_logits(q_rows, kb)
  p = jnp.where(mask, jnp.exp(logits - lse_rows[..., None]), 0.0)  # [B, Hkv, R, tile]
  return p.reshape(b, hkv, rows // group, group, -1).sum(axis=2)


def _slice_fetch(k, v, k_pos, q_pos_rows, tile: int):
  """``fetch(j)`` of :func:`tile_loop` over dense ``k, v [B, Hkv, S, D]`` with positions
  ``k_pos [B, S] or [B, Hkv, S]``: tile ``j`` is slots ``j*tile ..``; a last tile that would
  run past ``S`` is shifted back to end at ``S`` and the slots it shares with the previous
  tile are masked out, so ``S`` need not be a multiple of ``tile``."""
  num_keys = k.shape[2]
  q_pos = q_pos_rows[:, None, :, None]  # [B, 1, R, 1]

  def fetch(j):
    start = jnp.minimum(j * tile, num_keys - tile)
    kb = jax.lax.dynamic_slice_in_dim(k, start, tile, axis=2)  # [B, Hkv, tile, D]
    vb = None if v is None else jax.lax.dynamic_slice_in_dim(v, start, tile, axis=2)
    kp = _key_positions(jax.lax.dynamic_slice_in_dim(k_pos, start, tile, axis=-1))
    fresh = (start + jnp.arange(tile) >= j * tile)[None, None, None, :]  # not read before
    mask = fresh & (kp >= 0) & (kp <= q_pos) & (q_pos >= 0)  # [B, 1 or Hkv, R, tile]
    return kb, vb, mask, start

  return fetch


def tiled_attention(q_rows, q_pos_rows, k, v, k_pos, *, tile: int, num_tiles, init=None):
  """:func:`tile_loop` over dense keys: tiles ``0 .. num_tiles - 1`` of ``k, v [B, Hkv, S, D]``.

  Args:
    q_rows: ``[B, Hkv, R, D]`` folded queries, already scaled by ``1/sqrt(D)``.
    q_pos_rows: ``[B, R]`` int32 position of each row's query (``-1`` = padding).
    k, v: ``[B, Hkv, S, D]`` keys / values; ``k_pos [B, S]`` (shared by the heads) or
      ``[B, Hkv, S]`` their positions (``-1`` = empty).
    tile: keys per tile (``<= S``; a last tile past ``S`` is shifted back and masked).
    num_tiles: tiles to read, a Python int or a traced int32 scalar.
    init: ``(o, m, l)`` to continue from (default :func:`empty_partial`).
  """
  b, hkv, rows, d = q_rows.shape
  fetch = _slice_fetch(k, v, k_pos, q_pos_rows, min(tile, k.shape[2]))
  init = empty_partial(b, hkv, rows, d) if init is None else init
  return tile_loop(q_rows, lambda j: fetch(j)[:3], num_tiles, init)


def _blocked_chunk(q, k, v, positions, block_size: int):
  """A chunk padded to whole query blocks (position ``-1``) and folded for the tile loops.

  Returns ``(block, padded, arrays, positions [B, padded], q_pos_rows [B, padded * G])`` with
  ``arrays = (q_rows [B, Hkv, padded * G, D] scaled by 1/sqrt(D), k [B, Hkv, padded, D]``
  and, when ``v`` is given, ``v [B, Hkv, padded, D])``.
  """
  t, d = q.shape[1], q.shape[3]
  hkv = k.shape[2]
  block = min(block_size, t)
  padded = -(-t // block) * block
  kv = (k,) if v is None else (k, v)
  if padded != t:
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, kv = jnp.pad(q, pad), tuple(jnp.pad(x, pad) for x in kv)
    positions = jnp.pad(positions, ((0, 0), (0, padded - t)), constant_values=-1)
  arrays = (fold_queries(q * (d**-0.5), hkv),) + tuple(x.transpose(0, 2, 1, 3) for x in kv)
  q_pos_rows = jnp.repeat(positions, q.shape[2] // hkv, axis=1)
  return block, padded, arrays, positions, q_pos_rows


def causal_attention(q, k, v, positions, *, block_size: int = 512, key_block: int = 256):
  """Causal self-attention of a chunk over itself, tiled flash-style in compiled loops.

  A loop over query blocks of ``block_size`` tokens. Block ``i`` reads its own keys (the
  diagonal: ``block_size / key_block`` tiles, masked by positions) and then every key tile
  before it *unmasked*: a chunk's real tokens are a prefix of each row with increasing
  positions (the model's contract; padding is ``-1`` after them), so every key before a real
  query's block is visible to it, and the upper triangle is never computed. Rows of padding
  queries come back as "saw no key" (``o = l = 0``), and a diagonal tile is folded into
  the rows of its own tokens and after only (the rows before see none of its keys). Both
  loops compile to one body each, so compile time does not grow with the chunk. On 2 CPU
  cores at 2,048 tokens (one SmolLM2 layer) this takes 38 ms (42 ms with every diagonal
  tile over all of its block's rows; 56 ms with every tile masked and 256-token blocks;
  168 ms for the dense masked softmax).

  Args:
    q: ``[B, T, Hq, D]`` rotated queries.
    k, v: ``[B, T, Hkv, D]`` rotated keys / values.
    positions: ``[B, T]`` int32, increasing along each row's real tokens, ``-1`` for the
      padding after them.
    block_size: queries per block; key_block: keys per tile (``block_size`` a multiple of
      it, or larger than the chunk).

  Returns:
    ``(o, m, l)`` with ``o [B, Hkv, T * G, D]`` (see :func:`tiled_attention`).
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  if t == 1:  # a decode step: the token sees itself only (what the loop below computes)
    real = (positions[:, 0] >= 0)[:, None, None]  # [B, 1, 1]
    o = jnp.broadcast_to(v.astype(jnp.float32).transpose(0, 2, 1, 3), (b, hkv, group, d))
    return (jnp.where(real[..., None], o, 0.0),  # softmax weight 1 on its own value
            jnp.where(real, _own_logits(q, k), _NEG_INF),
            jnp.where(real, jnp.ones((b, hkv, group), jnp.float32), 0.0))
  tile = min(key_block, t)
  block = min(block_size, -(-t // tile) * tile)
  tile = min(tile, block)
  if block % tile:
    raise ValueError(f"block_size={block_size} must be a multiple of key_block={key_block}.")
  block, padded, (q_rows, kt, vt), positions, q_pos_rows = _blocked_chunk(
      q, k, v, positions, block)
  rows = block * group
  diagonal_tiles = block // tile

  def key_tile(x, start):
    return jax.lax.dynamic_slice_in_dim(x, start, tile, axis=x.ndim - 2)

  def query_block(i, acc):
    qb = jax.lax.dynamic_slice_in_dim(q_rows, i * rows, rows, axis=2)  # [B, Hkv, rows, D]
    qp = jax.lax.dynamic_slice_in_dim(q_pos_rows, i * rows, rows, axis=1)[:, None, :, None]
    part = empty_partial(b, hkv, rows, d)
    for s in range(diagonal_tiles):  # the block's own keys: the only masked tiles
      start = i * block + s * tile
      # Queries before this tile's first key see none of it (positions increase along the
      # real tokens): its rows start at the tile's first token.
      r0 = s * tile * group
      kp = jax.lax.dynamic_slice_in_dim(positions, start, tile, axis=1)[:, None, None, :]
      mask = (kp >= 0) & (kp <= qp[:, :, r0:]) & (qp[:, :, r0:] >= 0)  # [B, 1, rows - r0, tile]
      sub = _online_update(tuple(x[:, :, r0:] for x in part), qb[:, :, r0:],
                           key_tile(kt, start), key_tile(vt, start), mask)
      part = tuple(jnp.concatenate([x[:, :, :r0], y], axis=2) if r0 else y
                   for x, y in zip(part, sub))
    if padded > block:  # earlier blocks' keys (a one-block chunk has none: no loop)
      part = jax.lax.fori_loop(
          0, i * diagonal_tiles,
          lambda j, c: _online_update(c, qb, key_tile(kt, j * tile), key_tile(vt, j * tile)),
          part)
    return tuple(jax.lax.dynamic_update_slice_in_dim(a, p, i * rows, axis=2)
                 for a, p in zip(acc, part))

  acc = empty_partial(b, hkv, padded * group, d)
  if padded == block:
    acc = query_block(0, acc)
  else:
    acc = jax.lax.fori_loop(0, padded // block, query_block, acc)
  real = (q_pos_rows >= 0)[:, None, :]  # [B, 1, R]: padding rows saw keys unmasked
  o, m, l = (jnp.where(real[..., None], acc[0], 0.0), jnp.where(real, acc[1], _NEG_INF),
             jnp.where(real, acc[2], 0.0))
  return tuple(x[:, :, :t * group] for x in (o, m, l))


def causal_key_sums(q, k, positions, lse_rows, *, block_size: int = 256,
                    key_block: int = 256):
  """Attention each key of a causal chunk receives, summed over the chunk's queries.

  The column sums of the causal softmax (H2O's accumulated score), from the row
  log-sum-exps the attention already computed (``m + log(l)`` of :func:`causal_attention`),
  so the probabilities are never normalised or stored: one more pass of ``q . k`` over the
  causal triangle, in the same compiled tile loops.

  Args:
    q: ``[B, T, Hq, D]`` rotated queries; ``k [B, T, Hkv, D]`` rotated keys.
    positions: ``[B, T]`` int32 (``-1`` = padding, contributes nothing).
    lse_rows: ``[B, Hkv, T * G]`` float32 log-sum-exp of each folded query row's logits.

  Returns:
    ``[B, Hkv, G, T]`` float32: per query head, the summed probability of each key.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  if t == 1:  # a decode step: the token's own key, seen by itself
    seen = (positions[:, 0] >= 0)[:, None, None]
    return jnp.where(seen, jnp.exp(_own_logits(q, k) - lse_rows), 0.0)[..., None]  # [B, Hkv, G, 1]
  block, padded, (q_rows, kt), positions, q_pos_rows = _blocked_chunk(
      q, k, None, positions, block_size)
  lse_rows = jnp.pad(lse_rows, ((0, 0), (0, 0), (0, (padded - t) * group)))
  rows = block * group
  tile = min(key_block, padded)

  def query_block(i, sums):
    qb = jax.lax.dynamic_slice_in_dim(q_rows, i * rows, rows, axis=2)  # [B, Hkv, rows, D]
    qp = jax.lax.dynamic_slice_in_dim(q_pos_rows, i * rows, rows, axis=1)
    lse = jax.lax.dynamic_slice_in_dim(lse_rows, i * rows, rows, axis=2)
    tiles = ((i + 1) * block + tile - 1) // tile
    return tiled_key_sums(qb, qp, kt, positions, lse, group=group, tile=tile,
                          num_tiles=tiles, init=sums)

  sums = jnp.zeros((b, hkv, group, padded), jnp.float32)
  sums = jax.lax.fori_loop(0, padded // block, query_block, sums)
  return sums[..., :t]


def tiled_key_sums(q_rows, q_pos_rows, k, k_pos, lse_rows, *, group: int, tile: int,
                   num_tiles, init=None):
  """Per query head, the softmax probability each key receives, summed over query rows.

  The statistic H2O accumulates and SnapKV reads from its observation window, from the row
  log-sum-exps the attention already computed: ``sum_r exp(q_r . k_s - lse_r)`` over the
  visible keys, one tile of keys at a time, so no ``[R, S]`` probability array is stored. A
  row with ``lse = +inf`` contributes nothing (rows a policy does not observe, and rows that
  saw no key). Tiles as :func:`tiled_attention` (a shifted last tile counts each key once).

  Args:
    q_rows: ``[B, Hkv, R, D]`` folded queries (row ``t * group + g``), scaled by 1/sqrt(D).
    q_pos_rows: ``[B, R]`` int32 position of each row's query (``-1`` = padding).
    k: ``[B, Hkv, S, D]`` keys; ``k_pos``: ``[B, S]`` or ``[B, Hkv, S]`` their positions.
    lse_rows: ``[B, Hkv, R]`` float32 each row's log-sum-exp over *all* its keys.
    group: query heads per KV head (``R = T * group``).
    tile, num_tiles: keys per tile (``<= S``) and tiles to read (may be traced).
    init: ``[B, Hkv, group, S]`` sums to add to (default zeros).

  Returns:
    ``[B, Hkv, group, S]`` float32.
  """
  b, hkv, _, _ = q_rows.shape
  num_keys = k.shape[2]
  fetch = _slice_fetch(k, None, k_pos, q_pos_rows, min(tile, num_keys))

  def key_tile(j, sums):
    kb, _, mask, start = fetch(j)
    part = tile_key_sums(q_rows, kb, mask, lse_rows, group)  # [B, Hkv, G, tile]
    old = jax.lax.dynamic_slice_in_dim(sums, start, part.shape[-1], axis=3)
    return jax.lax.dynamic_update_slice_in_dim(sums, old + part, start, axis=3)

  sums = jnp.zeros((b, hkv, group, num_keys), jnp.float32) if init is None else init
  if isinstance(num_tiles, int) and num_tiles == 1:
    return key_tile(0, sums)
  return jax.lax.fori_loop(0, num_tiles, key_tile, sums)


def row_lse(m, l):
  """Row log-sum-exp ``m + log(l)`` of an ``(o, m, l)`` partial (``+inf`` where no key)."""
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def self_attention(q, k, v, positions, rope, *, block_size: int = 256):
  """Plain causal attention without a cache: pre-RoPE ``q, k, v`` -> ``[B, T, Hq, D]``."""
  q = rope.apply(q, positions)
  k = rope.apply(k, positions)
  o, _, l = causal_attention(q, k, v, positions, block_size=block_size)
  return unfold_outputs(normalize(o, l), q.shape[1]).astype(v.dtype)


__all__ = [
    "fold_queries",
    "unfold_outputs",
    "merge_partials",
    "normalize",
    "position_mask",
    "empty_partial",
    "tile_loop",
    "tile_key_sums",
    "tiled_attention",
    "causal_attention",
    "causal_key_sums",
    "tiled_key_sums",
    "row_lse",
    "self_attention",
]
