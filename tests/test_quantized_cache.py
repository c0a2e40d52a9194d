"""HAQ-KV storage: quantize/pack round trips, attention over quantized slots vs a dequantized
reference, kept tokens that never change, analytic bytes, and the errors that name the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import attention
from headkv_jax import paged_cache
from headkv_jax import policies
from headkv_jax import quantization
from headkv_jax import slot_store
from headkv_jax.paged_cache import PagedKVCache
from pallas_kernels import packing
from tests.test_paged_cache import D, ROPE, jit_step, random_stack, run_stack, spans


# ---- the format -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", packing.PACKED_BITS)
def test_pack_unpack_is_a_bijection(bits):
  """Every code pattern survives pack -> unpack, and packing distinct codes never collides."""
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, size=(5, 7, 64), dtype=np.uint8)
  packed = packing.pack(jnp.asarray(codes), bits)
  assert packed.shape == (5, 7, 64 * bits // 8) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(packing.unpack(packed, bits), codes)
  # Every byte value is reachable and decodes back to itself (a bijection on bytes).
  every = jnp.arange(256, dtype=jnp.uint8)[None, :]
  np.testing.assert_array_equal(packing.pack(packing.unpack(every, bits), bits), every)


@pytest.mark.parametrize("bits", quantization.QUANT_BITS)
@pytest.mark.parametrize("group", [8, 16, 32, 64])
def test_planar_decode_is_the_same_values_split_into_planes(bits, group):
  """A decode tile's planar read (channels split into the planes of their codes, groups
  inside planes, planes inside groups, or one plane at 8 bits) holds exactly the values of
  the flat read, keys' channel shift and scale included, and attention's tile dots over it
  equal the flat ones to float32 rounding (a wrong plane or group order would fail by O(1))."""
  rng = np.random.default_rng(bits * 100 + group)
  x = rng.normal(size=(2, 3, 24, 64)).astype(np.float32)
  channel = jnp.asarray(np.stack([rng.normal(size=(2, 3, 1, 64)),
                                  rng.uniform(0.5, 2.0, size=(2, 3, 1, 64))], axis=-2),
                        jnp.float16)  # [B, Hkv, 1, 2, D]
  store = slot_store.encode(jnp.asarray(x), bits, group, jnp.float32, channel)
  flat = slot_store.decode(store, bits, group, jnp.float32, channel)
  planar = slot_store.decode(store, bits, group, jnp.float32, channel, planar=True)
  n = 8 // bits
  assert planar.shape == (2, 3, 24, n, 64 // n)
  np.testing.assert_array_equal(np.asarray(planar).reshape(flat.shape), flat)
  q = jnp.asarray(rng.normal(size=(2, 3, 5, 64)), jnp.float32)
  np.testing.assert_allclose(attention.tile_logits(q, planar), attention.tile_logits(q, flat),
                             rtol=1e-5, atol=1e-4)
  p = jnp.asarray(rng.uniform(size=(2, 3, 5, 24)), jnp.float32)
  np.testing.assert_allclose(attention._tile_mix(p, planar), attention._tile_mix(p, flat),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", quantization.QUANT_BITS)
def test_round_trip_error_within_half_a_scale(bits):
  """|x - x^| <= scale / 2 per element for keys (per channel) and values (per token group),
  with absmax outliers and constant groups included; never NaN."""
  rng = np.random.default_rng(10 + bits)
  x = rng.normal(size=(3, 16, 64)).astype(np.float32)
  x[0, 3, 5] = 40.0  # an outlier channel value
  x[1, :, 7] = 0.25  # a constant key channel
  x[2, 4, :32] = -1.5  # a constant value group
  x = jnp.asarray(x)
  codes, scale, zero = quantization.quantize_keys(x, bits)
  err = jnp.abs(quantization.dequantize_keys(codes, scale, zero, bits) - x)
  assert scale.dtype == jnp.float16 and codes.shape == (3, 16, 64 * bits // 8)
  assert bool(jnp.all(err <= scale[:, None, :].astype(jnp.float32) / 2 + 1e-6))
  codes, scale, zero = quantization.quantize_values(x, bits, 32)
  back = quantization.dequantize_values(codes, scale, zero, bits, 32)
  per = jnp.repeat(scale.astype(jnp.float32), 32, axis=-1)
  assert bool(jnp.all(jnp.abs(back - x) <= per / 2 + 1e-6))
  assert bool(jnp.all(jnp.isfinite(back))) and float(jnp.max(jnp.abs(back[2, 4, :32] + 1.5))) < 1e-3


def test_effective_bits_formula():
  assert quantization.effective_bits(4, 32) == 5.0
  assert quantization.effective_bits(2, 64) == 2.5
  assert quantization.effective_bits(16, 32, jnp.bfloat16) == 16.0
  assert quantization.effective_bits(16, 32, jnp.float32) == 32.0


# ---- the cache ------------------------------------------------------------------------------

def _stored(x, bits, group, channel=None):
  """What a quantized slot gives back for stored ``x [..., D]`` (keys: normalised by their
  channel (shift, scale) ``[..., 2, D]`` before quantizing)."""
  return slot_store.decode(slot_store.encode(x, bits, group, jnp.float32, channel), bits,
                           group, jnp.float32, channel)


def _key_channels(keys):
  """The channel (shift, scale) a head fixes from its first written keys ``[..., T, D]``:
  their mean and standard deviation per channel (floored at a tenth of the mean deviation),
  in float16 -> ``[..., 1, 2, D]``."""
  x = np.asarray(keys, np.float64)
  mean, std = x.mean(axis=-2), x.std(axis=-2)
  std = np.maximum(std, np.maximum(0.1 * std.mean(axis=-1, keepdims=True), 2.0**-14))
  return jnp.asarray(np.stack([mean, std], axis=-2)[..., None, :, :], jnp.float16)


@pytest.mark.parametrize("kv", [(8, 8), (4, 2), (2, 2), (16, 4)])
def test_attention_over_quantized_slots_equals_dequantized_reference(kv):
  """Decoding after a prefill: cached tokens outside the full-precision window are read as
  their dequantized values, sinks and the residual exactly, the new token exactly."""
  batch, t, hq, hkv, prefill, sinks, residual, group = 2, 14, 4, 2, 13, 2, 3, 4
  (q, k, v), = random_stack(20, 1, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  cache = PagedKVCache.create(1, batch, hkv, D, 32, "full", chunk_size=prefill,
                              dtype=jnp.float32, page_size=4, bits=np.full((1, hkv, 2), kv),
                              quant_group=group, residual=residual, fp_sinks=sinks)
  _, cache = cache.attend(0, q[:, :prefill], k[:, :prefill], v[:, :prefill],
                          positions[:, :prefill], ROPE)
  out, _ = cache.attend(0, q[:, prefill:], k[:, prefill:], v[:, prefill:],
                        positions[:, prefill:], ROPE)
  held = None if kv[0] == 16 else cache.key_channels[:, 0][:, :, None]  # [B, Hkv, 1, 2, D]

  kr = np.asarray(ROPE.apply(k, positions), np.float64)  # stored keys are rotated
  qr = np.asarray(ROPE.apply(q, positions), np.float64)[:, prefill]  # [B, Hq, D]
  # keys [B, T, Hkv, D] -> per head [B, Hkv, T, D]: the prefill fixed each head's scales
  kr_h = jnp.asarray(kr, jnp.float32).transpose(0, 2, 1, 3)
  if kv[0] < 16:  # the prefill's keys fixed each head's channel shifts and scales
    np.testing.assert_allclose(np.asarray(held, np.float32),
                               np.asarray(_key_channels(kr_h[:, :, :prefill]), np.float32),
                               rtol=1e-3, atol=1e-3)
  kd = np.asarray(_stored(kr_h, kv[0], group, held), np.float64).transpose(0, 2, 1, 3)
  vd = np.asarray(_stored(v, kv[1], group), np.float64)
  exact = (np.arange(t) < sinks) | (np.arange(t) >= prefill - residual)
  kk = np.where(exact[None, :, None, None], kr, kd)
  vv = np.where(exact[None, :, None, None], np.asarray(v, np.float64), vd)
  want = np.zeros((batch, hq, D))
  for b in range(batch):
    for h in range(hq):
      logits = kk[b, :, h // 2] @ qr[b, h] / np.sqrt(D)
      p = np.exp(logits - logits.max())
      want[b, h] = (p / p.sum()) @ vv[b, :, h // 2]
  np.testing.assert_allclose(out[:, 0], want, atol=1e-5)


@jax.jit
def _held_raw(c):
  """Per layer: (positions [B, Hkv, C], the raw K/V stores at those slots); moves codes and
  scales only (no arithmetic), so the bits compared below are the stored ones."""
  out = []
  for layer in range(c.num_layers):
    _, _, pos, _ = c.slot_meta(layer)
    (_, k, v), = c.raw_view(layer)  # one bit class
    out.append((pos, ((k, v),)))
  return out


_rechunk_1 = jax.jit(lambda c: c.rechunk(1))


@pytest.mark.parametrize("policy, kv", [
    (policies.make_policy("h2o", n_sink=1), (4, 2)),
    (policies.make_policy("snapkv", window=2, pool_kernel=3), (2, 2)),
    (policies.make_policy("streamingllm", n_sink=2, position_mode="cache_relative"), (8, 4)),
    (policies.make_policy("adakv", window=2, pool_kernel=3), (4, 4)),
], ids=lambda x: getattr(x, "name", str(x)))
def test_kept_tokens_never_change_across_evictions(policy, kv):
  """A token's dequantized K and V are bit-identical at every step it is held: chunked
  prefill, eviction, decode, and re-packing (rechunk) never re-quantize."""
  kv_bits = kv
  layers, batch, t, hq, hkv = 2, 2, 22, 4, 2
  stack = random_stack(21, layers, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  cache = PagedKVCache.create(layers, batch, hkv, D, np.array([[6, 9], [7, 7]]), policy,
                              chunk_size=5, dtype=jnp.float32, page_size=4,
                              bits=np.full((layers, hkv, 2), kv), quant_group=4, residual=2,
                              fp_sinks=1)
  seen = [np.full((batch, hkv, t, 2, D), np.nan, np.float32) for _ in range(layers)]
  scales = []

  def check(c):  # every held position's dequantized K, V equal what it was when first seen
    scales.append(np.asarray(c.key_channels))  # and every head's key channels, once set
    set_first = np.any(scales[0][..., 1, :] != 0, axis=-1)
    np.testing.assert_array_equal(scales[-1][set_first], scales[0][set_first])
    for layer, (pos, ((k, v),)) in enumerate(_held_raw(c)):
      kv = np.stack([np.asarray(slot_store.decode(k, kv_bits[0], 4, jnp.float32)),
                     np.asarray(slot_store.decode(v, kv_bits[1], 4, jnp.float32))], axis=3)
      b, h, s = np.nonzero(np.asarray(pos) >= 0)
      p = np.asarray(pos)[b, h, s]
      before = seen[layer][b, h, p]
      known = ~np.isnan(before[:, 0, 0])
      np.testing.assert_array_equal(kv[b, h, s][known], before[known])
      seen[layer][b, h, p] = kv[b, h, s]

  for s, e in spans("chunked", 15, 5, 5) + [(s, s + 1) for s in range(15, 18)]:
    _, cache = run_stack(cache, [tuple(x[:, s:e] for x in qkv) for qkv in stack],
                         positions[:, s:e], [(0, e - s)], on_compress=check)
    check(cache)
  cache = _rechunk_1(cache)
  check(cache)
  for s in range(18, t):
    _, cache = run_stack(cache, [tuple(x[:, s:s + 1] for x in qkv) for qkv in stack],
                         positions[:, s:s + 1], [(0, 1)])
    check(cache)
  assert sum(int((~np.isnan(x[..., 0, 0])).sum()) for x in seen) > layers * batch * hkv * 6


@pytest.mark.parametrize("bits", [4, 2])
def test_key_channels_keep_an_outlier_channel_from_erasing_the_others(bits):
  """KIVI's key axis: keys whose channel 0 is about 20 every token, the others about 0.
  Per-token groups alone spend their levels on the outlier and erase the other channels of
  its group; the cache's channel shifts and scales (fixed from the head's first tokens) keep
  their error at the scale of those channels, and later tokens (a second chunk) use the same
  ones."""
  rng = np.random.RandomState(4)
  batch, t, hkv, group = 1, 24, 1, 8
  k = rng.randn(batch, t, hkv, D).astype(np.float32)
  k[..., 0] = 20.0 + 5.0 * k[..., 0]
  k[:, 12:] *= 2.0  # the second chunk's keys are larger: they must not move the scales
  v = rng.randn(batch, t, hkv, D).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  cache = PagedKVCache.create(1, batch, hkv, D, 64, "full", chunk_size=12, dtype=jnp.float32,
                              page_size=4, bits=np.full((1, hkv, 2), (bits, bits)),
                              quant_group=group, residual=0, fp_sinks=0)
  for s in (0, 12):  # two chunks: the first fixes the scales
    cache = cache.append(0, jnp.asarray(k[:, s:s + 12]).transpose(0, 2, 1, 3),
                         jnp.asarray(v[:, s:s + 12]).transpose(0, 2, 1, 3),
                         positions[:, s:s + 12], jnp.zeros((batch, hkv, 12)))
  np.testing.assert_allclose(np.asarray(cache.key_channels[0, 0, 0], np.float32),
                             np.asarray(_key_channels(k[0, :12, 0])[0], np.float32),
                             rtol=1e-3, atol=1e-3)  # the first chunk's, not the second's
  held = np.asarray(cache.view(0)[0][0, 0, :t])  # [T, D] dequantized keys
  err = np.abs(held - k[0, :, 0])[:, 1:group]  # the outlier's group mates
  plain = np.asarray(_stored(jnp.asarray(k[0, :, 0]), bits, group))
  plain_err = np.abs(plain - k[0, :, 0])[:, 1:group]
  assert err.mean() < 0.5 * plain_err.mean()
  levels = (1 << bits) - 1
  assert err.max() <= (np.abs(k[0, :, 0, 1:group]).max() * 2 + 1) / levels  # their own range


def test_a_decode_steps_key_channels_are_a_chunks_with_that_token_alone_stored():
  """A one-token write (every decode step) fixes the channels of a head without any by a
  shorter formula; it must equal the general one's on a chunk where only that token is
  stored (mean = the token, deviation 0, scale at the floor), and leave set heads alone."""
  rng = np.random.RandomState(5)
  b, hkv = 2, 3
  k = jnp.asarray(rng.randn(b, hkv, 1, D).astype(np.float32))
  old = jnp.asarray(rng.randn(b, hkv, 2, D).astype(np.float16))
  old = old.at[0, 1, 1].set(0).at[1, 2, 1].set(0).at[1, 0, 1].set(0)  # heads with no channels
  stored = jnp.asarray([[[True], [True], [True]], [[False], [True], [True]]])
  one = paged_cache._first_key_channels(old, k, stored)
  two = paged_cache._first_key_channels(
      old, jnp.concatenate([k, 3.0 + k], axis=2),
      jnp.concatenate([stored, jnp.zeros_like(stored)], axis=2))
  np.testing.assert_array_equal(np.asarray(one, np.float32), np.asarray(two, np.float32))
  changed = np.any(np.asarray(one != old), axis=(2, 3))
  assert changed.tolist() == [[False, True, False], [False, False, True]]


@pytest.mark.parametrize("drive", ["chunked", "decode"])
def test_mixed_bits_in_one_layer_match_each_class_alone(drive):
  """Heads of different bit classes in one layer: each head attends, and its statistic
  scores its slots, exactly as in a cache where every head has its bits (classes are
  independent stores of one layer; a mixed layer's one tile loop over all its classes,
  ``PagedKVCache._attend_classes``, reads each head's own slots only)."""
  batch, t, hq, hkv = 1, 12, 6, 3
  (q, k, v), = random_stack(22, 1, batch, t, hq, hkv)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  mixed = np.array([[[8, 4], [16, 16], [2, 2]]])
  policy = policies.make_policy("snapkv", window=2)
  outs, scores = {}, {}
  for name, bits in [("mixed", mixed)] + [(h, np.broadcast_to(mixed[:, h:h + 1], (1, hkv, 2)))
                                          for h in range(hkv)]:
    cache = PagedKVCache.create(1, batch, hkv, D, np.array([[6, 8, 5]]), policy, chunk_size=4,
                                dtype=jnp.float32, page_size=4, bits=bits, quant_group=4,
                                residual=2)
    outs[name], cache = run_stack(cache, [(q, k, v)], positions, spans(drive, t, 4, 4))
    scores[name] = np.asarray(cache.slot_meta(0)[3])  # [B, Hkv, max_region] by slot
  for h in range(hkv):  # query heads 2h, 2h + 1 read KV head h
    np.testing.assert_allclose(outs["mixed"][0][:, :, 2 * h:2 * h + 2],
                               outs[h][0][:, :, 2 * h:2 * h + 2], atol=1e-6)
    n = min(scores["mixed"].shape[-1], scores[h].shape[-1])
    np.testing.assert_allclose(scores["mixed"][:, h, :n], scores[h][:, h, :n], atol=1e-6)
  assert cache.layout.num_classes == 1
  mixed_cache = PagedKVCache.create(1, batch, hkv, D, 8, policy, chunk_size=4, bits=mixed,
                                    quant_group=4)
  assert mixed_cache.layout.pairs == ((8, 4), (16, 16), (2, 2))


def test_nbytes_equal_the_analytic_formula():
  """Codes, scales, zeros, the full-precision window and the bookkeeping are all counted."""
  layers, batch, hkv, chunk, page, group, window = 2, 2, 3, 4, 4, 4, 2 + 3
  budgets = np.array([[8, 12, 8], [16, 8, 6]])  # all >= the window: it is not capped
  bits = np.array([[[4, 2], [16, 16], [2, 2]], [[8, 8], [8, 8], [4, 4]]])
  cache = PagedKVCache.create(layers, batch, hkv, D, budgets, "h2o", chunk_size=chunk,
                              dtype=jnp.bfloat16, page_size=page, bits=bits, quant_group=group,
                              residual=3, fp_sinks=2)

  def side(b):  # bytes of one slot of one side
    return 2 * D if b == 16 else D * b // 8 + 2 * 2 * (D // group)

  want = 0
  for l in range(layers):
    for h in range(hkv):
      slots = -(-(budgets[l, h] + chunk) // page) * page
      kb, vb = bits[l, h]
      want += batch * slots * (side(kb) + side(vb) + 4 + 4)  # + position, score
      if min(kb, vb) < 16:
        want += batch * window * (2 * 2 * D + 4)  # window K, V (bf16) and positions
      want += batch * 3 * 4  # offsets, lengths, dropped
      want += batch * 2 * D * 2  # key channel shift + scale (float16; every head once any
      #                           head quantizes its keys)
  assert cache.nbytes == want
  # Effective bits: a 4/2 head at budget 8 holds 5 of its 8 tokens also in the window, and
  # its key channels (a shift and a scale each) add 32 / 8 bits per key element.
  eff = cache.head_effective_bits()
  assert eff[0, 1] == 16.0
  assert eff[0, 0] == pytest.approx(((4 + 8 + 32 / 8) + 5 * 16 / 8 + (2 + 8) + 5 * 16 / 8) / 2)
  assert PagedKVCache.create(layers, batch, hkv, D, budgets, "h2o", chunk_size=chunk,
                             bits=np.full((layers, hkv, 2), (16, 4))).key_channels is None
  assert cache.effective_bits == pytest.approx((eff * budgets).sum() / budgets.sum())


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": np.array([[[4, 8]] * 2] * 2)},
     r"Values may not get more bits than keys: \(layer, kv_head\)=\(0, 0\) has 4-bit keys"),
    ({"bits": np.full((2, 2), 3)}, r"Unsupported bits \[3\]; allowed: \[16, 8, 4, 2\]"),
    ({"bits": np.full((2, 2), 4), "quant_group": 3}, "quant_group=3 must divide head_dim=8"),
    ({"bits": np.full((2, 2, 3), 4)}, r"bits must have shape \[2, 2\] or \[2, 2, 2\]"),
    ({"bits": np.array([[4, 2], [4, 4]]), "policy": "adakv"},
     "Policy 'adakv' moves budget between the heads of a layer"),
])
def test_bad_bits_are_named(kwargs, match):
  args = {"budgets": 40, "policy": "h2o", "chunk_size": 4} | kwargs
  with pytest.raises(ValueError, match=match):
    PagedKVCache.create(2, 1, 2, D, dtype=jnp.float32, **args)


def test_jit_decode_with_quantized_heads_matches_eager():
  layers, batch, t, hq, hkv = 2, 2, 12, 4, 2
  stack = random_stack(23, layers, batch, t, hq, hkv)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  cache = PagedKVCache.create(layers, batch, hkv, D, 6, policies.make_policy("h2o", n_sink=1),
                              chunk_size=8, dtype=jnp.float32, page_size=4,
                              bits=np.array([[[4, 2], [8, 8]], [[2, 2], [2, 2]]]),
                              quant_group=4, residual=2)
  eager, _ = run_stack(cache, stack, positions, spans("decode", t, 8, 8), eager=True)
  jitted = [[] for _ in stack]
  for s, e in spans("decode", t, 8, 8):
    outs, cache = jit_step(cache, [tuple(x[:, s:e] for x in qkv) for qkv in stack],
                           positions[:, s:e], ROPE)
    for layer, o in enumerate(outs):
      jitted[layer].append(o)
  for layer in range(layers):
    np.testing.assert_allclose(jnp.concatenate(jitted[layer], 1), eager[layer], atol=1e-5)
  assert jax.tree_util.tree_structure(cache) is not None


def _partitions(items):
  """Every set partition of ``items`` (a list), as lists of lists."""
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in _partitions(rest):
    for i in range(len(part)):
      yield part[:i] + [[first] + part[i]] + part[i + 1:]
    yield [[first]] + part


def test_decode_loops_cover_each_head_once_at_least_cost():
  """A decode layer's static tile loops (``_layer_loops``) read every head of every class
  exactly once, never two classes in one loop, and their cost (``tiles x (1 + heads)`` per
  loop) is the least over every way of splitting each class's heads (brute force)."""
  budgets = [[36, 900, 1000, 5000, 40], [300, 300, 300, 300, 300]]
  bits = [[[8, 4], [4, 2], [4, 2], [4, 2], [16, 16]], [[4, 2]] * 5]
  cache = PagedKVCache.create(2, 1, 5, 64, budgets, "snapkv", chunk_size=16,
                              dtype=jnp.float32, bits=bits)
  tile = cache._tile_size()
  for layer in range(2):
    tiles = -(-(np.asarray(budgets[layer]) + cache.page_size) // tile)
    loops = cache._layer_loops(layer)
    read = sorted((c, h) for c, heads in loops for h in (heads or range(5)))
    assert read == sorted((int(c), h) for h, c in enumerate(cache.layout.class_of[layer]))
    cost = lambda run: int(max(tiles[list(run)])) * (1 + len(run))
    got = sum(cost(heads or range(5)) for _, heads in loops)
    best = 0
    for c in set(cache.layout.class_of[layer].tolist()):
      heads = [h for h in range(5) if cache.layout.class_of[layer][h] == c]
      best += min(sum(cost(run) for run in part) for part in _partitions(heads))
    assert got == best
