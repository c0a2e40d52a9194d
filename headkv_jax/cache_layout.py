"""Static layout of a paged layer: which slots each KV head and each bit class own.

A layer's slots ``[0, S)`` are split into one block per *bit class* (the heads with the same
(key bits, value bits)), classes in order of their first head; inside a block every head owns
a fixed, page-aligned region of ``round_up(budget + chunk_size, page_size)`` slots. adakv
(one class: its heads share one pool) packs regions from one total instead. Everything here
but :func:`join_classes` is plain Python / numpy on static configuration: it decides array
shapes, never values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from headkv_jax import quantization
from headkv_jax import slot_pool


class BitClass(NamedTuple):
  """One bit class of a layer: its heads' regions are the layer's slots
  ``[base, base + slots)``, stored in the class's own K/V stores."""

  bits: tuple[int, int]  # (key bits, value bits)
  heads: tuple[int, ...]  # KV heads of the class, ascending
  base: int  # first layer slot of the class's block
  slots: int  # slots of the class's block (its stores' second axis)


def layer_layout(budgets, bits, adaptive: bool, chunk_size: int, page_size: int):
  """-> ``(classes, region sizes [Hkv] (None for adakv), first slots [Hkv])`` of one layer.

  Args:
    budgets: ``[Hkv]`` ints, the layer's budgets.
    bits: ``[Hkv]`` (key bits, value bits) pairs.
    adaptive: adakv's shared pool (``sum(budgets)`` plus one chunk and a page per head).
    chunk_size, page_size: as the cache's.
  """
  pairs = list(dict.fromkeys(bits))
  heads = [tuple(h for h, p in enumerate(bits) if p == pair) for pair in pairs]
  need = np.array([slot_pool.round_up(int(b) + chunk_size, page_size) for b in budgets])
  if adaptive:
    slack = len(budgets) * (chunk_size + page_size - 1)
    slots = slot_pool.round_up(int(np.sum(budgets)) + slack, page_size)
    return (BitClass(pairs[0], heads[0], 0, slots),), None, np.cumsum(need) - need
  offsets = np.zeros(len(budgets), np.int64)
  classes, base = [], 0
  for pair, hs in zip(pairs, heads):
    start = base
    for h in hs:
      offsets[h] = base
      base += need[h]
    classes.append(BitClass(pair, hs, start, base - start))
  return tuple(classes), need, offsets


def join_classes(xs, classes):
  """Per-class arrays ``[B, Hc, ...]`` (in ``classes`` order) -> ``[B, Hkv, ...]`` in head order."""
  if len(xs) == 1:
    return xs[0]
  order = np.argsort(np.concatenate([c.heads for c in classes]))  # class order -> heads
  return jnp.concatenate(xs, axis=1)[:, order]


def as_bits(bits, shape) -> np.ndarray:
  """``bits`` None / ``[L, Hkv]`` / ``[L, Hkv, 2]`` -> int ``[L, Hkv, 2]`` (key, value);
  raises for widths outside ``SUPPORTED_BITS`` or values with more bits than keys."""
  allowed = quantization.SUPPORTED_BITS
  bits = np.full(shape, 16) if bits is None else np.asarray(bits)
  if bits.shape == shape:
    bits = np.stack([bits, bits], axis=-1)
  if bits.shape != shape + (2,):
    raise ValueError(f"bits must have shape {list(shape)} or {list(shape) + [2]} (key, value "
                     f"bits), got {list(bits.shape)}.")
  bad = sorted(set(bits.ravel().tolist()) - set(allowed))
  if bad:
    raise ValueError(f"Unsupported bits {bad}; allowed: {list(allowed)}.")
  worse = np.argwhere(bits[..., 1] > bits[..., 0])
  if len(worse):
    l, h = (int(i) for i in worse[0])
    raise ValueError(f"Values may not get more bits than keys: (layer, kv_head)=({l}, {h}) has "
                     f"{int(bits[l, h, 0])}-bit keys and {int(bits[l, h, 1])}-bit values.")
  return bits.astype(np.int64)


__all__ = ["BitClass", "layer_layout", "join_classes", "as_bits"]
