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


def test_one_token_chunk_sees_itself_with_weight_one():
  """A decode step's own part (t == 1, no loop): o = its value, m = its scaled logit, l = 1;
  a padding row sees nothing (o = l = 0, m = the "no key" floor), as the tile loop of a
  longer chunk gives for its first token."""
  q, k, v, pos = _ragged(2, seed=3, lengths=[2, 0])
  o, m, l = (np.asarray(x) for x in attention.causal_attention(
      *(jnp.asarray(x[:, :1]) for x in (q, k, v, pos))))
  loop = [np.asarray(x)[:, :, :3] for x in attention.causal_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))]
  np.testing.assert_array_equal(o[0], np.repeat(v[0, 0][:, None], 3, axis=1))  # [Hkv, G, D]
  np.testing.assert_array_equal(l[0], 1.0)
  want = np.einsum("hgd,hd->hg", q[0, 0].reshape(2, 3, 8), k[0, 0]) / np.sqrt(8)
  np.testing.assert_allclose(m[0], want, rtol=1e-6)
  assert np.all(o[1] == 0) and np.all(l[1] == 0) and np.all(m[1] <= -1e30)  # _NEG_INF
  for got, ref in zip((o, m, l), loop):
    np.testing.assert_allclose(got, ref, rtol=1e-6)


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
