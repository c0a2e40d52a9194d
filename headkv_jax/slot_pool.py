"""Static-shape primitives on a layer's slot pool ``[B, S, ...]`` (see ``paged_cache``).

Per-head views are index arrays ``[B, Hkv, N]`` into the pool; writes at index ``S`` (one past
the end) are dropped, which is how padding tokens and empty slots are skipped without shapes
that depend on data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x, multiple: int):
  """Smallest multiple of ``multiple`` that is >= ``x`` (ints or int arrays)."""
  return (x + multiple - 1) // multiple * multiple


def region_starts(lengths, chunk_size: int, page_size: int):
  """Page-aligned first slot ``[..., Hkv]`` of each head when packed for ``lengths [..., Hkv]``
  (from 0; heads packed along the last axis).

  Head ``h`` gets ``round_up(length + chunk_size, page_size)`` slots: its tokens plus one chunk.
  """
  need = round_up(lengths + chunk_size, page_size)  # [..., Hkv]
  return jnp.cumsum(need, axis=-1, dtype=jnp.int32) - need


def gather(pool, idx):
  """``pool [B, S, ...]``, ``idx [B, Hkv, N]`` (in range) -> ``[B, Hkv, N, ...]``."""
  b, h, n = idx.shape
  flat = idx.reshape((b, h * n) + (1,) * (pool.ndim - 2))
  out = jnp.take_along_axis(pool, flat, axis=1)
  return out.reshape((b, h, n) + pool.shape[2:])


def runs(pool, starts, size: int):
  """``pool [B, S, ...]``, ``starts [B, Hkv]`` (``<= S - size``) -> the ``size`` consecutive
  slots from each start, ``[B, Hkv, size, ...]``: one contiguous block per head (a head's
  slots are consecutive), far cheaper than gathering slot by slot."""
  def row(p, st):  # p [S, ...], st [Hkv]
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(p, s, size, axis=0))(st)

  return jax.vmap(row)(pool, starts)


def update_runs(buf, starts, values, mask):
  """``buf [B, Hkv, ..., N]`` with ``values [B, Hkv, ..., size]`` written along the last axis
  from ``starts [B, Hkv]`` (``<= N - size``) where ``mask`` (broadcastable) holds."""
  size = values.shape[-1]

  def one(b, st, v, m):  # b [..., N]
    old = jax.lax.dynamic_slice_in_dim(b, st, size, axis=b.ndim - 1)
    return jax.lax.dynamic_update_slice_in_dim(b, jnp.where(m, v, old), st, axis=b.ndim - 1)

  mask = jnp.broadcast_to(mask, values.shape)
  return jax.vmap(jax.vmap(one))(buf, starts, values, mask)


def scatter(pool, idx, values):
  """Writes ``values [B, Hkv, N, ...]`` at ``idx [B, Hkv, N]``; indices >= S are dropped.

  Mapped over rows (a scatter with a batch dimension) rather than indexed by a row iota: the
  same program on one device, and on a mesh the partitioner keeps each row's write on the
  devices holding the row instead of gathering the indices and values of the whole batch.
  """
  def row(p, i, v):  # p [S, ...], i [Hkv, N], v [Hkv, N, ...]
    return p.at[i].set(v.astype(p.dtype), mode="drop")

  return jax.vmap(row)(pool, idx, values)


def rotate(rope, x, pos):
  """RoPE of ``x [..., D]`` by ``pos [...]`` for any leading shape (HF rotate_half layout).

  ``RoPE.apply`` takes one position per token; the cache needs one per (token, KV head) in
  ``cache_relative`` mode, where a token's slot differs between heads.
  """
  cos, sin = rope.cos_sin(pos)  # [..., D]
  xf = x.astype(jnp.float32)
  half = xf.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


__all__ = ["round_up", "region_starts", "gather", "runs", "update_runs", "scatter", "rotate"]
