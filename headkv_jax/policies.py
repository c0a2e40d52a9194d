"""Eviction policies: which of its slots each KV head keeps.

A policy never touches K/V. It sees one layer's *view* of every KV head's slots, in position
order (slot ``c`` of head ``h`` is the ``c``-th oldest token that head still holds):

    scores  [B, Hkv, C] float32   per-slot statistic the cache collected (meaning below)
    lengths [B, Hkv]    int32     slots in use; slots ``c >= lengths`` are empty
    budgets [Hkv]       int32     per-head budgets of this layer (may be traced)

and returns a keep mask ``[B, Hkv, C]``. :func:`compact` turns the mask into gather indices
that keep the survivors in position order. Everything is jit-able with static shapes and
vectorised over heads (ranks come from a stable argsort, never a Python loop over heads).

Selection rule (the numpy references in ``tests/test_policies.py`` spell out the same rule):
every head with ``length <= budget`` keeps everything; otherwise *forced* slots (the first
``n_sink`` and a recent window) rank first, the rest by a per-policy priority, ties broken
towards the older slot, and the head keeps its ``budget`` best.

=============  =====================================  ===========================================
policy         priority of a non-forced slot          recent window (forced)
=============  =====================================  ===========================================
full           (never evicts)                         -
streamingllm   slot index (newest first)              everything but the sinks
h2o            accumulated attention (``scores``)     ``budget - n_sink - (budget - n_sink) // 2``
snapkv         max-pool(``scores``, ``pool_kernel``)  ``window`` (the observation window)
pyramidkv      as snapkv (budgets fall with depth:    ``window``
               :func:`pyramid_budgets`)
headaware      as snapkv, per-head budgets given      ``window``
adakv          as snapkv, then per-head counts from   ``window``
               a layer-wide top-k (see below)
oracle         caller's answer-attention per slot     ``window`` (default 0)
=============  =====================================  ===========================================

``scores`` is what :meth:`PagedKVCache.attend` collects (``score_kind``): for h2o the
attention each slot received, summed over all queries so far; for the SnapKV family the
attention of the last ``window`` queries of the latest call (the observation window), summed
over those queries; with ``score_mode="accumulate"`` a SnapKV-family head adds each call's
window attention to what its slots already had instead (a question-agnostic memory across
prefill chunks: a token that earlier chunks' windows attended keeps that credit); with
``score_mode="keydiff"`` (KeyDiff, Park et al. 2025) a slot's statistic is no attention at all
but how far its key points from the head's other keys, :func:`key_novelty`, recomputed over
every slot the head holds at each call (question-agnostic: a needle's distinctive keys stand
out of a haystack that no later query has attended to yet); ``score_mode="keydiff_window"``
ranks by both, :func:`union_rank`: a slot is as good as its better rank under key novelty and
under the observation window's attention, so a head keeps the top of both lists in equal depth
(distinctive keys from earlier chunks, and what the latest window, the question in a prompt's
last chunk, attends). Query heads
of a GQA group are reduced to their KV head by ``gqa_reduce``
per call, so scores are stored once per KV head (for h2o with "max" the accumulated score is
the sum over calls of each call's group maximum).
SnapKV pools only over non-forced slots (as the paper pools ``attn[..., :-window]``).

adakv (Ada-SnapKV): a layer keeps ``sum(budgets)`` tokens in all. Head ``h`` first gets its
``floor_h = n_sink + window + floor(alpha * (budget_h - n_sink - window))`` best slots (the
uniform share); the rest of the layer's total goes to the best remaining slots over all heads
(flattened head-major, ties to the lower index). A head may therefore end above its own budget;
the cache sizes pools per layer so that this fits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

POLICY_NAMES = (
    "full", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "headaware", "oracle")
POSITION_MODES = ("original", "cache_relative")
GQA_REDUCES = ("mean", "max")
SCORE_MODES = ("latest", "accumulate", "keydiff", "keydiff_window")
SNAPKV_FAMILY = ("snapkv", "pyramidkv", "adakv", "headaware")
# headaware's defaults, tuned on needles at 2k tokens with SmolLM2-135M (see the README):
# its many small heads keep the attention sinks, and a wider pool keeps the whole needle span.
HEADAWARE_POOL_KERNEL = 21


@dataclasses.dataclass(frozen=True)
class Policy:
  """A validated policy and its knobs (hashable: a static argument under ``jit``).

  Build it with :func:`make_policy`, which fills the per-policy defaults.

  Attributes:
    name: one of :data:`POLICY_NAMES`.
    n_sink: first tokens every head keeps (streamingllm and headaware default 4, others 0).
    window: recent / observation window (SnapKV family default 32, oracle 0; unused by
      streamingllm and h2o, whose recent part is derived from the budget).
    pool_kernel: odd max-pool kernel along keys for the SnapKV family (default 7; headaware
      :data:`HEADAWARE_POOL_KERNEL`).
    gqa_reduce: how a GQA group's query heads reduce to their KV head: "mean" or "max".
    position_mode: "original" (keys stored rotated at their positions) or "cache_relative"
      (keys stored un-rotated and rotated by their slot at attention time, StreamingLLM).
    alpha: adakv's uniform share (default 0.2).
    score_mode: SnapKV family: "latest" (default; each call's observation window replaces the
      slots' scores, SnapKV), "accumulate" (added to them, summed over calls), "keydiff"
      (no attention: each slot's :func:`key_novelty` among the head's keys, KeyDiff) or
      "keydiff_window" (the better of a slot's two ranks, :func:`union_rank`).
  """

  name: str = "full"
  n_sink: int = 0
  window: int = 32
  pool_kernel: int = 7
  gqa_reduce: str = "mean"
  position_mode: str = "original"
  alpha: float = 0.2
  score_mode: str = "latest"

  def __post_init__(self):
    _check_choice("policy", self.name, POLICY_NAMES)
    _check_choice("position_mode", self.position_mode, POSITION_MODES)
    _check_choice("gqa_reduce", self.gqa_reduce, GQA_REDUCES)
    _check_choice("score_mode", self.score_mode, SCORE_MODES)
    if self.score_mode != "latest" and self.name not in SNAPKV_FAMILY:
      raise ValueError(f"score_mode={self.score_mode!r} is for the SnapKV family "
                       f"({', '.join(SNAPKV_FAMILY)}), not policy {self.name!r}.")
    if self.n_sink < 0:
      raise ValueError(f"n_sink must be >= 0, got {self.n_sink}.")
    if self.window < 0:
      raise ValueError(f"window must be >= 0, got {self.window}.")
    if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
      raise ValueError(f"pool_kernel must be an odd integer >= 1, got {self.pool_kernel}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")

  @property
  def score_kind(self) -> str:
    """Per-slot statistic the cache must collect: "none", "accumulate", "window" (attention
    of the observation window) or "keys" (:func:`key_novelty`, ``score_mode="keydiff"``)."""
    if self.name == "h2o":
      return "accumulate"
    if self.name in SNAPKV_FAMILY:
      return "keys" if self.score_mode == "keydiff" else "window"
    return "none"

  @property
  def uses_novelty(self) -> bool:
    """Whether the slots' statistic involves :func:`key_novelty` (the KeyDiff modes)."""
    return self.name in SNAPKV_FAMILY and self.score_mode.startswith("keydiff")

  @property
  def accumulates(self) -> bool:
    """Whether a call's statistic adds to the slots' earlier scores (h2o; the SnapKV family
    with ``score_mode="accumulate"``) rather than replacing them."""
    return self.score_kind == "accumulate" or self.score_mode == "accumulate"

  @property
  def adaptive(self) -> bool:
    """Whether a head may keep more than its own budget (layer-wide allocation)."""
    return self.name == "adakv"

  @property
  def min_budget(self) -> int:
    """Smallest budget this policy can honour: its forced slots plus one."""
    if self.name == "full":
      return 1
    if self.name == "h2o":
      return self.n_sink + 2  # one heavy hitter and one recent token
    if self.name == "streamingllm":
      return self.n_sink + 1
    return max(self.n_sink + self.window, 1)

  def check_budgets(self, budgets: np.ndarray) -> None:
    """Raises ValueError for a budget <= 0 or below :attr:`min_budget`."""
    budgets = np.asarray(budgets)
    for name, bad in (("must be positive", budgets <= 0),
                      (f"must be >= n_sink + window = {self.min_budget} for policy "
                       f"{self.name!r} (n_sink={self.n_sink}, window={self.window})",
                       budgets < self.min_budget)):
      if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"Budget {int(budgets[idx])} at (layer, kv_head)={idx} {name}.")


def make_policy(name: str, **overrides) -> Policy:
  """A :class:`Policy` with the defaults of ``name``; ``overrides`` set any field."""
  _check_choice("policy", name, POLICY_NAMES)
  defaults = {"n_sink": 4 if name in ("streamingllm", "headaware") else 0,
              "window": 0 if name == "oracle" else 32,
              "pool_kernel": HEADAWARE_POOL_KERNEL if name == "headaware" else 7}
  defaults.update(overrides)
  return Policy(name=name, **defaults)


def _check_choice(what: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {what} {value!r}; allowed: {', '.join(allowed)}.")


def pyramid_budgets(budget: int, num_layers: int, num_kv_heads: int, *,
                    min_budget: int = 1, beta: int = 20) -> np.ndarray:
  """PyramidKV budgets ``[layers, Hkv]``: linear in depth, from ``2*budget - b_min`` to ``b_min``.

  ``b_min = max(budget // beta, min_budget)``; the total is exactly ``budget * layers`` per
  head (the remainder of the rounding goes to the shallowest layers).
  """
  if budget <= 0:
    raise ValueError(f"budget must be positive, got {budget}.")
  b_min = min(max(budget // beta, min_budget), budget)
  b_max = 2 * budget - b_min
  per_layer = np.floor(np.linspace(b_max, b_min, num_layers)).astype(np.int64)
  per_layer[: budget * num_layers - per_layer.sum()] += 1
  return np.repeat(per_layer[:, None], num_kv_heads, axis=1)


# ---- selection (jnp) ----------------------------------------------------------------------


def recent_counts(policy: Policy, budgets):
  """Per-head size ``[Hkv]`` of the recent window that is always kept (numpy for numpy
  budgets, jnp for traced ones)."""
  xp = np if isinstance(budgets, (np.ndarray, list, tuple, int)) else jnp
  budgets = xp.asarray(budgets).astype(xp.int64 if xp is np else jnp.int32)
  if policy.name == "streamingllm":
    return budgets - policy.n_sink
  if policy.name == "h2o":
    rest = budgets - policy.n_sink
    return rest - rest // 2
  return xp.full_like(budgets, policy.window)


def forced_mask(policy: Policy, lengths, budgets, num_slots: int):
  """Bool ``[B, Hkv, C]``: the sinks and the recent window of every head."""
  c = jnp.arange(num_slots, dtype=jnp.int32)[None, None, :]  # [1, 1, C]
  length = lengths[:, :, None]  # [B, Hkv, 1]
  recent = jnp.asarray(recent_counts(policy, budgets), jnp.int32)[None, :, None]
  return (c < length) & ((c < policy.n_sink) | (c >= length - recent))


def max_pool(scores, valid, kernel: int):
  """Max-pool ``[B, Hkv, C]`` along slots ('same' padding); invalid slots never win."""
  x = jnp.where(valid, scores, -jnp.inf)
  half = kernel // 2
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), ((0, 0), (0, 0), (half, half)))


def priorities(policy: Policy, scores, lengths, budgets):
  """Ranking key ``[B, Hkv, C]``: +inf forced, -inf empty, else the policy's priority."""
  num_slots = scores.shape[-1]
  c = jnp.arange(num_slots, dtype=jnp.int32)[None, None, :]
  valid = c < lengths[:, :, None]  # [B, Hkv, C]
  forced = forced_mask(policy, lengths, budgets, num_slots)
  if policy.name in ("streamingllm", "full"):
    prio = jnp.broadcast_to(c, scores.shape).astype(jnp.float32)
  elif policy.name in SNAPKV_FAMILY:
    prio = max_pool(scores, valid & ~forced, policy.pool_kernel)
  else:  # h2o, oracle
    prio = scores.astype(jnp.float32)
  prio = jnp.where(valid, prio, -jnp.inf)
  return jnp.where(forced, jnp.inf, prio)


def _per_row(fn, x):
  """``fn`` (on the last axis) mapped over every leading axis of ``x``.

  A scatter mapped over the leading axes (one with batch dimensions) rather than indexed by
  their iotas: on a mesh the partitioner then keeps each row's scatter on the devices holding
  the row instead of gathering the whole batch's indices into every device."""
  for _ in range(x.ndim - 1):
    fn = jax.vmap(fn)
  return fn(x)


def _inverse_permutation(perm):
  """``inv`` with ``inv[..., perm[..., i]] = i`` along the last axis (a scatter, not a sort,
  :func:`_per_row`)."""
  def one(p):  # [N]
    return jnp.zeros(p.shape, jnp.int32).at[p].set(jnp.arange(p.shape[0], dtype=jnp.int32))

  return _per_row(one, perm)


def _ranks(prio):
  """Rank of every entry along the last axis by descending ``prio``, ties to lower index."""
  return _inverse_permutation(jnp.argsort(-prio, axis=-1, stable=True).astype(jnp.int32))


# A head evicting at most 1/EVICT_FRACTION of the slots it ranks finds them with a top-k.
EVICT_FRACTION = 16


def _evicted(prio, count, most: int):
  """``[B, Hkv, C]`` bool: the ``count [B, Hkv]`` (``<= most``, static) entries that rank
  last by :func:`_ranks` (lowest ``prio``, ties to the higher index), from one
  ``lax.top_k`` of ``most`` entries instead of a sort of all ``C``."""
  num_slots = prio.shape[-1]
  # Reversed, top_k's ties-to-the-lower-index pick the higher original index first.
  _, idx = jax.lax.top_k(-prio[..., ::-1], most)  # [B, Hkv, most], lowest priority first
  idx = num_slots - 1 - idx
  take = jnp.arange(most)[None, None, :] < count[..., None]
  idx = jnp.where(take, idx, num_slots)  # past the end: dropped

  def one(i):  # [most] -> [C]
    return jnp.zeros((num_slots,), bool).at[i].set(True, mode="drop")

  return _per_row(one, idx)


def select_keep(policy: Policy, scores, lengths, budgets, most_evicted: int | None = None):
  """Keep mask ``[B, Hkv, C]`` for one layer (see the module docstring for the rule).

  Args:
    policy: the policy.
    scores: ``[B, Hkv, C]`` float per-slot statistic (ignored by streamingllm / full).
    lengths: ``[B, Hkv]`` int32 slots in use.
    budgets: ``[Hkv]`` ints or a traced int32 array, this layer's budgets.
    most_evicted: a static bound on ``lengths - budgets`` (e.g. a region's headroom), or
      None. Where it is at most ``C / EVICT_FRACTION`` (a decode step's eviction: a page
      out of thousands) the evicted slots come from a top-k of that many, not a sort of all
      ``C``: the same mask (adakv, whose heads trade budget, always sorts).
  """
  budgets = jnp.asarray(budgets, jnp.int32)
  num_slots = scores.shape[-1]
  valid = jnp.arange(num_slots)[None, None, :] < lengths[:, :, None]  # [B, Hkv, C]
  if policy.name == "full":
    return valid
  prio = priorities(policy, scores, lengths, budgets)
  if (not policy.adaptive and most_evicted is not None
      and 0 < most_evicted * EVICT_FRACTION <= num_slots):
    count = jnp.maximum(lengths - budgets[None, :], 0)  # [B, Hkv]
    return valid & ~_evicted(jnp.where(valid, prio, jnp.inf), count, int(most_evicted))
  rank = _ranks(prio)  # [B, Hkv, C]
  if not policy.adaptive:
    return valid & (rank < jnp.asarray(budgets, jnp.int32)[None, :, None])
  # adakv: a per-head floor, then the layer's remaining total by a global top-k.
  forced_n = policy.n_sink + policy.window
  floor = forced_n + jnp.floor(policy.alpha * (budgets - forced_n)).astype(jnp.int32)  # [Hkv]
  in_floor = valid & (rank < floor[None, :, None])
  remaining = jnp.sum(budgets) - jnp.sum(in_floor, axis=(1, 2))  # [B]
  b, h, _ = scores.shape
  cand = jnp.where(valid & ~in_floor, prio, -jnp.inf).reshape(b, h * num_slots)
  in_global = (_ranks(cand) < remaining[:, None]) & (valid & ~in_floor).reshape(b, -1)
  return in_floor | in_global.reshape(b, h, num_slots)


def compact(keep):
  """Keep mask ``[B, Hkv, C]`` -> (gather indices ``[B, Hkv, C]``, new lengths ``[B, Hkv]``).

  The first ``new_length`` indices are the kept slots in ascending (= position) order, the
  dropped ones after them in ascending order (what a stable sort of ``~keep`` gives; computed
  with cumulative sums and one scatter).
  """
  kept = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)  # [B, Hkv, C]
  new_len = kept[..., -1]
  dropped = jnp.cumsum(~keep, axis=-1, dtype=jnp.int32)
  dest = jnp.where(keep, kept - 1, new_len[..., None] + dropped - 1)  # a permutation
  return _inverse_permutation(dest), new_len


def key_novelty(keys, valid):
  """KeyDiff's statistic: ``1 - cos(k, mean direction of the head's keys)`` per slot.

  Args:
    keys: ``[B, Hkv, N, D]`` keys before RoPE (the score reads content, not position).
    valid: ``[B, Hkv, N]`` bool, the slots the head holds (they define its mean direction).

  Returns:
    ``[B, Hkv, N]`` float32 in ``[0, 2]`` (0 on invalid slots): high for a key unlike the rest.
    The anchor is the mean of the *unit* keys, so one large-norm key (an attention sink) does
    not become the direction every other key is measured against.
  """
  unit = unit_keys(keys)  # [B, Hkv, N, D]
  w = valid[..., None].astype(jnp.float32)
  anchor = unit_keys(jnp.sum(unit * w, axis=2, keepdims=True))  # [B, Hkv, 1, D]
  cos = jnp.sum(unit * anchor, axis=-1)  # [B, Hkv, N]
  return jnp.where(valid, 1.0 - cos, 0.0)


def unit_keys(x):
  """``x [..., D]`` scaled to unit length along ``D`` in float32 (zero stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def union_rank(a, b, valid):
  """The better of two rankings: ``N - min(rank_a, rank_b)`` per slot, 0 off ``valid``.

  Args:
    a, b: ``[..., N]`` float statistics (higher is better) of the same slots.
    valid: ``[..., N]`` bool, the slots that take part.

  Returns:
    ``[..., N]`` float32 in ``[1, N]`` on valid slots: ranking by it takes the ``k/2`` best of
    each list (more when they overlap). Ranks are descending, ties to the lower index, as
    :func:`select_keep`'s.
  """
  mask = lambda x: jnp.where(valid, x.astype(jnp.float32), -jnp.inf)
  best = jnp.minimum(_ranks(mask(a)), _ranks(mask(b)))
  return jnp.where(valid, (a.shape[-1] - best).astype(jnp.float32), 0.0)


def novelty_scores(policy: Policy, novelty, window_scores, valid):
  """The per-slot statistic of a KeyDiff mode (``policy.uses_novelty``): the
  :func:`key_novelty` itself ("keydiff"), or its :func:`union_rank` with the observation
  window's ``window_scores`` ("keydiff_window"; None is fine for "keydiff"); all ``[..., N]``."""
  if policy.score_kind == "keys":
    return novelty
  return union_rank(novelty, window_scores, valid)


def reduce_group(x, gqa_reduce: str, axis: int):
  """Reduces a GQA group axis of per-query-head statistics by "mean" or "max"."""
  return jnp.max(x, axis=axis) if gqa_reduce == "max" else jnp.mean(x, axis=axis)


__all__ = [
    "POLICY_NAMES", "POSITION_MODES", "GQA_REDUCES", "SCORE_MODES", "SNAPKV_FAMILY",
    "HEADAWARE_POOL_KERNEL",
    "Policy", "make_policy",
    "pyramid_budgets", "recent_counts", "forced_mask", "max_pool", "priorities", "select_keep",
    "compact", "key_novelty", "unit_keys", "union_rank", "novelty_scores", "reduce_group",
]
