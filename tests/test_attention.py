"""The tiled attention loops equal brute-force softmax attention (numpy), whatever the tiling."""

import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import attention


def _brute_force(q, k, v, q_pos, k_pos):
  """Per query head: softmax over keys with ``0 <= k_pos <= q_pos``; zero rows see nothing.

  ``q [B, T, Hq, D]`` (unscaled), ``k, v [B, S, Hkv, D]``, ``q_pos [B, T]``, ``k_pos [B, S]``.
  """
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  out = np.zeros((b, t, hq, d))
  for bi in range(b):
    for h in range(hq):
      logits = q[bi, :, h] @ k[bi, :, h // group].T / np.sqrt(d)  # [T, S]
      mask = ((k_pos[bi][None] >= 0) & (k_pos[bi][None] <= q_pos[bi][:, None])
              & (q_pos[bi][:, None] >= 0))
      logits = np.where(mask, logits, -np.inf)
      top = np.max(np.where(mask, logits, -1e30), axis=1, keepdims=True)
      p = np.where(mask, np.exp(logits - top), 0.0)
      denom = p.sum(axis=1, keepdims=True)
      out[bi, :, h] = (p / np.where(denom > 0, denom, 1.0)) @ v[bi, :, h // group]
  return out


def _ragged(t, seed, lengths):
  rng = np.random.RandomState(seed)
  q = rng.randn(len(lengths), t, 6, 8).astype(np.float32)
  k = rng.randn(len(lengths), t, 2, 8).astype(np.float32)
  v = rng.randn(len(lengths), t, 2, 8).astype(np.float32)
  pos = np.full((len(lengths), t), -1, np.int32)
  for i, n in enumerate(lengths):
    pos[i, :n] = np.arange(n)
  return q, k, v, pos


@pytest.mark.parametrize("t,block,key_block", [
    (70, 16, 16),   # chunk not a multiple of the block: padded
    (64, 16, 24),   # key tiles not aligned with query blocks: the last one shifted back
    (50, 64, 64),   # one block: no loop
    (48, 8, 32),    # key tiles wider than query blocks
])
def test_causal_attention_matches_brute_force(t, block, key_block):
  """Every query block reads exactly the keys up to its own end, once (ragged batch)."""
  q, k, v, pos = _ragged(t, seed=t, lengths=[t, t - 13])
  o, _, l = attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       jnp.asarray(pos), block_size=block, key_block=key_block)
  got = attention.unfold_outputs(attention.normalize(o, l), t)
  np.testing.assert_allclose(np.asarray(got), _brute_force(q, k, v, pos, pos), atol=2e-5)
  assert np.all(np.asarray(got)[1, t - 13:] == 0), "padding queries see nothing"


@pytest.mark.parametrize("tile", [5, 16, 40])
def test_tiled_attention_over_a_cache_counts_each_key_once(tile):
  """A traced tile count reads the filled prefix once; a shifted last tile adds nothing twice."""
  rng = np.random.RandomState(tile)
  s, hkv, group, d = 40, 2, 3, 8
  k = rng.randn(1, s, hkv, d).astype(np.float32)
  v = rng.randn(1, s, hkv, d).astype(np.float32)
  q = rng.randn(1, 1, hkv * group, d).astype(np.float32)
  k_pos = np.where(np.arange(s) < 33, np.arange(s), -1)[None].astype(np.int32)
  q_pos = np.array([[33]], np.int32)
  q_rows = attention.fold_queries(jnp.asarray(q) * d**-0.5, hkv)
  filled = jnp.int32(33)
  o, _, l = attention.tiled_attention(
      q_rows, jnp.repeat(jnp.asarray(q_pos), group, axis=1), jnp.asarray(k).transpose(0, 2, 1, 3),
      jnp.asarray(v).transpose(0, 2, 1, 3), jnp.asarray(k_pos), tile=tile,
      num_tiles=(filled + tile - 1) // tile)
  got = attention.unfold_outputs(attention.normalize(o, l), 1)
  np.testing.assert_allclose(np.asarray(got), _brute_force(q, k, v, q_pos, k_pos), atol=2e-5)


@pytest.mark.parametrize("t,tile", [(1, 256), (9, 4), (9, 7), (12, 64)])
def test_attention_over_slots_matches_the_probability_reference(t, tile):
  """The paged cache's attention (tiles over per-head slots + the causal chunk, merged by
  log-sum-exp) equals the reference that materialises the probabilities, and so do the
  statistics a policy sums from the observed queries: ragged per-head slots, empty slots,
  a padding row and query, tiles that shift back at the end of the filled slots."""
  from headkv_jax import cache_attention
  rng = np.random.RandomState(t * 100 + tile)
  b, hkv, group, c, d = 2, 2, 3, 21, 8
  qg = rng.randn(b, hkv, group, t, d).astype(np.float32)
  kc, vc = (rng.randn(b, hkv, c, d).astype(np.float32) for _ in range(2))
  kn, vn = (rng.randn(b, hkv, t, d).astype(np.float32) for _ in range(2))
  lengths = np.array([[17, 5], [0, 12]])  # tokens each (row, head) holds
  pc = np.full((b, hkv, c), -1, np.int32)
  for (i, h), n in np.ndenumerate(lengths):
    pc[i, h, :n] = np.sort(rng.choice(40, n, replace=False))  # kept positions, in order
  positions = np.full((b, t), -1, np.int32)
  positions[0] = 40 + np.arange(t)
  positions[1, :max(t - 1, 1)] = 40 + np.arange(max(t - 1, 1))  # row 1: a padding query
  observed = positions >= 0
  observed[0, 0] = t == 1  # an unobserved query (the SnapKV window's complement)
  args = [jnp.asarray(x) for x in (qg, kc, vc, pc, kn, vn, positions)]
  out, sums = attention.attention_over_slots(*args, num_filled=jnp.int32(lengths.max()),
                                             observed=jnp.asarray(observed), tile=tile)
  ref, probs = cache_attention.attention_over_cache(*args)
  ref = np.asarray(ref).transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * group, d)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
  want = np.sum(np.asarray(probs) * observed[:, None, None, :, None], axis=3)
  np.testing.assert_allclose(np.asarray(sums), want, atol=2e-5)
  none_out, none_sums = attention.attention_over_slots(*args, num_filled=17, tile=tile)
  assert none_sums is None
  np.testing.assert_allclose(np.asarray(none_out), ref, atol=2e-5)
