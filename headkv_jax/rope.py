"""Rotary position embeddings (RoPE) as a small pytree.

The cache needs RoPE as much as the model does: in ``position_mode="cache_relative"``
(StreamingLLM) keys are stored *before* rotation and rotated by their slot inside the cache,
so the rotation lives here, in the library, and the models hand a :class:`RoPE` to the cache.

Convention: Hugging Face's ``rotate_half`` layout (the first and second halves of ``head_dim``
form the complex pairs), which is what Llama/Mistral/Qwen2 checkpoints in HF form expect.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.struct
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "llama3", "linear")


@flax.struct.dataclass
class RoPE:
  """Rotary embedding tables.

  Attributes:
    inv_freq: ``[head_dim // 2]`` float32 inverse frequencies (after any scaling).
    attention_scaling: multiplies cos/sin (1.0 for every rope type supported here).
  """

  inv_freq: jnp.ndarray
  attention_scaling: float = flax.struct.field(pytree_node=False, default=1.0)
  # (positions, cos, sin) precomputed by :meth:`at`, or None.
  table: tuple | None = None

  def angles(self, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions ``[...]`` int -> cos, sin ``[..., head_dim // 2]`` float32 of the angles
    ``position * inv_freq``, unscaled by ``attention_scaling``: every rotation by positions
    (the model's and the cache's) takes its angles from here."""
    angles = positions.astype(jnp.float32)[..., None] * self.inv_freq  # [..., D/2]
    return jnp.cos(angles), jnp.sin(angles)

  def rotate(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """The one RoPE formula: ``x [..., D]`` rotated by the angles ``cos, sin [..., D/2]``
    (broadcast; HF rotate_half layout, the pair of channel ``i`` is ``i + D/2``), scaled by
    ``attention_scaling``; float32 math, ``x``'s dtype out."""
    cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

  def turns(self, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin ``[n, head_dim // 2]`` float32 of the angles ``i * inv_freq``, ``i < n``,
    unscaled by ``attention_scaling``: the table :func:`headkv_jax.slot_pool.rotate_run`
    reads runs' first angles and offsets from."""
    angles = jnp.arange(n, dtype=jnp.float32)[:, None] * self.inv_freq  # [n, D/2]
    return jnp.cos(angles), jnp.sin(angles)

  def digit_turns(self) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin ``[3, 256, head_dim // 2]`` float32 of the angles ``d * 256**i * inv_freq``
    (digit ``d`` of base 256 at place ``i``), unscaled: the table
    :func:`headkv_jax.slot_pool.rotate` composes any position below ``2**24`` from."""
    places = jnp.asarray([1.0, 256.0, 65536.0], jnp.float32)[:, None]
    digits = jnp.arange(256, dtype=jnp.float32)[None, :] * places  # [3, 256]
    angles = digits[..., None] * self.inv_freq  # [3, 256, D/2]
    return jnp.cos(angles), jnp.sin(angles)

  def at(self, positions: jnp.ndarray, angles=None) -> "RoPE":
    """This RoPE with the angles of ``positions`` computed once (or given: ``angles = (cos,
    sin)`` from :meth:`angles` of the same positions, e.g. made by another program).

    :meth:`apply` called with that very ``positions`` array reads them instead of
    computing them again. It matters on XLA:CPU: fused into a rotation, cos and sin are
    evaluated again for every head and every channel pair, and a 2,048-token prefill's
    query rotation took 4.9 ms against 0.14 ms from given angles (one SmolLM2 layer).
    """
    cos, sin = self.angles(positions) if angles is None else angles
    return self.replace(table=(positions, cos, sin))

  def apply(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """Rotates ``x [B, T, H, D]`` by ``positions [B, T]``; computed in float32."""
    if self.table is not None and self.table[0] is positions:  # see :meth:`at`
      cos, sin = self.table[1:]
    else:
      cos, sin = self.angles(positions)  # [B, T, D/2]
    return self.rotate(x, cos[:, :, None, :], sin[:, :, None, :])


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` for the rope types in :data:`ROPE_TYPES`.

  ``scaling`` is a Hugging Face ``rope_scaling`` dict (``rope_type`` or legacy ``type``);
  ``None`` means the default rope.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  rope_type = rope_type_of(scaling)
  if rope_type == "default":
    return inv_freq.astype(np.float32)
  if rope_type == "linear":
    return (inv_freq / float(scaling["factor"])).astype(np.float32)
  # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
  factor = float(scaling["factor"])
  low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
  high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
  old_context = float(scaling["original_max_position_embeddings"])
  low_freq_wavelen = old_context / low_freq_factor
  high_freq_wavelen = old_context / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
  """The rope type named by an HF ``rope_scaling`` dict; raises for unsupported ones."""
  if not scaling:
    return "default"
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(
        f"Unsupported rope type {rope_type!r} in rope_scaling={dict(scaling)}; "
        f"supported: {', '.join(ROPE_TYPES)}."
    )
  return rope_type
