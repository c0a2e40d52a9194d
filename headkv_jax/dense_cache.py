"""The uncompressed KV cache: one dense ``[B, Hkv, capacity, D]`` buffer per layer.

It is the ``full`` baseline and the reference the compressed caches are compared against. It
implements the cache contract every model call relies on::

    out, cache = cache.attend(layer, q, k, v, positions, rope)

with pre-RoPE ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` and ``positions [B, T]`` (``-1`` =
padding; a ragged batch is right-padded so each row's real tokens form a prefix). Keys are
stored rotated at their original positions. Each row appends at its own length, so rows of
different lengths decode together.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from headkv_jax import attention

_OLD_TILE = 512  # keys per tile when a prefill chunk reads the cache


@flax.struct.dataclass
class DenseLayerCache:
  """One layer's buffers.

  Attributes:
    k, v: ``[B, Hkv, capacity, D]`` rotated keys and values.
    positions: ``[B, capacity]`` int32 original position of each slot, ``-1`` when empty.
    lengths: ``[B]`` int32 slots filled per row.
  """

  k: jnp.ndarray
  v: jnp.ndarray
  positions: jnp.ndarray
  lengths: jnp.ndarray


@flax.struct.dataclass
class DenseKVCache:
  """Full KV cache for all layers (a pytree; pass it into and out of jitted steps)."""

  layers: tuple[DenseLayerCache, ...]

  @classmethod
  def create(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
             capacity: int, dtype=jnp.float32) -> "DenseKVCache":
    if capacity <= 0:
      raise ValueError(f"capacity must be positive, got {capacity}.")
    def layer():
      return DenseLayerCache(
          k=jnp.zeros((batch, num_kv_heads, capacity, head_dim), dtype),
          v=jnp.zeros((batch, num_kv_heads, capacity, head_dim), dtype),
          positions=jnp.full((batch, capacity), -1, jnp.int32),
          lengths=jnp.zeros((batch,), jnp.int32),
      )
    return cls(layers=tuple(layer() for _ in range(num_layers)))

  @property
  def capacity(self) -> int:
    return self.layers[0].k.shape[2]

  @property
  def nbytes(self) -> int:
    """Real bytes of every array the cache holds."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

  def token_counts(self) -> jnp.ndarray:
    """Tokens held per (layer, row, KV head): ``[layers, B, Hkv]``."""
    hkv = self.layers[0].k.shape[1]
    return jnp.stack([jnp.repeat(l.lengths[:, None], hkv, axis=1) for l in self.layers])

  def layer_view(self, layer: int) -> "DenseKVCache":
    """Layer ``layer`` as a one-layer cache (for layer-by-layer prefill)."""
    return self.replace(layers=(self.layers[layer],))

  def with_layer_view(self, layer: int, view: "DenseKVCache") -> "DenseKVCache":
    """This cache with layer ``layer`` taken from the one-layer ``view``."""
    return self.replace(layers=self.layers[:layer] + view.layers + self.layers[layer + 1:])

  def attend(self, layer: int, q, k, v, positions, rope):
    """Appends the new tokens and attends over the cache; needs ``length + T <= capacity``."""
    out, _, cache = self.attend_with_lse(layer, q, k, v, positions, rope)
    return out, cache

  def attend_with_lse(self, layer: int, q, k, v, positions, rope):
    """:meth:`attend`, plus each folded query row's log-sum-exp ``[B, Hkv, T * G]``."""
    cache = self.layers[layer]
    t = q.shape[1]
    q = rope.apply(q, positions)
    k = rope.apply(k, positions)
    # Attention reads the cache as it was (plus the new tokens among themselves); the write
    # only feeds the returned cache, so XLA updates the donated buffers in place.
    out, lse = self._attend_chunk(cache, q, k, v, positions, skip_if_empty=t > 1)
    # The barrier orders the write after the read, which lets XLA skip defensive copies.
    out, lse, cache = jax.lax.optimization_barrier((out, lse, cache))
    new = self._append(cache, k, v, positions)
    layers = self.layers[:layer] + (new,) + self.layers[layer + 1:]
    return out, lse, self.replace(layers=layers)

  @staticmethod
  def _append(cache: DenseLayerCache, k, v, positions) -> DenseLayerCache:
    """Row b's real tokens go to slots ``[length_b, length_b + n_b)``.

    One ``dynamic_update_slice`` per row writes in place (a masked scatter made XLA rewrite
    the whole buffer every step). Padding (position -1, always after a row's real tokens)
    lands in slots past the row's length with position -1, so it is never attended and the
    next call overwrites it.
    """
    kt = k.transpose(0, 2, 1, 3).astype(cache.k.dtype)  # [B, Hkv, T, D]
    vt = v.transpose(0, 2, 1, 3).astype(cache.v.dtype)
    ck, cv, cp = cache.k, cache.v, cache.positions
    for b in range(k.shape[0]):
      start = cache.lengths[b]
      ck = jax.lax.dynamic_update_slice(ck, kt[b:b + 1], (b, 0, start, 0))
      cv = jax.lax.dynamic_update_slice(cv, vt[b:b + 1], (b, 0, start, 0))
      cp = jax.lax.dynamic_update_slice(cp, positions[b:b + 1], (b, start))
    lengths = cache.lengths + jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)
    return DenseLayerCache(k=ck, v=cv, positions=cp, lengths=lengths)

  @staticmethod
  def _attend_chunk(cache: DenseLayerCache, q, k, v, positions, skip_if_empty: bool):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q_rows = attention.fold_queries(q * (d**-0.5), hkv)  # [B, Hkv, T*G, D]
    q_pos_rows = jnp.repeat(positions, hq // hkv, axis=1)  # [B, T*G]
    capacity = cache.k.shape[2]
    # Prefill reads the old cache in key tiles, only the tiles the longest row has filled: a
    # chunk costs what the cache holds, not its capacity. Decode reads it in one go.
    if skip_if_empty:
      tile = min(_OLD_TILE, capacity)
      num_tiles = (jnp.max(cache.lengths) + tile - 1) // tile
    else:
      tile, num_tiles = capacity, 1
    old = attention.tiled_attention(q_rows, q_pos_rows, cache.k, cache.v, cache.positions,
                                    tile=tile, num_tiles=num_tiles)
    new = attention.causal_attention(q, k, v, positions)
    o, m, l = attention.merge_partials([new, old])
    out = attention.unfold_outputs(attention.normalize(o, l), t).astype(v.dtype)
    return out, attention.row_lse(m, l)
