"""Batched generation with a KV cache: prefill (whole or chunked), then compiled decode blocks.

Prompts of different lengths share one batch: each row is right-padded, padding gets position
``-1`` (never stored, never attended), and every row continues from its own length, so a row
generates exactly what it would alone. Prompt lengths are bucketed to limit recompiles.

Decoding runs in blocks: one jitted program (a ``lax.while_loop``) runs up to ``block_size``
steps on device, each step = the model's forward for one token per row, the policy's eviction
hook and sampling, with EOS handled on device; the tokens come to the host once per block.
``compiled=False`` runs the same steps one by one from Python (the reference the blocks are
tested against: both give the same tokens).

The cache is pluggable: ``make_cache(batch, capacity)`` returns any object with the cache
contract (the dense cache by default; a compressed ``headkv_jax`` cache for the policies), and
the optional hooks ``after_prefill_chunk`` / ``after_prefill`` / ``after_decode_step`` let a
policy evict. ``models.method_driver.MethodDriver`` provides all of them for a compression
method (``generate(runner, prompts, n, **driver.generate_kwargs())``).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from headkv_jax import memory_maps
from headkv_jax.dense_cache import DenseKVCache
from models import sampling as sampling_lib
from models.runner import ModelRunner

BUCKET = 64  # prompt lengths are padded up to a multiple of this
DECODE_BLOCK = 32  # decode steps per compiled block (tokens go to the host once per block)


@dataclasses.dataclass
class GenerationResult:
  """What :func:`generate` returns.

  Attributes:
    tokens: per prompt, the generated token ids (EOS included if produced).
    prompt_lengths: per prompt, its length in tokens.
    cache: the final cache (for ``nbytes`` and token counts).
    prefill_s: prompt processing time, compression included (compile included on new shapes).
    decode_s / decode_steps: wall time and count of the model's decode steps (one token per
      row each, eviction and sampling included), compile excluded. Compiled blocks: every
      step, timed from after the block's compile (an empty warm-up run) to the last block's
      tokens on the host. ``compiled=False``: the steps after the first (which compiles).
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


def bucket(n: int) -> int:
  """``n`` tokens rounded up to a multiple of :data:`BUCKET` (prompts are padded to it)."""
  return _round_up(n, BUCKET)


def size_class(n: int) -> int:
  """``n`` tokens rounded up to their size class: a multiple of :data:`BUCKET` up to 1,024,
  past it a multiple of 1/16 of the next power of two (128 up to 2,048, 256 up to 4,096, ...;
  at most 12.5% more than ``n``).

  Cache capacities and budget caps come from this, so prompts of many buckets share one
  decode program per method (1,900-2,100 tokens plus a few new ones: two classes, 2,048 and
  2,304), while short prompts keep their bucket.
  """
  step = max(BUCKET, (1 << max(0, int(n) - 1).bit_length()) // 16)
  return _round_up(int(n), step)


def chunk_width(prompt_len: int, chunk_size: int | None) -> int:
  """The columns of every prefill call for a ``prompt_len``-token prompt: ``chunk_size``
  (None: one call), at most the prompt's bucket."""
  padded = bucket(prompt_len)
  return padded if chunk_size is None else min(chunk_size, padded)


def prefill_columns(prompt_len: int, chunk_size: int | None) -> int:
  """The columns of all prefill calls together: the prompt's bucket rounded up to whole
  chunks of :func:`chunk_width` (the last chunk padded)."""
  return _round_up(bucket(prompt_len), chunk_width(prompt_len, chunk_size))


def capacity(prompt_len: int, max_new_tokens: int, chunk_size: int | None = None) -> int:
  """The cache positions :func:`prefill` makes room for: the prompt's bucket plus the new
  tokens, and the last chunk's padding columns (``chunk_size``; None: one call), as a
  :func:`size_class`."""
  return size_class(max(bucket(prompt_len) + max_new_tokens,
                        prefill_columns(prompt_len, chunk_size)))


def budget_cap(prompt_len: int, max_new_tokens: int) -> int:
  """The most tokens a method's budgets need: the prompt's bucket plus the new tokens, as a
  :func:`size_class`.

  From the class, not the exact length, so every prompt of one class gets the same static
  budgets and pool shapes, and reuses one compiled program per method.
  """
  return size_class(bucket(prompt_len) + max_new_tokens)


def check_prompts(prompts: Sequence[Sequence[int]], config, max_new_tokens: int,
                  allow_long_context: bool) -> None:
  """Raises a clear error for empty prompts or ones past ``config``'s trained context."""
  if not prompts:
    raise ValueError("No prompts given; pass at least one non-empty prompt.")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token.")
    total = len(p) + max_new_tokens
    if config.past_context(total) and not allow_long_context:
      raise ValueError(
          f"Prompt {i} has {len(p)} tokens + {max_new_tokens} new tokens = {total}, past the "
          f"model's max_position_embeddings={config.max_position_embeddings}. Shorten it, or opt in with "
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
    block_size: int = DECODE_BLOCK,
    compiled: bool = True,
    compile_ahead: bool = True,
) -> GenerationResult:
  """Generates up to ``max_new_tokens`` for each prompt; stops a row at EOS.

  ``block_size`` / ``compiled`` choose the decode loop (see :func:`decode`).
  ``compile_ahead``: compile the decode block while the prefill computes (the first call of
  new shapes waits for the larger of the two, not their sum; ``prefill_s`` then shares the
  cores with that compile).
  """
  cfg = runner.config
  eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
  ahead = None
  if compiled and compile_ahead and max_new_tokens > 1:
    ahead = functools.partial(_compile_decode_ahead, runner, sampling=sampling, eos=eos,
                              after_decode_step=after_decode_step, block_size=block_size)
  done = prefill(runner, prompts, max_new_tokens, make_cache=make_cache,
                 chunk_size=chunk_size, after_prefill_chunk=after_prefill_chunk,
                 after_prefill=after_prefill, allow_long_context=allow_long_context,
                 while_computing=ahead)
  return decode(runner, done.cache, done.last_logits, done.lengths, max_new_tokens,
                sampling=sampling, seed=seed, eos=eos, after_decode_step=after_decode_step,
                block_size=block_size, compiled=compiled, prefill_s=done.prefill_s,
                prefill_cache_bytes=done.prefill_cache_bytes)


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
    while_computing: Callable | None = None,
) -> Prefilled:
  """Runs the prompts through the model, whole (``chunk_size=None``) or in chunks.

  ``make_cache(batch, capacity)`` gets room for the bucketed prompts plus ``max_new_tokens``
  (and for the last chunk's padding columns; the dense cache by default); every chunk has
  ``chunk_size`` columns (the last padded with position ``-1``), so one program serves every
  chunk; the hooks run after each chunk and after the last one. ``while_computing(cache,
  lengths) -> wait`` is called once the prefill is dispatched, before its results are
  waited for and before ``after_prefill`` runs, with the shapes (``jax.ShapeDtypeStruct``
  leaves) of the cache ``after_prefill`` will return (after it, with its result, for a hook
  that needs concrete values); ``wait()`` is called at the end (:func:`generate` compiles
  the decode block there).
  """
  cfg = runner.config
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  check_prompts(prompts, cfg, max_new_tokens, allow_long_context)
  memory_maps.release_near_limit()  # a long loop of calls compiles many programs
  b = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  longest = int(lengths.max())
  chunk = chunk_width(longest, chunk_size)
  # Every chunk has `chunk` columns, the last one padded (position -1, never stored): one
  # compiled program per chunk size, not a second one for a shorter last chunk (a new shape
  # compiles every distinct layer again: 125 s for head-aware's 30 ragged layers at 4k).
  total = prefill_columns(longest, chunk)
  if make_cache is None:
    make_cache = functools.partial(
        _dense_cache, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, runner.model.dtype)
  # A dense cache writes a chunk's padding columns past its tokens: room for the last chunk.
  cache = make_cache(b, capacity(longest, max_new_tokens, chunk))

  # Prefill, whole or in chunks; the last chunk's logits give each row's first new token.
  t0 = time.perf_counter()
  tokens, positions = pad_batch(prompts, total)
  last_logits = None
  for start in range(0, total, chunk):
    tok_c, pos_c = tokens[:, start:start + chunk], positions[:, start:start + chunk]
    logits, cache = runner.forward(tok_c, pos_c, cache, last_only=True)
    # A row whose prompt ended in an earlier chunk keeps the logits from that chunk.
    has_tokens = (pos_c >= 0).any(axis=1)
    last_logits = logits if last_logits is None else jnp.where(
        jnp.asarray(has_tokens)[:, None], logits, last_logits)
    if after_prefill_chunk is not None:
      cache = after_prefill_chunk(cache)

  prefill_cache_bytes = int(getattr(cache, "nbytes", 0))
  # The decode block compiles from the shapes after_prefill will return, before it runs: the
  # hook's own first compile (a one-shot compression's) then overlaps the block's.
  final = None
  if while_computing is not None:
    try:
      final = cache if after_prefill is None else jax.eval_shape(after_prefill, cache)
    except TypeError:  # a hook that needs concrete values (jax's tracer errors): after it
      pass
  wait = None if final is None else while_computing(final, lengths)
  if after_prefill is not None:
    cache = after_prefill(cache)
  if while_computing is not None and wait is None:
    wait = while_computing(cache, lengths)
  jax.block_until_ready((last_logits, cache))
  seconds = time.perf_counter() - t0
  if wait is not None:
    wait()
  return Prefilled(cache, last_logits, lengths, seconds, prefill_cache_bytes)


def decode(runner: ModelRunner, cache, last_logits, lengths, max_new_tokens: int, *,
           sampling: sampling_lib.SamplingConfig, seed: int, eos: set[int],
           after_decode_step: Callable[[object], object] | None = None,
           block_size: int = DECODE_BLOCK, compiled: bool = True,
           **timing) -> GenerationResult:
  """Samples each row's first token from ``last_logits [B, V]``, then decodes the rest.

  ``lengths [B]`` are the prompt lengths (each row continues at its own position); ``cache``
  is donated. ``compiled=True`` decodes in jitted blocks of up to ``block_size`` steps, the
  tokens coming to the host once per block; ``after_decode_step`` is traced inside, so it must
  be jax-traceable, and it is part of the compiled program: pass one function (a module-level
  jit, or a ``functools.partial`` of one with array arguments, see :func:`_split_hook`), not
  a new closure per call, or every call compiles a new block. ``compiled=False`` steps from
  Python: one jitted forward and one ``after_decode_step`` call per token. Both give the same
  tokens (same PRNG key per step). ``timing`` (``prefill_s``, ``prefill_cache_bytes``) is
  passed through.
  """
  if block_size <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  b = len(lengths)
  lengths = np.asarray(lengths, np.int32)
  if max_new_tokens == 0:
    return GenerationResult([[] for _ in range(b)], lengths.tolist(), cache, **timing)
  key, sub = jax.random.split(jax.random.PRNGKey(seed))
  first = np.asarray(sampling_lib.sample(last_logits, sub, sampling))  # [B]
  run = _decode_blocks if compiled else _decode_steps
  out, cache, decode_s, steps = run(
      runner, cache, key, first, lengths, max_new_tokens, sampling=sampling, eos=eos,
      after_decode_step=after_decode_step, block_size=block_size)
  return GenerationResult(out, lengths.tolist(), cache, decode_s=decode_s, decode_steps=steps,
                          **timing)


def _decode_steps(runner, cache, key, next_tok, lengths, max_new_tokens, *, sampling, eos,
                  after_decode_step, block_size):
  """The step-by-step loop: returns ``(tokens per row, cache, decode_s, steps)``."""
  del block_size  # one step at a time
  b = len(lengths)
  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  t0 = time.perf_counter()
  steps = 0
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
  return out, cache, time.perf_counter() - t0, steps


class DecodeState(NamedTuple):
  """What a decode block carries from step to step (and from block to block, donated).

  Attributes:
    cache: the KV cache.
    key: the PRNG key the next step splits.
    tokens: ``[B]`` int32 each row's last sampled token (the next step's input).
    done: ``[B]`` bool rows that emitted EOS (they decode at position ``-1`` from then on).
    emitted: int32 scalar, tokens emitted so far (the first, sampled from prefill, included).
  """

  cache: object
  key: jax.Array
  tokens: jax.Array
  done: jax.Array
  emitted: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeLoop:
  """One block of decode steps, traced inside ``ModelRunner.decode_block`` (static).

  A step feeds each row's last token at position ``length + emitted - 1`` (``-1`` once the row
  is done), runs ``hook(*hook_args, cache, **hook_kwargs)`` (the method's eviction), splits
  the key and samples, exactly as the step-by-step loop. The block stops after ``block``
  steps, when ``emitted`` reaches ``limit`` (a traced count: the last, shorter block runs the
  same program) or when every row is done.
  """

  block: int
  sampling: sampling_lib.SamplingConfig
  hook: Callable | None = None

  def __call__(self, step, state: DecodeState, lengths, eos, limit, hook_operands):
    """-> ``(state, tokens [B, block])``: the tokens each row emitted, ``-1`` after the end."""
    hook_args, hook_kwargs = hook_operands

    def cond(carry):
      i, s, _ = carry
      return (i < self.block) & (s.emitted < limit) & ~jnp.all(s.done)

    def body(carry):
      i, s, tokens = carry
      positions = jnp.where(s.done, -1, lengths + s.emitted - 1)  # [B]
      logits, cache = step(s.tokens, positions, s.cache)
      if self.hook is not None:
        cache = self.hook(*hook_args, cache, **hook_kwargs)
      key, sub = jax.random.split(s.key)
      new = sampling_lib.sample(logits, sub, self.sampling)  # [B]
      tokens = tokens.at[:, i].set(jnp.where(s.done, -1, new))
      done = s.done | (new[:, None] == eos[None, :]).any(axis=1)
      return i + 1, DecodeState(cache, key, new, done, s.emitted + 1), tokens

    tokens = jnp.full((state.tokens.shape[0], self.block), -1, jnp.int32)  # [B, block]
    _, state, tokens = lax.while_loop(cond, body, (jnp.int32(0), state, tokens))
    return state, tokens


def _block_inputs(cache, key, first, done, lengths, eos, after_decode_step, block_size,
                  sampling):
  """A decode block's static loop and its arguments after ``state``: ``(loop, state,
  (lengths, eos, hook_operands))``; the arguments may be arrays or ``jax.ShapeDtypeStruct``s
  (:func:`_compile_decode_ahead` lowers the same block from shapes alone)."""
  hook, hook_operands = _split_hook(after_decode_step)
  loop = DecodeLoop(block_size, sampling, hook)
  state = DecodeState(cache, key, first, done, jnp.int32(1))
  return loop, state, (lengths, eos, hook_operands)


def _eos_array(eos: set[int]) -> np.ndarray:
  return np.asarray(sorted(eos), np.int32).reshape(-1)  # [E]


def _decode_blocks(runner, cache, key, first, lengths, max_new_tokens, *, sampling, eos,
                   after_decode_step, block_size):
  """Decodes in compiled blocks: returns ``(tokens per row, cache, decode_s, steps)``."""
  out = [[int(t)] for t in first]
  done = np.isin(first, list(eos))
  if done.all() or max_new_tokens == 1:
    return out, cache, 0.0, 0
  loop, state, (lengths, eos, hook_operands) = _block_inputs(
      cache, key, jnp.asarray(first), jnp.asarray(done), jnp.asarray(lengths),
      jnp.asarray(_eos_array(eos)), after_decode_step, block_size, sampling)
  # Compile outside the timed region: a limit of 0 runs no step (and keeps the state).
  state, _ = runner.decode_block(loop, state, lengths, eos, jnp.int32(0), hook_operands)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  limit = jnp.int32(max_new_tokens)
  while True:
    state, tokens = runner.decode_block(loop, state, lengths, eos, limit, hook_operands)
    tokens, emitted, done = jax.device_get((tokens, state.emitted, state.done))
    for row, new in zip(out, tokens):
      row.extend(int(t) for t in new if t >= 0)
    if done.all() or emitted >= max_new_tokens:
      break
  return out, state.cache, time.perf_counter() - t0, int(emitted) - 1


def _compile_decode_ahead(runner, cache, lengths, *, sampling, eos, after_decode_step,
                          block_size):
  """Starts compiling the decode block for ``cache`` (a prefill's result, maybe still being
  computed) in a thread; returns a function that waits for it.

  The block's program depends on the shapes only, so it can compile while the prefill runs
  (XLA computes on its own threads; the caller waits for the prefill): a first call's
  tracing and compiling of the decode program, seconds for 30 unrolled layers, no longer
  follow the prefill but overlap it. The later :meth:`ModelRunner.decode_block` call finds
  the program compiled. An error here is dropped: that call raises it where it belongs.
  """
  def shape(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

  b = len(lengths)
  key = jax.eval_shape(jax.random.PRNGKey, 0)
  row = lambda dtype: jax.ShapeDtypeStruct((b,), dtype)
  args = _block_inputs(jax.tree_util.tree_map(shape, cache), key, row(jnp.int32),
                       row(jnp.bool_), row(jnp.int32), shape(_eos_array(eos)),
                       after_decode_step, block_size, sampling)
  loop, state, (lengths, eos, hook_operands) = args

  def compile_block():
    try:
      runner.lower_decode_block(loop, state, lengths, eos, jax.ShapeDtypeStruct((), jnp.int32),
                                hook_operands).compile()
    except Exception:  # pylint: disable=broad-except
      pass

  thread = threading.Thread(target=compile_block, name="compile-decode-block", daemon=True)
  thread.start()
  return thread.join


def _split_hook(hook):
  """``hook`` as ``(static function, (args, kwargs))`` for :class:`DecodeLoop`.

  A ``functools.partial`` whose bound arguments are all arrays is split: its function is
  static and its arrays are operands of the compiled block, so new arrays (e.g. the oracle's
  scores per sample) reuse the program. Any other hook is static as it is: a new closure per
  call compiles a new block.
  """
  if isinstance(hook, functools.partial):
    bound = (hook.args, dict(hook.keywords))
    leaves = jax.tree_util.tree_leaves(bound)
    if leaves and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
      return hook.func, bound
  return hook, ((), {})


def _dense_cache(num_layers, num_kv_heads, head_dim, dtype, batch, capacity):
  return DenseKVCache.create(num_layers, batch, num_kv_heads, head_dim, capacity, dtype)
