"""The paged compressed cache: exactness vs dense attention, eviction invariants, bytes, errors.

A tiny random "attention stack" (independent random q/k/v per layer) stands in for a model, so
each layer's output can be checked against dense causal attention computed in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import eviction
from headkv_jax import policies
from headkv_jax import rope as rope_lib
from headkv_jax.paged_cache import PagedKVCache
from tests.test_policies import ref_keep

D = 8
ROPE = rope_lib.RoPE(inv_freq=jnp.asarray(rope_lib.rope_inv_freq(D, 10000.0)))
DRIVES = ("one_shot", "chunked", "decode")
MODES = ("original", "cache_relative")


def random_stack(seed, layers, batch, t, hq, hkv):
  rng = np.random.default_rng(seed)
  def arr(h):
    return jnp.asarray(rng.normal(size=(batch, t, h, D)), jnp.float32)
  return [(arr(hq), arr(hkv), arr(hkv)) for _ in range(layers)]


def dense_reference(q, k, v, positions, with_probs=False):
  """Causal GQA attention in numpy: ``[B, T, Hq, D]`` (padding rows zero) [and ``[B, Hq, T, T]``
  probabilities]."""
  q = np.asarray(ROPE.apply(q, positions), np.float64)
  k = np.asarray(ROPE.apply(k, positions), np.float64)
  v, pos = np.asarray(v, np.float64), np.asarray(positions)
  b_size, t, hq, _ = q.shape
  group = hq // k.shape[2]
  out = np.zeros(q.shape)
  probs = np.zeros((b_size, hq, t, t))
  for b in range(b_size):
    for h in range(hq):
      logits = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(D)  # [T, T]
      mask = (pos[b][None, :] >= 0) & (pos[b][None, :] <= pos[b][:, None])
      logits = np.where(mask, logits, -np.inf)
      for i in np.flatnonzero(pos[b] >= 0):
        p = np.exp(logits[i] - logits[i].max())
        probs[b, h, i] = p / p.sum()
        out[b, i, h] = probs[b, h, i] @ v[b, :, h // group]
  return (out, probs) if with_probs else out


def spans(drive, t, chunk, prefill):
  if drive == "one_shot":
    return [(0, t)]
  if drive == "chunked":
    return [(s, min(s + chunk, t)) for s in range(0, t, chunk)]
  return [(0, prefill)] + [(s, s + 1) for s in range(prefill, t)]


def _attend_every_layer(cache, qkv, positions, rope):
  """Every layer attends (``qkv`` per layer) -> (per-layer outputs, cache); no compression."""
  outs = []
  for layer, (q, k, v) in enumerate(qkv):
    o, cache = cache.attend(layer, q, k, v, positions, rope)
    outs.append(o)
  return outs, cache


attend_layers = jax.jit(_attend_every_layer)
compress_jit = jax.jit(lambda cache, oracle=None: cache.compress(oracle))
view_jit = jax.jit(lambda cache, layer: cache.view(layer), static_argnums=1)


def run_stack(cache, stack, positions, span_list, oracle=None, on_compress=None, eager=False):
  """Feeds the stack span by span, compressing after each; returns per-layer outputs.

  Jitted per span (one compile per cache structure and span length, reused across spans);
  ``eager=True`` runs every op eagerly (the reference the jit tests compare against).
  """
  outs = [[] for _ in stack]
  for s, e in span_list:
    attend = _attend_every_layer if eager else attend_layers
    o, cache = attend(cache, [tuple(x[:, s:e] for x in qkv) for qkv in stack],
                      positions[:, s:e], ROPE)
    for layer, x in enumerate(o):
      outs[layer].append(x)
    if on_compress is not None:
      on_compress(cache)
    cache = cache.compress(oracle) if eager else compress_jit(cache, oracle)
  return [jnp.concatenate(o, axis=1) for o in outs], cache


@jax.jit
def jit_step(cache, qkv, positions, rope):
  """One model-like step: every layer attends (``qkv`` per layer), then the cache compresses."""
  outs, cache = _attend_every_layer(cache, qkv, positions, rope)
  return outs, cache.compress()


def make_oracle(seed, layers, batch, hq, t):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.random((batch, hq, t)), jnp.float32) for _ in range(layers)]


@pytest.mark.parametrize("name", policies.POLICY_NAMES)
def test_matches_dense_when_budgets_cover_the_sequence(name):
  layers, batch, t, hq, hkv = 2, 2, 12, 6, 3
  stack = random_stack(0, layers, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  budgets = np.array([[16, 16, 16], [20, 12, 13]])  # uniform and ragged layers, all >= t
  oracle = make_oracle(1, layers, batch, hq, t)
  refs = [dense_reference(q, k, v, positions) for q, k, v in stack]
  for mode in MODES:
    policy = policies.make_policy(name, window=4, position_mode=mode)
    for drive in DRIVES:
      # One chunk_size for all drives (fewer shapes to compile); chunks of 4, prefill of 4.
      cache = PagedKVCache.create(layers, batch, hkv, D, budgets, policy, chunk_size=t,
                                  dtype=jnp.float32, page_size=4)
      outs, cache = run_stack(cache, stack, positions, spans(drive, t, 4, 4), oracle)
      for out, ref in zip(outs, refs):
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"{mode} {drive}")
      np.testing.assert_array_equal(cache.logical_tokens, t)
      for layer in range(layers):  # slots == positions: nothing was evicted or reordered
        _, _, pos, _, _ = cache.view(layer)  # eager: its ops are shared by every policy
        np.testing.assert_array_equal(pos[..., :t], np.broadcast_to(np.arange(t), (batch, hkv, t)))


def reference_choices(pre, oracle):
  """Per layer: (positions ``[B, Hkv, C]``, numpy reference keep mask) of a cache about to
  compress."""
  out = []
  for layer in range(pre.num_layers):
    _, _, pos, scores, _ = view_jit(pre, layer)
    if oracle is not None:  # answer attention by position, GQA group mean, at each slot
      b, hkv = pos.shape[:2]
      by_pos = np.asarray(oracle[layer]).reshape(b, hkv, -1, oracle[layer].shape[-1]).mean(2)
      scores = np.take_along_axis(by_pos, np.clip(np.asarray(pos), 0, None), axis=2)
    keep = ref_keep(pre.policy, scores, pre.lengths[:, layer], pre.budgets[layer])
    out.append((np.asarray(pos), keep))
  return out


EVICTING = [
    policies.make_policy("streamingllm", n_sink=2),
    policies.make_policy("streamingllm", n_sink=2, position_mode="cache_relative"),
    policies.make_policy("h2o", n_sink=1),
    policies.make_policy("h2o", gqa_reduce="max", position_mode="cache_relative"),
    policies.make_policy("snapkv", window=3, pool_kernel=3),
    policies.make_policy("pyramidkv", window=2, pool_kernel=5, gqa_reduce="max"),
    policies.make_policy("headaware", window=3, n_sink=1),
    policies.make_policy("adakv", window=2, pool_kernel=3),
    policies.make_policy("oracle", window=2),
]


@pytest.mark.parametrize("policy", EVICTING, ids=lambda p: f"{p.name}-{p.position_mode}")
def test_eviction_invariants_and_reference_choice(policy):
  layers, batch, t, hq, hkv, chunk = 2, 2, 26, 6, 3, 5
  stack = random_stack(2, layers, batch, t, hq, hkv)
  lengths = np.array([t, 19])  # a ragged batch: row 1 is right padded
  positions = np.where(np.arange(t) < lengths[:, None], np.arange(t), -1).astype(np.int32)
  budgets = np.array([[8, 8, 8], [12, 8, 7]])  # a uniform and a ragged layer
  oracle = make_oracle(3, layers, batch, hq, t) if policy.name == "oracle" else None
  cache = PagedKVCache.create(layers, batch, hkv, D, budgets, policy, chunk_size=chunk,
                              dtype=jnp.float32, page_size=4)
  span_list = spans("chunked", 20, chunk, 0) + spans("decode", t, chunk, 20)[1:]
  checks, posts = [], []

  def record(pre):
    checks.extend(reference_choices(pre, oracle))
    posts.append(compress_jit(pre, oracle))

  run_stack(cache, stack, jnp.asarray(positions), span_list, oracle, on_compress=record)
  assert len(checks) == layers * len(span_list)
  for i, post in enumerate(posts):
    for layer in range(layers):
      pre_pos, keep = checks[i * layers + layer]
      _, _, pos, _, _ = view_jit(post, layer)
      pos, n = np.asarray(pos), np.asarray(post.lengths[:, layer])
      row_budgets = np.array(budgets[layer])
      if policy.adaptive:
        assert (n.sum(-1) <= row_budgets.sum()).all()
      else:
        assert (n <= row_budgets).all()
      offsets = np.asarray(post.offsets[:, layer])
      assert (offsets % post.page_size == 0).all()
      assert (offsets[:, :-1] + n[:, :-1] <= offsets[:, 1:]).all()  # regions never overlap
      assert post.nbytes == cache.nbytes  # memory does not grow with the sequence
      assert not np.asarray(post.dropped).any()
      for b in range(batch):
        for h in range(hkv):
          kept = pos[b, h, : n[b, h]]
          assert (np.diff(kept) > 0).all()  # position order, no position twice
          np.testing.assert_array_equal(kept, pre_pos[b, h][keep[b, h]])
          held = pre_pos[b, h][pre_pos[b, h] >= 0]
          recent = policies.recent_counts(post.policy, row_budgets)[h]
          must = set(held[: policy.n_sink]) | set(held[len(held) - recent:])
          assert must <= set(kept.tolist())
          assert (pos[b, h, n[b, h]:] == -1).all()


@pytest.mark.parametrize("policy", [
    policies.make_policy("snapkv", window=3, pool_kernel=3),
    policies.make_policy("adakv", window=2, pool_kernel=3),
], ids=lambda p: p.name)
def test_eviction_ranks_over_the_layers_own_view_size(policy):
  """A layer is ranked over the smallest static view (256, 1024, ... slots) that holds its
  longest head: a model with one large head (region > 256) evicts its small layer through
  the 256-slot view and its large one through the full view, with the reference choice."""
  from headkv_jax import eviction
  layers, batch, t, hq, hkv, chunk = 2, 1, 330, 4, 2, 40
  stack = random_stack(15, layers, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  budgets = np.array([[290, 9], [8, 8]])
  cache = PagedKVCache.create(layers, batch, hkv, D, budgets, policy, chunk_size=chunk,
                              dtype=jnp.float32, page_size=4)
  assert eviction.view_sizes(cache.layout.max_region) == (256, cache.layout.max_region)
  checks, posts = [], []

  def record(pre):
    checks.extend(reference_choices(pre, None))
    posts.append(compress_jit(pre, None))

  run_stack(cache, stack, positions, spans("chunked", t, chunk, 0), on_compress=record)
  longest = [int(np.asarray(p.lengths[:, 0]).max()) for p in posts]
  assert policy.adaptive or max(longest) > 256  # the large view ran (adakv: the layer's
  # total moves between its heads, so no head outgrows the small view here)
  for i, post in enumerate(posts):
    for layer in range(layers):
      pre_pos, keep = checks[i * layers + layer]
      pos, n = np.asarray(view_jit(post, layer)[2]), np.asarray(post.lengths[:, layer])
      for h in range(hkv):
        np.testing.assert_array_equal(pos[0, h, :n[0, h]], pre_pos[0, h][keep[0, h]])


@pytest.mark.parametrize("policy", [
    policies.make_policy("snapkv", window=3),
    policies.make_policy("h2o", position_mode="cache_relative"),
], ids=lambda p: f"{p.name}-{p.position_mode}")
def test_ragged_batch_rows_equal_running_alone(policy):
  layers, t, hq, hkv, chunk = 2, 20, 4, 2, 5
  lengths = [20, 11]
  stack = random_stack(4, layers, 2, t + 3, hq, hkv)
  prompt_pos = np.where(np.arange(t) < np.array(lengths)[:, None], np.arange(t), -1)
  budgets = np.array([[8, 10], [9, 7]])

  def run(rows):
    rows = np.array(rows)
    cache = PagedKVCache.create(layers, len(rows), hkv, D, budgets, policy, chunk_size=chunk,
                                dtype=jnp.float32, page_size=4)
    outs = [[] for _ in range(layers)]
    # Chunked prefill, then decode where each row continues at its own position.
    pos = [prompt_pos[rows, s:s + chunk] for s in range(0, t, chunk)]
    pos += [np.array(lengths)[rows][:, None] + step for step in range(3)]
    starts = list(range(0, t, chunk)) + list(range(t, t + 3))
    for s, p in zip(starts, pos):
      qkv = [(q[rows, s:s + p.shape[1]], k[rows, s:s + p.shape[1]], v[rows, s:s + p.shape[1]])
             for q, k, v in stack]
      o, cache = jit_step(cache, qkv, jnp.asarray(p, jnp.int32), ROPE)
      for layer in range(layers):
        outs[layer].append(o[layer])
    return [jnp.concatenate(o, axis=1) for o in outs], cache

  both, cache2 = run([0, 1])
  for row in (0, 1):
    alone, cache1 = run([row])
    valid = np.r_[np.arange(t) < lengths[row], [True] * 3]
    for layer in range(layers):
      np.testing.assert_allclose(both[layer][row][valid], alone[layer][0][valid], atol=1e-5)
      _, _, p2, _, _ = cache2.view(layer)
      _, _, p1, _, _ = cache1.view(layer)
      np.testing.assert_array_equal(p2[row], p1[0])


def test_gqa_stores_kv_heads_only():
  layers, batch, t, hq, hkv = 1, 1, 10, 9, 3
  stack = random_stack(5, layers, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  cache = PagedKVCache.create(layers, batch, hkv, D, 16, "h2o", chunk_size=t,
                              dtype=jnp.float32, page_size=4)
  pool, = cache.pools
  slots = pool.k.shape[1]
  # Three KV heads' budgets + one chunk each, page rounded; nothing per query head.
  assert slots == 3 * 28 < 9 * 16
  assert pool.k.shape == (batch, slots, D)
  outs, cache = run_stack(cache, stack, positions, [(0, t)])
  np.testing.assert_allclose(outs[0], dense_reference(*stack[0], positions), atol=1e-5)
  assert cache.logical_tokens.shape == (layers, batch, hkv)


def test_nbytes_follow_budgets():
  layers, batch, hkv, chunk, page = 3, 2, 4, 8, 16
  budgets = np.array([[64, 128, 32, 256], [96, 96, 96, 96], [512, 16, 16, 32]])
  bytes_per_token = 2 * D * 2 + 4 + 4  # bf16 K and V, int32 position, float32 score
  def nbytes(b):
    return PagedKVCache.create(layers, batch, hkv, D, b, "h2o", chunk_size=chunk,
                               page_size=page).nbytes
  full = nbytes(budgets)
  tokens = batch * budgets.sum()
  slack = batch * layers * hkv * ((chunk + page) * bytes_per_token + 12)  # + per-head ints
  assert tokens * bytes_per_token <= full <= tokens * bytes_per_token + slack
  assert abs(nbytes(budgets // 2) - full / 2) <= slack
  f32 = PagedKVCache.create(layers, batch, hkv, D, budgets, "h2o", chunk_size=chunk,
                            page_size=page, dtype=jnp.float32).nbytes
  assert f32 > full  # the K/V dtype is what is stored


def test_page_table_covers_each_head_region():
  cache = PagedKVCache.create(1, 2, 3, D, np.array([[8, 20, 12]]), "h2o", chunk_size=4,
                              dtype=jnp.float32, page_size=4)
  table = np.asarray(cache.page_table(0))
  assert table[0, 0].tolist()[:3] == [0, 1, 2] and table[0, 0, 3] == -1
  assert table[0, 1, 0] == 3 and (table[0, 1][table[0, 1] >= 0] < 9).all()


def test_jit_decode_matches_eager():
  layers, batch, t, hq, hkv = 2, 2, 14, 4, 2
  stack = random_stack(6, layers, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  policy = policies.make_policy("h2o", n_sink=1)
  cache = PagedKVCache.create(layers, batch, hkv, D, 6, policy, chunk_size=8,
                              dtype=jnp.float32, page_size=4)

  step = jax.jit(lambda *args: jit_step.__wrapped__(*args))  # its own compilations to count
  eager_outs, eager_cache = run_stack(cache, stack, positions, spans("decode", t, 8, 8),
                                      eager=True)
  jit_outs = [[] for _ in stack]
  for s, e in spans("decode", t, 8, 8):
    outs, cache = step(cache, [(q[:, s:e], k[:, s:e], v[:, s:e]) for q, k, v in stack],
                       positions[:, s:e], ROPE)
    for layer, o in enumerate(outs):
      jit_outs[layer].append(o)
  assert step._cache_size() == 2  # one prefill shape, one decode shape
  for layer in range(layers):
    np.testing.assert_allclose(jnp.concatenate(jit_outs[layer], 1), eager_outs[layer], atol=1e-5)
    np.testing.assert_array_equal(cache.view(layer)[2], eager_cache.view(layer)[2])


@pytest.mark.parametrize("kwargs, match", [
    ({"budgets": 6, "policy": policies.make_policy("snapkv", window=4, n_sink=4)},
     r"Budget 6 at \(layer, kv_head\)=\(0, 0\) must be >= n_sink \+ window = 8"),
    ({"budgets": 0}, r"Budget 0 .* must be positive"),
    ({"budgets": np.array([[8, -1, 8], [8, 8, 8]])}, r"Budget -1 at \(layer, kv_head\)=\(0, 1\)"),
    ({"policy": "lru"}, "Unknown policy 'lru'; allowed: full, streamingllm, h2o"),
    ({"budgets": np.full((3, 2), 8)},
     r"budgets must have shape \[layers, kv_heads\] = \[2, 3\], got \[3, 2\]"),
    ({"chunk_size": 0}, "chunk_size must be positive, got 0"),
    ({"page_size": -4}, "page_size must be positive, got -4"),
    ({"bits": np.full((2, 3), 3)}, r"Unsupported bits \[3\]; allowed: \[16, 8, 4, 2\]"),
])
def test_create_errors(kwargs, match):
  args = {"budgets": 8, "policy": "h2o", "chunk_size": 4} | kwargs
  with pytest.raises(ValueError, match=match):
    PagedKVCache.create(2, 1, 3, D, args.pop("budgets"), args.pop("policy"), **args)


def test_attend_errors():
  cache = PagedKVCache.create(1, 1, 3, D, 8, "h2o", chunk_size=4, dtype=jnp.float32)
  (q, k, v), = random_stack(7, 1, 1, 5, 6, 3)
  pos = jnp.arange(5, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match="5 new tokens exceed chunk_size=4"):
    cache.attend(0, q, k, v, pos, ROPE)
  with pytest.raises(ValueError, match="Got 5 and 3"):
    cache.attend(0, q[:, :4, :5], k[:, :4], v[:, :4], pos[:, :4], ROPE)
  with pytest.raises(ValueError, match="needs oracle_scores"):
    PagedKVCache.create(1, 1, 3, D, 8, "oracle", chunk_size=4).compress()


@pytest.mark.parametrize("policy", [
    policies.make_policy("snapkv", window=4),
    policies.make_policy("streamingllm", position_mode="cache_relative"),
], ids=lambda p: f"{p.name}-{p.position_mode}")
def test_llama_with_paged_cache_equals_no_cache(policy):
  from flax import nnx

  from models.config import LlamaConfig
  from models.llama import Llama
  from models.runner import ModelRunner

  cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                    num_heads=6, num_kv_heads=2, head_dim=8)
  model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  t, prefill = 20, 16
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, t)))
  full, _ = model(tokens)
  cache = PagedKVCache.create(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim,
                              np.array([[20, 24], [32, 20]]), policy, chunk_size=8,
                              dtype=jnp.float32, page_size=4)
  runner, compress = ModelRunner(model), jax.jit(lambda c: c.compress())
  outs = []
  for s, e in spans("chunked", prefill, 8, 0) + spans("decode", t, 8, prefill)[1:]:
    pos = jnp.broadcast_to(jnp.arange(s, e, dtype=jnp.int32), (2, e - s))
    logits, cache = runner.forward(tokens[:, s:e], pos, cache)
    cache = compress(cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)


def test_paged_decode_reference_matches_attend():
  """The kernel oracle over pages + page table == the cache's own attention (original mode)."""
  from headkv_jax.cache_attention import paged_decode_attention_reference

  layers, batch, t, hq, hkv = 1, 2, 15, 6, 3
  stack = random_stack(8, layers, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  cache = PagedKVCache.create(layers, batch, hkv, D, np.array([[5, 9, 7]]),
                              policies.make_policy("h2o"), chunk_size=10, dtype=jnp.float32,
                              page_size=4)
  _, cache = run_stack(cache, stack, positions, [(0, 10)] + [(s, s + 1) for s in range(10, 14)])
  q, k, v = (x[:, 14:] for x in stack[0])
  out, cache = cache.attend(0, q, k, v, positions[:, 14:], ROPE)
  k_pages, v_pages = cache.pages(0)
  ref, lse = paged_decode_attention_reference(
      ROPE.apply(q, positions[:, 14:])[:, 0], k_pages, v_pages, cache.lengths[:, 0],
      cache.page_table(0))
  np.testing.assert_allclose(ref, out[:, 0], atol=1e-5)
  assert np.isfinite(np.asarray(lse)).all()


@pytest.mark.parametrize("name, bits, mode", [
    ("snapkv", None, "original"), ("h2o", (4, 16, 2), "original"),
    ("streamingllm", None, "cache_relative")])
def test_a_decode_step_reads_whole_regions_as_its_tiles_do(name, bits, mode, monkeypatch):
  """A decode step reads each head's region of a static layer in one static slice
  (``_whole_region``, no gather) and keeps its slot logits in a buffer of the layer's longest
  region (``_layer_view``); it must give the outputs, statistics and pools of the 256-slot
  tile loops over the model's longest region it replaces, for ragged regions longer than a
  tile (a loop's heads of unequal regions read past the shorter ones, masked), quantized
  classes and rolled keys."""
  layers, batch, hq, hkv, chunk, t = 2, 2, 6, 3, 64, 704
  stack = random_stack(11, layers, batch, t, hq, hkv)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t)).copy()
  positions[1, t - 40:] = -1  # a ragged batch: row 1 is shorter
  positions = jnp.asarray(positions)
  policy = policies.make_policy(name, position_mode=mode)
  budgets = np.array([[300, 40, 520], [500, 520, 260]])
  cache = PagedKVCache.create(
      layers, batch, hkv, D, budgets, policy, chunk_size=chunk, dtype=jnp.float32,
      page_size=16, bits=None if bits is None else np.array([bits, bits]), quant_group=4,
      residual=8, fp_sinks=2)
  _, cache = run_stack(cache, stack, positions, spans("chunked", t - 1, chunk, 0))
  cache = cache.rechunk(1)
  last = [tuple(x[:, t - 1:] for x in qkv) for qkv in stack]
  whole = []
  real, real_view = PagedKVCache._whole_region, PagedKVCache._layer_view

  def spy(self, *args):
    whole.append(real(self, *args))
    return whole[-1]

  def step(whole_regions):
    monkeypatch.setattr(PagedKVCache, "_whole_region",
                        spy if whole_regions else lambda self, *args: None)
    # The tiles' statistic buffer spans the model's longest region.
    monkeypatch.setattr(PagedKVCache, "_layer_view", real_view if whole_regions else
                        lambda self, layer: self.layout.max_region)
    return jax.jit(lambda *a: _attend_every_layer(*a))(cache, last, positions[:, t - 1:], ROPE)

  tiled, tiled_cache = step(False)
  outs, new_cache = step(True)
  assert any(w is not None for w in whole) and max(w[1] for w in whole if w) > 256
  for a, b in zip(tiled, outs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(tiled_cache), jax.tree_util.tree_leaves(new_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_headroom_compress_amortises_decode_eviction():
  layers, batch, t, hq, hkv, chunk = 1, 1, 20, 2, 1, 4
  (q, k, v), = random_stack(9, layers, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  cache = PagedKVCache.create(layers, batch, hkv, D, 8, policies.make_policy("h2o"),
                              chunk_size=chunk, dtype=jnp.float32, page_size=4)
  compress = jax.jit(lambda c: c.compress(headroom=1))
  counts = []
  for s in range(t):
    sl = slice(s, s + 1)
    _, cache = attend_layers(cache, [(q[:, sl], k[:, sl], v[:, sl])], positions[:, sl], ROPE)
    cache = compress(cache)
    counts.append(int(cache.logical_tokens[0, 0, 0]))
  # The region holds budget + chunk = 12: evict back to 8 only when it is full.
  assert counts == list(range(1, 12)) + [8, 9, 10, 11] * 2 + [8]
  kept = np.asarray(cache.view(0)[2][0, 0, :8])
  assert (np.diff(kept) > 0).all() and set(range(16, 20)) <= set(kept.tolist())
  with pytest.raises(ValueError, match="headroom must be in"):
    cache.compress(headroom=5)
  assert int(cache.dropped[:, 0].sum()) == 0
  for s in range(4, 9):  # skipping compress overflows the region: counted, never silent
    sl = slice(s, s + 1)
    _, cache = attend_layers(cache, [(q[:, sl], k[:, sl], v[:, sl])], positions[:, sl] + 20,
                             ROPE)
  assert int(cache.lengths[:, 0][0, 0]) == 12 and int(cache.dropped[:, 0][0, 0]) == 1


@pytest.mark.parametrize("name, gqa_reduce, score_mode", [
    ("h2o", "mean", "latest"), ("h2o", "max", "latest"), ("snapkv", "mean", "latest"),
    ("adakv", "max", "latest"), ("headaware", "mean", "accumulate")])
def test_collected_scores_match_numpy(name, gqa_reduce, score_mode):
  """H2O accumulates every query's attention; SnapKV keeps the last window's, or with
  score_mode="accumulate" sums every call's window; GQA reduced."""
  batch, t, hq, hkv, window = 2, 12, 6, 3, 4
  stack = random_stack(10, 1, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  policy = policies.make_policy(name, window=window, gqa_reduce=gqa_reduce,
                                score_mode=score_mode)
  cache = PagedKVCache.create(1, batch, hkv, D, np.array([[12, 16, 12]]), policy,
                              chunk_size=8, dtype=jnp.float32, page_size=4)
  _, probs = dense_reference(*stack[0], positions, with_probs=True)  # [B, Hq, T, T]
  chunks = [(0, 8), (8, 12)]
  for s, e in chunks:
    _, cache = attend_layers(cache, [tuple(x[:, s:e] for x in stack[0])], positions[:, s:e],
                             ROPE)
  # h2o sums each call's group-reduced attention; SnapKV keeps the last call's last window.
  calls = chunks if name == "h2o" else [(t - window, t)]
  if score_mode == "accumulate":
    calls = [(e - window, e) for _, e in chunks]
  want = 0
  for s, e in calls:
    per = probs[:, :, s:e].sum(axis=2).reshape(batch, hkv, hq // hkv, t)  # [B, Hkv, G, T]
    want = want + (per.max(axis=2) if gqa_reduce == "max" else per.mean(axis=2))
  np.testing.assert_allclose(cache.view(0)[3][..., :t], want, atol=1e-5)


@pytest.mark.parametrize("name, score_mode, window", [
    ("snapkv", "latest", 3), ("headaware", "accumulate", 3), ("snapkv", "latest", 0)])
def test_window_scores_of_a_ragged_chunk_match_numpy(name, score_mode, window):
  """A chunk's observation-window statistic reads only the rows of each batch row's last
  ``window`` real queries (``PagedKVCache._window_rows``): with rows of 12 and 9 tokens in
  chunks of 8 (the second chunk holds 4 and 1 real tokens, fewer than the window of 3 for
  the second row, the rest padding), every held slot's and every new key's score is the
  numpy sum of exactly those queries' attention (a window of 0: none, every score 0); a
  window taken from the wrong tokens, or padding rows counted, would move a score by
  O(1/T)."""
  batch, t, hq, hkv, chunk = 2, 12, 6, 3, 8
  lengths = [12, 9]
  stack = random_stack(11, 1, batch, t, hq, hkv)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t)).copy()
  positions[1, lengths[1]:] = -1
  positions = jnp.asarray(positions)
  policy = policies.make_policy(name, window=window, score_mode=score_mode)
  cache = PagedKVCache.create(1, batch, hkv, D, np.array([[12, 16, 12]]), policy,
                              chunk_size=chunk, dtype=jnp.float32, page_size=4)
  _, probs = dense_reference(*stack[0], positions, with_probs=True)  # [B, Hq, T, T]
  for s in range(0, t, chunk):
    _, cache = attend_layers(cache, [tuple(x[:, s:s + chunk] for x in stack[0])],
                             positions[:, s:s + chunk], ROPE)
  for b, n in enumerate(lengths):
    calls = [(max(s, min(s + chunk, n) - window), min(s + chunk, n))
             for s in range(0, n, chunk)]
    if score_mode == "latest":
      calls = calls[-1:]
    want = sum(probs[b, :, lo:hi].sum(axis=1) for lo, hi in calls if hi > lo)  # [Hq, T]
    want = np.zeros((hq, t)) if isinstance(want, int) else want
    want = want.reshape(hkv, hq // hkv, t).mean(axis=1)
    np.testing.assert_allclose(cache.view(0)[3][b, :, :n], want[:, :n], atol=1e-5,
                               err_msg=f"row {b}")


def _novelty_reference(keys, valid):
  """numpy KeyDiff: 1 - cos(k, normalised mean of the unit keys) over the valid slots."""
  unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  anchor = (unit * valid[..., None]).sum(axis=-2, keepdims=True)
  anchor = anchor / np.linalg.norm(anchor, axis=-1, keepdims=True)
  return np.where(valid, 1.0 - (unit * anchor).sum(-1), 0.0)


def _ranks_reference(x):
  """Descending ranks along the last axis, ties to the lower index."""
  order = np.argsort(-x, axis=-1, kind="stable")
  return np.argsort(order, axis=-1, kind="stable")


@pytest.mark.parametrize("position_mode", ["original", "cache_relative"])
def test_keydiff_window_ranks_by_the_better_of_novelty_and_window(position_mode):
  """score_mode="keydiff_window": a slot's score orders the slots as the better (smaller) of
  its rank by key novelty and its rank by the last window's attention (no eviction here, so
  the window attention is the dense reference's)."""
  batch, t, hq, hkv, window = 1, 12, 6, 3, 3
  stack = random_stack(13, 1, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  policy = policies.make_policy("snapkv", window=window, score_mode="keydiff_window",
                                position_mode=position_mode)
  cache = PagedKVCache.create(1, batch, hkv, D, 16, policy, chunk_size=8, dtype=jnp.float32,
                              page_size=4, rope=ROPE)
  for s, e in [(0, 8), (8, 12)]:
    _, cache = attend_layers(cache, [tuple(x[:, s:e] for x in stack[0])], positions[:, s:e],
                             ROPE)
  _, probs = dense_reference(*stack[0], positions, with_probs=True)  # [B, Hq, T, T]
  win = probs[:, :, t - window:].sum(axis=2).reshape(batch, hkv, hq // hkv, t).mean(axis=2)
  k = np.asarray(stack[0][1], np.float64).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  nov = _novelty_reference(k, np.ones((batch, hkv, t), bool))
  best = np.minimum(_ranks_reference(nov), _ranks_reference(win))
  got = np.asarray(cache.view(0)[3])[..., :t]
  np.testing.assert_array_equal(got + best, np.full_like(got, got[0, 0, 0] + best[0, 0, 0]))


@pytest.mark.parametrize("position_mode", ["original", "cache_relative"])
def test_keydiff_scores_are_the_novelty_of_every_held_key(position_mode):
  """score_mode="keydiff": after each call every held slot's score is its key's novelty among
  all keys its head holds (pre-RoPE, so both position modes agree), ragged rows included;
  after an eviction the survivors are re-scored against the survivors."""
  batch, t, hq, hkv = 2, 12, 6, 3
  stack = random_stack(12, 1, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  positions = positions.at[1, :3].set(-1)  # row 1 holds 3 tokens fewer (left padding)
  policy = policies.make_policy("headaware", window=2, n_sink=1, score_mode="keydiff",
                                position_mode=position_mode)
  assert policy.score_kind == "keys"
  cache = PagedKVCache.create(1, batch, hkv, D, np.array([[6, 8, 6]]), policy, chunk_size=8,
                              dtype=jnp.float32, page_size=4, rope=ROPE)
  k = np.asarray(stack[0][1], np.float64).transpose(0, 2, 1, 3)  # [B, Hkv, T, D] pre-RoPE
  for s, e in [(0, 8), (8, 12)]:
    _, cache = attend_layers(cache, [tuple(x[:, s:e] for x in stack[0])], positions[:, s:e],
                             ROPE)
    pos = np.asarray(cache.view(0)[2])  # [B, Hkv, C] positions held (-1 empty)
    held = np.take_along_axis(k, np.maximum(pos, 0)[..., None], axis=2)
    np.testing.assert_allclose(cache.view(0)[3], _novelty_reference(held, pos >= 0), atol=1e-5)
    if s == 0:
      cache = cache.compress()
      assert np.asarray(cache.lengths[:, 0]).tolist() == [[6, 8, 6], [5, 5, 5]]


def test_keydiff_decode_evictions_rank_the_keys_held_then():
  """KeyDiff novelty is computed when a head is ranked, not at every decode step: at every
  step where the amortised eviction runs, the novelty it ranks by is that of the keys held
  then (numpy reference), and evictions do happen; without the model's RoPE the cache
  refuses the mode."""
  batch, t, hq, hkv, prefill = 1, 40, 4, 2, 12
  (q, k, v), = random_stack(14, 1, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  policy = policies.make_policy("snapkv", window=2, score_mode="keydiff")
  with pytest.raises(ValueError, match="pass the model's RoPE"):
    PagedKVCache.create(1, batch, hkv, D, 8, policy, chunk_size=prefill)
  cache = PagedKVCache.create(1, batch, hkv, D, 8, policy, chunk_size=prefill,
                              dtype=jnp.float32, page_size=4, rope=ROPE)
  kp = np.asarray(k, np.float64).transpose(0, 2, 1, 3)  # [B, Hkv, T, D] pre-RoPE
  _, cache = attend_layers(cache, [(q[:, :prefill], k[:, :prefill], v[:, :prefill])],
                           positions[:, :prefill], ROPE)
  cache = jax.jit(lambda c: c.rechunk(1))(cache)
  step_compress = jax.jit(lambda c: c.compress(headroom=1))
  needs = jax.jit(lambda c: eviction.needs_eviction(c, 0, 1))
  evictions = 0
  for s in range(prefill, t):
    sl = slice(s, s + 1)
    _, cache = attend_layers(cache, [(q[:, sl], k[:, sl], v[:, sl])], positions[:, sl], ROPE)
    if bool(needs(cache)):
      evictions += 1
      pos = np.asarray(cache.view(0)[2])
      held = np.take_along_axis(kp, np.maximum(pos, 0)[..., None], axis=2)
      np.testing.assert_allclose(cache.view(0)[3], _novelty_reference(held, pos >= 0),
                                 atol=1e-5, err_msg=f"step {s}")
    cache = step_compress(cache)
  assert evictions >= 3


def test_pyramidkv_int_budget_falls_with_depth():
  cache = PagedKVCache.create(4, 1, 2, D, 64, policies.make_policy("pyramidkv", window=8),
                              chunk_size=8)
  per_layer = [b[0] for b in cache.budgets]
  assert sum(per_layer) == 4 * 64 and per_layer == sorted(per_layer, reverse=True)
  sizes = cache.layout.count[0].tolist()  # each layer's block of the one pool
  assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
  assert cache.pools[0].k.shape[1] == sum(sizes)  # no layer padded to the largest


def test_bfloat16_pages_stay_close_to_float32():
  layers, batch, t, hq, hkv = 1, 1, 12, 4, 2
  stack = random_stack(11, layers, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    cache = PagedKVCache.create(layers, batch, hkv, D, 8, policies.make_policy("snapkv", window=2),
                                chunk_size=6, dtype=dtype, page_size=4)
    assert cache.pools[0].k.dtype == dtype
    for s in (0, 6):
      o, cache = jit_step(cache, [tuple(x[:, s:s + 6] for x in stack[0])], positions[:, s:s + 6],
                          ROPE)
    outs[dtype] = np.asarray(o[0], np.float32)
  np.testing.assert_allclose(outs[jnp.bfloat16], outs[jnp.float32], atol=5e-2)


def _rotated(x, pos):
  """RoPE of ``x [N, D]`` at positions ``pos [N]`` in float64 (HF rotate_half layout)."""
  cos, sin = (np.asarray(a, np.float64) for a in ROPE.angles(jnp.asarray(pos)))  # [N, D/2]
  x1, x2 = x[:, :x.shape[-1] // 2], x[:, x.shape[-1] // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("name", [n for n in policies.POLICY_NAMES if n != "full"])
def test_rolled_positions_equal_dense_attention_at_slots(name):
  """cache_relative (rolled) mode after evictions: a new token's attention equals dense
  attention over its KV head's kept keys placed at positions 0..n-1 and the token at n, per
  KV head (the kept sets differ between heads), in a ragged batch with GQA."""
  layers, batch, t, hq, hkv, chunk = 2, 2, 23, 6, 3, 5
  stack = random_stack(11, layers, batch, t + 1, hq, hkv)
  lengths = np.array([t, 17])  # row 1 right padded
  positions = np.where(np.arange(t) < lengths[:, None], np.arange(t), -1).astype(np.int32)
  budgets = np.array([[8, 8, 8], [12, 8, 7]])  # a uniform and a ragged layer
  policy = policies.make_policy(name, window=2, position_mode="cache_relative",
                                **({"n_sink": 1} if name in ("streamingllm", "h2o") else {}))
  oracle = make_oracle(12, layers, batch, hq, t + 1) if name == "oracle" else None
  cache = PagedKVCache.create(layers, batch, hkv, D, budgets, policy, chunk_size=chunk,
                              dtype=jnp.float32, page_size=4)
  _, cache = run_stack(cache, stack, jnp.asarray(positions), spans("chunked", t, chunk, 0),
                       oracle)
  assert (np.asarray(cache.logical_tokens) < lengths[None, :, None]).any()  # it evicted
  step_pos = jnp.asarray(lengths[:, None], jnp.int32)  # each row's next position
  group = hq // hkv
  new = [tuple(x[np.arange(batch), lengths][:, None] for x in qkv) for qkv in stack]
  outs, _ = attend_layers(cache, new, step_pos, ROPE)  # every layer's new token, [B, 1, H, D]
  for layer, ((qs, ks, vs), out) in enumerate(zip(new, outs)):
    kc, vc, _, _, _ = view_jit(cache, layer)  # kept keys, stored un-rotated
    n = np.asarray(cache.lengths[:, layer])
    for b in range(batch):
      for h in range(hq):
        kv = h // group
        m = int(n[b, kv])
        keys = np.concatenate([np.asarray(kc[b, kv, :m], np.float64),
                               np.asarray(ks[b, 0, kv:kv + 1], np.float64)])
        vals = np.concatenate([np.asarray(vc[b, kv, :m], np.float64),
                               np.asarray(vs[b, 0, kv:kv + 1], np.float64)])
        keys = _rotated(keys, np.arange(m + 1))
        query = _rotated(np.asarray(qs[b, 0, h:h + 1], np.float64), np.array([m]))
        logits = (query @ keys.T)[0] / np.sqrt(D)
        p = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[b, 0, h], (p / p.sum()) @ vals, atol=1e-5,
                                   err_msg=f"layer {layer} row {b} head {h}")


@pytest.mark.parametrize("with_table", [True, False])
def test_rotate_run_is_rope_at_consecutive_positions(with_table):
  """A rolled cache rotates each tile of keys as one run of consecutive slots
  (``slot_pool.rotate_run``: angle addition from a table, no trigonometry per element): it
  equals RoPE at the positions ``first + 0..size-1`` (float64 reference) for runs starting
  anywhere the tiles do, negative starts (a tile shifted back over a short region) and the
  table's last row included; a wrong sign or row would fail by O(1)."""
  from headkv_jax import slot_pool
  d, size, n = 64, 32, 1000
  rope = rope_lib.RoPE(inv_freq=jnp.asarray(rope_lib.rope_inv_freq(d, 100000.0), jnp.float32))
  x = np.random.default_rng(0).normal(size=(2, 3, size, d)).astype(np.float32)
  first = np.array([[0, 1, 999], [-size + 1, -5, 517]], np.int32)
  turns = rope.turns(n) if with_table else None
  got = np.asarray(slot_pool.rotate_run(rope, jnp.asarray(x), jnp.asarray(first), turns))
  pos = (first[..., None] + np.arange(size)).reshape(-1)
  angles = pos[:, None].astype(np.float64) * np.asarray(rope.inv_freq, np.float64)
  cos, sin = np.cos(angles), np.sin(angles)
  xf = x.reshape(-1, d).astype(np.float64)
  x1, x2 = xf[:, :d // 2], xf[:, d // 2:]
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(x.shape)
  np.testing.assert_allclose(got, want, atol=2e-4)  # float32 angles of positions up to 1,030


def test_rotate_by_digit_table_is_rope():
  """Un-rotating held keys by their own positions (KeyDiff in "original" mode) reads
  ``rope.digit_turns()``: RoPE composed from the base-256 digits of each position equals the
  float64 rotation to float32-angle rounding, for positions with every digit in use, negative
  ones (un-rotation) and 0; a wrong digit place or sign would fail by O(1)."""
  from headkv_jax import slot_pool
  d = 64
  rope = rope_lib.RoPE(inv_freq=jnp.asarray(rope_lib.rope_inv_freq(d, 10000.0), jnp.float32))
  pos = np.array([0, 1, 255, 256, 257, 65535, 65536, 70001, -3, -300, -70001, 1_000_003])
  x = np.random.default_rng(1).normal(size=(pos.size, d)).astype(np.float32)
  got = np.asarray(slot_pool.rotate(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32),
                                    rope.digit_turns()))
  angles = pos[:, None].astype(np.float64) * np.asarray(rope.inv_freq, np.float64)
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2 = x[:, :d // 2].astype(np.float64), x[:, d // 2:].astype(np.float64)
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  # float32 angles of positions up to 10^6: |error| ~ 10^6 * 2^-24 per unit of norm
  np.testing.assert_allclose(got, want, atol=0.2)
  mid = np.abs(pos) < 2**17
  np.testing.assert_allclose(got[mid], want[mid], atol=0.03)
  np.testing.assert_allclose(got[np.abs(pos) < 300], want[np.abs(pos) < 300], atol=1e-4)


def test_rope_at_reuses_its_angles_for_its_own_positions_only():
  """``RoPE.at(positions)`` (angles computed once per prefill chunk, outside the layer
  programs) rotates exactly as computing them in place, bit for bit, under jit with the
  angles made by another program; ``apply`` with any other positions array computes that
  array's own angles (a table read for the wrong positions would rotate by O(1) wrong)."""
  import jax
  d = 64
  rope = rope_lib.RoPE(inv_freq=jnp.asarray(rope_lib.rope_inv_freq(d, 10000.0), jnp.float32))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 3, d)), jnp.float32)
  pos = jnp.asarray([[0, 1, 2, 3, 4], [7, 8, 9, -1, -1]], jnp.int32)
  other = pos + 100
  angles = jax.jit(rope.angles)(pos)

  @jax.jit
  def both(x, pos, other, angles):
    at = rope.at(pos, angles)
    return at.apply(x, pos), at.apply(x, other)

  same, moved = both(x, pos, other, angles)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(jax.jit(rope.apply)(x, pos)))
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(jax.jit(rope.apply)(x, other)))
  assert not np.allclose(np.asarray(moved), np.asarray(same), atol=1e-2)
