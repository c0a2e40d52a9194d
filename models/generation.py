"""Batched generation with a KV cache: prefill (whole or chunked), then a jitted decode step.

Prompts of different lengths share one batch: each row is right-padded, padding gets position
``-1`` (never stored, never attended), and every row continues from its own length, so a row
generates exactly what it would alone. Prompt lengths are bucketed to limit recompiles.

The cache is pluggable: ``make_cache(batch, capacity)`` returns any object with the cache
contract (the dense cache by default; a compressed ``headkv_jax`` cache for the policies), and
the optional hooks ``after_prefill_chunk`` / ``after_decode_step`` let a policy evict.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax.dense_cache import DenseKVCache
from models import sampling as sampling_lib
from models.runner import ModelRunner

BUCKET = 64  # prompt lengths are padded up to a multiple of this


@dataclasses.dataclass
class GenerationResult:
  """What :func:`generate` returns.

  Attributes:
    tokens: per prompt, the generated token ids (EOS included if produced).
    prompt_lengths: per prompt, its length in tokens.
    cache: the final cache (for ``nbytes`` and token counts).
    prefill_s: prompt processing time, compression included (compile included on new shapes).
    decode_s / decode_steps: time and count of decode steps after the first (which compiles).
    prefill_cache_bytes: cache bytes held during prefill (before re-packing for decoding).
  """

  tokens: list[list[int]]
  prompt_lengths: list[int]
  cache: object
  prefill_s: float = 0.0
  decode_s: float = 0.0
  decode_steps: int = 0
  prefill_cache_bytes: int = 0


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def check_prompts(prompts: Sequence[Sequence[int]], max_positions: int, max_new_tokens: int,
                  allow_long_context: bool) -> None:
  """Raises a clear error for empty prompts or ones past the model's trained context."""
  if not prompts:
    raise ValueError("No prompts given; pass at least one non-empty prompt.")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token.")
    total = len(p) + max_new_tokens
    if total > max_positions and not allow_long_context:
      raise ValueError(
          f"Prompt {i} has {len(p)} tokens + {max_new_tokens} new tokens = {total}, past the "
          f"model's max_position_embeddings={max_positions}. Shorten it, or opt in with "
          "allow_long_context=True (e.g. with a streamingllm cache in cache_relative mode).")


def pad_batch(prompts: Sequence[Sequence[int]], length: int):
  """Right-pads prompts -> ``tokens [B, length]``, ``positions [B, length]`` (-1 = padding)."""
  b = len(prompts)
  tokens = np.zeros((b, length), np.int32)
  positions = np.full((b, length), -1, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    positions[i, :len(p)] = np.arange(len(p))
  return tokens, positions


@dataclasses.dataclass
class Prefilled:
  """What :func:`prefill` returns: the cache after the prompt and each row's first logits.

  Attributes:
    cache: the cache holding the prompts (after ``after_prefill``).
    last_logits: ``[B, V]`` logits at each row's last prompt token.
    lengths: ``[B]`` prompt lengths.
    prefill_s: prompt processing time, compression included.
    prefill_cache_bytes: cache bytes held during prefill (before ``after_prefill``).
  """

  cache: object
  last_logits: jax.Array
  lengths: np.ndarray
  prefill_s: float
  prefill_cache_bytes: int


def generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    make_cache: Callable[[int, int], object] | None = None,
    chunk_size: int | None = None,
    after_prefill_chunk: Callable[[object], object] | None = None,
    after_prefill: Callable[[object], object] | None = None,
    after_decode_step: Callable[[object], object] | None = None,
    allow_long_context: bool = False,
) -> GenerationResult:
  """Generates up to ``max_new_tokens`` for each prompt; stops a row at EOS."""
  cfg = runner.config
  eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
  done = prefill(runner, prompts, max_new_tokens, make_cache=make_cache,
                 chunk_size=chunk_size, after_prefill_chunk=after_prefill_chunk,
                 after_prefill=after_prefill, allow_long_context=allow_long_context)
  return decode(runner, done.cache, done.last_logits, done.lengths, max_new_tokens,
                sampling=sampling, seed=seed, eos=eos, after_decode_step=after_decode_step,
                prefill_s=done.prefill_s, prefill_cache_bytes=done.prefill_cache_bytes)


def prefill(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    make_cache: Callable[[int, int], object] | None = None,
    chunk_size: int | None = None,
    after_prefill_chunk: Callable[[object], object] | None = None,
    after_prefill: Callable[[object], object] | None = None,
    allow_long_context: bool = False,
) -> Prefilled:
  """Runs the prompts through the model, whole (``chunk_size=None``) or in chunks.

  ``make_cache(batch, capacity)`` gets room for the bucketed prompts plus ``max_new_tokens``
  (the dense cache by default); the hooks run after each chunk and after the last one.
  """
  cfg = runner.config
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  check_prompts(prompts, cfg.max_position_embeddings, max_new_tokens, allow_long_context)
  b = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded = _round_up(int(lengths.max()), BUCKET)
  if make_cache is None:
    make_cache = functools.partial(
        _dense_cache, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, runner.model.dtype)
  cache = make_cache(b, _round_up(padded + max_new_tokens, BUCKET))

  # Prefill, whole or in chunks; the last chunk's logits give each row's first new token.
  t0 = time.perf_counter()
  tokens, positions = pad_batch(prompts, padded)
  chunk = padded if chunk_size is None else chunk_size
  last_logits = None
  for start in range(0, padded, chunk):
    stop = min(start + chunk, padded)
    tok_c, pos_c = tokens[:, start:stop], positions[:, start:stop]
    logits, cache = runner.forward(tok_c, pos_c, cache, last_only=True)
    # A row whose prompt ended in an earlier chunk keeps the logits from that chunk.
    has_tokens = (pos_c >= 0).any(axis=1)
    last_logits = logits if last_logits is None else jnp.where(
        jnp.asarray(has_tokens)[:, None], logits, last_logits)
    if after_prefill_chunk is not None:
      cache = after_prefill_chunk(cache)

  prefill_cache_bytes = int(getattr(cache, "nbytes", 0))
  if after_prefill is not None:
    cache = after_prefill(cache)
  jax.block_until_ready((last_logits, cache))
  return Prefilled(cache, last_logits, lengths, time.perf_counter() - t0, prefill_cache_bytes)


def decode(runner: ModelRunner, cache, last_logits, lengths, max_new_tokens: int, *,
           sampling: sampling_lib.SamplingConfig, seed: int, eos: set[int],
           after_decode_step: Callable[[object], object] | None = None,
           **timing) -> GenerationResult:
  """Samples each row's first token from ``last_logits [B, V]``, then decodes token by token.

  ``lengths [B]`` are the prompt lengths (each row continues at its own position); ``cache``
  is donated to the model calls. ``timing`` (``prefill_s``, ``prefill_cache_bytes``) is
  passed through to the result.
  """
  b = len(lengths)
  lengths = np.asarray(lengths, np.int32)
  key = jax.random.PRNGKey(seed)
  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  if max_new_tokens == 0:
    return GenerationResult(out, lengths.tolist(), cache, **timing)
  t0 = time.perf_counter()
  steps = 0
  key, sub = jax.random.split(key)
  next_tok = np.asarray(sampling_lib.sample(last_logits, sub, sampling))
  for step in range(max_new_tokens):
    for i in range(b):
      if not done[i]:
        out[i].append(int(next_tok[i]))
        done[i] = int(next_tok[i]) in eos
    if done.all() or step == max_new_tokens - 1:
      break
    pos = np.where(done, -1, lengths + step)[:, None].astype(np.int32)  # [B, 1]
    logits, cache = runner.forward(next_tok[:, None], pos, cache, last_only=True)
    if after_decode_step is not None:
      cache = after_decode_step(cache)
    key, sub = jax.random.split(key)
    next_tok = np.asarray(sampling_lib.sample(logits, sub, sampling))
    if step == 0:  # the first step compiles: time the steady state from here
      t0 = time.perf_counter()
    else:
      steps += 1
  decode_s = time.perf_counter() - t0
  return GenerationResult(out, lengths.tolist(), cache, decode_s=decode_s, decode_steps=steps,
                          **timing)


def method_hooks(spec, config, *, batch: int, prompt_len: int, max_new_tokens: int,
                 chunk_size: int | None, dtype, profile=None) -> dict:
  """``generate`` keyword arguments that run compression method ``spec`` (a MethodSpec).

  Prefill is one shot (``chunk_size=None``) or chunked; the cache is compressed after every
  prefill chunk, re-packed for decoding (``rechunk(1)``: decode-time bytes are the budgets'),
  and compressed again after every decode step (h2o re-evicts each step; the others evict once
  a head passes its budget).
  """
  from headkv_jax import methods

  padded = _round_up(prompt_len, BUCKET)
  chunk = padded if chunk_size is None else min(chunk_size, padded)

  def make_cache(b, capacity):
    return methods.make_cache(
        spec, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, batch=b, capacity=capacity, chunk_size=chunk, dtype=dtype,
        max_len=prompt_len + max_new_tokens, profile=profile)

  hooks = dict(make_cache=make_cache, chunk_size=chunk_size)
  if spec.name != "full" or not spec.bit_scheme.is_full_precision:  # a paged cache
    hooks.update(after_prefill_chunk=_jit_compress, after_prefill=_jit_rechunk,
                 after_decode_step=_jit_compress)
  return hooks


@functools.partial(jax.jit, donate_argnums=0)
def _jit_compress(cache):
  return cache.compress()


@jax.jit  # no donation: the re-packed pools have other shapes
def _jit_rechunk(cache):
  return cache.rechunk(1)


def _dense_cache(num_layers, num_kv_heads, head_dim, dtype, batch, capacity):
  return DenseKVCache.create(num_layers, batch, num_kv_heads, head_dim, capacity, dtype)
