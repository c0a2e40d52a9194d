"""Asymmetric low-bit quantization of K/V on KIVI's axes: keys per channel, values per token.

A quantized page of ``G`` tokens stores (``b`` = bits in {2, 4, 8}, ``D`` = head_dim)::

    keys    codes [G, D*b/8] uint8   one scale + zero per channel over the page's G tokens
            scale, zero [D]  float16  (KIVI: outlier channels keep their own range)
    values  codes [G, D*b/8] uint8   one scale + zero per token per group of ``g`` channels
            scale, zero [G, D/g] float16

Codes are packed with :mod:`pallas_kernels.packing` (planar uint8). Dequantization is
``x^ = zero + code * scale``; with ``scale = (max - zero) / (2^b - 1)`` the error is at most
``scale / 2`` per element. Scales and zeros are stored in float16 with the zero rounded *down*
and the scale rounded *up*, so ``[zero, zero + (2^b - 1) scale]`` still covers ``[min, max]``
and the bound survives the rounding; a constant group gets a tiny positive scale (no division
by zero, no NaN). A page is quantized once: its codes and scales are never recomputed, so a
kept token's dequantized K and V never change (no compounding error).

Effective bits per element, scales included: ``b + 32 / G`` for keys, ``b + 32 / g`` for values
(:func:`effective_bits`); 16-bit means "stored in the cache dtype" and costs its width.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels import packing

SUPPORTED_BITS = (16, 8, 4, 2)
QUANT_BITS = packing.PACKED_BITS  # bits stored as packed codes (16 is the cache dtype)
SCALE_DTYPE = jnp.float16
_SCALE_BITS = 2 * 16  # a float16 scale and a float16 zero per group
_TINY_SCALE = 2.0**-24  # float16's smallest subnormal: the scale of a constant group


def check_bits(bits: int, what: str = "bits") -> int:
  """``bits`` as an int, or a ValueError naming it and the allowed widths."""
  if int(bits) != bits or int(bits) not in SUPPORTED_BITS:
    raise ValueError(f"Unsupported {what}={bits!r}; allowed: {', '.join(map(str, SUPPORTED_BITS))}.")
  return int(bits)


def _round_f16(x, direction: str):
  """float32 -> float16, rounded towards -inf ("down") or +inf ("up")."""
  y = x.astype(SCALE_DTYPE)
  yf = y.astype(jnp.float32)
  if direction == "down":
    return jnp.where(yf > x, jnp.nextafter(y, jnp.asarray(-jnp.inf, SCALE_DTYPE)), y)
  return jnp.where(yf < x, jnp.nextafter(y, jnp.asarray(jnp.inf, SCALE_DTYPE)), y)


def scale_zero(lo, hi, bits: int):
  """float16 ``(scale, zero)`` of groups whose float32 minima / maxima are ``lo`` / ``hi``."""
  levels = (1 << bits) - 1
  zero = _round_f16(lo.astype(jnp.float32), "down")
  span = hi.astype(jnp.float32) - zero.astype(jnp.float32)
  scale = _round_f16(jnp.maximum(span / levels, _TINY_SCALE), "up")
  return scale, zero


def _codes(x, scale, zero, bits: int):
  levels = (1 << bits) - 1
  q = jnp.round((x - zero.astype(jnp.float32)) / scale.astype(jnp.float32))
  return jnp.clip(q, 0, levels).astype(jnp.uint8)  # clip: a rounding at the top edge


def quantize_keys(k, bits: int):
  """Keys of pages ``k [..., G, D]`` -> ``(codes [..., G, D*b/8], scale [..., D], zero [..., D])``.

  One scale and zero per channel over the page's ``G`` tokens (axis -2).
  """
  x = k.astype(jnp.float32)
  scale, zero = scale_zero(jnp.min(x, axis=-2), jnp.max(x, axis=-2), bits)
  codes = _codes(x, scale[..., None, :], zero[..., None, :], bits)
  return packing.pack(codes, bits), scale, zero


def dequantize_keys(codes, scale, zero, bits: int):
  """Inverse of :func:`quantize_keys` -> float32 ``[..., G, D]``."""
  c = packing.unpack(codes, bits).astype(jnp.float32)
  return zero[..., None, :].astype(jnp.float32) + c * scale[..., None, :].astype(jnp.float32)


def _groups(x, group: int):
  d = x.shape[-1]
  if d % group:
    raise ValueError(f"value group size {group} does not divide head_dim {d}.")
  return x.reshape(x.shape[:-1] + (d // group, group))  # [..., D/g, g]


def quantize_values(v, bits: int, group: int):
  """Values ``v [..., D]`` -> ``(codes [..., D*b/8], scale [..., D/g], zero [..., D/g])``.

  One scale and zero per token per group of ``group`` consecutive channels.
  """
  x = _groups(v.astype(jnp.float32), group)  # [..., D/g, g]
  scale, zero = scale_zero(jnp.min(x, axis=-1), jnp.max(x, axis=-1), bits)
  codes = _codes(x, scale[..., None], zero[..., None], bits).reshape(v.shape)
  return packing.pack(codes, bits), scale, zero


def dequantize_values(codes, scale, zero, bits: int, group: int, planar: bool = False):
  """Inverse of :func:`quantize_values` -> float32 ``[..., D]``, or ``[..., n, D / n]`` with
  ``planar`` (the channels split as :func:`pallas_kernels.packing.unpack_split` splits them:
  the same values, in a layout XLA:CPU vectorizes; ``n = 8 // bits``)."""
  width = codes.shape[-1]
  n = packing.codes_per_byte(bits)
  if (group % width and width % group) or (n * width) % group:
    x = _groups(packing.unpack(codes, bits).astype(jnp.float32), group)  # [..., D/g, g]
    x = zero[..., None].astype(jnp.float32) + x * scale[..., None].astype(jnp.float32)
    x = x.reshape(x.shape[:-2] + (n, width))
  else:  # groups inside planes (g <= W) or planes inside groups (g > W): no gather
    gp = min(group, width)
    c = packing.unpack_split(codes, bits).astype(jnp.float32)  # [..., n, W]
    c = c.reshape(c.shape[:-1] + (width // gp, gp))  # [..., n, W/gp, gp]

    def per_part(s):  # [..., D/g] -> [..., n, W/gp, 1]
      s = s.astype(jnp.float32)
      if group > width:
        s = jnp.repeat(s, group // width, axis=-1)  # [..., n]
      return s.reshape(s.shape[:-1] + (n, width // gp, 1))

    x = (per_part(zero) + c * per_part(scale)).reshape(c.shape[:-3] + (n, width))
  return x if planar else x.reshape(x.shape[:-2] + (n * width,))


def effective_bits(bits: int, group: int, dtype=jnp.float32) -> float:
  """Bits per element of one side (K or V), its scales and zeros included.

  ``group`` is the elements that share a scale (the page's tokens for keys, the channel group
  for values); 16-bit storage is the cache dtype, whose width it costs.
  """
  if bits == 16:
    return float(np.dtype(dtype).itemsize * 8)
  return bits + _SCALE_BITS / group


__all__ = ["SUPPORTED_BITS", "QUANT_BITS", "SCALE_DTYPE", "check_bits", "scale_zero",
           "quantize_keys", "dequantize_keys", "quantize_values", "dequantize_values",
           "effective_bits"]
