"""Bit packing of quantization codes: the one definition the cache and the kernels share.

Codes of ``bits`` in {2, 4, 8} are packed along the last axis into uint8, ``n = 8 // bits``
codes a byte, in a *planar* layout: byte ``i`` of a packed row of ``D // n`` bytes holds codes
``i, i + D/n, i + 2 D/n, ...`` at bit offsets ``0, bits, 2 bits, ...``::

    packed[..., i] = sum_j code[..., j * (D // n) + i] << (j * bits)

so unpacking is ``n`` shifts and masks laid side by side (no interleave), and a kernel can skip
even that by splitting the query into the ``n`` matching chunks of ``D // n`` channels
(:func:`unpack_planes`). Everything here is plain ``jnp`` on values, so it runs inside
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


def unpack_planes(packed, bits: int):
  """uint8 ``[..., W]`` -> the ``8 // bits`` planes of codes, each uint8 ``[..., W]``.

  Plane ``j`` holds the codes of channels ``[j * W, (j + 1) * W)``.
  """
  n = codes_per_byte(bits)
  mask = (1 << bits) - 1
  return [(packed >> (j * bits)) & mask for j in range(n)]


def unpack(packed, bits: int):
  """Inverse of :func:`pack`: uint8 ``[..., W]`` -> uint8 codes ``[..., W * 8 // bits]``.

  The planes come from one shift of ``[..., n, W]`` by a ``[n, 1]`` of bit offsets and a
  reshape, not from a concatenation: fused into a tile's dequantization on XLA:CPU, a
  concatenate selects its source per element. Even so, XLA:CPU emits that fusion as a scalar
  loop (it runs along the reshaped channels, so the offset changes within it, and in a
  decode step the offsets reach the fusion as a loop operand), and there the shift is
  cheaper on int32 than on uint8 (which LLVM guards with a compare and a select per
  element): SmolLM2 at 8,000 tokens, ``roles``, 32 traced decode steps spent 485 ms in
  these fusions with uint8 shifts and 345 ms with int32."""
  n = codes_per_byte(bits)
  if n == 1:
    return packed
  shifts = np.arange(0, 8, bits, dtype=np.int32)[:, None]  # [n, 1]
  planes = (packed.astype(jnp.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)  # [..., n, W]
  return planes.astype(jnp.uint8).reshape(packed.shape[:-1] + (n * packed.shape[-1],))


__all__ = ["PACKED_BITS", "codes_per_byte", "packed_width", "pack", "unpack_planes", "unpack"]
