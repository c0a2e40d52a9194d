"""Compression methods by name: a method = an eviction policy + how budgets are allocated.

This is the one place that turns what a user types (``--method=headaware --budget=128``)
into a cache: :func:`plan_cache` resolves a method's per-head budgets and bits once (a
hashable :class:`CachePlan`), and the plan creates the cache::

    spec = MethodSpec("headaware", budget=128)
    plan = plan_cache(spec, num_layers=30, num_kv_heads=3, max_len=2112, profile=profile)
    cache = plan.create(batch=1, head_dim=64, capacity=2112, chunk_size=2048)

(``make_cache`` does both.) ``models.method_driver.MethodDriver`` drives a plan's cache
through generation: prefill, eviction after each chunk and while decoding.

``budget`` is the seed plan's "tokens per layer": the *average* number of tokens kept per KV
head per layer (a layer holds ``budget * kv_heads`` slots in all, however they are split).
``full`` keeps everything in the dense cache. ``headaware`` allocates per-head budgets from a
head profile (HeadKV: a floor per head plus a pool split by score, model-wide by default, which
moves budget into the few layers whose heads retrieve) and selects tokens SnapKV-style inside
each head.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from headkv_jax import allocation as allocation_lib
from headkv_jax import bits as bits_lib
from headkv_jax import policies as policies_lib
from headkv_jax.cache_layout import nested_ints
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.paged_cache import PagedKVCache
from headkv_jax.profile import HeadProfile

METHODS = ("full",) + tuple(p for p in policies_lib.POLICY_NAMES if p != "full")
# Methods whose per-head budgets come from a head profile.
PROFILE_METHODS = ("headaware",)
ALLOCATIONS = allocation_lib.METHODS


# MethodSpec.score_mode: the policies' modes, or "auto" (resolved by MethodSpec.for_prefill).
SCORE_MODES = ("auto",) + policies_lib.SCORE_MODES
# What "auto" means for a chunked headaware prefill, picked on niah_single at 2,000 tokens,
# chunk 512, budget 128, seed 0 (README: 8/10 vs 3/10 for the one-shot defaults).
CHUNKED_SCORE_MODE = "keydiff_window"
CHUNKED_POOL_KERNEL = 3
# What staging=None ("auto") means for a chunked headaware prefill: heads keep up to 4x their
# budget until the prompt ends. Picked on the same cells (README: 10/10 vs 8/10 at staging 2
# and 8/10 without staging; one-shot: 10/10).
CHUNKED_STAGING = 4.0


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A compression method and its knobs.

  Attributes:
    name: one of :data:`METHODS`.
    budget: average tokens kept per KV head per layer (ignored by ``full``).
    allocation: how ``headaware`` splits the budget among heads (see ``allocation.METHODS``).
    scope: ``"model"`` (budget moves across layers) or ``"layer"`` (each layer sums exactly).
    score_name: the profile score ``headkv`` allocation follows.
    pool_fraction: share of the budget ``headkv`` allocation hands out by score.
    window: SnapKV observation / recent window (policy default when None).
    n_sink: sink tokens (policy default when None).
    pool_kernel: SnapKV max-pool kernel (policy default when None: 7, headaware 21).
    gqa_reduce: "mean" or "max" over a GQA group.
    position_mode: "original" or "cache_relative".
    score_mode: SnapKV family: "latest" (each call's observation window replaces the scores),
      "accumulate" (summed over calls), "keydiff" (key novelty, no attention) or
      "keydiff_window" (the better of both ranks); see :mod:`headkv_jax.policies`. The
      default "auto" is "latest", except for ``headaware`` when a prompt is compressed before
      its end (more than one prefill chunk): :meth:`for_prefill`.
    kv_bits: storage precision per KV head, a :func:`headkv_jax.bits.parse_kv_bits` text
      ("16", "8", "4/2", "kivi2", "roles", "avg:3.5", ...); "16" stores the cache dtype.
    staging: a chunked prefill keeps up to ``staging`` x its budget per head between chunks
      (capped like the budgets); the eviction after the prompt, whose window holds the
      question, brings every head to its budget (``models.method_driver``). 1 = every chunk
      evicts to the budget. Prefill then holds more than the budget (records:
      ``prefill_cache_bytes``); decoding holds the budget. None ("auto"):
      :data:`CHUNKED_STAGING` for a chunked ``headaware`` prefill, else 1 (:meth:`for_prefill`).
  """

  name: str
  budget: int = 0
  allocation: str = "headkv"
  scope: str = "model"
  score_name: str = "retrieval_reasoning"
  pool_fraction: float = allocation_lib.HEADKV_POOL_FRACTION
  window: int | None = None
  n_sink: int | None = None
  pool_kernel: int | None = None
  gqa_reduce: str = "mean"
  position_mode: str = "original"
  kv_bits: str = "16"
  score_mode: str = "auto"
  staging: float | None = None

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"Unknown method {self.name!r}; allowed: {', '.join(METHODS)}.")
    if self.name != "full" and int(self.budget) <= 0:
      raise ValueError(f"Method {self.name!r} needs a budget > 0, got {self.budget}.")
    if self.allocation not in ALLOCATIONS:
      raise ValueError(
          f"Unknown allocation {self.allocation!r}; allowed: {', '.join(ALLOCATIONS)}.")
    if self.scope not in allocation_lib.SCOPES:
      raise ValueError(
          f"Unknown scope {self.scope!r}; allowed: {', '.join(allocation_lib.SCOPES)}.")
    bits_lib.parse_kv_bits(self.kv_bits)  # raises naming the text and the allowed forms
    if self.staging is not None and not (isinstance(self.staging, (int, float))
                                         and self.staging >= 1):
      raise ValueError(f"staging={self.staging!r} must be a number >= 1 (1 = every prefill "
                       "chunk evicts to the budget; 2 = heads keep up to twice their budget "
                       "until the prompt ends).")
    if self.score_mode not in SCORE_MODES:
      raise ValueError(f"Unknown score_mode {self.score_mode!r}; allowed: "
                       f"{', '.join(SCORE_MODES)}.")

  @property
  def bit_scheme(self) -> bits_lib.BitScheme:
    return bits_lib.parse_kv_bits(self.kv_bits)

  @property
  def dense(self) -> bool:
    """Whether this method runs on the dense cache: ``full`` at 16 bits (nothing evicted,
    nothing quantized); every other spec gets a paged cache."""
    return self.name == "full" and self.bit_scheme.is_full_precision

  def for_prefill(self, chunked: bool) -> "MethodSpec":
    """This spec with ``score_mode="auto"`` and ``staging=None`` made concrete for a prefill
    that is ``chunked`` (the prompt compressed before its end, so before its question) or not.

    A one-shot eviction ranks by the observation window, which holds the question ("latest",
    SnapKV). A chunked ``headaware`` prefill ranks by :data:`CHUNKED_SCORE_MODE` with pool
    kernel :data:`CHUNKED_POOL_KERNEL` unless the spec sets one: the windows of the chunks
    before the question never look at a needle, a key's novelty does (README: "Head-aware
    defaults"). The other methods stay the papers' ("latest"). Once the prompt is in,
    decoding ranks by "latest" (``models.method_driver.rechunk_for_decoding``). Likewise a
    chunked ``headaware`` prefill keeps :data:`CHUNKED_STAGING` x its budgets until the prompt
    ends unless the spec sets ``staging``; everything else evicts to the budget (1).
    """
    spec = self
    if spec.staging is None:
      staged = chunked and self.name == "headaware"
      spec = dataclasses.replace(spec, staging=CHUNKED_STAGING if staged else 1.0)
    if spec.score_mode != "auto":
      return spec
    if chunked and self.name == "headaware":
      return dataclasses.replace(
          spec, score_mode=CHUNKED_SCORE_MODE,
          pool_kernel=CHUNKED_POOL_KERNEL if self.pool_kernel is None else self.pool_kernel)
    return dataclasses.replace(spec, score_mode="latest")

  def policy(self) -> policies_lib.Policy:
    """The policy of this spec (``score_mode="auto"``: the one-shot one, "latest")."""
    overrides = dict(gqa_reduce=self.gqa_reduce, position_mode=self.position_mode,
                     score_mode="latest" if self.score_mode == "auto" else self.score_mode)
    if self.pool_kernel is not None:
      overrides["pool_kernel"] = self.pool_kernel
    if self.window is not None:
      overrides["window"] = self.window
    if self.n_sink is not None:
      overrides["n_sink"] = self.n_sink
    return policies_lib.make_policy(self.name, **overrides)


def method_budgets(spec: MethodSpec, num_layers: int, num_kv_heads: int, *,
                   max_len: int | None = None,
                   profile: HeadProfile | None = None) -> np.ndarray:
  """Per-(layer, KV head) budgets ``[layers, Hkv]`` int for a compressed method.

  ``max_len`` (prompt + new tokens) caps every head: no pool is sized for tokens that can
  never arrive (a budget of 4096 on a 2,000-token prompt holds 2,000 + new tokens' worth).
  """
  if spec.name == "full":
    raise ValueError("Method 'full' has no budgets: it keeps every token.")
  policy = spec.policy()
  floor = policy.min_budget
  if spec.budget < floor:
    raise ValueError(
        f"budget={spec.budget} is below the minimum {floor} of method {spec.name!r} "
        f"(n_sink={policy.n_sink}, window={policy.window}); use budget >= {floor}.")
  if spec.name in PROFILE_METHODS:
    if profile is None:
      raise ValueError(f"Method {spec.name!r} needs a head profile (see "
                       "`python -m experiments.profile_heads`).")
    profile.check_matches(profile.model_id, num_layers, num_kv_heads)
    scores = profile.roles if spec.allocation == "roles" else profile
    opts = {}
    if spec.allocation == "headkv":
      opts = dict(pool_fraction=spec.pool_fraction, score_name=spec.score_name)
    return allocation_lib.allocate_budgets(
        spec.allocation, spec.budget, num_layers, num_kv_heads, scores=scores,
        max_len=max_len, scope=spec.scope, sinks=policy.n_sink, window=policy.window,
        min_per_head=floor, **opts).astype(np.int32)
  if spec.name == "pyramidkv":
    budgets = np.asarray(policies_lib.pyramid_budgets(
        spec.budget, num_layers, num_kv_heads, min_budget=floor), np.int32)
  else:
    budgets = np.full((num_layers, num_kv_heads), spec.budget, np.int32)
  if max_len is not None:
    budgets = np.maximum(np.minimum(budgets, max_len), floor).astype(np.int32)
  return budgets


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """A method's cache for one model shape and token cap, resolved once.

  ``budgets`` / ``bits`` are decided here and nowhere else (``PagedKVCache.create`` receives
  them as arrays): a dense cache for 16-bit ``full``, else a paged cache with per-head budgets
  ``[layers][Hkv]`` and (key bits, value bits) ``[layers][Hkv][2]``. Hashable (nested tuples),
  so a plan can be a static argument of a compiled function: equal plans share programs.

  Attributes:
    spec: the method.
    num_layers, num_kv_heads: the model's shape.
    budgets: ``[layers][Hkv]`` tokens per head after a compression; None for the dense cache.
    bits: ``[layers][Hkv][2]`` storage bits per head; None for the dense cache.
    residual: full-precision recent tokens of a quantized head (None: the cache default).
    quant_group: channels per scale + zero of a quantized token (None: the cache default).
    fp_sinks: full-precision first tokens of a quantized head (None: the cache default).
  """

  spec: MethodSpec
  num_layers: int
  num_kv_heads: int
  budgets: tuple | None = None
  bits: tuple | None = None
  residual: int | None = None
  quant_group: int | None = None
  fp_sinks: int | None = None

  @property
  def dense(self) -> bool:
    return self.budgets is None

  def create(self, *, batch: int, head_dim: int, capacity: int, chunk_size: int,
             dtype=jnp.float32, page_size: int = 16, rope=None):
    """An empty cache: dense with room for ``capacity`` tokens, or paged with room for
    ``chunk_size`` new tokens per call (``rope``: the model's, for the KeyDiff modes)."""
    if self.dense:
      return DenseKVCache.create(self.num_layers, batch, self.num_kv_heads, head_dim, capacity,
                                 dtype)
    return PagedKVCache.create(self.num_layers, batch, self.num_kv_heads, head_dim,
                               np.asarray(self.budgets), self.spec.policy(),
                               chunk_size=chunk_size, dtype=dtype, page_size=page_size,
                               rope=rope, **self.paged_kwargs())

  def paged_kwargs(self) -> dict:
    """The bit arguments of ``PagedKVCache.create`` (and ``prompt_stats.compress_prompt``)."""
    out = dict(bits=np.asarray(self.bits))
    if self.residual is not None:
      out["residual"] = self.residual
    if self.quant_group is not None:
      out["quant_group"] = self.quant_group
    if self.fp_sinks is not None:
      out["fp_sinks"] = self.fp_sinks
    return out


def plan_cache(spec: MethodSpec, num_layers: int, num_kv_heads: int, *, max_len: int,
               profile: HeadProfile | None = None) -> CachePlan:
  """The cache ``spec`` needs on a model of ``num_layers`` x ``num_kv_heads`` KV heads.

  ``max_len`` (prompt + new tokens; a bucket, see ``models.generation.budget_cap``) caps every
  budget; ``full`` with fewer than 16 bits (KIVI without eviction) is a paged cache whose
  budgets hold all ``max_len`` tokens. ``avg:`` bit targets are weighed by the budgets (an
  average over stored tokens).
  """
  if spec.dense:
    return CachePlan(spec, num_layers, num_kv_heads)
  if spec.name == "full":
    budgets = np.full((num_layers, num_kv_heads), max_len, np.int32)
  else:
    budgets = method_budgets(spec, num_layers, num_kv_heads, max_len=max_len, profile=profile)
  scheme = spec.bit_scheme
  bits = bits_lib.allocate_bits(scheme, num_layers, num_kv_heads, profile=profile,
                                weights=budgets)
  return CachePlan(spec, num_layers, num_kv_heads, nested_ints(budgets), nested_ints(bits),
                   scheme.residual, scheme.group, scheme.fp_sinks)


def make_cache(spec: MethodSpec, *, num_layers: int, num_kv_heads: int, head_dim: int,
               batch: int, capacity: int, chunk_size: int, dtype=jnp.float32,
               max_len: int | None = None, profile: HeadProfile | None = None,
               page_size: int = 16, rope=None):
  """An empty cache for ``spec``: :func:`plan_cache` then :meth:`CachePlan.create`.

  ``capacity`` sizes the dense cache (prompt + new tokens); ``chunk_size`` is the most tokens
  one model call adds (the prompt length for one-shot prefill); ``max_len`` (prompt + new
  tokens, default ``capacity``) caps the per-head budgets; ``rope`` is the model's (the
  KeyDiff score modes need it).
  """
  plan = plan_cache(spec, num_layers, num_kv_heads, max_len=max_len or capacity,
                    profile=profile)
  return plan.create(batch=batch, head_dim=head_dim, capacity=capacity, chunk_size=chunk_size,
                     dtype=dtype, page_size=page_size, rope=rope)
