"""K or V storage of a slot pool at one bit width: plain arrays or quantized codes + scales.

A *store* is a pytree whose every leaf has the slot pool's leading axes ``[B, S, ...]``:

    bits == 16     an array [B, S, D] in the cache dtype
    bits in 8/4/2  QuantStore(codes [B, S, D*b/8] uint8, scale [B, S, D/g] f16, zero [B, S, D/g] f16)

Each slot carries its own scales (one scale + zero per group of ``g`` channels of its token),
so gathering, scattering and compacting slots move codes *with* their scales: a kept token's
dequantized value never changes when other tokens are evicted or the pool is re-packed. The
slot-pool primitives (:mod:`headkv_jax.slot_pool`) apply leaf by leaf (:func:`tree`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from headkv_jax import quantization


@flax.struct.dataclass
class QuantStore:
  """Quantized slots: ``codes [..., D*b/8]`` uint8, ``scale``/``zero [..., D/g]`` float16."""

  codes: jnp.ndarray
  scale: jnp.ndarray
  zero: jnp.ndarray


def empty(bits: int, lead: tuple[int, ...], head_dim: int, dtype, group: int):
  """A zero store with leading shape ``lead`` (e.g. ``(B, S)``)."""
  if bits == 16:
    return jnp.zeros(lead + (head_dim,), dtype)
  width = head_dim * bits // 8
  return QuantStore(codes=jnp.zeros(lead + (width,), jnp.uint8),
                    scale=jnp.zeros(lead + (head_dim // group,), quantization.SCALE_DTYPE),
                    zero=jnp.zeros(lead + (head_dim // group,), quantization.SCALE_DTYPE))


def encode(x, bits: int, group: int, dtype, channel=None):
  """``x [..., D]`` -> the store of those tokens (quantized once, per token and group).

  ``channel [..., 2, D]`` (broadcastable; quantized stores only): a per-channel shift and
  scale; the tokens are quantized as ``(x - shift) / scale`` and :func:`decode` undoes it
  (keys: see ``PagedKVCache.key_channels``)."""
  if bits == 16:
    return x.astype(dtype)
  if channel is not None:
    ch = channel.astype(jnp.float32)
    x = (x.astype(jnp.float32) - ch[..., 0, :]) / ch[..., 1, :]
  return QuantStore(*quantization.quantize_values(x, bits, group))


def decode(store, bits: int, group: int, dtype, channel=None, planar: bool = False):
  """A store (or a gathered view of one) ``[..., *]`` -> values ``[..., D]`` in ``dtype``
  (``x * scale + shift`` where :func:`encode` took a ``channel``; one rounding to ``dtype``).
  ``planar``: a quantized store's values as ``[..., n, D / n]`` (the same values, the channel
  axis split into the planes of its codes, which XLA:CPU dequantizes in vector code; see
  :func:`headkv_jax.quantization.dequantize_values`); a 16-bit store stays ``[..., D]``."""
  if bits == 16:
    return store
  x = quantization.dequantize_values(store.codes, store.scale, store.zero, bits, group,
                                     planar=planar)
  if channel is not None:
    ch = channel.astype(jnp.float32)
    shift, scale = ch[..., 0, :], ch[..., 1, :]  # [..., D]
    if planar:
      shift, scale = (a.reshape(a.shape[:-1] + x.shape[-2:]) for a in (shift, scale))
    x = x * scale + shift
  return x.astype(dtype)


def tree(fn, *stores):
  """``fn`` applied leaf by leaf to stores of one structure (gather, scatter, reshape ...)."""
  return jax.tree_util.tree_map(fn, *stores)


__all__ = ["QuantStore", "empty", "encode", "decode", "tree"]
