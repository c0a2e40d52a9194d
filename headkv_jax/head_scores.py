"""Head scores: what each attention head does, measured on probe prompts.

Every function here is a pure function of one sample's attention probabilities

  attn: ``[layers, q_heads, T_query, T_key]`` float, causal, each row sums to 1

plus the token-index annotations that the probe generators in ``experiments/probes.py``
return. Each returns ``[layers, q_heads]`` float64 scores in [0, 1]; average them over probe
samples, then fold query heads into KV heads with :func:`reduce_to_kv_heads` (the cache is
stored once per KV head, so that is the unit a budget is given to).

The scores (see design.md, "Head profiling and allocation"):

- :func:`retrieval_score` (Wu et al., "Retrieval Head"): on needle-copy probes, the share
  of copy steps at which the head's top-1 key is a needle token equal to the token being
  emitted.
- :func:`retrieval_reasoning_score` (HeadKV-R2): the attention weight that the head's top-N
  keys put inside the answer span.
- :func:`induction_score`: on a repeated random sequence, the attention from the second
  copy to the token after the earlier occurrence of the current token.
- :func:`local_score`: the attention mass on the most recent ``window`` keys.

:func:`assign_roles` turns the three role scores into one :class:`Role` per head.

Positions (query rows, spans, copy starts) are absolute token positions. The map may hold
only the *last* ``T_query`` query rows (row i is the query at position
``i + T_key - T_query``): a long probe's full ``T x T`` maps do not fit in memory, and the
scores need only the rows they read.

Inputs may be numpy or jax arrays; the scores are computed in numpy (float64) because
profiling is offline and a few maps at a time.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np


class Role(enum.IntEnum):
  """What a head is for; the value is what a roles array stores."""

  RETRIEVAL = 0  # copies from far back in the context (needle heads)
  INDUCTION = 1  # continues a pattern seen earlier ([A][B] ... [A] -> [B])
  LOCAL = 2  # looks at the last few tokens (and the sinks); needs no long cache


ROLE_NAMES = tuple(role.name.lower() for role in Role)


def _as_attn(attn) -> np.ndarray:
  attn = np.asarray(attn, dtype=np.float64)
  if attn.ndim != 4 or attn.shape[2] > attn.shape[3]:
    raise ValueError(
        'attn must be [layers, q_heads, T_query, T_key] with T_query <= T_key. Got shape'
        f' {attn.shape}.')
  return attn


def _as_rows(name: str, positions, attn: np.ndarray) -> np.ndarray:
  """Absolute query positions ``[S]`` -> row indices into ``attn``'s query axis."""
  positions = np.asarray(positions, dtype=np.int64).reshape(-1)
  num_q, num_k = attn.shape[2:]
  if positions.size == 0:
    raise ValueError(f'{name} is empty; need at least one query position.')
  if positions.min() < num_k - num_q or positions.max() >= num_k:
    raise ValueError(f'{name} must lie in [{num_k - num_q}, {num_k}) (the query positions '
                     f'this map holds). Got {positions.tolist()}.')
  return positions - (num_k - num_q)


def _check_span(name: str, span: Sequence[int], num_keys: int) -> tuple[int, int]:
  start, end = (int(x) for x in span)
  if not 0 <= start < end <= num_keys:
    raise ValueError(f'{name} must be (start, end) with 0 <= start < end <= {num_keys}. '
                     f'Got {(start, end)}.')
  return start, end


def retrieval_score(attn, query_rows, target_key_pos, copied=None) -> np.ndarray:
  """Wu et al. retrieval score: how often the head's top-1 key is the copied needle token.

  With teacher forcing, the row that *emits* answer token j is the row of the token before
  it, so a probe with the answer at ``[a, a + S)`` has ``query_rows = [a-1, ..., a+S-2]``.

  Args:
    attn: ``[layers, q_heads, T_query, T_key]`` attention probabilities.
    query_rows: ``[S]`` int, the query positions that emit a needle token (one per copy
      step).
    target_key_pos: ``[S]`` int, the needle position holding the token row s emits; or
      ``[S, M]`` int padded with -1 when that token occurs at several needle positions
      (a repeated digit): landing on any of them counts, as in Wu et al., who check the
      token at the argmax position.
    copied: optional ``[S]`` bool, whether the model's own top-1 prediction at row s is
      that token. Steps where it is False score 0 for every head (Wu et al. count only
      tokens the model really copies); the denominator stays S (the needle length).

  Returns:
    ``[layers, q_heads]`` float64 in [0, 1].
  """
  attn = _as_attn(attn)
  rows = _as_rows('query_rows', query_rows, attn)
  targets = np.asarray(target_key_pos, dtype=np.int64)
  if targets.ndim == 1:
    targets = targets[:, None]  # [S, 1]
  if targets.ndim != 2 or targets.shape[0] != rows.size:
    raise ValueError(f'target_key_pos must be [S] or [S, M] with S = {rows.size} query '
                     f'rows. Got shape {targets.shape}.')
  if targets.max() >= attn.shape[3] or ((targets < 0) & (targets != -1)).any():
    raise ValueError(f'target_key_pos must lie in [0, {attn.shape[3]}) (or be -1 padding). '
                     f'Got {targets.tolist()}.')
  top1 = attn[:, :, rows, :].argmax(axis=-1)  # [layers, q_heads, S]
  hit = (top1[..., None] == targets).any(axis=-1)  # [layers, q_heads, S]
  if copied is not None:
    copied = np.asarray(copied, dtype=bool).reshape(-1)
    if copied.size != rows.size:
      raise ValueError(f'copied must be [S] = [{rows.size}]. Got {copied.size} values.')
    hit &= copied
  return hit.mean(axis=-1)


def retrieval_reasoning_score(attn, query_rows, answer_span, top_n: int) -> np.ndarray:
  """HeadKV-R2 score: the attention the head's top-N keys put inside the answer span.

  For each query row: take the head's ``top_n`` keys by attention (ties: lower position
  first), keep those inside ``answer_span``, sum their attention. Averaged over rows.

  Args:
    attn: ``[layers, q_heads, T_query, T_key]`` attention probabilities.
    query_rows: ``[S]`` int query positions (those that emit the answer).
    answer_span: ``(start, end)`` half-open key positions of the answer in the context.
    top_n: how many of each row's keys count (>= 1).

  Returns:
    ``[layers, q_heads]`` float64 in [0, 1].
  """
  attn = _as_attn(attn)
  rows = _as_rows('query_rows', query_rows, attn)
  start, end = _check_span('answer_span', answer_span, attn.shape[3])
  if not 1 <= int(top_n) <= attn.shape[3]:
    raise ValueError(f'top_n must be in [1, {attn.shape[3]}] (the number of keys). '
                     f'Got {top_n}.')
  picked = attn[:, :, rows, :]  # [layers, q_heads, S, T_key]
  # A stable sort of -attn puts the lower position first among equal weights.
  order = np.argsort(-picked, axis=-1, kind='stable')[..., :int(top_n)]  # [L, H, S, N]
  weights = np.take_along_axis(picked, order, axis=-1)  # [L, H, S, N]
  inside = (order >= start) & (order < end)
  return (weights * inside).sum(axis=-1).mean(axis=-1)


def induction_score(attn, first_start: int, second_start: int, length: int) -> np.ndarray:
  """Induction score on a sequence whose tokens ``[first_start, +length)`` repeat.

  Query ``second_start + j`` (the j-th token of copy 2, equal to token ``first_start + j``)
  should attend to ``first_start + j + 1``: the token that followed its earlier occurrence.
  Averaged over j in ``[0, length - 1)``; the last token of copy 2 is left out because its
  predecessor's successor is no longer part of copy 1.

  Returns:
    ``[layers, q_heads]`` float64 in [0, 1].
  """
  attn = _as_attn(attn)
  first_start, second_start, length = int(first_start), int(second_start), int(length)
  if length < 2 or first_start < 0 or second_start < first_start + length:
    raise ValueError(
        'need length >= 2, 0 <= first_start and first_start + length <= second_start. Got '
        f'first_start={first_start}, second_start={second_start}, length={length}.')
  j = np.arange(length - 1)
  rows = _as_rows('the second copy', second_start + j, attn)  # [length - 1]
  return attn[:, :, rows, first_start + j + 1].mean(axis=-1)


def local_score(attn, window: int, query_rows=None) -> np.ndarray:
  """Attention mass on the last ``window`` keys: keys k with ``q - window < k <= q``.

  Args:
    attn: ``[layers, q_heads, T_query, T_key]``.
    window: how many recent keys count as local (>= 1).
    query_rows: query positions to average over; default: every position the map holds
      that has keys outside the window (before that every head is trivially 100% local).

  Returns:
    ``[layers, q_heads]`` float64 in [0, 1].
  """
  attn = _as_attn(attn)
  num_q, num_k = attn.shape[2:]
  window = int(window)
  offset = num_k - num_q
  if window < 1:
    raise ValueError(f'window must be >= 1. Got {window}.')
  if query_rows is None:
    query_rows = np.arange(max(offset, window), num_k)
    if query_rows.size == 0:
      raise ValueError(f'window={window} covers every key of a {num_k}-token map; use a '
                       'longer probe or a smaller window.')
  rows = _as_rows('query_rows', query_rows, attn)
  pos = rows + offset  # [S] absolute position of each query row
  keys = np.arange(num_k)
  near = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)  # [S, K]
  return (attn[:, :, rows, :] * near).sum(axis=-1).mean(axis=-1)


def reduce_to_kv_heads(scores, num_kv_heads: int, how: str = 'mean') -> np.ndarray:
  """Fold query-head scores ``[layers, q_heads]`` into KV heads ``[layers, kv_heads]``.

  Query head h uses KV head ``h // (q_heads // kv_heads)`` (Hugging Face ``repeat_kv``
  layout). ``how`` is 'mean' (the group's typical behaviour) or 'max' (keep a KV head if
  any of its query heads needs it).
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [layers, q_heads]. Got shape {scores.shape}.')
  num_layers, num_q = scores.shape
  if num_kv_heads < 1 or num_q % num_kv_heads:
    raise ValueError('Number of Q heads must be divisible by number of KV heads. Got '
                     f'{num_q} and {num_kv_heads}.')
  grouped = scores.reshape(num_layers, num_kv_heads, num_q // num_kv_heads)  # [L, KV, G]
  if how == 'mean':
    return grouped.mean(axis=-1)
  if how == 'max':
    return grouped.max(axis=-1)
  raise ValueError(f"how must be 'mean' or 'max'. Got {how!r}.")


def normalize_scores(scores, how: str = 'max') -> np.ndarray:
  """Puts one score on a [0, 1] scale across all heads so different scores compare.

  'max' divides by the largest value (all-zero stays zero): it keeps the score's shape, so
  a score that only a few heads have (retrieval) stays high only for those heads. 'rank'
  maps to the average rank / (n - 1): robust to outliers but gives every score the same
  uniform spread, even when no head really has the property.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if np.isnan(scores).any() or (scores < 0).any():
    raise ValueError('scores must be non-negative and not NaN.')
  if how == 'max':
    top = scores.max() if scores.size else 0.0
    return scores / top if top > 0 else np.zeros_like(scores)
  if how == 'rank':
    flat = scores.reshape(-1)
    if flat.size < 2:
      return np.zeros_like(scores)
    order = np.argsort(flat, kind='stable')
    ranks = np.empty(flat.size)
    ranks[order] = np.arange(flat.size)
    for value in np.unique(flat):  # ties share their average rank
      tied = flat == value
      ranks[tied] = ranks[tied].mean()
    return (ranks / (flat.size - 1)).reshape(scores.shape)
  raise ValueError(f"how must be 'max' or 'rank'. Got {how!r}.")


def assign_roles(retrieval, induction, local, normalize: str = 'max') -> np.ndarray:
  """One :class:`Role` per head: the role whose normalized score is highest.

  Each score is normalized across all heads of the model (:func:`normalize_scores`, by
  default divide-by-max), then each head takes the argmax role. Divide-by-max is the
  default because the raw scales differ (local mass is ~0.5-1 for most heads, retrieval
  is 0 for most and high for a few) while their shapes carry the meaning: after it, a head
  is a retrieval head only if it is close to the model's best retrieval head *and* not
  closer to the best local head. Rank normalization would force every role's scores to
  the same uniform spread and call heads "retrieval" even in a model that fails the probe.

  Ties go to the earlier role (retrieval, then induction, then local): calling a
  retrieval head local costs accuracy, the reverse only memory.

  Args: ``[layers, heads]`` arrays (any matching shape). Returns int32 of that shape.
  """
  stacked = [normalize_scores(s, normalize) for s in (retrieval, induction, local)]
  if len({s.shape for s in stacked}) != 1:
    raise ValueError('retrieval, induction and local scores must have one shape. Got '
                     f'{[s.shape for s in stacked]}.')
  return np.argmax(np.stack(stacked), axis=0).astype(np.int32)  # first max wins
