"""One sample, one method -> one record of metrics. Every phase is a grid of these.

``evaluate_sample`` runs a generation task (passkey, needles, variable tracking, LongBench)
through a compression method and scores the answer; ``evaluate_perplexity`` streams a long
document through the compressed cache chunk by chunk and scores each chunk's next-token
predictions given what the cache kept. Metrics carry their unit in the key.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import results
from headkv_jax import kernel_decode
from headkv_jax import methods
from models import generation
from models import method_driver
from models import shared_prefill
from models.runner import ModelRunner

DEFAULT_MAX_NEW_TOKENS = 24


def _cache_metrics(cache) -> dict:
  """Bytes, tokens and precision of a cache (the dense cache stores its dtype's bits)."""
  counts = np.asarray(cache.token_counts())  # [layers, B, Hkv]
  metrics = {"cache_bytes": int(cache.nbytes), "kv_tokens_mean": float(counts.mean()),
             "kv_tokens_max": int(counts.max())}
  if hasattr(cache, "head_bits"):
    metrics.update(effective_bits=cache.effective_bits, head_bits=cache.head_bits.tolist(),
                   attention_impl=kernel_decode.resolve_impl(cache.attention_impl),
                   score_mode=cache.policy.score_mode)
  else:
    metrics.update(effective_bits=float(np.dtype(cache.layers[0].k.dtype).itemsize * 8))
  return metrics


def evaluate_sample(runner: ModelRunner, tokenizer, sample, spec: methods.MethodSpec, *,
                    chunk_size: int | None, profile=None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    oracle_scores=None, compile_ahead: bool = True) -> dict:
  """Generates an answer for ``sample`` under ``spec``; returns accuracy, memory and timing.

  ``oracle_scores``: the oracle's answer attention (``experiments.phase0.oracle_scores``).
  ``compile_ahead``: as :func:`models.generation.generate` (False: ``prefill_s`` has the
  cores to itself, the decode block compiling after it).
  """
  cfg = runner.config
  prompt = list(sample.prompt_tokens)
  driver = method_driver.MethodDriver.create(
      spec, cfg, prompt_len=len(prompt), max_new_tokens=max_new_tokens, chunk_size=chunk_size,
      dtype=runner.model.dtype, profile=profile, oracle_scores=oracle_scores)
  out = generation.generate(runner, [prompt], max_new_tokens, allow_long_context=True,
                            compile_ahead=compile_ahead, **driver.generate_kwargs())
  return {**_answer_record(runner, tokenizer, sample, out, max_new_tokens),
          **_prefill_fields(driver.spec, driver.plan.dense)}


def _prefill_fields(spec: methods.MethodSpec, dense: bool) -> dict:
  """What ``score_mode="auto"`` and ``staging=None`` resolved to for the prompt (``spec`` as
  the driver ran it); decoding then ranks by "latest" (``rechunk_for_decoding``)."""
  return {} if dense else {"score_mode": spec.score_mode, "staging": spec.staging}


def evaluate_from_shared(runner: ModelRunner, tokenizer, sample, shared, spec, *,
                         profile=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
  """``evaluate_sample`` of ``spec`` with one-shot eviction, from a shared prefill of ``sample``
  (``models.shared_prefill.prefill``).

  The record is that of ``evaluate_sample(..., chunk_size=None)`` (same kept tokens, same
  answer; see ``models.shared_prefill``), plus ``shared_prefill: True`` and
  ``shared_prefill_s``; ``prefill_s`` is the shared prefill plus the spec's compression, and
  ``peak_rss_bytes`` is the process's (shared prefills are held while methods run).
  """
  out = shared_prefill.generate_from(runner, shared, spec, profile=profile)
  return {**_answer_record(runner, tokenizer, sample, out, max_new_tokens),
          **_prefill_fields(spec.for_prefill(False), spec.dense),
          "shared_prefill": True, "shared_prefill_s": shared.prefill_s}


def _answer_record(runner: ModelRunner, tokenizer, sample, out, max_new_tokens: int) -> dict:
  """A generation task's metrics from a ``GenerationResult`` of one prompt."""
  cfg = runner.config
  prompt = sample.prompt_tokens
  text = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
  record = {
      "accuracy": float(sample.score(text)),
      "prompt_tokens": len(prompt),
      "past_context": cfg.past_context(len(prompt) + max_new_tokens),
      "prefill_s": out.prefill_s,
      "prefill_tok_per_s": len(prompt) / out.prefill_s if out.prefill_s else None,
      "decode_ms_per_token": (1e3 * out.decode_s / out.decode_steps
                              if out.decode_steps else None),
      "prefill_cache_bytes": out.prefill_cache_bytes,
      "peak_rss_bytes": results.peak_rss_bytes(),
      "generated": text[:200],
  }
  record.update(_cache_metrics(out.cache))
  return record


def evaluate_perplexity(runner: ModelRunner, sample, spec: methods.MethodSpec, *,
                        chunk_size: int, profile=None) -> dict:
  """Perplexity of ``sample.prompt_tokens`` streamed in chunks through the method's cache.

  Chunk ``i`` is scored given the (compressed) cache of chunks ``< i`` plus itself, then the
  cache is compressed to the budgets: the long-document setting of StreamingLLM / H2O
  evaluations. A stream has no end of prompt to stage towards, so ``spec.staging`` is 1 here.
  """
  cfg = runner.config
  tokens = np.asarray(sample.prompt_tokens, np.int32)
  n = len(tokens)
  driver = method_driver.MethodDriver.create(
      dataclasses.replace(spec, staging=1.0), cfg, prompt_len=n, max_new_tokens=0,
      chunk_size=chunk_size,
      dtype=runner.model.dtype, profile=profile)
  width = driver.prefill_chunk  # chunk_size, or the bucketed document if that is shorter
  cache = driver.make_cache(1, generation.bucket(n))
  compress = driver.after_prefill_chunk
  nll, count = 0.0, 0
  start_t = time.perf_counter()
  for start in range(0, n - 1, width):
    stop = min(start + width, n - 1)
    chunk = np.zeros((1, width), np.int32)
    pos = np.full((1, width), -1, np.int32)
    chunk[0, :stop - start] = tokens[start:stop]
    pos[0, :stop - start] = np.arange(start, stop)
    logits, cache = runner.forward(chunk, pos, cache)
    targets = jnp.asarray(tokens[start + 1:stop + 1])
    logp = jax.nn.log_softmax(logits[0, :stop - start].astype(jnp.float32), axis=-1)
    nll -= float(jnp.sum(jnp.take_along_axis(logp, targets[:, None], axis=1)))
    count += stop - start
    if compress is not None:
      cache = compress(cache)
  seconds = time.perf_counter() - start_t
  record = {"perplexity": math.exp(nll / count), "nll_per_token": nll / count,
            "prompt_tokens": n, "past_context": cfg.past_context(n),
            "prefill_s": seconds, "peak_rss_bytes": results.peak_rss_bytes()}
  record.update(_cache_metrics(cache))
  return record
