"""Eviction policies against a brute-force numpy reference (loops over rows, heads, slots)."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import policies

C = 16  # slots per head view in the selection tests
H = 3


def ref_recent(policy, budget):
  if policy.name == "streamingllm":
    return budget - policy.n_sink
  if policy.name == "h2o":
    rest = budget - policy.n_sink
    return rest - rest // 2
  return policy.window


def ref_head_order(policy, scores, length, budget):
  """Slots of one head, best first, and its forced set (the rule in the policies docstring)."""
  recent = ref_recent(policy, budget)
  forced = {c for c in range(length) if c < policy.n_sink or c >= length - recent}
  prio = {}
  for c in range(length):
    if policy.name == "streamingllm":
      prio[c] = float(c)
    elif policy.name in policies.SNAPKV_FAMILY:
      half = policy.pool_kernel // 2
      near = [scores[j] for j in range(max(0, c - half), min(length, c + half + 1))
              if j not in forced]
      prio[c] = max(near) if near else -np.inf
    else:
      prio[c] = float(scores[c])
  order = sorted(range(length), key=lambda c: (c not in forced, -prio[c], c))
  return order, forced, prio


def ref_keep(policy, scores, lengths, budgets):
  """Brute-force keep mask ``[B, H, C]`` with the same rule as ``policies.select_keep``."""
  scores, lengths, budgets = np.asarray(scores), np.asarray(lengths), np.asarray(budgets)
  b_size, h_size, c_size = scores.shape
  keep = np.zeros(scores.shape, bool)
  for b in range(b_size):
    floors, cands = 0, []
    for h in range(h_size):
      length, budget = int(lengths[b, h]), int(budgets[h])
      if policy.name == "full":
        keep[b, h, :length] = True
        continue
      order, _, prio = ref_head_order(policy, scores[b, h], length, budget)
      if not policy.adaptive:
        keep[b, h, order[:budget]] = True
        continue
      forced_n = policy.n_sink + policy.window
      floor = forced_n + int(np.floor(policy.alpha * (budget - forced_n)))
      keep[b, h, order[:floor]] = True
      floors += len(order[:floor])
      cands += [(-prio[c], h * c_size + c) for c in order[floor:]]
    if policy.adaptive:
      for _, flat in sorted(cands)[: int(budgets.sum()) - floors]:
        keep[b, flat // c_size, flat % c_size] = True
  return keep


POLICY_CASES = [
    policies.make_policy("full"),
    policies.make_policy("streamingllm", n_sink=2),
    policies.make_policy("h2o"),
    policies.make_policy("h2o", n_sink=1),
    policies.make_policy("snapkv", window=3, pool_kernel=3),
    policies.make_policy("snapkv", window=2, pool_kernel=1, n_sink=1),
    policies.make_policy("pyramidkv", window=2, pool_kernel=5),
    policies.make_policy("headaware", window=3),
    policies.make_policy("adakv", window=2, pool_kernel=3),
    policies.make_policy("adakv", window=2, pool_kernel=3, alpha=1.0),
    policies.make_policy("oracle"),
    policies.make_policy("oracle", window=2, n_sink=1),
]


@pytest.mark.parametrize("policy", POLICY_CASES, ids=lambda p: f"{p.name}-{p.n_sink}-{p.window}")
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(data=st.data())
def test_select_keep_matches_brute_force(policy, data):
  lo = policy.min_budget
  budgets = np.array(data.draw(st.lists(st.integers(lo, lo + 8), min_size=H, max_size=H)))
  lengths = np.array(data.draw(st.lists(st.integers(0, C), min_size=2 * H, max_size=2 * H)))
  lengths = lengths.reshape(2, H)
  seed = data.draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  # Small integers make ties common: the tie rule is part of the contract.
  scores = rng.integers(0, 4, size=(2, H, C)).astype(np.float32)
  keep = np.asarray(policies.select_keep(policy, jnp.asarray(scores), jnp.asarray(lengths),
                                         budgets))
  np.testing.assert_array_equal(keep, ref_keep(policy, scores, lengths, budgets))
  kept = keep.sum(-1)
  assert (kept <= np.maximum(lengths, 0)).all()
  if policy.name == "full":
    np.testing.assert_array_equal(kept, lengths)
  elif policy.adaptive:
    assert (kept.sum(-1) == np.minimum(lengths.sum(-1), budgets.sum())).all()
  else:
    np.testing.assert_array_equal(kept, np.minimum(lengths, budgets))
  if policy.name != "full":  # sinks and the recent window always survive
    forced = np.asarray(policies.forced_mask(policy, jnp.asarray(lengths), budgets, C))
    assert keep[forced].all()


@pytest.mark.parametrize("policy", [p for p in POLICY_CASES if not p.adaptive],
                         ids=lambda p: f"{p.name}-{p.n_sink}-{p.window}")
@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(data=st.data())
def test_a_few_evictions_found_by_top_k_match_the_sort(policy, data):
  """A head at most ``most_evicted`` over its budget (a decode step's eviction: a page of
  thousands of slots) finds the slots to drop with a top-k instead of a sort: exactly the
  keep mask of the sort and of the brute force, ties (small integer scores) included."""
  most, c_size = 16, 16 * policies.EVICT_FRACTION
  budgets = np.array(data.draw(st.lists(st.integers(max(policy.min_budget, 1), c_size - most),
                                        min_size=H, max_size=H)))
  over = np.array(data.draw(st.lists(st.integers(-3, most), min_size=2 * H, max_size=2 * H)))
  lengths = np.clip(budgets[None, :] + over.reshape(2, H), 0, c_size)
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  scores = jnp.asarray(rng.integers(0, 4, size=(2, H, c_size)).astype(np.float32))
  args = (policy, scores, jnp.asarray(lengths), budgets)
  fast = np.asarray(policies.select_keep(*args, most_evicted=most))
  np.testing.assert_array_equal(fast, np.asarray(policies.select_keep(*args)))
  np.testing.assert_array_equal(fast, ref_keep(policy, np.asarray(scores), lengths, budgets))


def test_compact_keeps_position_order():
  keep = jnp.asarray([[[True, False, True, False, True]]])
  idx, lengths = policies.compact(keep)
  assert lengths.tolist() == [[3]]
  assert idx[0, 0, :3].tolist() == [0, 2, 4]


def test_max_pool_ignores_invalid_slots():
  scores = jnp.asarray([[[1.0, 5.0, 2.0, 9.0]]])
  valid = jnp.asarray([[[True, True, True, False]]])
  out = policies.max_pool(scores, valid, 3)
  assert out[0, 0, :3].tolist() == [5.0, 5.0, 5.0]


def test_pyramid_budgets_total_and_order():
  b = policies.pyramid_budgets(64, 5, 2, min_budget=8)
  assert b.shape == (5, 2)
  assert b.sum() == 64 * 5 * 2
  assert (np.diff(b[:, 0]) <= 0).all() and b[-1, 0] >= 8
  assert b[0, 0] > b[-1, 0]


def test_make_policy_defaults():
  assert policies.make_policy("streamingllm").n_sink == 4
  assert policies.make_policy("snapkv").window == 32
  assert policies.make_policy("snapkv").pool_kernel == 7
  assert policies.make_policy("oracle").window == 0
  assert policies.make_policy("h2o").score_kind == "accumulate"
  assert policies.make_policy("adakv").alpha == 0.2


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "lru"}, "Unknown policy 'lru'; allowed: full, streamingllm"),
    ({"name": "snapkv", "position_mode": "relative"}, "Unknown position_mode 'relative'"),
    ({"name": "snapkv", "gqa_reduce": "sum"}, "Unknown gqa_reduce 'sum'; allowed: mean, max"),
    ({"name": "snapkv", "pool_kernel": 6}, "pool_kernel must be an odd integer >= 1, got 6"),
    ({"name": "snapkv", "window": -1}, "window must be >= 0, got -1"),
    ({"name": "adakv", "alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"name": "snapkv", "score_mode": "sum"},
     "Unknown score_mode 'sum'; allowed: latest, accumulate, keydiff, keydiff_window"),
    ({"name": "streamingllm", "score_mode": "keydiff"},
     "score_mode='keydiff' is for the SnapKV family"),
    ({"name": "h2o", "score_mode": "accumulate"},
     "score_mode='accumulate' is for the SnapKV family"),
])
def test_policy_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    policies.make_policy(**kwargs)


def test_key_novelty_ranks_the_odd_key_first_and_ignores_norms():
  """KeyDiff's statistic: a key unlike the head's others scores highest, whatever the keys'
  norms (a large-norm repeated key does not pull the anchor), empty slots score 0, and each
  (row, head) has its own anchor."""
  rng = np.random.RandomState(0)
  base = rng.randn(8)
  keys = np.tile(base, (2, 3, 10, 1)) + 0.05 * rng.randn(2, 3, 10, 8)  # [B, Hkv, N, D]
  keys[:, :, 0] *= 50.0  # a sink-like key: same direction, huge norm
  keys[0, 1, 6] = -base  # the needle of (row 0, head 1)
  keys[1, 2, 3] = rng.randn(8)  # the needle of (row 1, head 2)
  valid = np.ones((2, 3, 10), bool)
  valid[1, :, 8:] = False
  got = np.asarray(policies.key_novelty(jnp.asarray(keys, jnp.float32), jnp.asarray(valid)))
  assert got[0, 1].argmax() == 6 and got[0, 1, 6] > 1.5
  assert got[1, 2].argmax() == 3
  assert (got[1, :, 8:] == 0).all() and (got >= 0).all() and (got <= 2 + 1e-6).all()
  assert got[0, 0, 0] < 0.05  # the large-norm key points like the rest: not novel
  assert np.isfinite(np.asarray(policies.key_novelty(jnp.zeros((1, 1, 3, 8)),
                                                     jnp.ones((1, 1, 3), bool)))).all()


def test_union_rank_keeps_the_top_of_both_lists():
  """The top 2k by union_rank are the top k of each statistic (disjoint here); invalid slots
  score 0, below every valid one."""
  a = jnp.asarray([[9., 8., 0., 0., 0., 0., 1., 2.]])
  b = jnp.asarray([[0., 0., 5., 7., 1., 2., 0., 0.]])
  valid = jnp.asarray([[True] * 7 + [False]])
  got = np.asarray(policies.union_rank(a, b, valid))
  assert set(np.argsort(-got[0], kind="stable")[:4].tolist()) == {0, 1, 2, 3}
  assert got[0, 7] == 0 and (got[0, :7] >= 1).all()


def test_budget_errors_name_value_and_minimum():
  pol = policies.make_policy("snapkv", window=8, n_sink=4)
  with pytest.raises(ValueError, match=r"Budget 10 at \(layer, kv_head\)=\(1, 0\) must be >= "
                                       r"n_sink \+ window = 12"):
    pol.check_budgets(np.array([[16, 16], [10, 16]]))
  with pytest.raises(ValueError, match=r"Budget 0 at \(layer, kv_head\)=\(0, 1\) must be positive"):
    policies.make_policy("full").check_budgets(np.array([[4, 0]]))
