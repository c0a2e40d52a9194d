"""Decode attention of :class:`~headkv_jax.paged_cache.PagedKVCache` through the Pallas kernel.

``PagedKVCache(attention_impl=...)`` picks how :meth:`PagedKVCache.attend` computes attention:
``"xla"`` dequantizes each head's view and calls
:func:`headkv_jax.attention.attention_over_slots`; ``"pallas"`` runs decode calls
(``T == 1``) in ``position_mode="original"`` through the fused kernel
(:func:`pallas_kernels.quantized_decode_attention.quantized_decode_attention`), which reads the
packed codes in place; ``"auto"`` (default) is ``"pallas"`` on a GPU backend and ``"xla"``
elsewhere (the kernel is Triton-only for now; TPU and CPU get XLA). Prefill chunks (``T > 1``)
and ``position_mode="cache_relative"`` (keys rotated by slot at attention time) always use
XLA, whatever the setting. Off a GPU the kernel runs in Pallas interpret mode, so
``attention_impl="pallas"`` works (slowly) in CPU tests.

One decode step, per bit class of the layer (one kernel launch sees one bit pair):

* pools: the class's K/V stores ``[B, S_c, ...]`` reshaped to pages
  ``[B * S_c / page_size, page_size, ...]`` (a free reshape; row ``b``'s pages are
  ``b * S_c / page_size + ...``); the page table of a (row, head) is its region's pages from
  ``lc.offsets``; quantized keys are per token per ``quant_group`` channels
  (``key_axis="token"``), 16-bit stores are passed as floats;
* full-precision window (quantized classes): the window's copy of a token must be used, not
  its codes. A head's tokens are in position order, its sinks (positions ``< fp_sinks``) are
  among its first ``fp_sinks`` slots and the window's recent tokens (the last ``residual``
  positions written) among its last ``residual`` slots, so the kernel attends slots
  ``[n_head, length - n_tail)`` only (``n_head = min(fp_sinks, length)``, ``n_tail =
  min(residual, length - n_head)``, via the kernel's ``starts``) and those first / last slots
  are attended here in jnp, each read from the window where the window holds its position and
  dequantized from its slot otherwise: exactly what :meth:`PagedKVCache.view` returns. (Exact
  as long as no window-held token sits in the middle, i.e. the window's recent entries are
  the head's most recent positions: positions are written in increasing order, as the cache
  is driven.)
* the new token (its rotated key and value) in jnp;
* the parts are merged exactly by log-sum-exp, and the per-slot probabilities the policies'
  statistics need come from :func:`quantized_decode_probs` with the merged ``lse`` (skipped
  for a policy without statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax import cache_layout
from headkv_jax import fp_window
from headkv_jax import slot_pool
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


def decode_attention(cache, layer: int, qg, k_new, v_new, positions, pc, *,
                     block_sizes: qda.BlockSizes | None = None, need_probs: bool = True):
  """Decode attention of one layer through the kernel (see the module docstring).

  Args:
    cache: the :class:`PagedKVCache` before the new token is written.
    layer: Python int.
    qg: ``[B, Hkv, G, 1, D]`` rotated queries; ``k_new, v_new``: ``[B, Hkv, 1, D]`` the new
      token's rotated key and value; ``positions``: ``[B, 1]`` (``-1``: padding, which gets
      zero output and zero probabilities, as in the XLA path).
    pc: ``[B, Hkv, C]`` positions of the per-head view (:meth:`PagedKVCache.slot_view`).
    block_sizes: the kernel's :class:`BlockSizes` (default ``BlockSizes()``).
    need_probs: compute the probabilities (False: zeros of the right shape).

  Returns:
    ``out [B, Hkv, G, 1, D]`` in ``v_new.dtype`` and ``probs [B, Hkv, G, 1, C + 1]`` float32
    (cached slots in view order, then the new token), as ``attention_over_cache``.
  """
  b, hkv, g, t, d = qg.shape
  if t != 1:
    raise ValueError(f"decode_attention takes one new token per row; got T={t}.")
  lc = cache.layers[layer]
  view_len = pc.shape[-1]
  ps = cache.page_size
  max_pages = -(-view_len // ps)
  interpret = not on_gpu()
  block_sizes = block_sizes or qda.BlockSizes()
  q_valid = positions[:, 0] >= 0  # [B]
  qf = qg[:, :, :, 0].astype(jnp.float32)  # [B, Hkv, G, D]
  scale = d**-0.5
  hi = jax.lax.Precision.HIGHEST
  new_logit = jnp.einsum("bhgd,bhd->bhg", qf, k_new[:, :, 0].astype(jnp.float32),
                         precision=hi) * scale  # [B, Hkv, G]

  outs, probs, lses = [], [], []
  for c, cls in enumerate(cache.classes(layer)):
    heads = np.asarray(cls.heads)
    hc = len(heads)
    kb, vb = cls.bits
    kp, ks, kz = _pages(lc.k[c], ps)
    vp, vs, vz = _pages(lc.v[c], ps)
    pages_per_row = cls.slots // ps
    local = lc.offsets[:, heads] - cls.base  # [B, Hc] first class slot of each region
    first = local // ps + (jnp.arange(b, dtype=jnp.int32) * pages_per_row)[:, None]
    table = first[:, :, None] + jnp.arange(max_pages, dtype=jnp.int32)  # [B, Hc, P]
    table = jnp.minimum(table, kp.shape[0] - 1)  # past a region: masked by its length
    lengths = lc.lengths[:, heads]  # [B, Hc]
    q_c = qf[:, heads].reshape(b, hc * g, d)  # (qg[:, heads, :, 0] would move Hc first)
    fp = lc.fp[c]
    sinks, residual = cache.fp_sinks, cache.residual
    if fp is not None:
      n_head = jnp.minimum(sinks, lengths)
      n_tail = jnp.minimum(residual, lengths - n_head)
      starts, ends = n_head, lengths - n_tail
      # The excluded slots: the first `sinks` and the last `n_tail` of each region.
      j = jnp.arange(sinks + residual, dtype=jnp.int32)
      cand = jnp.where(j < sinks, j, ends[:, :, None] + (j - sinks))  # [B, Hc, F]
      cand_ok = jnp.where(j < sinks, j < n_head[:, :, None], (j - sinks) < n_tail[:, :, None])
      cand = jnp.where(cand_ok, cand, 0)
      slot = jnp.clip(local[:, :, None] + cand, 0, cls.slots - 1)  # class slots [B, Hc, F]
      k_w = slot_store.decode(slot_store.tree(lambda x: slot_pool.gather(x, slot), lc.k[c]),
                              kb, cache.quant_group, cache.dtype)
      v_w = slot_store.decode(slot_store.tree(lambda x: slot_pool.gather(x, slot), lc.v[c]),
                              vb, cache.quant_group, cache.dtype)
      pos_w = jnp.where(cand_ok, jnp.take_along_axis(pc[:, heads], cand, axis=2), -1)
      k_w, v_w, _ = fp_window.read(fp, pos_w, k_w, v_w, sinks, residual)
      w_logit = jnp.einsum("bhgd,bhfd->bhgf", qf[:, heads], k_w.astype(jnp.float32),
                           precision=hi) * scale
      w_logit = jnp.where(cand_ok[:, :, None, :], w_logit, -jnp.inf)  # [B, Hc, G, F]
    else:
      starts, ends = jnp.zeros_like(lengths), lengths
    kw = dict(k_bits=kb, v_bits=vb, value_group=cache.quant_group, key_axis="token")
    out_k, lse_k = qda.quantized_decode_attention(
        q_c, kp, ks, kz, vp, vs, vz, ends, table, **kw, block_sizes=block_sizes,
        interpret=interpret, starts=starts)
    out_k = out_k.reshape(b, hc, g, d)
    lse_k = lse_k.reshape(b, hc, g)
    l_new = new_logit[:, heads]  # [B, Hc, G]: finite, so the merged lse is finite
    parts = [lse_k[..., None], l_new[..., None]] + ([w_logit] if fp is not None else [])
    lse = jax.nn.logsumexp(jnp.concatenate(parts, axis=-1), axis=-1)  # [B, Hc, G]
    out = (jnp.exp(lse_k - lse)[..., None] * out_k
           + jnp.exp(l_new - lse)[..., None] * v_new[:, heads].astype(jnp.float32))
    if fp is not None:
      p_w = jnp.exp(w_logit - lse[..., None])  # [B, Hc, G, F]; 0 where not a candidate
      out += jnp.einsum("bhgf,bhfd->bhgd", p_w, v_w.astype(jnp.float32), precision=hi)
    outs.append(out)
    lses.append(lse)
    if need_probs:
      p = qda.quantized_decode_probs(q_c, kp, ks, kz, ends, table, lse.reshape(b, hc * g),
                                     k_bits=kb, key_axis="token", starts=starts)
      p = p.reshape(b, hc, g, -1)
      if fp is not None:  # the candidates' slots hold 0 in p (outside [starts, ends))
        idx = jnp.where(cand_ok, cand, p.shape[-1])[:, :, None, :]  # [B, Hc, 1, F]
        rows = jnp.arange(b)[:, None, None, None]
        hh = jnp.arange(hc)[None, :, None, None]
        gg = jnp.arange(g)[None, None, :, None]
        p = p.at[rows, hh, gg, idx].add(p_w, mode="drop")
      probs.append(p[..., :view_len])

  cat = lambda xs: cache_layout.join_classes(xs, cache.classes(layer))
  lse = cat(lses)  # [B, Hkv, G]
  out = jnp.where(q_valid[:, None, None, None], cat(outs), 0.0)[:, :, :, None]
  if need_probs:
    p_new = jnp.exp(new_logit - lse)
    probs = jnp.concatenate([cat(probs), p_new[..., None]], axis=-1)  # [B, Hkv, G, C + 1]
    probs = jnp.where(q_valid[:, None, None, None], probs, 0.0)[:, :, :, None]
  else:
    probs = jnp.zeros((b, hkv, g, 1, view_len + 1), jnp.float32)
  return out.astype(v_new.dtype), probs


__all__ = ["ATTENTION_IMPLS", "check_impl", "resolve_impl", "uses_kernel", "decode_attention"]
