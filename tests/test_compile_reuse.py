"""Prompts of many lengths in one process reuse compiled programs: shapes come from buckets.

A library user looping over prompts of slightly different lengths once filled the process's
memory-map limit with one new set of executables per prompt (budgets capped at the exact
prompt length were static configuration). Every static shape now follows the prompt's bucket,
so a sweep compiles once per bucket and method; this test counts the compiled programs.
"""

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
  return sum(f._jitted._cache_size() if hasattr(f, "_jitted") else f._cache_size()
             for f in fns if not hasattr(f, "_jitted") or "_jitted" in f.__dict__)


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
