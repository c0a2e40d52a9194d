"""Prefill once, compress many ways: one-shot eviction of one prompt under many policies.

One-shot compression (SnapKV's setting, and the needle tables of HeadKV / Ada-KV) prefills the
whole prompt with exact attention, then evicts once. The prompt's keys, values and the first
new token are then the same for every method; only the per-slot statistic each policy ranks by
differs. So a budget sweep need not prefill once per (method, budget): record the statistics
of *every* policy in one prefill, then build each method's compressed cache from them::

    cache = RecordingCache.create(dense_cache, window=32)      # wraps a DenseKVCache
    logits, cache = model(prompt, positions, cache)             # one chunk: the whole prompt
    small = compress_prompt(cache, budgets, policy)   # per method, jit-able

``compress_prompt`` fills a :class:`PagedKVCache` with the prompt and each token's statistic,
then runs the cache's own ``rechunk`` (which evicts with the policy's own ``select_keep``), so
the kept tokens are those the per-method path (``PagedKVCache.attend`` on the whole prompt,
then ``compress``) keeps; ``tests/test_prompt_stats.py`` checks it on a tiny model.

The statistics, per layer and query head (reduced to KV heads per policy, by its
``gqa_reduce``):

    accumulated  [B, Hkv, G, P]     attention each key received, summed over every prompt query
                                    (H2O's score; a second pass over the causal attention, so
                                    recorded only when asked: ``accumulate=True``)
    window       [B, Hkv, G, W, P]  attention of the last ``W`` real queries (oldest first);
                                    the SnapKV family sums its last ``window <= W`` of them

Only the "original" position mode is supported (keys stored rotated at their positions).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax import attention
from headkv_jax import cache_attention
from headkv_jax import policies as policies_lib
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.jit import traced
from headkv_jax.paged_cache import PagedKVCache

QUERY_BLOCK = 256  # queries per block when summing attention (bounds the logits' memory)


def attention_stats(q, k, positions, window: int, lse_rows=None,
                    query_block: int = QUERY_BLOCK, accumulate: bool = True):
  """Per-key attention statistics of one causal prompt.

  Args:
    q: ``[B, T, Hq, D]`` queries rotated at their positions (unscaled).
    k: ``[B, T, Hkv, D]`` keys rotated at their positions.
    positions: ``[B, T]`` int32, ``-1`` for padding (a row's real tokens form a prefix).
    window: ``W``, how many of each row's last real queries to keep separately.
    lse_rows: ``[B, Hkv, T * G]`` the row log-sum-exps of the prompt's own attention (what
      the dense cache's attention returns), or None to compute them here.
    query_block: queries per block of the tiled loops.
    accumulate: whether to sum every query's attention (``accumulated``; None without it).

  Returns:
    ``accumulated [B, Hkv, G, T]`` and ``window [B, Hkv, G, W, T]`` float32 probabilities
    (softmax over the visible keys, as ``cache_attention.attention_over_cache``; padding
    queries and the window slots of a row shorter than ``W`` contribute zeros).
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  accumulated = None
  if accumulate:
    if lse_rows is None:
      _, m, l = attention.causal_attention(q, k, k, positions, block_size=query_block)
      lse_rows = attention.row_lse(m, l)
    # Accumulated: column sums of the causal softmax, from the row log-sum-exps.
    accumulated = attention.causal_key_sums(q, k, positions, lse_rows, block_size=query_block,
                                            key_block=query_block)

  # Window: the last W real queries of each row, oldest first, against every key.
  qg = (q.astype(jnp.float32) * d**-0.5).reshape(b, t, hkv, g, d)
  qg = qg.transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
  kt = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  n_real = jnp.sum(positions >= 0, axis=1)  # [B]
  idx = n_real[:, None] - window + jnp.arange(window)  # [B, W]
  ok = idx >= 0
  safe = jnp.clip(idx, 0, t - 1)
  q_win = jnp.take_along_axis(qg, safe[:, None, None, :, None], axis=3)  # [B, Hkv, G, W, D]
  pos_win = jnp.where(ok, jnp.take_along_axis(positions, safe, axis=1), -1)  # [B, W]
  kp = positions[:, None, None, None, :]
  qp = pos_win[:, None, None, :, None]
  mask = (kp >= 0) & (kp <= qp) & (qp >= 0)
  logits = jnp.einsum("bhgtd,bhsd->bhgts", q_win, kt, preferred_element_type=jnp.float32)
  return accumulated, cache_attention.masked_softmax(logits, mask)


def slot_scores(policy: policies_lib.Policy, accumulated, window_probs):
  """One layer's per-token statistic ``[B, Hkv, T]`` for ``policy`` (what its cache collects
  while attending: H2O's accumulated attention, the SnapKV family's observation window; the
  KeyDiff modes rank by the held keys' novelty too, which the cache computes when it
  evicts).

  ``accumulated [B, Hkv, G, T]`` (None if not recorded) and ``window_probs [B, Hkv, G, W,
  T]`` come from :func:`attention_stats`; the SnapKV family needs ``policy.window <= W``.
  """
  kind = policy.score_kind
  if kind == "accumulate":
    if accumulated is None:
      raise ValueError(f"Policy {policy.name!r} ranks by the attention every query gave, and "
                       "this prefill did not record it; record with accumulate=True (see "
                       "models.method_driver.record_accumulated).")
    return policies_lib.reduce_group(accumulated, policy.gqa_reduce, axis=2)
  if kind == "window":
    w = window_probs.shape[3]
    if policy.window > w:
      raise ValueError(f"Policy {policy.name!r} has window={policy.window} but only the last "
                       f"{w} queries were recorded; record with window >= {policy.window}.")
    per = jnp.sum(window_probs[:, :, :, w - policy.window:], axis=3)
    return policies_lib.reduce_group(per, policy.gqa_reduce, axis=2)  # [B, Hkv, T]
  return jnp.zeros(window_probs.shape[:2] + window_probs.shape[4:], jnp.float32)


@flax.struct.dataclass
class RecordingCache:
  """A dense cache that also records each layer's :func:`attention_stats` (a pytree).

  Drive it with one model call over the whole prompt (one-shot prefill); a second call would
  record statistics of that call's queries only, so :func:`check_one_shot` refuses a cache
  whose statistics do not cover every token it holds.

  The statistics are indexed by cache slot, over the dense cache's whole capacity (the call
  fills slots ``[0, T)``; the rest are zero): their shapes follow the capacity, not the
  prompt, so one compiled compression serves every prompt of one capacity.

  Attributes:
    dense: the wrapped :class:`DenseKVCache` (attention and K/V storage).
    accumulated, window_probs: per layer, the statistics (None before the layer ran;
      ``accumulated`` stays None unless ``accumulate``), last axis the capacity.
    seen: int32 scalar, the tokens (columns, padding included) of the call the statistics
      come from; :func:`check_one_shot` compares it with the tokens held.
    window: ``W``, static.
    accumulate: whether ``accumulated`` is recorded (H2O needs it; it costs a second pass
      over the causal attention: a 2,000-token SmolLM2 prefill took 5.3 s with it and 4.6 s
      without on 2 CPU cores), static.
  """

  dense: DenseKVCache
  accumulated: tuple
  window_probs: tuple
  seen: jax.Array
  window: int = flax.struct.field(pytree_node=False)
  accumulate: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def create(cls, dense: DenseKVCache, window: int,
             accumulate: bool = True) -> "RecordingCache":
    if window < 0:
      raise ValueError(f"window must be >= 0, got {window}.")
    n = len(dense.layers)
    return cls(dense=dense, accumulated=(None,) * n, window_probs=(None,) * n,
               seen=jnp.zeros((), jnp.int32), window=int(window), accumulate=bool(accumulate))

  @property
  def nbytes(self) -> int:
    return self.dense.nbytes

  def token_counts(self):
    return self.dense.token_counts()

  def layer_view(self, layer: int) -> "RecordingCache":
    """Layer ``layer`` as a one-layer recording cache (for layer-by-layer prefill)."""
    return self.replace(dense=self.dense.layer_view(layer),
                        accumulated=(self.accumulated[layer],),
                        window_probs=(self.window_probs[layer],))

  def with_layer_view(self, layer: int, view: "RecordingCache") -> "RecordingCache":
    """This cache with layer ``layer`` (storage and statistics) taken from ``view``."""

    def put(seq, x):
      return seq[:layer] + x + seq[layer + 1:]

    return self.replace(dense=self.dense.with_layer_view(layer, view.dense),
                        accumulated=put(self.accumulated, view.accumulated),
                        window_probs=put(self.window_probs, view.window_probs),
                        seen=view.seen)

  def attend(self, layer: int, q, k, v, positions, rope):
    """The dense cache's attention, plus this call's statistics for ``layer``."""
    out, lse_rows, dense = self.dense.attend_with_lse(layer, q, k, v, positions, rope)
    acc, win = attention_stats(rope.apply(q, positions), rope.apply(k, positions), positions,
                               self.window, lse_rows, accumulate=self.accumulate)
    # Slots [T, capacity) of a one-shot call hold nothing: zero statistics (a second call's
    # statistics would not match its slots; check_one_shot refuses that cache by `seen`).
    t, room = k.shape[1], dense.layers[layer].positions.shape[-1]
    pad = lambda x: None if x is None else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, max(room - t, 0))])
    acc, win = pad(acc), pad(win)

    def put(seq, x):
      return seq[:layer] + (x,) + seq[layer + 1:]

    return out, self.replace(dense=dense, accumulated=put(self.accumulated, acc),
                             window_probs=put(self.window_probs, win),
                             seen=jnp.asarray(t, jnp.int32))


def compress_prompt(recorded: RecordingCache, budgets, policy: policies_lib.Policy, *,
                    decode_chunk: int | None = None, page_size: int = 16, bits=None,
                    residual: int | None = None, quant_group: int | None = None,
                    fp_sinks: int | None = None, rope=None) -> PagedKVCache:
  """The compressed cache ``policy`` keeps of a one-shot prefill, ready for decoding.

  Args:
    recorded: a :class:`RecordingCache` after one model call over the whole prompt.
    budgets: ``[layers, Hkv]`` ints (or one int), as ``PagedKVCache.create``.
    policy: any policy but "oracle" (it needs the answer's attention), in "original" mode.
    decode_chunk: the returned cache's ``chunk_size`` (default ``page_size``: decoding's
      room, so an amortised eviction runs at most once per page of new tokens per head).
    page_size: slots per page.
    bits: per-head storage bits as ``PagedKVCache.create`` takes them (None: 16).
    residual: full-precision recent tokens of a quantized head (None: the cache default).
    quant_group: channels per scale + zero of a quantized token (None: the cache default).
    fp_sinks: full-precision first tokens of a quantized head (None: the cache default).
    rope: the model's RoPE (the KeyDiff score modes need it; see ``PagedKVCache.create``).

  Returns:
    A :class:`PagedKVCache` holding each head's kept tokens (``rechunk(decode_chunk)``).
  """
  if policy.name == "oracle":
    raise ValueError("compress_prompt cannot run policy 'oracle': it ranks by the answer's "
                     "attention, which a prompt prefill does not see.")
  if policy.position_mode != "original":
    raise ValueError(f"compress_prompt supports position_mode='original' only, got "
                     f"{policy.position_mode!r}.")
  if any(w is None for w in recorded.window_probs):
    raise ValueError("The recording cache has no statistics yet; run the prompt through the "
                     "model first (one call, the whole prompt).")
  layers = recorded.dense.layers
  b, hkv, _, d = layers[0].k.shape
  t = recorded.window_probs[0].shape[-1]  # slots the statistics cover: the capacity
  cache = PagedKVCache.create(len(layers), b, hkv, d, budgets, policy, chunk_size=t,
                              dtype=layers[0].k.dtype, page_size=page_size, bits=bits,
                              rope=rope, quant_group=quant_group,
                              **{k: v for k, v in (('residual', residual), ('fp_sinks', fp_sinks))
                                 if v is not None})
  # Every layer's recording stacked, so one compiled loop body appends any layer.
  stack = lambda xs: jnp.stack(list(xs))
  ks, vs = stack(lc.k[:, :, :t] for lc in layers), stack(lc.v[:, :, :t] for lc in layers)
  pos = stack(lc.positions[:, :t] for lc in layers)  # [L, B, T]
  win = stack(recorded.window_probs)
  acc = stack(recorded.accumulated) if recorded.accumulate else None

  def append(i, cache):
    # The recorded call filled slots [0, t) of every row (padding holds position -1).
    scores = slot_scores(policy, None if acc is None else acc[i], win[i])
    return cache.append(i, ks[i], vs[i], pos[i], scores)

  cache = jax.lax.fori_loop(0, len(layers), append, cache)
  return cache.rechunk(page_size if decode_chunk is None else decode_chunk)


def check_one_shot(recorded: RecordingCache) -> None:
  """Raises if the recorded statistics miss tokens the dense cache holds (several calls)."""
  lengths = recorded.dense.layers[0].lengths
  if traced(lengths):  # shapes only (jax.eval_shape): nothing to check
    return
  held = int(np.max(np.asarray(lengths)))
  seen = int(recorded.seen)
  if held > seen:
    raise ValueError(f"The cache holds {held} tokens but its statistics cover the last call's "
                     f"{seen}; prefill the whole prompt in one call for shared compression.")


__all__ = ["QUERY_BLOCK", "attention_stats", "slot_scores", "RecordingCache",
           "compress_prompt", "check_one_shot"]
