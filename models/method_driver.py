"""The one object that runs a compression method through generation: :class:`MethodDriver`.

A method needs, at every stage of a generation, the same decisions: which cache to create, what
to do after each prefill chunk, after the prompt, and after each decode step. The driver makes
them once, from a :class:`headkv_jax.methods.CachePlan` (per-head budgets and bits resolved
once, capped at the prompt's *bucket* plus the new tokens, so every prompt of a bucket shares
one set of shapes and programs)::

    driver = MethodDriver.create(spec, config, prompt_len=2000, max_new_tokens=12,
                                 chunk_size=None, dtype=jnp.float32, profile=profile)
    result = generation.generate(runner, [prompt], 12, **driver.generate_kwargs())

What runs where:

* dense ``full`` (16 bits): the dense cache, no hooks.
* one-shot prefill (``chunk_size=None``) of a method that can use it (not the oracle, keys at
  their original positions): the prompt goes through a dense
  :class:`~headkv_jax.prompt_stats.RecordingCache` (exact blocked attention, every policy's
  statistic recorded on the way), then one compiled compression (:meth:`compress_recorded`):
  the same kept tokens and outputs as attending through the paged cache
  (``tests/test_prompt_stats.py``) without materialising ``[T, budget + T]`` probabilities.
  ``models.shared_prefill`` reuses one such prefill for many methods.
* otherwise the paged cache with room for one prefill chunk, compressed after every chunk and
  re-packed for decoding after the prompt (``rechunk(page_size)``: room for a page of new
  tokens per head). With ``spec.staging > 1`` the prefill cache has *staging budgets*
  (:func:`staging_budgets`: each head's budget times ``staging``, capped like the budgets):
  the chunks, compressed before the question arrives, evict only down to those, and the
  eviction after the prompt, whose observation window holds the question, ranks by that
  window (SnapKV's "latest", the one-shot pool kernel) and brings every head to its budget.
* while decoding, eviction is amortised (:func:`evict_while_decoding`): a layer evicts only
  when one of its heads has no room for the next token, so a head holds between its budget and
  its region (budget + one to two pages: ``round_up(budget + page, page)``); H2O's scores still accumulate every step, and
  ``cache_bytes`` counts the regions, headroom included.
* the oracle compresses with the answer's attention (``oracle_scores``) at every stage; its
  hooks are partials of compiled functions with the scores as operands, so every sample reuses
  one program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from headkv_jax import methods as methods_lib
from headkv_jax import paged_cache
from headkv_jax import prompt_stats
from headkv_jax.cache_layout import nested_ints
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.jit import jit
from headkv_jax.rope import RoPE
from models import generation


def supports_shared_prefill(spec: methods_lib.MethodSpec) -> bool:
  """Whether ``spec`` can prefill through a recording cache (not the oracle; keys in
  "original" mode)."""
  return spec.name != "oracle" and spec.position_mode == "original"


def resolve_spec(spec: methods_lib.MethodSpec, prompt_len: int,
                 chunk_size: int | None) -> methods_lib.MethodSpec:
  """``spec`` as it runs on a ``prompt_len``-token prompt prefilled in ``chunk_size`` chunks
  (None: one call): ``score_mode="auto"`` resolved by ``MethodSpec.for_prefill``, chunked when
  the prompt's bucket takes more than one chunk (compressed before its end)."""
  chunked = chunk_size is not None and chunk_size < generation.bucket(prompt_len)
  return spec.for_prefill(chunked)


def rolled_budget_cap(spec: methods_lib.MethodSpec, config, max_len: int, chunk: int) -> int:
  """The most tokens a head may keep in ``position_mode="cache_relative"`` so that no rotation
  reaches ``config.max_position_embeddings`` (the model's trained context).

  A rolled key is rotated by its slot among its head's tokens, and a head holds up to its
  budget plus one prefill chunk (``chunk``) before it evicts, so slots stay below
  ``budget + chunk``. While the whole sequence (``max_len``) fits the context nothing needs
  capping (a slot never exceeds the tokens seen); past it, every head keeps at most
  ``max_positions - chunk`` (what a capped head cannot hold goes to the others, as with any
  cap of :func:`headkv_jax.allocation.allocate_budgets`).
  """
  if not config.past_context(max_len):
    return max_len
  max_positions = config.max_position_embeddings
  if spec.name == "full":
    raise ValueError(
        f"Method 'full' keeps every token, so in position_mode='cache_relative' its slots reach "
        f"the sequence length ({max_len}), past max_position_embeddings={max_positions}; use a "
        "compressing method, or position_mode='original'.")
  cap = max_positions - chunk
  floor = spec.policy().min_budget
  if cap < max(floor, 1):
    raise ValueError(
        f"position_mode='cache_relative' past the trained context keeps each head's slots below "
        f"max_position_embeddings={max_positions}, so a head may hold at most "
        f"{max_positions} - chunk_size {chunk} = {cap} tokens, below method {spec.name!r}'s "
        f"minimum {floor}; prefill in smaller chunks (chunk_size < {max_positions - floor}).")
  return cap


def staging_budgets(plan: methods_lib.CachePlan, cap: int) -> tuple:
  """The budgets a chunked prefill of ``plan`` keeps between its chunks: each head's budget
  times ``plan.spec.staging``, rounded up, at most ``cap`` (the plan's own cap), never below
  the budget; a static ``[layers][Hkv]`` nested tuple."""
  budgets = np.asarray(plan.budgets, np.int64)
  staged = np.ceil(budgets * float(plan.spec.staging)).astype(np.int64)
  return nested_ints(np.maximum(np.minimum(staged, cap), budgets))


def final_policy(spec: methods_lib.MethodSpec):
  """The policy of the eviction after a staged chunked prefill of ``spec`` (as given, before
  ``resolve_spec``): its one-shot policy (``score_mode="auto"`` -> "latest" with the
  method's pool kernel), ranking by the last chunk's observation window, which holds the
  question, as a one-shot eviction does. An explicit ``score_mode`` is kept."""
  return spec.for_prefill(False).policy()


def record_window(specs) -> int:
  """How many last queries a recording prefill must keep for ``specs`` (their largest
  SnapKV-style observation window; 0 when none needs one)."""
  return max([s.policy().window for s in specs if s.policy().score_kind == "window"] or [0])


def record_accumulated(specs) -> bool:
  """Whether a recording prefill must sum every query's attention for ``specs`` (H2O's
  score; the others rank by the observation window or the keys, and skip that pass)."""
  return any(s.policy().score_kind == "accumulate" for s in specs)


def recording_cache_maker(config, dtype, window: int,
                          accumulate: bool = True) -> Callable[[int, int], object]:
  """``make_cache(batch, capacity)`` for ``generation.prefill``: a dense cache that records
  the statistics of the last ``window`` queries, and with ``accumulate`` every query's summed
  attention (``prompt_stats.RecordingCache``)."""

  def make_cache(batch, capacity):
    dense = DenseKVCache.create(config.num_layers, batch, config.num_kv_heads, config.head_dim,
                                capacity, dtype)
    return prompt_stats.RecordingCache.create(dense, window, accumulate)

  return make_cache


@dataclasses.dataclass(frozen=True)
class MethodDriver:
  """Makes one method's cache and runs its eviction at every stage of a generation.

  Attributes:
    plan: the method's cache (budgets and bits, resolved once).
    config: the model's config.
    dtype: the cache dtype (the model's).
    prefill_chunk: most tokens one prefill call adds (the bucketed prompt for one shot).
    one_shot: the prompt is prefilled in one call (``chunk_size=None``).
    oracle_scores: the oracle's per-layer ``[B, Hq or Hkv, P]`` answer attention by position.
    staging: the prefill cache's budgets (:func:`staging_budgets`) when they differ from the
      plan's (a chunked prefill with ``spec.staging > 1``); None otherwise.
    final: the policy of the eviction after a staged prefill (:func:`final_policy`).
  """

  plan: methods_lib.CachePlan
  config: Any
  dtype: Any
  prefill_chunk: int
  one_shot: bool
  oracle_scores: tuple | None = dataclasses.field(default=None, compare=False)
  staging: tuple | None = None
  final: Any = None

  @classmethod
  def create(cls, spec: methods_lib.MethodSpec, config, *, prompt_len: int,
             max_new_tokens: int, chunk_size: int | None, dtype, profile=None,
             oracle_scores=None) -> "MethodDriver":
    """The driver of ``spec`` for prompts of up to ``prompt_len`` tokens (their bucket).

    Args:
      spec: the method.
      config: the model's config (layers, KV heads, head dim).
      prompt_len: the longest prompt; budgets are capped at its bucket + ``max_new_tokens``
        (in ``cache_relative`` mode past the context, also by :func:`rolled_budget_cap`).
      max_new_tokens: tokens to generate.
      chunk_size: prefill chunk in tokens, or None for one call over the whole prompt.
      dtype: the cache dtype.
      profile: the head profile (``headaware`` budgets, ``roles`` / ``avg:`` bits).
      oracle_scores: required by the oracle: per layer ``[B, Hq or Hkv, P]`` attention the
        answer pays to each position (``P`` = the generation's cache positions).
    """
    if spec.name == "oracle" and oracle_scores is None:
      raise ValueError("Method 'oracle' needs oracle_scores: the answer's attention per layer "
                       "(see experiments.phase0.oracle_scores).")
    if spec.name != "oracle" and oracle_scores is not None:
      raise ValueError(f"oracle_scores are for method 'oracle' only, not {spec.name!r}.")
    if chunk_size is not None and chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    padded = generation.bucket(prompt_len)
    chunk = generation.chunk_width(prompt_len, chunk_size)
    given, spec = spec, resolve_spec(spec, prompt_len, chunk_size)
    cap = generation.budget_cap(prompt_len, max_new_tokens)
    if spec.position_mode == "cache_relative":
      cap = rolled_budget_cap(spec, config, cap, chunk)
    plan = methods_lib.plan_cache(spec, config.num_layers, config.num_kv_heads, max_len=cap,
                                  profile=profile)
    scores = None if oracle_scores is None else tuple(oracle_scores)
    staging = final = None
    if not plan.dense and chunk < padded and spec.name != "oracle" and spec.staging > 1:
      staging = staging_budgets(plan, cap)
      final = final_policy(given)
      if staging == plan.budgets:
        staging = final = None
    return cls(plan, config, dtype, chunk, chunk_size is None, scores, staging, final)

  @property
  def spec(self) -> methods_lib.MethodSpec:
    return self.plan.spec

  @property
  def records_prefill(self) -> bool:
    """Whether the prompt goes through a recording cache (one shot, see the module)."""
    return (self.one_shot and not self.plan.dense
            and supports_shared_prefill(self.spec))

  # ---- the cache ---------------------------------------------------------------------------

  def make_cache(self, batch: int, capacity: int):
    """``generation.prefill``'s ``make_cache``: the cache the prompt is prefilled into."""
    if self.records_prefill:
      return recording_cache_maker(self.config, self.dtype, record_window([self.spec]),
                                   record_accumulated([self.spec]))(batch, capacity)
    plan = self.plan
    if self.staging is not None:
      # The prefill keeps the final cache's full-precision residual (capped by the smallest
      # final budget), so the window moves unchanged when the prompt ends.
      residual = plan.residual if plan.residual is not None else paged_cache.RESIDUAL
      sinks = plan.fp_sinks if plan.fp_sinks is not None else paged_cache.FP_SINKS
      residual = min(residual, int(np.min(plan.budgets)) - sinks)
      plan = dataclasses.replace(plan, budgets=self.staging, residual=max(residual, 0))
    return plan.create(batch=batch, head_dim=self.config.head_dim, capacity=capacity,
                       chunk_size=self.prefill_chunk, dtype=self.dtype,
                       rope=self.config.make_rope())

  def compress_recorded(self, recorded: prompt_stats.RecordingCache):
    """The paged cache this method keeps of a recorded one-shot prefill, ready to decode
    (one compiled program per plan and shapes)."""
    if not supports_shared_prefill(self.spec) or self.plan.dense:
      raise ValueError(f"Method {self.spec.name!r} (kv_bits={self.spec.kv_bits}, position "
                       f"mode {self.spec.position_mode!r}) has no compression of a recorded "
                       "prefill.")
    prompt_stats.check_one_shot(recorded)
    inv_freq = tuple(float(x) for x in self.config.rope_inv_freq())  # no device wait
    return _compress_recorded(recorded, self.plan, inv_freq)

  # ---- eviction hooks ----------------------------------------------------------------------

  @property
  def after_prefill_chunk(self) -> Callable | None:
    if self.plan.dense or self.records_prefill:
      return None
    if self.oracle_scores is not None:
      return functools.partial(_oracle_compress, scores=self.oracle_scores)
    return compress_chunk

  @property
  def after_prefill(self) -> Callable | None:
    if self.plan.dense:
      return None
    if self.records_prefill:
      return self.compress_recorded
    if self.oracle_scores is not None:
      return functools.partial(_oracle_rechunk, scores=self.oracle_scores)
    if self.staging is not None:
      return functools.partial(rechunk_for_decoding, budgets=self.plan.budgets,
                               policy=self.final)
    return rechunk_for_decoding

  @property
  def after_decode_step(self) -> Callable | None:
    if self.plan.dense:
      return None
    if self.oracle_scores is not None:
      return functools.partial(_oracle_compress, scores=self.oracle_scores)
    return evict_while_decoding

  def generate_kwargs(self) -> dict:
    """Keyword arguments of ``generation.generate`` / ``prefill`` that run this method."""
    return dict(make_cache=self.make_cache,
                chunk_size=None if self.one_shot else self.prefill_chunk,
                after_prefill_chunk=self.after_prefill_chunk,
                after_prefill=self.after_prefill,
                after_decode_step=self.after_decode_step)


def method_hooks(spec, config, *, batch: int | None = None, prompt_len: int,
                 max_new_tokens: int, chunk_size: int | None, dtype, profile=None,
                 oracle_scores=None) -> dict:
  """``MethodDriver.create(...).generate_kwargs()``: ``generate`` keyword arguments that run
  method ``spec`` (``batch`` is accepted for older callers; the cache takes it at creation)."""
  del batch
  return MethodDriver.create(spec, config, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                             chunk_size=chunk_size, dtype=dtype, profile=profile,
                             oracle_scores=oracle_scores).generate_kwargs()


# ---- the compiled programs (module level: every driver with equal shapes reuses them) -------

@jit(donate_argnums=0)
def evict_while_decoding(cache):
  """The decode-step eviction of a paged cache: amortised, ``compress(headroom=1)``.

  A layer evicts (back to the budgets) only when a head could not take one more token; a
  step with room to spare costs one ``lax.cond`` per layer. On the embedded model with
  snapkv at budget 1024, an eviction every step cost ~45 ms of a ~100 ms step.
  """
  return cache.compress(headroom=1)


@jit(donate_argnums=0)
def compress_chunk(cache):
  """After a prefill chunk: every head back to its budget."""
  return cache.compress()


@jit(static_argnames=("budgets", "policy"))  # no donation: the re-packed pools have other shapes
def rechunk_for_decoding(cache, budgets=None, policy=None):
  """After the prompt: pools re-packed with room for a page of new tokens per head (so a
  head evicts at most once per page of decoded tokens).

  ``budgets`` / ``policy`` (static): the final budgets and ranking of a prefill that kept
  staging budgets (:func:`staging_budgets`, :func:`final_policy`).

  A KeyDiff score mode (the question-agnostic ranking of a chunked prefill) is for the
  prompt's chunks, which come before the question; while decoding the question has been
  read, and heads rank by the latest window's attention as SnapKV does ("latest"). This also
  keeps decode-time eviction cheap: re-scoring novelty un-rotates and ranks every held key
  (on the embedded model at 4,000 tokens, budget 1024: ~20 ms per evicted layer, against
  ~3-8 ms).
  """
  if policy is not None:
    cache = cache.replace(policy=policy)
  cache = cache.rechunk(cache.page_size, budgets=budgets)
  if cache.policy.uses_novelty:
    cache = cache.replace(policy=dataclasses.replace(cache.policy, score_mode="latest"))
  return cache


@jit(donate_argnums=0)
def _oracle_compress(cache, scores):
  return cache.compress(scores)


@jit
def _oracle_rechunk(cache, scores):
  return cache.rechunk(cache.page_size, scores)


@functools.partial(jax.jit, static_argnames=("plan", "inv_freq"))
def _compress_recorded(recorded, plan: methods_lib.CachePlan, inv_freq: tuple):
  rope = RoPE(inv_freq=np.asarray(inv_freq, np.float32))
  return prompt_stats.compress_prompt(recorded, np.asarray(plan.budgets), plan.spec.policy(),
                                      rope=rope, **plan.paged_kwargs())


__all__ = ["MethodDriver", "method_hooks", "supports_shared_prefill", "resolve_spec",
           "rolled_budget_cap", "staging_budgets", "final_policy",
           "record_window", "record_accumulated", "recording_cache_maker",
           "evict_while_decoding", "compress_chunk", "rechunk_for_decoding"]
