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

  def attend(self, layer: int, q, k, v, positions, rope):
    cache = self.layers[layer]
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = rope.apply(q, positions)
    k = rope.apply(k, positions)
    # New tokens among themselves (blocked causal) ...
    parts = [attention.causal_attention(q, k, v, positions)]
    # ... and against what the cache held before this call; skipped at runtime when empty.
    q_rows = attention.fold_queries(q * (d**-0.5), hkv)  # [B, Hkv, T*G, D]
    q_pos_rows = jnp.repeat(positions, hq // hkv, axis=1)  # [B, T*G]

    def old_part(_):
      mask = attention.position_mask(q_pos_rows, cache.positions)
      return attention.partial_attention(q_rows, cache.k, cache.v, mask)

    def no_old_part(_):
      rows = q_rows.shape[2]
      return (jnp.zeros((b, hkv, rows, d), jnp.float32),
              jnp.full((b, hkv, rows), -1e30, jnp.float32),
              jnp.zeros((b, hkv, rows), jnp.float32))

    parts.append(jax.lax.cond(jnp.any(cache.lengths > 0), old_part, no_old_part, None))
    o, _, l = attention.merge_partials(parts)
    out = attention.unfold_outputs(attention.normalize(o, l), t).astype(v.dtype)

    # Append: row b's real tokens go to slots [length_b, length_b + n_b); padding is dropped.
    valid = positions >= 0  # [B, T]
    slots = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    slots = jnp.where(valid, slots, self.capacity)  # out of range -> dropped
    rows_idx = jnp.arange(b)[:, None]
    new = DenseLayerCache(
        k=cache.k.at[rows_idx, :, slots].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[rows_idx, :, slots].set(v.astype(cache.v.dtype), mode="drop"),
        positions=cache.positions.at[rows_idx, slots].set(positions, mode="drop"),
        lengths=cache.lengths + jnp.sum(valid, axis=1, dtype=jnp.int32),
    )
    layers = self.layers[:layer] + (new,) + self.layers[layer + 1:]
    return out, self.replace(layers=layers)
