"""Compression methods by name: a method = an eviction policy + how budgets are allocated.

This is the one place that turns what a user types (``--method=headaware --budget=128``)
into a cache::

    spec = MethodSpec("headaware", budget=128)
    cache = make_cache(spec, num_layers=30, num_kv_heads=3, head_dim=64, batch=1,
                       max_len=2024, chunk_size=2048, profile=profile)

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
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.paged_cache import PagedKVCache
from headkv_jax.profile import HeadProfile

METHODS = ("full",) + tuple(p for p in policies_lib.POLICY_NAMES if p != "full")
# Methods whose per-head budgets come from a head profile.
PROFILE_METHODS = ("headaware",)
ALLOCATIONS = allocation_lib.METHODS


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
    kv_bits: storage precision per KV head, a :func:`headkv_jax.bits.parse_kv_bits` text
      ("16", "8", "4/2", "kivi2", "roles", "avg:3.5", ...); "16" stores the cache dtype.
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

  @property
  def bit_scheme(self) -> bits_lib.BitScheme:
    return bits_lib.parse_kv_bits(self.kv_bits)

  def policy(self) -> policies_lib.Policy:
    overrides = dict(gqa_reduce=self.gqa_reduce, position_mode=self.position_mode)
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


def paged_budgets(spec: MethodSpec, num_layers: int, num_kv_heads: int, *, max_len: int,
                  profile: HeadProfile | None = None) -> np.ndarray:
  """Budgets ``[layers, Hkv]`` of ``spec``'s paged cache: :func:`method_budgets`, or, for
  ``full`` (a paged cache only when quantized), every head keeps all ``max_len`` tokens."""
  if spec.name == "full":
    return np.full((num_layers, num_kv_heads), max_len, np.int32)
  return method_budgets(spec, num_layers, num_kv_heads, max_len=max_len, profile=profile)


def method_bits(spec: MethodSpec, budgets: np.ndarray, *,
                profile: HeadProfile | None = None) -> dict:
  """``PagedKVCache.create`` keyword arguments of ``spec``'s bit scheme for ``budgets``
  ``[layers, Hkv]``: ``bits [layers, Hkv, 2]`` and the full-precision ``residual``.

  ``avg:`` targets are weighed by the budgets (an average over stored tokens).
  """
  scheme = spec.bit_scheme
  budgets = np.asarray(budgets)
  bits = bits_lib.allocate_bits(scheme, *budgets.shape, profile=profile, weights=budgets)
  return dict(bits=bits, residual=scheme.residual)


def make_cache(spec: MethodSpec, *, num_layers: int, num_kv_heads: int, head_dim: int,
               batch: int, capacity: int, chunk_size: int, dtype=jnp.float32,
               max_len: int | None = None, profile: HeadProfile | None = None,
               page_size: int = 16):
  """An empty cache for ``spec``: dense for 16-bit ``full``, paged and budgeted otherwise.

  ``capacity`` sizes the dense cache (prompt + new tokens); ``chunk_size`` is the most tokens
  one model call adds (the prompt length for one-shot prefill); ``max_len`` (prompt + new
  tokens) caps the per-head budgets. ``full`` with fewer than 16 bits (KIVI without
  eviction) is a paged cache whose budgets hold every token (``max_len``, else
  ``capacity``).
  """
  if spec.name == "full" and spec.bit_scheme.is_full_precision:
    return DenseKVCache.create(num_layers, batch, num_kv_heads, head_dim, capacity, dtype)
  budgets = paged_budgets(spec, num_layers, num_kv_heads, max_len=max_len or capacity,
                          profile=profile)
  return PagedKVCache.create(num_layers, batch, num_kv_heads, head_dim, budgets,
                             spec.policy(), chunk_size=chunk_size, dtype=dtype,
                             page_size=page_size,
                             **method_bits(spec, budgets, profile=profile))
