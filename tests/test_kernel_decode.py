"""PagedKVCache(attention_impl="pallas") decode steps (the kernel in interpret mode) against the
XLA path: outputs, collected scores and kept positions agree; dispatch and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import kernel_decode
from headkv_jax import policies
from headkv_jax import rope as rope_lib
from headkv_jax import slot_store
from headkv_jax.paged_cache import PagedKVCache

D = 16
ROPE = rope_lib.RoPE(inv_freq=jnp.asarray(rope_lib.rope_inv_freq(D, 10000.0)))
B, HQ, HKV, T = 2, 6, 3, 16
# One layer of three bit classes (quantized with a window, 16-bit, 2-bit) with ragged budgets,
# one uniform 4-bit layer (a free-reshape view).
BITS = [[[4, 2], [16, 16], [2, 2]], [[4, 4], [4, 4], [4, 4]]]
BUDGETS = [[10, 9, 12], [10, 10, 10]]


def _qkv(rng, t):
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(B, t, HQ, D), f(B, t, HKV, D) + 0.5, f(B, t, HKV, D)


@jax.jit
def _step(cache, qkv, positions):
  outs = []
  for layer, (q, k, v) in enumerate(qkv):
    o, cache = cache.attend(layer, q, k, v, positions, ROPE)
    outs.append(o)
  return outs, cache


def _prefill(policy):
  rng = np.random.default_rng(0)
  cache = PagedKVCache.create(len(BITS), B, HKV, D, np.asarray(BUDGETS), policy, chunk_size=T,
                              dtype=jnp.float32, page_size=4, bits=BITS, residual=4,
                              fp_sinks=2, attention_impl="xla")
  # Row 1 is left-padded (ragged prompt lengths).
  positions = jnp.asarray([np.arange(T), np.r_[[-1] * 3, np.arange(T - 3)]], jnp.int32)
  _, cache = _step(cache, [_qkv(rng, T) for _ in BITS], positions)
  return cache.compress().rechunk(1), positions[:, -1]


@pytest.mark.parametrize("policy", [policies.make_policy("h2o"),
                                    policies.make_policy("snapkv", window=4)])
def test_pallas_decode_matches_xla(policy):
  cache, last = _prefill(policy)
  pairs = cache.layout.pairs
  assert [p.fp is not None for p in cache.pools] == [min(b) < 16 for b in pairs]  # windows
  # The window's exact copies differ from the tokens' codes, so matching XLA to 1e-5 below
  # shows the kernel path reads window tokens from the window, not from their slots.
  member, kq, _ = cache.raw_view(1)[pairs.index((4, 4))]
  assert np.asarray(member).all()
  exact = np.asarray(cache.view(1)[0])
  coded = np.asarray(slot_store.decode(kq, 4, cache.quant_group, cache.dtype))
  held = np.asarray(cache.view(1)[2]) >= 0
  assert np.abs(exact - coded)[held].max() > 1e-2
  caches = {impl: cache.replace(attention_impl=impl) for impl in ("xla", "pallas")}
  assert kernel_decode.uses_kernel(caches["pallas"], 1)
  assert not kernel_decode.uses_kernel(caches["xla"], 1)
  rng = np.random.default_rng(1)
  for step in range(4):
    qkv = [tuple(x for x in _qkv(rng, 1)) for _ in BITS]
    positions = (last + 1 + step)[:, None]
    if step == 2:  # a padding token in row 1: zero output, nothing stored
      positions = positions.at[1, 0].set(-1)
    got = {}
    for impl, c in caches.items():
      outs, c = _step(c, qkv, positions)
      got[impl] = (outs, c)
    for layer in range(len(BITS)):
      a, b = got["pallas"][0][layer], got["xla"][0][layer]
      assert np.isfinite(np.asarray(a)).all()
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5,
                                 err_msg=f"step {step} layer {layer}")
      sa, sb = (got[impl][1].view(layer)[3] for impl in ("pallas", "xla"))
      np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), atol=1e-5,
                                 rtol=1e-5, err_msg=f"scores step {step} layer {layer}")
    if step == 2:
      assert (np.asarray(got["pallas"][0][0])[1] == 0).all()
    caches = {impl: c.compress() for impl, (_, c) in got.items()}
    for layer in range(len(BITS)):
      pa = caches["pallas"].view(layer)[2]
      pb = caches["xla"].view(layer)[2]
      np.testing.assert_array_equal(np.asarray(pa), np.asarray(pb))
  # Eviction happened and the window held tokens the kernel had to skip.
  lengths = np.asarray(caches["pallas"].lengths[:, 0])
  np.testing.assert_array_equal(lengths, np.broadcast_to(BUDGETS[0], lengths.shape))


def test_cache_relative_falls_back_to_xla():
  """position_mode="cache_relative" (keys rotated by slot at attention time) never uses the
  kernel: attention_impl="pallas" silently runs the XLA path (same numbers)."""
  policy = policies.make_policy("streamingllm", n_sink=2, position_mode="cache_relative")
  cache = PagedKVCache.create(1, B, HKV, D, 8, policy, chunk_size=4, dtype=jnp.float32,
                              page_size=4, bits=[[4, 16, 2]], attention_impl="pallas")
  assert not kernel_decode.uses_kernel(cache, 1)
  rng = np.random.default_rng(2)
  qkv = [_qkv(rng, 1)]
  pos = jnp.zeros((B, 1), jnp.int32)
  a, _ = _step(cache, qkv, pos)
  b, _ = _step(cache.replace(attention_impl="xla"), qkv, pos)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_auto_resolution_and_errors():
  expected = "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm") else "xla"
  assert kernel_decode.resolve_impl("auto") == expected
  assert kernel_decode.resolve_impl("xla") == "xla"
  cache = PagedKVCache.create(1, 1, 1, D, 8, "h2o", chunk_size=4, page_size=4)
  assert cache.attention_impl == "auto"
  assert not kernel_decode.uses_kernel(cache.replace(attention_impl="pallas"), 2)  # prefill
  with pytest.raises(ValueError, match=r"attention_impl must be one of \['auto', 'pallas', "
                                       r"'xla'\]; got 'triton'"):
    PagedKVCache.create(1, 1, 1, D, 8, "h2o", chunk_size=4, page_size=4,
                        attention_impl="triton")
  assert cache.rechunk(1).attention_impl == "auto"
  assert PagedKVCache.create(1, 1, 1, D, 8, "h2o", chunk_size=4, page_size=4,
                             attention_impl="pallas").rechunk(1).attention_impl == "pallas"


def test_process_default_decides_auto():
  """`--attention_impl` sets what "auto" caches use; an explicit setting always wins."""
  try:
    kernel_decode.set_default_impl("pallas")
    assert kernel_decode.resolve_impl("auto") == "pallas"
    assert kernel_decode.resolve_impl("xla") == "xla"
    kernel_decode.set_default_impl("xla")
    assert kernel_decode.resolve_impl("auto") == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
      kernel_decode.set_default_impl("cuda")
  finally:
    kernel_decode.set_default_impl("auto")
  assert kernel_decode.resolve_impl("auto") == ("pallas" if kernel_decode.on_gpu() else "xla")
