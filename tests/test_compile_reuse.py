"""Prompts of many lengths in one process reuse compiled programs: shapes come from buckets
and, past 1,024 tokens, from coarser size classes.

A library user looping over prompts of slightly different lengths once filled the process's
memory-map limit with one new set of executables per prompt (budgets capped at the exact
prompt length were static configuration). Every static shape now follows the prompt's bucket,
so a sweep compiles once per bucket and method; and the cache capacity and budget caps follow
the bucket's size class, so past 1,024 tokens the decode and compression programs serve
several buckets (only the prefill, whose tokens are the bucket, compiles per bucket). These
tests count the compiled programs.
"""

import dataclasses
import gc

import jax
import numpy as np
from flax import nnx

from headkv_jax.methods import MethodSpec
from models import generation
from models import method_driver
from models import shared_prefill
from models.config import LlamaConfig
from models.llama import Llama
from models.runner import ModelRunner

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
SPECS = [MethodSpec("full"), MethodSpec("snapkv", 48), MethodSpec("h2o", 48),
         MethodSpec("streamingllm", 48)]


def _programs(runner) -> int:
  """Compiled programs so far of the jitted entry points a generation goes through."""
  fns = [runner._decode_block, runner._layerwise._embed, runner._layerwise._layer,
         runner._layerwise._head, method_driver._compress_recorded,
         method_driver.rechunk_for_decoding, method_driver.compress_chunk,
         method_driver.evict_while_decoding]
  return sum(_compiled(f) for f in fns)


def _compiled(fn) -> int:
  """Programs ``fn`` (a jitted function, or a lazy one: ``headkv_jax.jit``) holds."""
  if hasattr(fn, "_jitted"):
    return fn._jitted._cache_size() if "_jitted" in fn.__dict__ else 0
  return fn._cache_size()


def test_ten_prompt_lengths_of_one_bucket_compile_once():
  """10 lengths in (128, 192]: the programs of the first prompt serve the other nine."""
  # The counted entry points are module-level jits that earlier tests in this process filled
  # too, and a near-limit release (memory_maps) in generate_from would empty them mid-test:
  # start from empty caches, so the count is this test's own and far from the limit.
  jax.clear_caches()
  gc.collect()
  runner = ModelRunner(Llama(CFG, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  lengths = [130, 150, 191, 140, 175, 133, 160, 187, 145, 170]
  counts = []
  for n in lengths:
    prompt = list(rng.randint(4, 97, n))
    results, _ = shared_prefill.generate_shared(runner, [prompt], 6, SPECS, eos_ids=[])
    assert all(len(r.tokens[0]) == 6 for r in results)
    for spec in SPECS[1:]:  # and the per-method path (chunked prefill)
      hooks = method_driver.method_hooks(spec, CFG, prompt_len=n, max_new_tokens=6,
                                         chunk_size=64, dtype=runner.model.dtype)
      generation.generate(runner, [prompt], 6, eos_ids=[], **hooks)
    counts.append(_programs(runner))
  assert counts[1:] == [counts[0]] * (len(lengths) - 1), counts


def test_size_classes_are_buckets_up_to_1024_and_at_most_an_eighth_more_past_it():
  """The rounding that decides how many programs a sweep compiles, and what it wastes."""
  classes = [generation.size_class(n) for n in range(1, 70_000)]
  for n, c in enumerate(classes, start=1):
    assert c >= n and c % generation.BUCKET == 0, (n, c)
    assert c == generation.bucket(n) if n <= 1024 else c <= n * 1.125, (n, c)
  assert classes == sorted(classes)  # a longer prompt never gets a smaller cache
  # A sweep of 1,900-2,100-token prompts with 12 new tokens: four buckets, two classes.
  buckets = {generation.bucket(n) for n in range(1900, 2101)}
  assert len(buckets) == 4
  assert {generation.budget_cap(n, 12) for n in range(1900, 2101)} == {2048, 2304}
  assert generation.capacity(1900, 12) == 2048 and generation.capacity(2100, 12) == 2304
  assert generation.capacity(1900, 12, chunk_size=1024) == 2048  # last chunk padded to 2,048
  assert generation.capacity(1900, 12, chunk_size=1536) == 3072


def test_two_buckets_of_one_size_class_share_the_decode_and_compression_programs():
  """1,100 and 1,200 tokens (buckets 1,152 and 1,216, class 1,280 with 6 new tokens): the
  second prompt compiles its prefill's layer program and nothing that decodes or compresses."""
  cfg = dataclasses.replace(CFG, max_position_embeddings=2048)
  jax.clear_caches()  # see test_ten_prompt_lengths_of_one_bucket_compile_once
  gc.collect()
  runner = ModelRunner(Llama(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(1)

  def counts():
    return tuple(_compiled(f) for f in (runner._decode_block, method_driver._compress_recorded,
                                        runner._layerwise._layer))

  seen = []
  for n in (1100, 1200):
    assert generation.budget_cap(n, 6) == 1280
    results, _ = shared_prefill.generate_shared(runner, [list(rng.randint(4, 97, n))], 6,
                                                SPECS, eos_ids=[])
    assert all(len(r.tokens[0]) == 6 for r in results)
    assert all(r.cache.nbytes > 0 for r in results)
    seen.append(counts())
  (decode, compress, layer), (decode2, compress2, layer2) = seen
  assert (decode2, compress2) == (decode, compress), seen
  assert layer2 > layer, seen  # the prefill of a new bucket is a new program
