"""Static-shape primitives on a layer's slot pool ``[B, S, ...]`` (see ``paged_cache``).

Per-head views are index arrays ``[B, Hkv, N]`` into the pool; writes at index ``S`` (one past
the end) are dropped, which is how padding tokens and empty slots are skipped without shapes
that depend on data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
  slots are consecutive), far cheaper than gathering slot by slot. Static ``starts`` (a
  numpy array, the same in every row) are static slices, no gather: one slice and a reshape
  where the blocks follow one another."""
  if isinstance(starts, np.ndarray):
    first = [int(st) for st in starts[0]]
    if (starts == starts[:1]).all():
      if first == list(range(first[0], first[0] + len(first) * size, size)):
        block = pool[:, first[0]:first[0] + len(first) * size]
        return block.reshape(pool.shape[:1] + (len(first), size) + pool.shape[2:])
      return jnp.stack([pool[:, st:st + size] for st in first], axis=1)
    starts = jnp.asarray(starts)

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


def _add_angles(a, b):
  """``(cos, sin)`` of the sum of two angles given as ``(cos, sin)`` pairs (broadcast)."""
  (cos_a, sin_a), (cos_b, sin_b) = a, b
  return cos_a * cos_b - sin_a * sin_b, sin_a * cos_b + cos_a * sin_b


def _negate_where(negative, cos_sin):
  """``(cos, sin)`` of the angle negated where ``negative [...]`` (cos is even, sin odd);
  ``cos_sin`` is ``[..., *, D/2]`` with as many axes after ``negative``'s as its shape needs."""
  cos, sin = cos_sin
  sign = jnp.where(negative, -1.0, 1.0)
  return cos, sign.reshape(sign.shape + (1,) * (sin.ndim - sign.ndim)) * sin


def rotate(rope, x, pos, turns=None):
  """RoPE of ``x [..., D]`` by ``pos [...]`` for any leading shape (HF rotate_half layout).

  ``RoPE.apply`` takes one position per token; the cache needs one per (token, KV head) in
  ``cache_relative`` mode, where a token's slot differs between heads, and un-rotates held
  keys by their own positions (KeyDiff in "original" mode).

  ``turns = rope.digit_turns()`` (made outside a loop) replaces the sine and cosine per
  element (see :func:`rotate_run` for why they cost) by three table rows per position, the
  base-256 digits of ``|pos|`` composed by angle addition; positions from ``2**24`` on are
  clipped there (a float32 angle has no digits left for them either).
  """
  if turns is None:
    return rope.rotate(x, *rope.angles(pos))  # [..., D/2] angles
  table_cos, table_sin = turns  # [3, 256, D/2]
  a = jnp.minimum(jnp.abs(pos.astype(jnp.int32)), 2**24 - 1)
  angle = (table_cos[0][a & 255], table_sin[0][a & 255])  # [..., D/2]
  for place in (1, 2):
    d = (a >> (8 * place)) & 255
    angle = _add_angles(angle, (table_cos[place][d], table_sin[place][d]))
  return rope.rotate(x, *_negate_where(pos < 0, angle))


def rotate_run(rope, x, first, turns=None):
  """RoPE of runs of consecutive slots: ``x [..., size, D]`` by positions ``first[...] +
  0 .. size-1`` (HF rotate_half layout); :func:`rotate`'s result to float32 rounding.

  A rolled cache rotates every key it reads by its slot on every step. Sines and cosines per
  key element would dominate that step: XLA:CPU computes one in about 4 ns, and fuses a
  small table's sin / cos into the per-element products, recomputing them per element.
  So the trigonometry comes from ``turns = rope.turns(n)``, made once outside the tile
  loops (``|first| < n``, ``size <= n``): a run's first angle is a row of it, its offsets
  are its first ``size`` rows, and each element gets the angle-addition products
  ``cos((f + i) w) = cos(f w) cos(i w) - sin(f w) sin(i w)``, ``sin((f + i) w) = sin(f w)
  cos(i w) + cos(f w) sin(i w)``. Without ``turns`` they are computed here (slow in a loop).
  """
  size = x.shape[-2]
  first = first.astype(jnp.int32)
  if turns is None:
    offsets = rope.turns(size)  # [size, D/2]
    start = tuple(a[..., None, :] for a in rope.angles(first))  # [..., 1, D/2]
  else:
    table_cos, table_sin = turns  # [n, D/2]
    offsets = (table_cos[:size], table_sin[:size])
    row = jnp.minimum(jnp.abs(first), table_cos.shape[0] - 1)
    start = _negate_where(first < 0, (table_cos[row][..., None, :],  # [..., 1, D/2]
                                      table_sin[row][..., None, :]))
  return rope.rotate(x, *_add_angles(start, offsets))  # [..., size, D/2] angles


__all__ = ["round_up", "region_starts", "gather", "runs", "update_runs", "scatter", "rotate",
           "rotate_run"]
