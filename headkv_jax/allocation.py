"""Token budgets per (layer, KV head): how many tokens each head's cache keeps.

  budgets = allocate_budgets('headkv', budget=256, num_layers=30, num_kv_heads=3,
                             scores=profile, max_len=prompt_len)  # int32 [30, 3]

``budget`` is the average number of tokens kept per KV head per layer (design.md: what the
seed's "tokens/layer" means). The split keeps these invariants, whatever the method:

- Exact totals: with ``scope='layer'`` every layer sums to ``budget * kv_heads``; with
  ``scope='model'`` only the model sums to ``budget * kv_heads * layers`` and budget moves
  across layers (it matters most on small models). Integers come from largest-remainder
  rounding (ties: lower index first), so totals are exact and the result is deterministic.
- A floor: every head keeps at least ``min_per_head`` tokens (default ``sinks + window``,
  what StreamingLLM needs to stay fluent); a budget below it is an error.
- A cap: no head keeps more than ``max_len`` (the prompt length); what a capped head cannot
  use goes to the uncapped heads in proportion to their weights (water-filling). When the
  total exceeds ``max_len * heads`` every head simply keeps ``max_len``.

Methods (each one sets the heads' weights for the share of the total above the floor):

- ``uniform``: every head ``budget``.
- ``pyramid`` (PyramidKV): per-head budgets fall linearly with depth from
  ``2 * budget - bottom`` to ``bottom = max(min_per_head, budget / beta)``; model scope only.
- ``adakv`` (Ada-KV): from per-token scores ``[layers, kv_heads, T]``, a global top-(H*B)
  over the unit's heads gives per-head counts, mixed with the uniform share:
  ``alpha * B + (1 - alpha) * count``.
- ``headkv`` (HeadKV): ``b_h = b_min + pool * s_h / sum(s)`` with
  ``b_min = max(min_per_head, (1 - pool_fraction) * budget)``; ``s`` is a
  ``[layers, kv_heads]`` score (or a :class:`HeadProfile`'s ``score_name``).
- ``roles``: local heads keep exactly ``sinks + window``; the rest of the total goes to
  retrieval heads (weight 1) and induction heads (weight ``induction_weight``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from headkv_jax import head_scores
from headkv_jax import profile as profile_lib

METHODS = ('uniform', 'pyramid', 'adakv', 'headkv', 'roles')
SCOPES = ('layer', 'model')
# HeadKV's default beta = 1.005 moves b / beta of every head's budget into the pool.
HEADKV_POOL_FRACTION = 1 / 1.005
PYRAMID_BETA = 20  # PyramidKV: the last layer keeps budget / beta
ADAKV_ALPHA = 0.2  # Ada-KV: share of each head's budget that stays uniform
ROLES_INDUCTION_WEIGHT = 0.5  # an induction head's weight next to a retrieval head's 1

_METHOD_OPTS = {
    'uniform': {},
    'pyramid': {'beta': PYRAMID_BETA},
    'adakv': {'alpha': ADAKV_ALPHA},
    'headkv': {'pool_fraction': HEADKV_POOL_FRACTION, 'score_name': 'retrieval_reasoning'},
    'roles': {'induction_weight': ROLES_INDUCTION_WEIGHT},
}


def allocate_budgets(method: str, budget: int, num_layers: int, num_kv_heads: int,
                     scores: Any = None, max_len: int | None = None,
                     scope: str | None = None, *, sinks: int = 4, window: int = 32,
                     min_per_head: int | None = None, **opts) -> np.ndarray:
  """Per-(layer, KV head) token budgets.

  Args:
    method: one of METHODS.
    budget: average tokens kept per KV head per layer.
    num_layers, num_kv_heads: the model's shape.
    scores: what the method reads: ``adakv`` a ``[layers, kv_heads, T]`` per-token score
      array; ``headkv`` a ``[layers, kv_heads]`` score array or a HeadProfile; ``roles`` a
      ``[layers, kv_heads]`` roles array or a HeadProfile. Unused by uniform/pyramid.
    max_len: the prompt length; no head gets more. None: no cap.
    scope: 'layer' (each layer sums to budget * kv_heads) or 'model' (the model sums to
      budget * kv_heads * layers). Default 'layer', except pyramid (only 'model').
    sinks, window: the StreamingLLM part every head keeps; local heads keep exactly that
      in ``roles``.
    min_per_head: the floor per head; default ``sinks + window``.
    **opts: method options (their defaults in ``_METHOD_OPTS``): pyramid ``beta``;
      adakv ``alpha``; headkv ``pool_fraction``, ``score_name``; roles
      ``induction_weight``.

  Returns:
    int32 ``[num_layers, num_kv_heads]``.
  """
  if method not in METHODS:
    raise ValueError(f'unknown allocation method {method!r}; allowed: {list(METHODS)}.')
  unknown = sorted(set(opts) - set(_METHOD_OPTS[method]))
  if unknown:
    raise ValueError(f'method {method!r} takes options {sorted(_METHOD_OPTS[method])}; got '
                     f'unknown {unknown}.')
  opts = {**_METHOD_OPTS[method], **opts}
  for name, value in (('budget', budget), ('num_layers', num_layers),
                      ('num_kv_heads', num_kv_heads)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer. Got {value!r}.')
  if max_len is not None and (int(max_len) != max_len or max_len < 1):
    raise ValueError(f'max_len must be a positive integer or None. Got {max_len!r}.')
  if min(sinks, window) < 0:
    raise ValueError(f'sinks and window must be >= 0. Got {sinks} and {window}.')
  min_per_head = sinks + window if min_per_head is None else min_per_head
  if int(min_per_head) != min_per_head or min_per_head < 0:
    raise ValueError(f'min_per_head must be an integer >= 0. Got {min_per_head!r}.')
  if budget < min_per_head:
    raise ValueError(f'budget {budget} is below min_per_head {min_per_head} (default '
                     f'sinks + window = {sinks} + {window}); raise the budget or lower '
                     'min_per_head.')
  if scope is None:
    scope = 'model' if method == 'pyramid' else 'layer'
  if scope not in SCOPES:
    raise ValueError(f'scope must be one of {list(SCOPES)}. Got {scope!r}.')
  if method == 'pyramid' and scope != 'model':
    raise ValueError("pyramid moves budget across layers by design; use scope='model'.")

  shape = (int(num_layers), int(num_kv_heads))
  ctx = _Ctx(int(budget), shape, scope, None if max_len is None else int(max_len),
             int(min_per_head), int(sinks) + int(window))
  return _METHOD_FNS[method](ctx, scores, **opts).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Ctx:
  """The validated arguments every method shares."""

  budget: int  # average tokens per KV head per layer
  shape: tuple[int, int]  # (num_layers, num_kv_heads)
  scope: str  # 'layer' or 'model'
  cap: int | None  # max_len
  floor: int  # min_per_head
  sink_window: int  # sinks + window: what a local head keeps

  def units(self, array: np.ndarray) -> np.ndarray:
    """``[layers, kv_heads, ...]`` -> ``[units, heads_per_unit, ...]``."""
    if self.scope == 'layer':
      return array
    return array.reshape(1, -1, *array.shape[2:])

  def unit_total(self) -> int:
    return self.budget * self.shape[1] * (1 if self.scope == 'layer' else self.shape[0])

  def split_units(self, weights: np.ndarray, floor: float) -> np.ndarray:
    """Splits every unit's total by ``weights [layers, kv_heads]`` above ``floor``."""
    per_unit = self.units(weights)  # [units, n]
    out = np.stack([split_total(self.unit_total(), w, floor, self.cap) for w in per_unit])
    return out.reshape(self.shape)


def split_total(total: int, weights: np.ndarray, floor: float = 0,
                cap: int | None = None) -> np.ndarray:
  """Integers ``[n]`` summing to ``total``: ``floor`` each + the rest in proportion to weights.

  Heads over ``cap`` are held at it and their overflow is re-split among the others
  (water-filling); if ``total >= cap * n`` every head gets ``cap``. All-zero weights split
  evenly. Largest-remainder rounding (ties: lower index) keeps the sum exact.
  """
  weights = np.asarray(weights, dtype=np.float64).reshape(-1)
  n = weights.size
  if np.isnan(weights).any() or (weights < 0).any():
    raise ValueError(f'weights must be non-negative and not NaN. Got {weights.tolist()}.')
  if cap is not None and total >= cap * n:
    return np.full(n, cap, dtype=np.int64)
  lo = float(floor) if cap is None else min(float(floor), float(cap))
  if total < lo * n - 1e-6:
    raise ValueError(f'total {total} cannot give {n} heads {lo} tokens each.')
  alloc = np.full(n, lo)  # [n] float
  active = np.ones(n, dtype=bool)
  while active.any():
    free = total - alloc[~active].sum() - lo * active.sum()
    w = weights[active]
    share = w / w.sum() if w.sum() > 0 else np.full(w.size, 1.0 / w.size)
    alloc[active] = lo + free * share
    if cap is None:
      break
    over = active & (alloc > cap)
    if not over.any():
      break
    alloc[over] = cap
    active &= ~over
  alloc = np.clip(alloc, lo, np.inf if cap is None else cap)
  return _round_exact(alloc, total)


def _round_exact(values: np.ndarray, total: int) -> np.ndarray:
  """Largest-remainder rounding of ``values [n]`` to integers summing to ``total``."""
  base = np.floor(values)
  short = int(np.clip(round(total - base.sum()), 0, values.size))
  order = np.argsort(-(values - base), kind='stable')  # largest remainder, then lower index
  base[order[:short]] += 1
  return base.astype(np.int64)


def _uniform(ctx: _Ctx, scores) -> np.ndarray:
  del scores  # unused
  return ctx.split_units(np.ones(ctx.shape), ctx.floor)


def _pyramid(ctx: _Ctx, scores, beta: float) -> np.ndarray:
  del scores  # unused
  if beta < 1:
    raise ValueError(f'pyramid beta must be >= 1. Got {beta}.')
  num_layers = ctx.shape[0]
  bottom = max(ctx.floor, ctx.budget / beta)
  top = 2 * ctx.budget - bottom
  depth = np.arange(num_layers) / max(num_layers - 1, 1)  # [layers] 0 -> 1
  per_head = top - (top - bottom) * depth if num_layers > 1 else np.full(1, ctx.budget)
  # Weights above the floor reproduce the linear ramp exactly (its mean is the budget).
  weights = np.broadcast_to((per_head - ctx.floor)[:, None], ctx.shape)
  return ctx.split_units(np.clip(weights, 0, None), ctx.floor)


def _adakv(ctx: _Ctx, scores, alpha: float) -> np.ndarray:
  if not 0 <= alpha <= 1:
    raise ValueError(f'adakv alpha must be in [0, 1]. Got {alpha}.')
  scores = np.asarray(scores if scores is not None else np.zeros(0), dtype=np.float64)
  if scores.ndim != 3 or scores.shape[:2] != ctx.shape or scores.shape[2] < 1:
    raise ValueError('adakv needs per-token scores [layers, kv_heads, T] = '
                     f'[{ctx.shape[0]}, {ctx.shape[1]}, T]. Got shape {scores.shape}.')
  per_unit = ctx.units(scores)  # [units, n, T]
  num_units, n, num_tokens = per_unit.shape
  targets = np.empty((num_units, n))
  for u in range(num_units):
    k = min(ctx.unit_total(), n * num_tokens)
    flat = per_unit[u].reshape(-1)  # [n * T]
    chosen = np.argsort(-flat, kind='stable')[:k]
    counts = np.bincount(chosen // num_tokens, minlength=n)  # [n]
    counts = counts * (ctx.unit_total() / k)  # keep the unit's sum when T is short
    targets[u] = alpha * ctx.budget + (1 - alpha) * counts
  weights = np.clip(targets.reshape(ctx.shape) - ctx.floor, 0, None)
  return ctx.split_units(weights, ctx.floor)


def _score_array(scores, name: str, what: str, shape) -> np.ndarray:
  if isinstance(scores, profile_lib.HeadProfile):
    scores.check_matches(scores.model_id, *shape)  # shape check, any model id
    if what == 'roles':
      return scores.roles
    if name not in scores.scores:
      raise ValueError(f'score_name {name!r} is not in the profile; allowed: '
                       f'{sorted(scores.scores)}.')
    return scores.scores[name]
  if scores is None:
    raise ValueError(f'this method needs {what} [layers, kv_heads] = {list(shape)} (an array '
                     'or a HeadProfile); got None.')
  scores = np.asarray(scores, dtype=np.float64)
  if scores.shape != shape:
    raise ValueError(f'{what} must be [layers, kv_heads] = {list(shape)}. Got shape '
                     f'{scores.shape}.')
  return scores


def _headkv(ctx: _Ctx, scores, pool_fraction: float, score_name: str) -> np.ndarray:
  if not 0 <= pool_fraction <= 1:
    raise ValueError(f'headkv pool_fraction must be in [0, 1]. Got {pool_fraction}.')
  scores = _score_array(scores, score_name, 'scores', ctx.shape)
  if np.isnan(scores).any() or (scores < 0).any():
    raise ValueError('headkv scores must be non-negative and not NaN.')
  floor = max(ctx.floor, (1 - pool_fraction) * ctx.budget)  # HeadKV's b_min
  return ctx.split_units(scores, floor)


def _roles(ctx: _Ctx, scores, induction_weight: float) -> np.ndarray:
  if induction_weight < 0:
    raise ValueError(f'roles induction_weight must be >= 0. Got {induction_weight}.')
  roles = np.asarray(_score_array(scores, '', 'roles', ctx.shape))
  known = [int(r) for r in head_scores.Role]
  if not np.isin(roles, known).all():
    raise ValueError(f'roles must be values of head_scores.Role {known}. Got '
                     f'{sorted(set(roles.reshape(-1).tolist()))}.')
  weight_of = {head_scores.Role.RETRIEVAL: 1.0, head_scores.Role.INDUCTION: induction_weight,
               head_scores.Role.LOCAL: 0.0}
  weights = np.vectorize(lambda r: weight_of[head_scores.Role(int(r))])(roles)
  local_keep = ctx.sink_window if ctx.cap is None else min(ctx.sink_window, ctx.cap)
  out = []
  for unit_roles, unit_weights in zip(ctx.units(roles), ctx.units(weights)):
    out.append(_split_roles(ctx, unit_roles == head_scores.Role.LOCAL, unit_weights,
                            local_keep))
  return np.stack(out).reshape(ctx.shape)


def _split_roles(ctx: _Ctx, local: np.ndarray, weights: np.ndarray,
                 local_keep: int) -> np.ndarray:
  """One unit: local heads keep ``local_keep``; the others share the rest."""
  total, n = ctx.unit_total(), local.size
  if local.all():  # no head to give the rest to: spread it evenly
    return split_total(total, np.ones(n), ctx.floor, ctx.cap)
  out = np.full(n, local_keep, dtype=np.int64)
  rest = total - local_keep * local.sum()
  others = ~local
  floor = ctx.floor if ctx.cap is None else min(ctx.floor, ctx.cap)
  if rest < floor * others.sum():
    raise ValueError(f'budget {ctx.budget} leaves {rest} tokens for {others.sum()} '
                     f'non-local heads after {local.sum()} local heads keep {local_keep}; '
                     f'min_per_head {ctx.floor} needs {floor * others.sum()}.')
  if ctx.cap is not None and rest > ctx.cap * others.sum():
    # Every non-local head is full: the excess goes back to the local heads.
    out[others] = ctx.cap
    local_total = total - ctx.cap * others.sum()
    out[local] = split_total(local_total, np.ones(local.sum()), local_keep, ctx.cap)
    return out
  out[others] = split_total(rest, weights[others], ctx.floor, ctx.cap)
  return out


_METHOD_FNS = {'uniform': _uniform, 'pyramid': _pyramid, 'adakv': _adakv,
               'headkv': _headkv, 'roles': _roles}
