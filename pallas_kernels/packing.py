"""Bit packing of quantization codes: the one definition the cache and the kernels share.

Codes of ``bits`` in {2, 4, 8} are packed along the last axis into uint8, ``n = 8 // bits``
codes a byte, in a *planar* layout: byte ``i`` of a packed row of ``D // n`` bytes holds codes
``i, i + D/n, i + 2 D/n, ...`` at bit offsets ``0, bits, 2 bits, ...``::

    packed[..., i] = sum_j code[..., j * (D // n) + i] << (j * bits)

so unpacking is ``n`` shifts and masks laid side by side (no interleave), and a kernel can skip
even that by splitting the query into the ``n`` matching chunks of ``D // n`` channels
(:func:`plane`). Everything here is plain ``jnp`` on values, so it runs inside
a Pallas kernel on loaded blocks as well as under ``jit``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PACKED_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
  """How many ``bits``-bit codes one uint8 holds (raises for bits outside PACKED_BITS)."""
  if bits not in PACKED_BITS:
    raise ValueError(f"Packed codes have bits in {list(PACKED_BITS)}; got {bits}.")
  return 8 // bits


def packed_width(dim: int, bits: int) -> int:
  """Bytes of one packed row of ``dim`` codes; ``dim`` must be a multiple of ``8 // bits``."""
  n = codes_per_byte(bits)
  if dim % n:
    raise ValueError(f"A row of {dim} codes cannot be packed at {bits} bits: {dim} is not a "
                     f"multiple of {n} codes per byte.")
  return dim // n


def pack(codes, bits: int):
  """``codes [..., D]`` ints in ``[0, 2**bits)`` -> uint8 ``[..., D * bits // 8]`` (planar)."""
  n = codes_per_byte(bits)
  width = packed_width(codes.shape[-1], bits)
  codes = codes.astype(jnp.uint8)
  out = codes[..., :width]
  for j in range(1, n):
    out = out | (codes[..., j * width:(j + 1) * width] << (j * bits))
  return out


def plane(packed, j: int, bits: int):
  """uint8 ``[..., W]`` -> uint8 plane ``j`` of its codes ``[..., W]``: the codes of
  channels ``[j * W, (j + 1) * W)``, one constant shift and mask (what a kernel unpacks
  from a loaded block, plane by plane)."""
  return (packed >> (j * bits)) & ((1 << bits) - 1)


def unpack_split(packed, bits: int):
  """uint8 ``[..., W]`` -> uint8 codes ``[..., n, W]`` (``n = 8 // bits``): :func:`unpack`
  with the channel axis split into its ``n`` planes (channel ``j * W + i`` at ``[j, i]``).

  Consumers that keep this split (a decode tile's dequantization and dot,
  ``headkv_jax.attention.tile_logits``) let XLA:CPU vectorize along ``W``, where the bit
  offset is constant; over the joined channel axis the offset changes within the loop, and
  XLA:CPU emits that fusion as scalar code. The shift is on int32, which in such a scalar
  loop costs less than a uint8 shift by a variable count (LLVM guards that with a compare and
  a select per element)."""
  n = codes_per_byte(bits)
  if n == 1:
    return packed[..., None, :]
  shifts = np.arange(0, 8, bits, dtype=np.int32)[:, None]  # [n, 1]
  planes = (packed.astype(jnp.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)  # [..., n, W]
  return planes.astype(jnp.uint8)


def unpack(packed, bits: int):
  """Inverse of :func:`pack`: uint8 ``[..., W]`` -> uint8 codes ``[..., W * 8 // bits]``,
  the planes of :func:`unpack_split` joined by a reshape (a concatenation, fused into a
  dequantization on XLA:CPU, would select its source per element)."""
  planes = unpack_split(packed, bits)
  return planes.reshape(packed.shape[:-1] + (planes.shape[-2] * packed.shape[-1],))


__all__ = ["PACKED_BITS", "codes_per_byte", "packed_width", "pack", "plane", "unpack_split",
           "unpack"]
