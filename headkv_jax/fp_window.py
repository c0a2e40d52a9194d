"""The full-precision tokens of a quantized bit class: its sinks and its recent residual.

KIVI keeps the most recent tokens in full precision (without them 2-bit accuracy collapses),
and attention sinks are the first tokens. A quantized class keeps, per row and (layer, KV
head) of the class, ``F = sinks + residual`` entries in the cache dtype: position ``p < sinks`` at entry
``p``, any later position at ``sinks + p % residual`` (a ring that always holds the last
``residual`` tokens written). Its slots also hold those tokens quantized; a reader takes the
window's copy wherever the window holds the slot's position (:func:`read`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

RESIDUAL = 32  # most recent tokens a quantized head keeps in the cache dtype (default)
SINKS = 4  # first tokens a quantized head keeps in the cache dtype (default)


@flax.struct.dataclass
class FpWindow:
  """Attributes:
    k, v: ``[B, Hc, F, D]`` in the cache dtype, as the class's stores hold them before
      quantization.
    pos: ``[B, Hc, F]`` int32 position held at each entry, ``-1`` when empty.
  """

  k: jnp.ndarray
  v: jnp.ndarray
  pos: jnp.ndarray


def empty(batch: int, heads: int, size: int, head_dim: int, dtype) -> FpWindow:
  return FpWindow(k=jnp.zeros((batch, heads, size, head_dim), dtype),
                  v=jnp.zeros((batch, heads, size, head_dim), dtype),
                  pos=jnp.full((batch, heads, size), -1, jnp.int32))


def index(pos, sinks: int, residual: int):
  """Window entry of each position (``sinks + residual`` = none)."""
  recent = sinks + (pos % residual if residual else residual)
  return jnp.where(pos < sinks, pos, recent)


def read(fp: FpWindow, pos, k, v, sinks: int, residual: int):
  """``k, v [B, Hc, C, D]`` of slots at positions ``pos [B, Hc, C]``, with the tokens the
  window holds read from it (exact) -> ``(k, v, held [B, Hc, C] bool)``."""
  j = jnp.clip(index(pos, sinks, residual), 0, fp.pos.shape[-1] - 1)  # [B, Hc, C]
  held = (pos >= 0) & (jnp.take_along_axis(fp.pos, j, axis=2) == pos)
  k = jnp.where(held[..., None], jnp.take_along_axis(fp.k, j[..., None], axis=2), k)
  v = jnp.where(held[..., None], jnp.take_along_axis(fp.v, j[..., None], axis=2), v)
  return k, v, held


def write(fp: FpWindow, rows, positions, k, v, sinks: int, residual: int) -> FpWindow:
  """``fp`` with the sinks and the last ``residual`` real tokens of ``positions [B, T]``
  written (padding, position -1, and older tokens are skipped): head ``h`` of ``k, v
  [B, Hkv, T, D]`` goes to window row ``rows[h]`` (``rows [Hkv]`` int32, the rows of one
  layer's heads in their class's window; a row ``>= fp.pos.shape[1]`` is not written)."""
  tok_valid = positions >= 0
  n_real = jnp.sum(tok_valid, axis=1, keepdims=True)
  rank = jnp.cumsum(tok_valid, axis=1) - 1
  sink = tok_valid & (positions < sinks)
  recent = tok_valid & (rank >= n_real - residual) & (positions >= sinks)
  size = fp.pos.shape[-1]
  j = jnp.where(sink | recent, index(positions, sinks, residual), size)  # [B, T]; F = drop
  hkv = k.shape[1]
  j = jnp.broadcast_to(j[:, None, :], (j.shape[0], hkv, j.shape[1]))  # [B, Hkv, T]
  r = jnp.broadcast_to(rows[None, :, None], j.shape)  # [B, Hkv, T]

  def put(pool, x):  # per row of the batch: pool [R, F, ...] at (rows, entries)
    def one(p, rr, jj, vv):
      return p.at[rr, jj].set(vv.astype(p.dtype), mode="drop")
    return jax.vmap(one)(pool, r, j, x)

  return FpWindow(k=put(fp.k, k), v=put(fp.v, v),
                  pos=put(fp.pos, jnp.broadcast_to(positions[:, None, :], j.shape)))


__all__ = ["RESIDUAL", "SINKS", "FpWindow", "empty", "index", "read", "write"]
