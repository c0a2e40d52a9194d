"""Fused decode attention over paged, quantized K/V (one query token per sequence).

One program of the grid ``(batch, kv_head, split)`` owns the ``G`` query heads of one KV head
(GQA folded into the block's rows, padded to ``block_h``) and one chunk of that head's page
table (split-K / flash-decoding). It walks its pages ``pages_per_block`` at a time: it gathers
the pages' packed codes and float16 scales from the flat pools, unpacks the planar codes
(:mod:`pallas_kernels.packing`) with shifts and masks and dequantizes *the loaded block only*
(registers / shared memory; the cache itself is never rewritten in float), and keeps an
online softmax. The splits' partial results are merged with a log-sum-exp combine in jnp.
The op returns ``(out, lse)`` so a caller can merge it exactly with attention over other
tokens (the full-precision sink / residual window)::

    lse = logaddexp(lse_1, lse_2);  out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2

Formats (``b`` bits, ``D`` head_dim, ``g`` value_group; see ``headkv_jax.quantization``):
keys ``uint8 [N, page, D*b/8]`` + scale/zero ``f16 [N, D]`` (``key_axis="channel"``: per
channel per page, KIVI) or ``f16 [N, page, D/g]`` (``key_axis="token"``: per token per group
of ``g`` channels, exactly like values; what ``headkv_jax.paged_cache`` stores); values
``uint8 [N, page, D*b/8]`` + scale/zero ``f16 [N, page, D/g]`` (per token per channel group);
16 bits means the pool holds floats and has no scales. Key scales multiply the logits:
per channel they scale the query (``q * s_K . codes + q . z_K``), per token each logit of a
channel group (``s_t (q_g . codes_t) + z_t sum(q_g)``); value scales multiply probabilities.

Backend: the kernel is written for, and asks explicitly for, the **Triton** lowering
(``compiler_params=pallas.triton.CompilerParams``). Reasons: (1) since jax 0.9 a plain GPU
``pallas_call`` goes to Mosaic GPU, and jax 0.10+ already warns that ``pl.pallas_call`` for
Mosaic GPU is itself deprecated in favour of ``plgpu.kernel`` (a warpgroup/TMA programming
model with explicit SMEM pipelines that a gather of pages through a page table does not map to
without a rewrite); (2) the Triton path lowers array-indexed (gather) loads of whole pages,
2-D dots, shifts and masks, which is all this kernel needs, and it is what jax's own
``ops/gpu/paged_attention.py`` used; (3) jax 0.11.x deprecates Triton (a warning) but still
ships it, so it runs on the lent GPU's jax 0.11.x. A Mosaic GPU (``plgpu.kernel``) port is the
future path once Triton is removed. ``tests/test_quantized_decode_kernel.py`` checks the CUDA
lowering on a CPU host. On CPU the kernel runs with ``interpret=True``.

GPU (Triton) requirements, checked when ``interpret=False``: ``page_size``, ``D``,
``pages_per_block`` and ``block_h`` powers of two; ``block_h >= 16``, ``pages_per_block *
page_size >= 16``, packed key planes ``D*k_bits/8 >= 16`` channels (token keys: chunks
``min(D*k_bits/8, value_group) >= 16``) and value chunks ``min(D*v_bits/8, value_group) >= 16``
(Triton's smallest dot). Dots run at DEFAULT precision (TF32 on NVIDIA); interpret mode
computes them in float32.

Integration notes: pools are passed whole (a full-array BlockSpec) and pages are gathered
through the page table inside the kernel, so the pool size is not limited by the kernel (Triton
switches to 64-bit offsets above 4 GiB); ``lengths`` must not exceed ``max_pages * page_size``;
optional ``starts`` mask a head's first slots (slots ``start <= slot < length`` are attended; a
caller attends the excluded ones elsewhere, e.g. the cache's full-precision sink / residual
tokens, and merges by ``lse``); ``lse`` is over the *scaled* logits ``q.k / sqrt(D)``; query
rows are padded to ``block_h`` (the padding's work is wasted, so G = 3 costs like 16 rows;
decode is memory-bound, bytes dominate).

TPU: future work. A TPU variant would take ``lengths`` and the page table as scalar prefetch
(``PrefetchScalarGridSpec``) and DMA pages into VMEM from an ``ANY``-space pool, as
``ops/tpu/paged_attention`` does; it would share :func:`_dequantize_block`'s math but not the
gather / loop structure, so it is not attempted here.

H2O statistics: :func:`quantized_decode_probs` recomputes each slot's probability from the
returned ``lse`` in plain jnp (no extra kernel output; exact against the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels import packing

ALLOWED_BITS = (16, 8, 4, 2)
KEY_AXES = ("channel", "token")  # one key scale covers a page's channel / a token's group
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf in the kernel


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tuning knobs of the kernel.

  Attributes:
    pages_per_block: pages gathered and attended per inner-loop step (the block of
      ``pages_per_block * page_size`` tokens).
    num_splits: chunks each head's page table is split into (independent programs, merged by
      log-sum-exp); more splits fill more SMs at small batch.
    block_h: rows of the query block (a KV head's ``G`` query heads, zero-padded); ``None``:
      the next power of two >= max(G, 16).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """

  pages_per_block: int = 8
  num_splits: int = 8
  block_h: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("pages_per_block", "num_splits", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int; got {value!r}.")
    if self.block_h is not None and (not isinstance(self.block_h, int) or self.block_h < 1):
      raise ValueError(f"BlockSizes.block_h must be None or a positive int; got {self.block_h!r}.")


def _dequantize_block(codes, scale, zero, plane: int, bits: int):
  """Plane ``plane`` of packed ``codes`` (uint8) -> float32 ``zero + code * scale``."""
  c = packing.plane(codes, plane, bits).astype(jnp.float32)
  return zero.astype(jnp.float32) + c * scale.astype(jnp.float32)


def _value_chunks(head_dim: int, v_bits: int, value_group: int):
  """Static ``(byte_offset, width)`` chunks of a packed value row; one scale group each."""
  width = packing.packed_width(head_dim, v_bits)
  chunk = min(width, value_group)
  return [(off, chunk) for off in range(0, width, chunk)], width


def _key_chunks(head_dim: int, k_bits: int, value_group: int):
  """Static ``(byte_offset, width)`` chunks of a packed key row at ``key_axis="token"``: each
  chunk's plane ``j`` is the channels ``[j * Wk + off, j * Wk + off + width)``, one group."""
  width = packing.packed_width(head_dim, k_bits)
  chunk = min(width, value_group)
  return [(off, chunk) for off in range(0, width, chunk)], width


def quantized_decode_attention_kernel(
    q_ref,  # [block_h, D] float32, pre-scaled by D**-0.5
    k_pages_ref,  # [N, page_size, D*k_bits/8] uint8 (or [N, page_size, D] float at 16 bits)
    k_scale_ref,  # [N, D] ("channel") / [N, page_size, D/value_group] ("token") f16; None: 16
    k_zero_ref,  # same shape as k_scale_ref
    v_pages_ref,  # [N, page_size, D*v_bits/8] uint8 (or [N, page_size, D] float at 16 bits)
    v_scale_ref,  # [N, page_size, D/value_group] float16, or None at 16 bits
    v_zero_ref,  # [N, page_size, D/value_group] float16, or None at 16 bits
    span_ref,  # [2] int32: (start, length) of this (row, KV head): slots [start, length) live
    page_table_ref,  # [pages_per_split] int32: this split's page ids (clipped into the pool)
    o_ref,  # [block_h, D] float32: unnormalised partial output of this split
    m_ref,  # [block_h] float32: running max of this split's logits
    l_ref,  # [block_h] float32: softmax denominator of this split
    *,
    k_bits: int,
    v_bits: int,
    value_group: int,
    pages_per_block: int,
    key_axis: str = "channel",
):
  split = pl.program_id(2)
  block_h, head_dim = q_ref.shape
  page_size = k_pages_ref.shape[1]
  pages_per_split = page_table_ref.shape[0]
  block_k = pages_per_block * page_size
  split_start = split * pages_per_split * page_size  # first token of this split
  start = span_ref[0]
  length = span_ref[1]
  split_len = pages_per_split * page_size
  lo = jnp.clip(start - split_start, 0, split_len)  # this split's live tokens: [lo, hi)
  hi = jnp.clip(length - split_start, 0, split_len)
  hi = jnp.maximum(hi, lo)
  first_block = lo // block_k
  n_blocks = jnp.where(hi > lo, (hi + block_k - 1) // block_k, first_block)  # every block in
  # [first_block, n_blocks) holds >= 1 live token (the online softmax's max stays finite)

  k_planes = 1 if k_bits == 16 else packing.codes_per_byte(k_bits)
  k_width = head_dim // k_planes
  token_keys = key_axis == "token" and k_bits != 16
  if token_keys:  # (byte offset, width, plane, q chunk, sum of the q chunk) per key group
    k_chunks, _ = _key_chunks(head_dim, k_bits, value_group)
    key_parts = []
    for off, width in k_chunks:
      for j in range(k_planes):
        qc = q_ref[:, pl.ds(j * k_width + off, width)]  # [block_h, width]
        key_parts.append((off, width, j, qc, qc.sum(axis=1)))
  else:
    q_planes = [q_ref[:, pl.ds(j * k_width, k_width)] for j in range(k_planes)]  # [block_h, Wk]
  if v_bits == 16:
    chunk_starts = [0]
    chunk_width = head_dim
  else:
    v_chunks, v_width = _value_chunks(head_dim, v_bits, value_group)
    chunk_width = v_chunks[0][1]
    chunk_starts = [j * v_width + off for off, _ in v_chunks
                    for j in range(packing.codes_per_byte(v_bits))]  # the body's order

  def body(i, carry):
    m_prev, l_prev, accs = carry
    ids = page_table_ref[pl.ds(i * pages_per_block, pages_per_block)]  # [ppb]
    token = split_start + i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    live = (token >= start) & (token < length)  # [block_k]

    logits = jnp.zeros((block_h, block_k), jnp.float32)
    if token_keys:  # logit += s_t (q_g . codes_t) + z_t sum(q_g), one channel group a part
      loaded = {}
      for off, width, j, qc, qsum in key_parts:
        if off not in loaded:  # each byte chunk is loaded once, unpacked k_planes times
          loaded[off] = k_pages_ref[ids, :, pl.ds(off, width)]  # [ppb, page_size, width]
        c = packing.plane(loaded[off], j, k_bits).astype(jnp.float32)
        group = (j * k_width + off) // value_group
        scale = k_scale_ref[ids, :, group].astype(jnp.float32).reshape(block_k)
        zero = k_zero_ref[ids, :, group].astype(jnp.float32).reshape(block_k)
        raw = pltriton.dot(qc, c.reshape(block_k, width), trans_b=True)  # [block_h, block_k]
        logits += raw * scale[None, :] + qsum[:, None] * zero[None, :]
    else:
      codes = k_pages_ref[ids]  # [ppb, page_size, Wk] uint8, or [ppb, page_size, D] float
      for j in range(k_planes):
        if k_bits == 16:
          k = codes.astype(jnp.float32)
        else:
          scale = k_scale_ref[ids, pl.ds(j * k_width, k_width)]  # [ppb, Wk]
          zero = k_zero_ref[ids, pl.ds(j * k_width, k_width)]  # [ppb, Wk]
          k = _dequantize_block(codes, scale[:, None, :], zero[:, None, :], j, k_bits)
        k = k.reshape(block_k, k_width)  # [block_k, Wk]
        logits += pltriton.dot(q_planes[j], k, trans_b=True)  # [block_h, block_k]
    logits = jnp.where(live[None, :], logits, _MASK_VALUE)  # dead slots may be NaN

    m_next = jnp.maximum(m_prev, logits.max(axis=1))  # [block_h]; finite: a live token
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(logits - m_next[:, None])  # [block_h, block_k]
    l_next = alpha * l_prev + p.sum(axis=1)

    new_accs = []
    if v_bits == 16:
      v = v_pages_ref[ids].astype(jnp.float32).reshape(block_k, head_dim)
      v = jnp.where(live[:, None], v, 0.0)  # unused slots may hold NaN: 0 * NaN = NaN
      new_accs.append(alpha[:, None] * accs[0] + pltriton.dot(p, v))
    else:
      n_planes = packing.codes_per_byte(v_bits)
      idx = 0
      for off, width in v_chunks:  # each byte chunk is loaded once, unpacked n_planes times
        codes = v_pages_ref[ids, :, pl.ds(off, width)]  # [ppb, page_size, width] uint8
        for j in range(n_planes):
          group = (j * v_width + off) // value_group
          scale = v_scale_ref[ids, :, group]  # [ppb, page_size]
          zero = v_zero_ref[ids, :, group]  # [ppb, page_size]
          v = _dequantize_block(codes, scale[:, :, None], zero[:, :, None], j, v_bits)
          v = jnp.where(live[:, None], v.reshape(block_k, width), 0.0)  # [block_k, width]
          new_accs.append(alpha[:, None] * accs[idx] + pltriton.dot(p, v))
          idx += 1
    return m_next, l_next, tuple(new_accs)

  m0 = jnp.full((block_h,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((block_h,), jnp.float32)
  accs0 = tuple(jnp.zeros((block_h, chunk_width), jnp.float32) for _ in chunk_starts)
  m, l, accs = lax.fori_loop(first_block, n_blocks, body, (m0, l0, accs0))
  for start, acc in zip(chunk_starts, accs):
    o_ref[:, pl.ds(start, chunk_width)] = acc
  m_ref[...] = m
  l_ref[...] = l


def _full_spec(x):
  if x is None:
    return None
  return pl.BlockSpec(x.shape, lambda b, h, s, _n=x.ndim: (0,) * _n)


def _pallas_decode(q4, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, span3, table4, *,
                   k_bits, v_bits, value_group, block_sizes, interpret, key_axis):
  """The pallas_call: q4 [B, Hkv, block_h, D], table4 [B, Hkv, S, pages_per_split]."""
  batch, kv_heads, block_h, head_dim = q4.shape
  num_splits, pages_per_split = table4.shape[2:]
  kernel = functools.partial(
      quantized_decode_attention_kernel, k_bits=k_bits, v_bits=v_bits,
      value_group=value_group, pages_per_block=block_sizes.pages_per_block, key_axis=key_axis)
  pools = (k_pages, k_scale, k_zero, v_pages, v_scale, v_zero)
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, block_h, head_dim), lambda b, h, s: (b, h, 0, 0)),
          *[_full_spec(x) for x in pools],  # flat pools: pages are gathered in-kernel
          pl.BlockSpec((None, None, 2), lambda b, h, s: (b, h, 0)),
          pl.BlockSpec((None, None, None, pages_per_split), lambda b, h, s: (b, h, s, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits, block_h, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits, block_h), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits, block_h), jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name=f"quantized_decode_attention_k{k_bits}v{v_bits}"
           + ("_tokenkeys" if key_axis == "token" and k_bits != 16 else ""),
  )(q4, *pools, span3, table4)


def _combine_splits(o, m, l):
  """Log-sum-exp merge over axis 2 of o [B, Hkv, S, R, D], m / l [B, Hkv, S, R]."""
  m_max = m.max(axis=2)
  m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)  # all splits empty: avoid -inf - -inf
  w = jnp.exp(m - m_safe[:, :, None])  # [B, Hkv, S, R]
  l_tot = (w * l).sum(axis=2)
  o_tot = (w[..., None] * o).sum(axis=2)
  out = jnp.where(l_tot[..., None] > 0, o_tot / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
  return out, m_safe + jnp.log(l_tot)  # log(0) = -inf for an empty head


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _expect(name, x, shape, dtype_kind=None):
  if x is None:
    raise ValueError(f"{name} is required here (shape {shape}); got None.")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}.")
  if dtype_kind == "uint8" and x.dtype != jnp.uint8:
    raise ValueError(f"{name} must be uint8 packed codes; got {x.dtype}.")
  if dtype_kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array; got {x.dtype}.")


def _check_group(value_group, head_dim, bits, what):
  """``value_group`` divides ``head_dim`` and divides / is divided by the packed row width."""
  if not isinstance(value_group, int) or value_group < 1 or head_dim % value_group:
    raise ValueError(f"value_group must be a positive divisor of head_dim={head_dim}; "
                     f"got {value_group!r}.")
  width = packing.packed_width(head_dim, bits)
  if max(width, value_group) % min(width, value_group):
    raise ValueError(f"value_group={value_group} and the packed {what} row of {width} "
                     f"bytes must divide one another (head_dim={head_dim}, bits={bits}).")


def _validate(q, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, lengths, page_table, *,
              k_bits, v_bits, value_group, block_sizes, interpret, key_axis="channel",
              starts=None):
  """Shape / bits checks shared by the kernel and the reference; returns (G, page_size)."""
  if key_axis not in KEY_AXES:
    raise ValueError(f"Unsupported key_axis={key_axis!r}; allowed: {list(KEY_AXES)}.")
  for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
    if bits not in ALLOWED_BITS:
      raise ValueError(f"Unsupported {name}={bits!r}; allowed: {list(ALLOWED_BITS)}.")
  if v_bits > k_bits:
    raise ValueError(f"Values may not have more bits than keys (keys are the sensitive side). "
                     f"Got k_bits={k_bits} and v_bits={v_bits}.")
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim]; got shape {tuple(q.shape)}.")
  batch, q_heads, head_dim = q.shape
  if page_table.ndim != 3 or page_table.shape[:2] != (batch, page_table.shape[1]):
    raise ValueError(f"page_table must be [batch={batch}, kv_heads, max_pages]; got shape "
                     f"{tuple(page_table.shape)}.")
  kv_heads = page_table.shape[1]
  if q_heads % kv_heads:
    raise ValueError(f"Number of Q heads must be divisible by number of KV heads. "
                     f"Got {q_heads} and {kv_heads}.")
  if tuple(lengths.shape) != (batch, kv_heads):
    raise ValueError(f"lengths must have shape {(batch, kv_heads)}; got {tuple(lengths.shape)}.")
  if starts is not None and tuple(starts.shape) != (batch, kv_heads):
    raise ValueError(f"starts must have shape {(batch, kv_heads)}; got {tuple(starts.shape)}.")
  for name, x in (("lengths", lengths), ("page_table", page_table), ("starts", starts)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array; got {x.dtype}.")
  if k_pages.ndim != 3:
    raise ValueError(f"k_pages must be [num_pages, page_size, width]; got shape "
                     f"{tuple(k_pages.shape)}.")
  num_pages, page_size = k_pages.shape[:2]
  if k_bits == 16:
    _expect("k_pages", k_pages, (num_pages, page_size, head_dim), "float")
    if k_scale is not None or k_zero is not None:
      raise ValueError("k_scale and k_zero must be None when k_bits=16.")
  else:
    _expect("k_pages", k_pages, (num_pages, page_size, packing.packed_width(head_dim, k_bits)),
            "uint8")
    if key_axis == "token":
      _check_group(value_group, head_dim, k_bits, "key")
      k_scale_shape = (num_pages, page_size, head_dim // value_group)
    else:
      k_scale_shape = (num_pages, head_dim)
    _expect("k_scale", k_scale, k_scale_shape, "float")
    _expect("k_zero", k_zero, k_scale_shape, "float")
  if v_bits == 16:
    _expect("v_pages", v_pages, (num_pages, page_size, head_dim), "float")
    if v_scale is not None or v_zero is not None:
      raise ValueError("v_scale and v_zero must be None when v_bits=16.")
  else:
    _check_group(value_group, head_dim, v_bits, "value")
    v_width = packing.packed_width(head_dim, v_bits)
    _expect("v_pages", v_pages, (num_pages, page_size, v_width), "uint8")
    groups = head_dim // value_group
    _expect("v_scale", v_scale, (num_pages, page_size, groups), "float")
    _expect("v_zero", v_zero, (num_pages, page_size, groups), "float")
  group = q_heads // kv_heads
  block_h = block_sizes.block_h or max(16, 1 << (group - 1).bit_length())
  if block_h < group:
    raise ValueError(f"BlockSizes.block_h={block_h} is smaller than the GQA group {group}.")
  if not interpret:
    _validate_triton(head_dim, page_size, block_h, k_bits, v_bits, value_group, block_sizes,
                     key_axis)
  return group, page_size, block_h


def _validate_triton(head_dim, page_size, block_h, k_bits, v_bits, value_group, block_sizes,
                     key_axis="channel"):
  for name, n in (("head_dim", head_dim), ("page_size", page_size), ("block_h", block_h),
                  ("pages_per_block", block_sizes.pages_per_block)):
    if not _is_pow2(n):
      raise ValueError(f"The Triton kernel needs {name} to be a power of two; got {n}.")
  k_width = head_dim if k_bits == 16 else packing.packed_width(head_dim, k_bits)
  if k_bits != 16 and key_axis == "token":
    k_width = min(k_width, value_group)
  v_width = head_dim if v_bits == 16 else min(packing.packed_width(head_dim, v_bits),
                                              value_group)
  for name, n in (("block_h", block_h), ("pages_per_block * page_size",
                                         block_sizes.pages_per_block * page_size),
                  ("key plane width D*k_bits/8 (token keys: min(D*k_bits/8, value_group))",
                   k_width),
                  ("value chunk min(D*v_bits/8, value_group)", v_width)):
    if n < 16:
      raise ValueError(f"Triton dots need {name} >= 16; got {n}.")


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "value_group", "block_sizes",
                                             "interpret", "key_axis"))
def quantized_decode_attention(q, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, lengths,
                               page_table, *, k_bits, v_bits, value_group,
                               block_sizes=BlockSizes(), interpret=False, key_axis="channel",
                               starts=None):
  """Decode attention of ``q [B, Hq, D]`` over paged quantized K/V -> ``(out, lse)``.

  Args:
    q: [B, Hq, D] queries (rotated, unscaled); Hq = Hkv * G, head h uses KV head h // G.
    k_pages, k_scale, k_zero, v_pages, v_scale, v_zero: the flat page pools (module docstring).
    lengths: [B, Hkv] int32 tokens held per (row, KV head), in page-table order.
    page_table: [B, Hkv, max_pages] int32 page ids; entries past a head's pages are ignored
      (clipped into range, never read unmasked).
    k_bits, v_bits: bits in {16, 8, 4, 2}, v_bits <= k_bits.
    value_group: channels sharing one value scale (and one key scale at key_axis="token";
      ignored when neither side uses it).
    block_sizes: :class:`BlockSizes`.
    interpret: run the kernel in Pallas interpret mode (CPU).
    key_axis: "channel" (k_scale [N, D], per channel per page) or "token" (k_scale
      [N, page_size, D/value_group], per token per channel group, as values).
    starts: optional [B, Hkv] int32: slots ``< start`` of a head are not attended (default 0).

  Returns:
    out [B, Hq, D] float32 (0 for an empty head) and lse [B, Hq] float32 (-inf when empty).
  """
  group, _, block_h = _validate(
      q, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, lengths, page_table,
      k_bits=k_bits, v_bits=v_bits, value_group=value_group, block_sizes=block_sizes,
      interpret=interpret, key_axis=key_axis, starts=starts)
  batch, q_heads, head_dim = q.shape
  kv_heads, max_pages = page_table.shape[1:]
  num_pages = k_pages.shape[0]
  q4 = (q.astype(jnp.float32) * head_dim**-0.5).reshape(batch, kv_heads, group, head_dim)
  q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, block_h - group), (0, 0)))  # [B, Hkv, block_h, D]
  ppb = block_sizes.pages_per_block
  num_splits = max(1, min(block_sizes.num_splits, pl.cdiv(max_pages, ppb)))
  blocks_per_split = 1 << (pl.cdiv(pl.cdiv(max_pages, num_splits), ppb) - 1).bit_length()
  pages_per_split = blocks_per_split * ppb  # a power-of-two number of blocks (Triton loads)
  table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
  table = jnp.pad(table, ((0, 0), (0, 0), (0, num_splits * pages_per_split - max_pages)))
  table4 = table.reshape(batch, kv_heads, num_splits, pages_per_split)
  if starts is None:
    starts = jnp.zeros_like(lengths)
  span3 = jnp.stack([starts.astype(jnp.int32), lengths.astype(jnp.int32)], axis=-1)
  o, m, l = _pallas_decode(
      q4, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, span3, table4, k_bits=k_bits,
      v_bits=v_bits, value_group=value_group, block_sizes=block_sizes, interpret=interpret,
      key_axis=key_axis)
  out, lse = _combine_splits(o[:, :, :, :group], m[:, :, :, :group], l[:, :, :, :group])
  return out.reshape(batch, q_heads, head_dim), lse.reshape(batch, q_heads)


# ------------------------------------------------------------------ jnp reference (oracle)


def _slot_logits(q, k_pages, k_scale, k_zero, page_table, *, k_bits, key_axis="channel"):
  """Scaled logits of every slot of every head's pages: [B, Hkv, G, max_pages * page_size].

  Keys are never dequantized: logits = (q * s_K) . codes + q . z_K, per page ("channel"), or
  s_t (q_g . codes_t) + z_t sum(q_g) per token t and channel group g ("token").
  """
  batch, q_heads, head_dim = q.shape
  kv_heads, max_pages = page_table.shape[1:]
  table = jnp.clip(page_table, 0, k_pages.shape[0] - 1)
  qg = (q.astype(jnp.float32) * head_dim**-0.5).reshape(batch, kv_heads, -1, head_dim)
  hi = lax.Precision.HIGHEST
  if k_bits == 16:
    k = k_pages[table].astype(jnp.float32)  # [B, Hkv, P, page, D]
    logits = jnp.einsum("bhgd,bhptd->bhgpt", qg, k, precision=hi)
  elif key_axis == "token":
    codes = packing.unpack(k_pages[table], k_bits).astype(jnp.float32)  # [B, Hkv, P, page, D]
    groups = k_scale.shape[-1]
    codes = codes.reshape(codes.shape[:-1] + (groups, head_dim // groups))
    scale = k_scale[table].astype(jnp.float32)  # [B, Hkv, P, page, D/g]
    zero = k_zero[table].astype(jnp.float32)
    qk = qg.reshape(qg.shape[:-1] + (groups, head_dim // groups))  # [B, Hkv, G, D/g, g]
    raw = jnp.einsum("bhgkc,bhptkc->bhgptk", qk, codes, precision=hi)
    logits = (raw * scale[:, :, None] + qk.sum(-1)[:, :, :, None, None] * zero[:, :, None]
              ).sum(-1)
  else:
    codes = packing.unpack(k_pages[table], k_bits).astype(jnp.float32)  # [B, Hkv, P, page, D]
    scale = k_scale[table].astype(jnp.float32)  # [B, Hkv, P, D]
    zero = k_zero[table].astype(jnp.float32)
    qs = qg[:, :, :, None, :] * scale[:, :, None]  # [B, Hkv, G, P, D]
    logits = jnp.einsum("bhgpd,bhptd->bhgpt", qs, codes, precision=hi)
    logits += jnp.einsum("bhgd,bhpd->bhgp", qg, zero, precision=hi)[..., None]
  return logits.reshape(batch, kv_heads, qg.shape[2], max_pages * k_pages.shape[1])


def _slot_live(lengths, num_slots, starts=None):
  slot = jnp.arange(num_slots)[None, None, :]
  live = slot < lengths[:, :, None]  # [B, Hkv, slots]
  return live if starts is None else live & (slot >= starts[:, :, None])


def quantized_decode_attention_reference(q, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero,
                                         lengths, page_table, *, k_bits, v_bits, value_group,
                                         block_sizes=BlockSizes(), interpret=False,
                                         key_axis="channel", starts=None):
  """Plain-jnp oracle of :func:`quantized_decode_attention` (gathers pages, no Pallas).

  ``block_sizes`` and ``interpret`` are accepted for signature parity and ignored.
  """
  _validate(q, k_pages, k_scale, k_zero, v_pages, v_scale, v_zero, lengths, page_table,
            k_bits=k_bits, v_bits=v_bits, value_group=value_group, block_sizes=block_sizes,
            interpret=True, key_axis=key_axis, starts=starts)
  batch, q_heads, head_dim = q.shape
  kv_heads, max_pages = page_table.shape[1:]
  slots = max_pages * k_pages.shape[1]
  logits = _slot_logits(q, k_pages, k_scale, k_zero, page_table, k_bits=k_bits,
                        key_axis=key_axis)
  live = _slot_live(lengths, slots, starts)[:, :, None, :]  # [B, Hkv, 1, slots]
  logits = jnp.where(live, logits, -jnp.inf)
  m = logits.max(axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(live, jnp.exp(logits - m), 0.0)  # [B, Hkv, G, slots]
  denom = p.sum(axis=-1)
  table = jnp.clip(page_table, 0, k_pages.shape[0] - 1)
  hi = lax.Precision.HIGHEST
  if v_bits == 16:
    v = v_pages[table].astype(jnp.float32).reshape(batch, kv_heads, slots, head_dim)
    v = jnp.where(live[:, :, 0, :, None], v, 0.0)
    o = jnp.einsum("bhgs,bhsd->bhgd", p, v, precision=hi)
  else:  # value scales multiply the probabilities: sum_t (p_t s_t) c_t + sum_t p_t z_t
    groups = head_dim // value_group
    codes = packing.unpack(v_pages[table], v_bits).astype(jnp.float32)
    codes = codes.reshape(batch, kv_heads, slots, groups, value_group)
    scale = v_scale[table].astype(jnp.float32).reshape(batch, kv_heads, slots, groups)
    zero = v_zero[table].astype(jnp.float32).reshape(batch, kv_heads, slots, groups)
    keep = live[:, :, 0, :, None]
    scale, zero = jnp.where(keep, scale, 0.0), jnp.where(keep, zero, 0.0)
    o = jnp.einsum("bhgs,bhsk,bhski->bhgki", p, scale, codes, precision=hi)
    o += jnp.einsum("bhgs,bhsk->bhgk", p, zero, precision=hi)[..., None]
    o = o.reshape(batch, kv_heads, -1, head_dim)
  out = jnp.where(denom[..., None] > 0, o / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
  lse = m[..., 0] + jnp.log(denom)
  return out.reshape(batch, q_heads, head_dim), lse.reshape(batch, q_heads)


def quantized_decode_probs(q, k_pages, k_scale, k_zero, lengths, page_table, lse, *, k_bits,
                           key_axis="channel", starts=None):
  """Attention probability of every slot, [B, Hq, max_pages * page_size] float32 (0 if unused).

  Recomputed in jnp from the ``lse`` the kernel returned (for H2O's accumulated scores); slot
  ``p * page_size + t`` is token ``t`` of the head's ``p``-th page-table entry. Rows sum to 1
  (0 for an empty head). Pass the *merged* lse to get probabilities over all tokens. With
  ``key_axis="token"`` the channel group follows from ``k_scale``'s last axis (``D / g``);
  slots outside ``[starts, lengths)`` get 0.
  """
  if key_axis not in KEY_AXES:
    raise ValueError(f"Unsupported key_axis={key_axis!r}; allowed: {list(KEY_AXES)}.")
  batch, q_heads, _ = q.shape
  kv_heads, max_pages = page_table.shape[1:]
  slots = max_pages * k_pages.shape[1]
  logits = _slot_logits(q, k_pages, k_scale, k_zero, page_table, k_bits=k_bits,
                        key_axis=key_axis)
  lse4 = lse.reshape(batch, kv_heads, -1, 1)
  live = _slot_live(lengths, slots, starts)[:, :, None, :] & jnp.isfinite(lse4)
  probs = jnp.where(live, jnp.exp(jnp.where(live, logits - lse4, 0.0)), 0.0)
  return probs.reshape(batch, q_heads, slots)


__all__ = ["ALLOWED_BITS", "KEY_AXES", "BlockSizes", "quantized_decode_attention",
           "quantized_decode_attention_kernel", "quantized_decode_attention_reference",
           "quantized_decode_probs"]
