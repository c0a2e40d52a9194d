"""One prefill, many compression methods: a budget sweep at the cost of one prompt pass.

With one-shot eviction (the whole prompt prefilled with exact attention, then compressed
once) every method sees the same keys, values and first new token; they differ only in which
tokens each head keeps. ``generate_shared`` prefills once through a
:class:`headkv_jax.prompt_stats.RecordingCache`, then for each method builds its compressed
cache (``prompt_stats.compress_prompt``: the policy's own selection) and decodes from it,
exactly as :func:`models.generation.generate` with
``MethodDriver.create(spec, ..., chunk_size=None)`` (``models.method_driver``) would, minus the
repeated prefills::

    results, prefill_s = generate_shared(runner, [prompt], 12, [MethodSpec('full'),
                                         MethodSpec('snapkv', 128), MethodSpec('h2o', 128)])

Each result's ``prefill_s`` is the shared prefill plus that method's compression; decoding
runs per method (h2o keeps evicting every step, as in the per-method path). For a sweep over
many samples, hold several :class:`SharedPrefill` (``prefill``) and run the methods over them
one after another (``generate_from``), so each method compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from headkv_jax import memory_maps
from headkv_jax import methods as methods_lib
from headkv_jax import prompt_stats
from models import generation
from models import method_driver
from models import sampling as sampling_lib
from models.runner import ModelRunner


def supports(spec: methods_lib.MethodSpec) -> bool:
  """Whether ``spec`` can share a prefill (not the oracle; keys in "original" mode)."""
  return method_driver.supports_shared_prefill(spec)


def check_supported(specs: Sequence[methods_lib.MethodSpec]) -> None:
  """Raises ValueError naming the specs that cannot share a prefill (see :func:`supports`)."""
  bad = [s.name for s in specs if not supports(s)]
  if bad:
    raise ValueError(f"Methods {bad} cannot share a prefill (the oracle needs the answer's "
                     "attention; cache_relative positions need un-rotated keys).")


def record_window(specs: Sequence[methods_lib.MethodSpec]) -> int:
  """How many last queries a shared prefill must record for ``specs`` (their largest window)."""
  check_supported(specs)
  return method_driver.record_window(specs)


@dataclasses.dataclass
class SharedPrefill:
  """One prompt batch prefilled once, ready to be compressed by any method.

  Attributes:
    recorded: the dense cache and the statistics of every policy.
    logits: ``[B, V]`` each row's last-prompt-token logits (its first new token).
    lengths: ``[B]`` prompt lengths.
    max_new_tokens: tokens each method will generate (caps the budgets, sizes the cache).
    prefill_s: seconds of the shared prefill.
  """

  recorded: prompt_stats.RecordingCache
  logits: jax.Array
  lengths: np.ndarray
  max_new_tokens: int
  prefill_s: float

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.recorded))


def prefill(runner: ModelRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
            window: int, accumulate: bool = True,
            allow_long_context: bool = False) -> SharedPrefill:
  """Prefills ``prompts`` once (one call) recording the last ``window`` queries' attention,
  and with ``accumulate`` every query's summed attention (only H2O ranks by it:
  :func:`record_accumulated`)."""
  make_cache = method_driver.recording_cache_maker(runner.config, runner.model.dtype, window,
                                                   accumulate)
  done = generation.prefill(runner, prompts, max_new_tokens, make_cache=make_cache,
                            allow_long_context=allow_long_context)
  prompt_stats.check_one_shot(done.cache)
  return SharedPrefill(done.cache, done.last_logits, done.lengths, max_new_tokens,
                       done.prefill_s)


def generate_from(runner: ModelRunner, shared: SharedPrefill, spec: methods_lib.MethodSpec,
                  *, profile=None,
                  sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
                  seed: int = 0, eos_ids: Sequence[int] | None = None
                  ) -> generation.GenerationResult:
  """Compresses ``shared`` with ``spec`` and decodes; ``shared`` stays usable for others.

  ``prefill_s`` of the result is the shared prefill plus this method's compression; ``full``
  decodes from a copy of the dense cache.
  """
  cfg = runner.config
  check_supported([spec])
  memory_maps.release_near_limit()  # each method compiles its own programs
  eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
  run = functools.partial(
      generation.decode, runner, last_logits=shared.logits, lengths=shared.lengths,
      max_new_tokens=shared.max_new_tokens, sampling=sampling, seed=seed, eos=eos,
      prefill_cache_bytes=shared.recorded.nbytes)
  t0 = time.perf_counter()
  driver = method_driver.MethodDriver.create(
      spec, cfg, prompt_len=int(shared.lengths.max()), max_new_tokens=shared.max_new_tokens,
      chunk_size=None, dtype=shared.recorded.dense.layers[0].k.dtype, profile=profile)
  if driver.plan.dense:
    cache = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, shared.recorded.dense))
    return run(cache=cache, prefill_s=shared.prefill_s + time.perf_counter() - t0)
  cache = jax.block_until_ready(driver.compress_recorded(shared.recorded))
  return run(cache=cache, prefill_s=shared.prefill_s + time.perf_counter() - t0,
             after_decode_step=driver.after_decode_step)


def generate_shared(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    specs: Sequence[methods_lib.MethodSpec],
    *,
    profiles: Sequence[object] | object = None,
    sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    allow_long_context: bool = False,
) -> tuple[list[generation.GenerationResult], float]:
  """Generates for ``prompts`` under each of ``specs`` after one shared one-shot prefill.

  Args:
    runner, prompts, max_new_tokens, sampling, seed, eos_ids, allow_long_context: as
      :func:`models.generation.generate`.
    specs: the methods (``full`` included or not); see :func:`supports`.
    profiles: one head profile for every spec, or one per spec (None where unused).

  Returns:
    ``(results, shared_prefill_s)``: one :class:`GenerationResult` per spec, in order.
  """
  specs = list(specs)
  if not isinstance(profiles, (list, tuple)):
    profiles = [profiles] * len(specs)
  if len(profiles) != len(specs):
    raise ValueError(f"Got {len(profiles)} profiles for {len(specs)} specs.")
  shared = prefill(runner, prompts, max_new_tokens, window=record_window(specs),
                   accumulate=method_driver.record_accumulated(specs),
                   allow_long_context=allow_long_context)
  results = [generate_from(runner, shared, s, profile=p, sampling=sampling, seed=seed,
                           eos_ids=eos_ids) for s, p in zip(specs, profiles)]
  return results, shared.prefill_s


__all__ = ["supports", "check_supported", "record_window", "SharedPrefill",
           "prefill", "generate_from", "generate_shared"]
