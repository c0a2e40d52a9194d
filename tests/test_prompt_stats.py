"""Prefill once, compress many: the shared path keeps and generates what each method alone does."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from headkv_jax import cache_attention
from headkv_jax import methods
from headkv_jax import prompt_stats
from headkv_jax.dense_cache import DenseKVCache
from models.config import LlamaConfig
from models.generation import generate
from models import method_driver
from models.method_driver import method_hooks
from models.llama import Llama
from models.runner import ModelRunner
from models.shared_prefill import generate_shared
from tests import tiny_models

# Two layers: enough for per-layer budgets (pyramidkv) and for a mixed-bits layer next to a
# uniform one (roles below); each more layer only adds compile time to every spec.
CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
NEW = 6


@pytest.fixture(scope="module")
def runner():
  return ModelRunner(Llama(CFG, rngs=nnx.Rngs(5)))


@pytest.fixture(scope="module")
def profile():
  return tiny_models.tiny_profile(1, [[0, 1], [2, 2]])  # a mixed layer, a uniform one


def _prompts():
  rng = np.random.RandomState(2)
  return [list(rng.randint(4, 97, n)) for n in (150, 97)]


# One spec per distinct path (each spec costs two compiles shared and ~three alone, the
# bulk of this file's time): dense full; snapkv with a non-default window / pool / GQA
# reduce (the defaults are the scoring of pyramidkv, adakv and headaware); h2o's
# accumulated scores and per-step eviction (quantized, which adds nothing to its
# selection); streamingllm's positional choice; per-layer, per-head and profile budgets;
# mixed bits by role; quantized full.
SPECS = [methods.MethodSpec("full"),
         methods.MethodSpec("snapkv", 40, window=8, pool_kernel=3, gqa_reduce="max"),
         methods.MethodSpec("streamingllm", 24),
         methods.MethodSpec("pyramidkv", 48),
         methods.MethodSpec("adakv", 40, score_mode="keydiff_window"),  # both ranks' union
         methods.MethodSpec("headaware", 40),
         # HAQ-KV: the shared path quantizes the same kept tokens the same way; KeyDiff's
         # key-novelty scores (recorded by the shared prefill, re-scored on dequantized keys
         # while decoding) rank the same.
         methods.MethodSpec("headaware", 40, kv_bits="roles", score_mode="keydiff"),
         methods.MethodSpec("h2o", 24, kv_bits="4/2"), methods.MethodSpec("full", kv_bits="8")]


def test_shared_prefill_matches_each_method_alone(runner, profile):
  """Per method: same generated tokens and the same kept positions per (layer, row, head) as
  a one-shot prefill through that method's own paged cache (one prefill chunk that holds the
  whole prompt; ``chunk_size=None`` itself now takes the shared path), ragged batch of two."""
  prompts = _prompts()
  shared, shared_s = generate_shared(runner, prompts, NEW, SPECS, profiles=profile,
                                     eos_ids=[])
  assert shared_s > 0
  for spec, got in zip(SPECS, shared):
    hooks = method_hooks(spec, CFG, batch=2, prompt_len=max(map(len, prompts)),
                         max_new_tokens=NEW, chunk_size=256, dtype=np.float32,
                         profile=profile)
    alone = generate(runner, prompts, NEW, eos_ids=[], **hooks)
    assert got.tokens == alone.tokens, spec
    if spec is SPECS[6]:  # chunk_size=None routes through the shared path (one spec shows it)
      one_shot = method_hooks(spec, CFG, batch=2, prompt_len=max(map(len, prompts)),
                              max_new_tokens=NEW, chunk_size=None, dtype=np.float32,
                              profile=profile)
      assert generate(runner, prompts, NEW, eos_ids=[], **one_shot).tokens == got.tokens
    if spec.name == "full":
      continue
    for layer in range(CFG.num_layers):
      want, have = alone.cache.view(layer)[2], got.cache.view(layer)[2]  # positions
      np.testing.assert_array_equal(np.sort(np.asarray(have), -1),
                                    np.sort(np.asarray(want), -1), err_msg=str(spec))
    assert got.cache.nbytes == alone.cache.nbytes


def test_attention_stats_match_the_reference_probabilities():
  """accumulated = column sums of the causal softmax over every real query; window = the rows
  of the last W real queries (brute force via cache_attention, padding row included)."""
  rng = np.random.RandomState(0)
  b, t, hq, hkv, d, w = 2, 40, 4, 2, 8, 5
  q = jnp.asarray(rng.randn(b, t, hq, d), jnp.float32)
  k = jnp.asarray(rng.randn(b, t, hkv, d), jnp.float32)
  pos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
  pos[1, 33:] = -1  # row 1 has 33 real tokens
  pos = jnp.asarray(pos)
  acc, win = prompt_stats.attention_stats(q, k, pos, w, query_block=16)
  qg = q.reshape(b, t, hkv, 2, d).transpose(0, 2, 3, 1, 4)
  kt = k.transpose(0, 2, 1, 3)
  empty_k = jnp.zeros((b, hkv, 0, d))
  _, probs = cache_attention.attention_over_cache(
      qg, empty_k, empty_k, jnp.zeros((b, hkv, 0), jnp.int32), kt, kt, pos)
  probs = np.asarray(probs)  # [B, Hkv, G, T, T]
  np.testing.assert_allclose(np.asarray(acc), probs.sum(axis=3), rtol=1e-5, atol=1e-6)
  for row, n in ((0, 40), (1, 33)):
    np.testing.assert_allclose(np.asarray(win)[row], probs[row, :, :, n - w:n],
                               rtol=1e-5, atol=1e-6)
  # Without the accumulated pass (no H2O among the methods) the window is the same.
  none, win_only = prompt_stats.attention_stats(q, k, pos, w, query_block=16, accumulate=False)
  assert none is None
  np.testing.assert_array_equal(np.asarray(win_only), np.asarray(win))


def test_compress_prompt_refuses_what_it_cannot_do():
  """Clear errors: oracle, cache_relative, no statistics yet, a window larger than recorded."""
  dense = DenseKVCache.create(1, 1, 2, 8, 64)
  rec = prompt_stats.RecordingCache.create(dense, window=4)
  from headkv_jax import policies
  with pytest.raises(ValueError, match="oracle"):
    prompt_stats.compress_prompt(rec, 8, policies.make_policy("oracle"))
  with pytest.raises(ValueError, match="original"):
    prompt_stats.compress_prompt(
        rec, 8, policies.make_policy("streamingllm", position_mode="cache_relative"))
  with pytest.raises(ValueError, match="no statistics"):
    prompt_stats.compress_prompt(rec, 40, policies.make_policy("snapkv"))
  acc, win = jnp.zeros((1, 2, 1, 16)), jnp.zeros((1, 2, 1, 4, 16))
  with pytest.raises(ValueError, match="window=32"):
    prompt_stats.slot_scores(policies.make_policy("snapkv"), acc, win)
  # A prefill recorded without the accumulated attention (only H2O ranks by it) refuses H2O
  # by name instead of ranking by zeros; the others never read it.
  with pytest.raises(ValueError, match="'h2o' ranks by the attention every query gave"):
    prompt_stats.slot_scores(policies.make_policy("h2o"), None, win)
  assert prompt_stats.slot_scores(policies.make_policy("streamingllm"), None, win).shape == (
      1, 2, 16)
  specs = [methods.MethodSpec("snapkv", 8), methods.MethodSpec("headaware", 8)]
  assert not method_driver.record_accumulated(specs)
  assert method_driver.record_accumulated(specs + [methods.MethodSpec("h2o", 8)])


def test_a_recording_of_several_calls_is_refused_and_one_call_fills_slots_from_zero(runner):
  """The statistics are indexed by slot over the whole capacity: one call over the prompt
  fills slots [0, T) and leaves zeros past them; a chunked prefill (whose last call's
  statistics would sit at the wrong slots) is refused by check_one_shot, not compressed."""
  from models import generation
  prompts = _prompts()
  maker = method_driver.recording_cache_maker(CFG, runner.model.dtype, 8, True)
  done = generation.prefill(runner, prompts, NEW, make_cache=maker)
  rec = done.cache
  prompt_stats.check_one_shot(rec)
  t = generation.bucket(150)
  assert int(rec.seen) == t
  room = rec.dense.layers[0].positions.shape[-1]
  assert room == generation.capacity(150, NEW) > t
  for acc, win in zip(rec.accumulated, rec.window_probs):
    assert acc.shape[-1] == win.shape[-1] == room
    assert not np.any(np.asarray(acc)[..., t:]) and not np.any(np.asarray(win)[..., t:])
    assert np.all(np.asarray(acc)[0, ..., :150] > 0)  # every real token was attended to
  chunked = generation.prefill(runner, prompts, NEW, make_cache=maker, chunk_size=64)
  with pytest.raises(ValueError, match="prefill the whole prompt in one call"):
    prompt_stats.check_one_shot(chunked.cache)
