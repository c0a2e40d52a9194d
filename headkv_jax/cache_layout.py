"""Static layout of the paged cache: which slots of which pool each (layer, KV head) owns.

The cache keeps **one pool per bit class for the whole model** (a bit class = the heads, of
any layer, stored at the same (key bits, value bits)). A pool's slots are grouped by layer:
layer ``l``'s heads of class ``c`` own the block ``[base[c, l], base[c, l] + count[c, l])``, and
inside it every head owns a page-aligned region of ``round_up(budget + chunk_size, page_size)``
slots (adakv, whose heads trade budget, shares one block per layer and re-packs it). So:

* every layer has the same array shapes: budgets move between layers through block sizes,
  which are *data* (this module's tables, read with a traced layer index), not array shapes.
  One compiled program serves every layer (a ``fori_loop`` / ``scan`` over layers, or one
  layer program called 30 times);
* the allocated slots are exactly the sum of the heads' regions: nothing is padded to the
  largest layer or head (a pool holds what its heads need, and a 16-bit head costs no
  quantized bytes and vice versa).

Everything here is plain numpy on static configuration: it decides array shapes and the
tables a traced program indexes, never values.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from headkv_jax import quantization
from headkv_jax import slot_pool


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """The model-wide layout of a paged cache (numpy tables, indexed by layer under ``jit``).

  Attributes:
    pairs: ``[C]`` (key bits, value bits) of each class, in order of first appearance.
    class_of: ``[L, Hkv]`` the class of every head.
    region: ``[L, Hkv]`` slots of a head's fixed region (adakv: 0, regions move).
    first_slot: ``[L, Hkv]`` where a head's region starts in its class's pool when empty.
    base, count: ``[C, L]`` first slot and size of layer ``l``'s block in pool ``c`` (0 slots
      where the layer has no head of the class).
    window: ``[C]`` the largest block of each pool (the span one layer's eviction rewrites).
    slots: ``[C]`` slots of each pool.
    fp_row: ``[L, Hkv]`` row of a quantized head in its class's full-precision window
      (``-1`` for 16-bit heads); ``fp_rows``: ``[C]`` rows per class.
    max_region: most slots one head can hold (the per-head view length).
    adaptive: adakv's shared blocks.
  """

  pairs: tuple[tuple[int, int], ...]
  class_of: np.ndarray
  region: np.ndarray
  first_slot: np.ndarray
  base: np.ndarray
  count: np.ndarray
  window: tuple[int, ...]
  slots: tuple[int, ...]
  fp_row: np.ndarray
  fp_rows: tuple[int, ...]
  max_region: int
  adaptive: bool

  @property
  def num_classes(self) -> int:
    return len(self.pairs)

  @property
  def num_layers(self) -> int:
    return self.class_of.shape[0]

  def quantized(self, c: int) -> bool:
    return min(self.pairs[c]) < 16

  def heads(self, layer: int, c: int) -> tuple[int, ...]:
    """The KV heads of ``layer`` (a Python int) in class ``c``."""
    return tuple(int(h) for h in np.flatnonzero(self.class_of[layer] == c))


@functools.lru_cache(maxsize=256)
def _layout(budgets: tuple, bits: tuple, adaptive: bool, chunk_size: int,
            page_size: int) -> Layout:
  budgets = np.asarray(budgets, np.int64)  # [L, Hkv]
  bits = np.asarray(bits, np.int64)  # [L, Hkv, 2]
  num_layers, hkv = budgets.shape
  pairs = list(dict.fromkeys((int(k), int(v)) for k, v in bits.reshape(-1, 2)))
  class_of = np.array([[pairs.index((int(k), int(v))) for k, v in row] for row in bits])
  need = slot_pool.round_up(budgets + chunk_size, page_size)  # [L, Hkv]
  num_c = len(pairs)
  base = np.zeros((num_c, num_layers), np.int64)
  count = np.zeros((num_c, num_layers), np.int64)
  first = np.zeros((num_layers, hkv), np.int64)
  region = np.zeros((num_layers, hkv), np.int64)
  fp_row = np.full((num_layers, hkv), -1, np.int64)
  fill = [0] * num_c
  rows = [0] * num_c
  max_region = 0
  for l in range(num_layers):
    for c in range(num_c):
      heads = np.flatnonzero(class_of[l] == c)
      base[c, l] = fill[c]
      if not len(heads):
        continue
      if adaptive:  # one block, regions packed from its first slot (re-packed on eviction)
        total = int(budgets[l, heads].sum())
        count[c, l] = slot_pool.round_up(total + len(heads) * (chunk_size + page_size - 1),
                                          page_size)
        first[l, heads] = fill[c] + np.cumsum(need[l, heads]) - need[l, heads]
        max_region = max(max_region, total + chunk_size)
      else:
        first[l, heads] = fill[c] + np.cumsum(need[l, heads]) - need[l, heads]
        region[l, heads] = need[l, heads]
        count[c, l] = int(need[l, heads].sum())
        max_region = max(max_region, int(need[l, heads].max()))
      fill[c] += int(count[c, l])
      if min(pairs[c]) < 16:
        fp_row[l, heads] = rows[c] + np.arange(len(heads))
        rows[c] += len(heads)
  window = tuple(int(count[c].max()) for c in range(num_c))
  return Layout(pairs=tuple(pairs), class_of=class_of, region=region, first_slot=first,
                base=base, count=count, window=window, slots=tuple(fill),
                fp_row=fp_row, fp_rows=tuple(rows), max_region=int(max_region),
                adaptive=bool(adaptive))


def layout(budgets, bits, adaptive: bool, chunk_size: int, page_size: int) -> Layout:
  """The :class:`Layout` of a cache (memoised on its static configuration).

  Args:
    budgets: ``[L][Hkv]`` ints (nested tuples or an array).
    bits: ``[L][Hkv]`` (key bits, value bits) pairs.
    adaptive: adakv's shared blocks (one class per layer).
    chunk_size, page_size: as the cache's.
  """
  # A cache holds nested tuples of ints already: they key the memo as they are (a cache's
  # `layout` is read hundreds of times while a decode step is traced).
  key = lambda x: (x if type(x) is tuple and all(type(r) is tuple for r in x)
                   else nested_ints(np.asarray(x)))
  return _layout(key(budgets), key(bits), bool(adaptive), int(chunk_size), int(page_size))


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


def nested_ints(array) -> tuple:
  """A nested tuple of ints (hashable, so a static argument of a compiled function) from an
  int array, e.g. per-head budgets ``[layers, Hkv]`` or bits ``[layers, Hkv, 2]``."""
  return tuple(map(nested_ints, array)) if np.ndim(array) else int(array)


__all__ = ["Layout", "layout", "as_bits", "nested_ints"]
