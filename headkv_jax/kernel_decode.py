"""Decode attention of :class:`~headkv_jax.paged_cache.PagedKVCache` through the Pallas kernel.

``PagedKVCache(attention_impl=...)`` picks how :meth:`PagedKVCache.attend` computes attention:
``"xla"`` gathers and dequantizes each head's slots tile by tile
(:func:`headkv_jax.attention.tile_loop`); ``"pallas"`` runs decode calls
(``T == 1``) in ``position_mode="original"`` through the fused kernel
(:func:`pallas_kernels.quantized_decode_attention.quantized_decode_attention`), which reads the
packed codes in place; ``"auto"`` (default) is ``"pallas"`` on a GPU backend and ``"xla"``
elsewhere (the kernel is Triton-only for now; TPU and CPU get XLA). Prefill chunks (``T > 1``)
and ``position_mode="cache_relative"`` (keys rotated by slot at attention time) always use
XLA, whatever the setting. Off a GPU the kernel runs in Pallas interpret mode, so
``attention_impl="pallas"`` works (slowly) in CPU tests.

One decode step (:func:`cached_partial`), per bit class (one kernel launch sees one bit pair):

* pools: the class's K/V stores ``[B, S_c, ...]`` reshaped to pages
  ``[B * S_c / page_size, page_size, ...]`` (a free reshape; row ``b``'s pages are
  ``b * S_c / page_size + ...``); the page table of a (row, head) is its region's pages
  (:meth:`PagedKVCache.page_table`); every head of the layer takes part, with length 0 outside
  the class (the kernel skips it); quantized keys are per token per ``quant_group`` channels
  (``key_axis="token"``) of keys normalised by the head's channel shift ``t`` and scale
  ``s``, which the query and the part's log-sum-exp take instead (``q . (k s + t) =
  (q s) . k + q . t``, the last the same for every key); 16-bit stores are passed as floats;
* full-precision window (quantized classes): the window's copy of a token must be used, not
  its codes. A head's tokens are in position order, so the window's tokens are among its
  first ``fp_sinks`` and last ``residual`` slots: the kernel attends the middle slots
  ``[lo, hi)`` (via its ``starts`` / ``ends``) and the edge slots are folded in by the
  library's tile core, reading the window's copy where it holds the position
  (``PagedKVCache._passes`` / ``_attend_pool(edges="only")``, the split the XLA path reads
  too). (Exact as long as positions are written in increasing order, as the cache is driven.)
* the parts are merged by :func:`headkv_jax.attention.merge_partials`; the new token and the
  policies' statistics are the caller's (the same code as the XLA path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from headkv_jax import attention
from headkv_jax import slot_store
from pallas_kernels import quantized_decode_attention as qda

ATTENTION_IMPLS = ("auto", "pallas", "xla")
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def check_impl(impl: str) -> str:
  """``impl`` if it is one of :data:`ATTENTION_IMPLS`, else a ValueError naming them."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}; got {impl!r}.")
  return impl


def on_gpu() -> bool:
  return jax.default_backend() in GPU_BACKENDS


_default_impl = "auto"


def set_default_impl(impl: str) -> None:
  """What ``attention_impl="auto"`` caches use in this process (the binaries'
  ``--attention_impl``); ``"auto"`` itself means "pallas" on a GPU backend, "xla" elsewhere.
  Set it before the first step is traced: compiled steps keep the choice they were traced
  with."""
  global _default_impl
  _default_impl = check_impl(impl)


def resolve_impl(impl: str) -> str:
  """"pallas" or "xla": ``"auto"`` follows :func:`set_default_impl`, then the backend
  ("pallas" on a GPU, "xla" elsewhere)."""
  check_impl(impl)
  if impl == "auto":
    impl = _default_impl
  if impl == "auto":
    return "pallas" if on_gpu() else "xla"
  return impl


def uses_kernel(cache, t: int) -> bool:
  """Static: whether ``cache.attend`` of ``t`` new tokens goes through the kernel."""
  return (t == 1 and cache.policy.position_mode == "original"
          and resolve_impl(cache.attention_impl) == "pallas")


def _pages(store, page_size: int):
  """A store ``[B, S_c, ...]`` -> (k_pages, scale, zero) of ``[B * S_c / page_size,
  page_size, ...]`` (scale / zero None for a 16-bit store)."""
  fn = lambda x: x.reshape((x.shape[0] * x.shape[1] // page_size, page_size) + x.shape[2:])
  if isinstance(store, slot_store.QuantStore):
    return fn(store.codes), fn(store.scale), fn(store.zero)
  return fn(store), None, None


def cached_partial(cache, layer, q_rows, positions, *,
                   block_sizes: qda.BlockSizes | None = None):
  """One decode token's attention over ``layer``'s cached slots through the kernel.

  Args:
    cache: the :class:`PagedKVCache` before the new token is written.
    layer: Python int or traced int32.
    q_rows: ``[B, Hkv, G, D]`` folded rotated queries, scaled by ``1/sqrt(D)`` (one token).
    positions: ``[B, 1]`` (``-1``: padding, whose row sees nothing, as in the XLA path).
    block_sizes: the kernel's :class:`BlockSizes` (default ``BlockSizes()``).

  Returns:
    ``((o, m, l), cache)``: the partial as :func:`headkv_jax.attention.tile_loop`'s, and
    the cache as its edge reads passed it on (write into this one).
  """
  b, hkv, g, d = q_rows.shape
  if positions.shape[1] != 1:
    raise ValueError(f"cached_partial takes one new token per row; got T={positions.shape[1]}.")
  lay = cache.layout
  ps = cache.page_size
  interpret = not on_gpu()
  block_sizes = block_sizes or qda.BlockSizes()
  q = (q_rows * d**0.5).reshape(b, hkv * g, d)  # unscaled: the kernel scales its logits
  table = cache.page_table(layer)  # [B, Hkv, P] page ids within a row's pool
  q_pos_rows = jnp.repeat(positions, g, axis=1)  # [B, G]
  parts = []
  for c in cache._layer_classes(layer):  # a class with no head here adds nothing
    pool = cache.pools[c]
    kb, vb = lay.pairs[c]
    kp, ks, kz = _pages(pool.k, ps)
    vp, vs, vz = _pages(pool.v, ps)
    rows_first = (jnp.arange(b, dtype=jnp.int32) * (pool.positions.shape[1] // ps))
    table_c = jnp.clip(table + rows_first[:, None, None], 0, kp.shape[0] - 1)
    # Slots [starts, ends) of each head through the kernel; with a full-precision window, the
    # edge slots it may hold through the library's tile core (PagedKVCache._passes).
    starts, ends, _ = cache._passes(layer, c, edges=False)  # [B, Hkv]; 0 outside the class
    channels = cache._key_channels(layer, c)  # [B, Hkv, 1, 2, D] or None
    if cache.pools[c].fp is not None:
      part, _, cache = cache._attend_pool(layer, c, q_rows, q_pos_rows, None,
                                          attention.empty_partial(b, hkv, g, d), edges="only")
      parts.append(part)
    q_c, shift = q, None
    if channels is not None:  # q . (k s + t) = (q s) . k + q . t, the last the same per key
      ch = channels.astype(jnp.float32)
      q_c = (q.reshape(b, hkv, g, d) * ch[..., 1, :]).reshape(b, hkv * g, d).astype(q.dtype)
      shift = jnp.sum(q_rows * ch[..., 0, :], axis=-1)  # [B, Hkv, G] scaled logit offset
    out_k, lse_k = qda.quantized_decode_attention(
        q_c, kp, ks, kz, vp, vs, vz, ends, table_c, k_bits=kb, v_bits=vb,
        value_group=cache.quant_group, key_axis="token", block_sizes=block_sizes,
        interpret=interpret, starts=starts)
    lse_k = lse_k.reshape(b, hkv, g)
    if shift is not None:
      lse_k = lse_k + shift
    seen = jnp.isfinite(lse_k)  # (out, lse) as a partial: o = out, m = lse, l = 1
    parts.append((out_k.reshape(b, hkv, g, d), jnp.where(seen, lse_k, attention.NEG_INF),
                  seen.astype(jnp.float32)))
  o, m, l = attention.merge_partials([attention.empty_partial(b, hkv, g, d)] + parts)
  real = (positions[:, 0] >= 0)[:, None, None]  # [B, 1, 1]: padding rows see nothing
  return (jnp.where(real[..., None], o, 0.0), jnp.where(real, m, attention.NEG_INF),
          jnp.where(real, l, 0.0)), cache


__all__ = ["ATTENTION_IMPLS", "check_impl", "resolve_impl", "uses_kernel", "cached_partial"]
