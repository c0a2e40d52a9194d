"""Methods by name: budgets from a spec, caches the model decodes with, rechunking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from headkv_jax import methods
from headkv_jax.bits import allocate_bits, parse_kv_bits
from headkv_jax.paged_cache import PagedKVCache
from headkv_jax.profiles import load_shipped_profile
from models.config import LlamaConfig
from models.generation import generate
from models.llama import Llama
from models.method_driver import method_hooks
from models.runner import ModelRunner
from tests import tiny_models

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


@pytest.fixture(scope="module")
def runner():
  return ModelRunner(Llama(CFG, rngs=nnx.Rngs(3)))


def _prompts():
  rng = np.random.RandomState(0)
  return [list(rng.randint(4, 97, n)) for n in (150, 90)]


def _run(runner, spec, chunk_size=None, new=8):
  prompts = _prompts()
  hooks = method_hooks(spec, CFG, batch=len(prompts), prompt_len=max(map(len, prompts)),
                       max_new_tokens=new, chunk_size=chunk_size, dtype=np.float32)
  return generate(runner, prompts, new, eos_ids=[], **hooks)


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"])
def test_budget_past_the_prompt_equals_full(runner, name):
  """Budgets >= prompt + new tokens: every method generates what the full cache does."""
  full = _run(runner, methods.MethodSpec("full")).tokens
  # pyramidkv's last layers keep budget / 20: only a large average budget covers the prompt.
  spec = methods.MethodSpec(name, budget=4096 if name == "pyramidkv" else 256)
  assert _run(runner, spec).tokens == full
  assert _run(runner, spec, chunk_size=64).tokens == full


def test_small_budget_caches_hold_budget_bytes(runner):
  """After generation a budget-64 cache holds 64 .. 64 + one page tokens/head (amortised
  eviction while decoding); bytes far below full."""
  full = _run(runner, methods.MethodSpec("full"))
  small = _run(runner, methods.MethodSpec("snapkv", budget=64), chunk_size=64)
  counts = np.asarray(small.cache.token_counts())
  assert 64 <= counts.min() and counts.max() <= 64 + small.cache.page_size
  assert small.cache.nbytes < full.cache.nbytes / 2


@pytest.mark.parametrize("name,same_tokens", [("streamingllm", True), ("snapkv", False),
                                               ("h2o", False)])
def test_amortised_eviction_stays_in_its_region_and_matches_eager(name, same_tokens):
  """Decoding with ``compress(headroom=1)``: a head never holds more than its region (budget +
  under one page), evicts back to its budget about once a page, and, where the ranking of
  the kept tokens does not change while decoding (streamingllm: sinks + the most recent),
  keeps at each of those steps exactly the tokens that evicting at every step keeps."""
  import jax
  import jax.numpy as jnp

  rng = np.random.RandomState(2)
  budget, page = 40, 16
  rope = CFG.make_rope()
  caches = {}
  for mode in ("eager", "amortised"):
    cache = PagedKVCache.create(1, 1, 2, 8, budget, name, chunk_size=64, page_size=page)
    q = jnp.asarray(rng.randn(1, 64, 6, 8), jnp.float32)
    kv = jnp.asarray(rng.randn(1, 64, 2, 8), jnp.float32)
    _, cache = cache.attend(0, q, kv, kv, jnp.arange(64, dtype=jnp.int32)[None], rope)
    caches[mode] = cache.rechunk(1)
  step_rng = np.random.RandomState(3)
  compress = {"eager": jax.jit(lambda c: c.compress()),
              "amortised": jax.jit(lambda c: c.compress(headroom=1))}
  region = -(-(budget + 1) // page) * page
  evictions = 0
  for t in range(64, 64 + 3 * page):
    q = jnp.asarray(step_rng.randn(1, 1, 6, 8), jnp.float32)
    kv = jnp.asarray(step_rng.randn(1, 1, 2, 8), jnp.float32)
    pos = jnp.full((1, 1), t, jnp.int32)
    for mode in caches:
      _, c = caches[mode].attend(0, q, kv, kv, pos, rope)
      caches[mode] = compress[mode](c)
    lengths = np.asarray(caches["amortised"].lengths[:, 0])
    assert lengths.max() <= region
    assert np.all(np.asarray(caches["eager"].lengths[:, 0]) == budget)
    if np.all(lengths == budget):  # the amortised cache evicted at this step
      evictions += 1
      if not same_tokens:
        continue
      kept = [np.sort(np.asarray(caches[m].view(0)[2])[0, :, :budget], axis=1) for m in caches]
      np.testing.assert_array_equal(kept[0], kept[1])
  assert evictions >= 2


def test_rechunk_keeps_tokens_and_shrinks():
  """rechunk(1) after a chunked prefill keeps every head's tokens and frees the chunk room."""
  rng = np.random.RandomState(1)
  cache = PagedKVCache.create(2, 1, 2, 8, np.array([[40, 36], [32, 32]]), "snapkv",
                              chunk_size=64)
  rope = CFG.make_rope()
  import jax.numpy as jnp
  q = jnp.asarray(rng.randn(1, 64, 4, 8), jnp.float32)
  kv = jnp.asarray(rng.randn(1, 64, 2, 8), jnp.float32)
  pos = jnp.arange(64, dtype=jnp.int32)[None]
  for layer in range(2):
    _, cache = cache.attend(layer, q, kv, kv, pos, rope)
  cache = cache.compress()
  small = cache.rechunk(1)
  assert small.nbytes < cache.nbytes / 2
  for layer in range(2):
    a, b = cache.view(layer), small.view(layer)
    np.testing.assert_array_equal(np.asarray(cache.lengths[:, layer]),
                                  np.asarray(small.lengths[:, layer]))
    for x, y in zip(a[:4], b[:4]):
      n = y.shape[2]
      np.testing.assert_array_equal(np.asarray(x)[:, :, :n], np.asarray(y))


def test_headaware_budgets_follow_the_profile():
  """Model-wide headkv allocation: exact total, more budget where the profile retrieves."""
  profile = load_shipped_profile("smollm2-135m")
  budgets = methods.method_budgets(methods.MethodSpec("headaware", 128), 30, 3,
                                   max_len=2000, profile=profile)
  assert budgets.sum() == 128 * 30 * 3
  top = np.unravel_index(np.argmax(profile.scores["retrieval_reasoning"]), budgets.shape)
  assert budgets[top] == budgets.max()


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "Unknown method 'nope'"),
    (dict(name="snapkv", budget=0), "needs a budget > 0, got 0"),
    (dict(name="headaware", budget=64, allocation="magic"), "Unknown allocation 'magic'"),
    (dict(name="headaware", budget=64, score_mode="novel"),
     "Unknown score_mode 'novel'; allowed: auto, latest, accumulate, keydiff, keydiff_window"),
])
def test_bad_specs_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    methods.MethodSpec(**kwargs)


def test_auto_score_mode_is_keydiff_window_only_for_chunked_headaware():
  """score_mode="auto" resolves once, in the driver: a prompt compressed before its end (more
  than one prefill chunk of its bucket) makes headaware rank by keydiff_window with pool 3
  (unless the spec sets a pool kernel); one-shot prefill, one chunk, the other methods and
  explicit modes keep what they say; the cache's policy carries the resolved mode."""
  from models.method_driver import MethodDriver, resolve_spec
  ha, snap = methods.MethodSpec("headaware", 64), methods.MethodSpec("snapkv", 64)
  assert ha.score_mode == "auto" and ha.policy().score_mode == "latest"
  chunked = resolve_spec(ha, 300, 128)
  assert (chunked.score_mode, chunked.pool_kernel) == ("keydiff_window", 3)
  assert chunked.policy().score_kind == "window" and chunked.policy().uses_novelty
  for one_shot in (resolve_spec(ha, 300, None), resolve_spec(ha, 300, 512)):
    assert (one_shot.score_mode, one_shot.pool_kernel) == ("latest", None)
  assert resolve_spec(snap, 300, 128).score_mode == "latest"
  assert resolve_spec(methods.MethodSpec("headaware", 64, pool_kernel=9), 300, 128).pool_kernel == 9
  explicit = methods.MethodSpec("headaware", 64, score_mode="accumulate")
  assert resolve_spec(explicit, 300, 128) == dataclasses.replace(explicit, staging=4.0)
  assert resolve_spec(dataclasses.replace(explicit, staging=2), 300, 128).staging == 2
  profile = tiny_models.tiny_profile(0, [[0, 1]] * CFG.num_layers)
  driver = MethodDriver.create(ha, CFG, prompt_len=300, max_new_tokens=4, chunk_size=128,
                               dtype=np.float32, profile=profile)
  cache = driver.make_cache(1, 512)
  assert cache.policy.score_mode == "keydiff_window" and cache.policy.pool_kernel == 3


def test_budget_below_policy_minimum_is_named():
  with pytest.raises(ValueError, match="budget=16 is below the minimum 32"):
    methods.method_budgets(methods.MethodSpec("snapkv", 16), 2, 2)
  with pytest.raises(ValueError, match="needs a head profile"):
    methods.method_budgets(methods.MethodSpec("headaware", 64), 2, 2)


def test_budgets_are_capped_at_the_longest_possible_sequence():
  """A budget past prompt + new tokens sizes no pool for tokens that can never arrive."""
  capped = methods.method_budgets(methods.MethodSpec("h2o", 4096), 2, 2, max_len=300)
  assert (capped == 300).all()
  floor = methods.method_budgets(methods.MethodSpec("snapkv", 4096), 2, 2, max_len=10)
  assert (floor == 32).all()  # never below the policy's minimum


@pytest.mark.parametrize("name, kv_bits", [
    ("full", "kivi2"), ("streamingllm", "8"), ("h2o", "4/2"), ("snapkv", "4"),
    ("pyramidkv", "2"), ("adakv", "8/4"), ("headaware", "roles"), ("headaware", "avg:5"),
    ("oracle", "4")])
def test_every_policy_runs_with_a_bit_scheme(runner, name, kv_bits):
  """Each policy decodes from quantized storage: bits per head as the scheme says, fewer bytes
  than the same method at 16 bits, effective bits reported."""
  prompts = _prompts()
  profile = tiny_models.tiny_profile(4, [[0, 2], [1, 2], [2, 0]])
  budget = 0 if name == "full" else 64

  def run(bits):
    spec = methods.MethodSpec(name, budget, kv_bits=bits)
    scores = None
    if name == "oracle":  # the oracle ranks by given answer attention: uniform here
      scores = [jnp.ones((2, 6, 512), jnp.float32)] * CFG.num_layers
    hooks = method_hooks(spec, CFG, batch=2, prompt_len=150, max_new_tokens=8, chunk_size=64,
                         dtype=np.float32, profile=profile, oracle_scores=scores)
    return generate(runner, prompts, 8, eos_ids=[], **hooks)

  out = run(kv_bits)
  assert all(len(t) == 8 for t in out.tokens)
  cache = out.cache
  budgets = np.asarray(cache.budgets)
  want = allocate_bits(parse_kv_bits(kv_bits), *budgets.shape, profile=profile, weights=budgets)
  np.testing.assert_array_equal(cache.head_bits, want)
  assert cache.effective_bits > 0
  if name != "full":  # the same budgets and pools at 16 bits hold more bytes
    same = PagedKVCache.create(CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim,
                               np.asarray(cache.budgets), cache.policy, chunk_size=1,
                               dtype=np.float32, page_size=cache.page_size,
                               rope=CFG.make_rope())
    assert cache.nbytes < same.nbytes


def test_bad_kv_bits_are_named():
  with pytest.raises(ValueError, match="kv_bits|allowed"):
    methods.MethodSpec("snapkv", 64, kv_bits="3")
  with pytest.raises(ValueError, match="profile"):
    methods.make_cache(methods.MethodSpec("snapkv", 64, kv_bits="roles"), num_layers=3,
                       num_kv_heads=2, head_dim=8, batch=1, capacity=256, chunk_size=64)


def _seen_rotations(monkeypatch):
  """Patches RoPE so every rotation (the model's and the cache's) records the largest position
  it used; returns the list the records go to. Run the code under ``jax.disable_jit()``:
  positions are then concrete, so no callback out of a compiled program is needed."""
  from headkv_jax import rope as rope_lib

  seen = []
  original = rope_lib.RoPE.angles

  def angles(self, positions):
    seen.append(int(np.max(np.asarray(positions), initial=-1)))
    return original(self, positions)

  monkeypatch.setattr(rope_lib.RoPE, "angles", angles)
  return seen


@pytest.mark.parametrize("name", ["h2o", "headaware"])
def test_rolled_positions_stay_inside_the_trained_context(monkeypatch, name):
  """A tiny model with a 64-position context, run over 150-token prompts + 3 new tokens in
  cache_relative mode with chunks of 16, never rotates by a position >= 64: a budget of 56
  would put slots up to 56 + 16 > 64, so heads are capped at 64 - 16 = 48 (without the cap
  this fails); heads do fill up to the cap (the check sees the slots)."""
  import dataclasses

  cfg = dataclasses.replace(CFG, max_position_embeddings=64)
  runner = ModelRunner(Llama(cfg, rngs=nnx.Rngs(5)))
  profile = tiny_models.tiny_profile(6, [[0, 2], [1, 2], [2, 0]])
  seen = _seen_rotations(monkeypatch)
  spec = methods.MethodSpec(name, 56, window=4, n_sink=2, position_mode="cache_relative")
  hooks = method_hooks(spec, cfg, prompt_len=150, max_new_tokens=3, chunk_size=16,
                       dtype=np.float32, profile=profile)
  with jax.disable_jit():
    out = generate(runner, _prompts(), 3, eos_ids=[], allow_long_context=True, **hooks)
  assert all(len(t) == 3 for t in out.tokens)
  assert np.asarray(out.cache.budgets).max() <= 64 - 16
  assert 48 <= max(seen) < 64, max(seen)


def test_rolled_positions_past_the_context_need_small_chunks():
  """One-shot (or a chunk near the context) cannot keep rolled slots inside it: a clear error."""
  import dataclasses

  cfg = dataclasses.replace(CFG, max_position_embeddings=64)
  spec = methods.MethodSpec("snapkv", 40, window=4, position_mode="cache_relative")
  with pytest.raises(ValueError, match=r"max_position_embeddings=64.*chunk_size"):
    method_hooks(spec, cfg, prompt_len=150, max_new_tokens=8, chunk_size=None,
                 dtype=np.float32)
  with pytest.raises(ValueError, match="'full' keeps every token"):
    method_hooks(methods.MethodSpec("full", kv_bits="4", position_mode="cache_relative"), cfg,
                 prompt_len=150, max_new_tokens=8, chunk_size=16, dtype=np.float32)


def test_rechunk_to_target_budgets_keeps_what_a_cache_of_those_budgets_keeps():
  """``rechunk(..., budgets=...)`` of a cache with larger (staging) budgets keeps, for every
  head, exactly the tokens a cache created with the target budgets keeps after the same
  chunk (both rank the same window scores over the same held tokens); targets above a
  head's budget or of another shape are refused by name."""
  rng = np.random.RandomState(5)
  rope = CFG.make_rope()
  target = np.array([[40, 36], [32, 48]])
  q = jnp.asarray(rng.randn(1, 64, 4, 8), jnp.float32)
  kv = jnp.asarray(rng.randn(1, 64, 2, 8), jnp.float32)
  pos = jnp.arange(64, dtype=jnp.int32)[None]
  kept = []
  for budgets, to in ((target * 2, target), (target, None)):
    cache = PagedKVCache.create(2, 1, 2, 8, budgets, "snapkv", chunk_size=64)
    for layer in range(2):
      _, cache = cache.attend(layer, q, kv, kv, pos, rope)
    small = cache.rechunk(1, budgets=to)
    assert np.asarray(small.budgets).tolist() == target.tolist()
    np.testing.assert_array_equal(np.asarray(small.lengths[0]), np.minimum(target, 64))
    kept.append([np.sort(np.asarray(small.view(layer)[2]), axis=-1) for layer in range(2)])
  for a, b in zip(*kept):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="target budget 80 of layer 0, KV head 0 is above"):
    small.rechunk(1, budgets=target * 2)
  with pytest.raises(ValueError, match=r"shape \[layers, kv_heads\] = \[2, 2\], got \[2\]"):
    small.compress(budgets=[40, 36])


@pytest.mark.parametrize("name", ["snapkv", "headaware"])
def test_staging_budgets_that_hold_the_prompt_decode_as_one_shot(runner, name):
  """A chunked prefill whose staging budgets hold the whole prompt evicts nothing until the
  prompt ends; then it ranks by the last chunk's window (the prompt's last queries, as
  one-shot eviction does) down to the budgets: the tokens of one-shot eviction, and a decode
  cache of the plain budgets. staging=1 is the plain chunked prefill."""
  from models.method_driver import MethodDriver
  profile = tiny_models.tiny_profile(0, [[0, 2], [1, 2], [2, 0]])
  prompts = _prompts()

  def run(spec, chunk):
    driver = MethodDriver.create(spec, CFG, prompt_len=150, max_new_tokens=8, chunk_size=chunk,
                                 dtype=np.float32, profile=profile)
    return driver, generate(runner, prompts, 8, eos_ids=[], **driver.generate_kwargs())

  spec = methods.MethodSpec(name, 48)
  _, one_shot = run(spec, None)
  driver, staged = run(dataclasses.replace(spec, staging=8), 50)
  assert np.asarray(driver.staging).min() >= 150 + 8  # capped at prompt bucket + new tokens
  assert staged.tokens == one_shot.tokens
  assert staged.cache.budgets == driver.plan.budgets
  counts = np.asarray(staged.cache.token_counts())
  assert counts.max() <= np.asarray(driver.plan.budgets).max() + staged.cache.page_size
  plain, _ = run(dataclasses.replace(spec, staging=1), 50)
  assert plain.staging is None and plain.final is None
  auto, _ = run(spec, 50)  # staging=None: 4x for chunked headaware, 1 for the others
  assert auto.spec.staging == (methods.CHUNKED_STAGING if name == "headaware" else 1.0)
  assert (auto.staging is not None) == (name == "headaware")
  assert run(spec, None)[0].spec.staging == 1.0
  with pytest.raises(ValueError, match="staging=0.5 must be a number >= 1"):
    methods.MethodSpec(name, 48, staging=0.5)


def test_scheme_options_reach_the_cache():
  """`@group=G,residual=R,fp_sinks=F` of a --kv_bits text size the cache: G channels per
  scale + zero (a smaller group holds more scale bytes), an R-token full-precision residual
  and F full-precision first tokens."""
  kw = dict(num_layers=CFG.num_layers, num_kv_heads=2, head_dim=8, batch=1, capacity=200,
            chunk_size=16)
  caches = {g: methods.make_cache(methods.MethodSpec("snapkv", 64,
                                                     kv_bits=f"4/2@group={g},residual=8"),
                                  **kw) for g in (4, 8)}
  assert {g: (c.quant_group, c.residual) for g, c in caches.items()} == {4: (4, 8), 8: (8, 8)}
  assert caches[4].nbytes > caches[8].nbytes
  assert caches[4].effective_bits > caches[8].effective_bits
  # fp_sinks=F: the first F tokens in full precision; with no residual either, no window.
  lean = methods.make_cache(methods.MethodSpec("snapkv", 64, kv_bits="4/2@residual=0,fp_sinks=0"),
                            **kw)
  sinks = methods.make_cache(methods.MethodSpec("snapkv", 64, kv_bits="4/2@residual=0,fp_sinks=6"),
                             **kw)
  assert (lean.fp_sinks, sinks.fp_sinks) == (0, 6)
  assert all(p.fp is None for p in lean.pools)
  assert [p.fp.pos.shape[-1] for p in sinks.pools if p.fp is not None] == [6]
  assert lean.nbytes < sinks.nbytes and lean.effective_bits < sinks.effective_bits
  assert lean.effective_bits == pytest.approx((4 + 2) / 2 + 32 / 8 + 32 / 64 / 2)
  with pytest.raises(ValueError, match="quant_group=3 must divide head_dim=8"):
    methods.make_cache(methods.MethodSpec("snapkv", 64, kv_bits="4@group=3"), **kw)


def test_rechunk_refuses_targets_that_shrink_the_full_precision_residual():
  """A quantized cache's full-precision window moves whole into the re-packed cache, so target
  budgets that leave less room than its residual are refused by name (a staged prefill is
  created with the final budgets' residual: models.method_driver)."""
  cache = PagedKVCache.create(1, 1, 2, 8, np.array([[64, 64]]), "snapkv", chunk_size=16,
                              bits=np.array([[4, 4]]), residual=32)
  with pytest.raises(ValueError, match="residual of 32 tokens, below this cache's 60"):
    cache.replace(residual=60).rechunk(1, budgets=np.array([[36, 40]]))
  with pytest.raises(ValueError, match="residual of 28 tokens, below this cache's 32"):
    cache.rechunk(1, budgets=np.array([[32, 40]]))
  assert cache.rechunk(1, budgets=np.array([[36, 40]])).residual == 32
