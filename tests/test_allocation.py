"""Budget allocation: invariants (hypothesis) and the methods' defining behaviour."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from headkv_jax import allocation
from headkv_jax import head_scores
from headkv_jax import profile as profile_lib

allocate = allocation.allocate_budgets
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw, method=None):
  """A random allocation problem: (method, kwargs) that must succeed."""
  method = method or draw(st.sampled_from(allocation.METHODS))
  layers = draw(st.integers(1, 6))
  heads = draw(st.integers(1, 5))
  sinks = draw(st.integers(0, 4))
  window = draw(st.integers(0, 12))
  min_per_head = draw(st.one_of(st.none(), st.integers(0, sinks + window)))
  floor = sinks + window if min_per_head is None else min_per_head
  budget = draw(st.integers(max(floor, 1), 80))
  max_len = draw(st.one_of(st.none(), st.integers(1, 120)))
  scope = 'model' if method == 'pyramid' else draw(st.sampled_from(allocation.SCOPES))
  kwargs = dict(budget=budget, num_layers=layers, num_kv_heads=heads, max_len=max_len,
                scope=scope, sinks=sinks, window=window, min_per_head=min_per_head)
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  if method == 'adakv':
    kwargs['scores'] = rng.random((layers, heads, draw(st.integers(1, 50))))
  elif method == 'headkv':
    scores = rng.random((layers, heads))
    scores[rng.random((layers, heads)) < 0.3] = 0.0  # zero scores happen
    kwargs['scores'] = scores
  elif method == 'roles':
    # local heads must fit: with min_per_head < sinks + window they take more than their
    # share; keep the default floor so the budget always suffices.
    kwargs['min_per_head'] = None
    kwargs['budget'] = max(budget, sinks + window, 1)
    kwargs['scores'] = rng.integers(0, 3, (layers, heads))
  return method, kwargs


def unit_sums(out, scope):
  return out.sum(axis=1) if scope == 'layer' else np.array([out.sum()])


@SETTINGS
@given(problems())
def test_totals_floor_cap_and_determinism(problem):
  method, kw = problem
  out = allocate(method, **kw)
  assert out.dtype == np.int32 and out.shape == (kw['num_layers'], kw['num_kv_heads'])
  np.testing.assert_array_equal(out, allocate(method, **kw))  # deterministic
  cap = kw['max_len']
  per_unit = kw['budget'] * kw['num_kv_heads'] * (
      1 if kw['scope'] == 'layer' else kw['num_layers'])
  heads_per_unit = out.size // len(unit_sums(out, kw['scope']))
  if cap is not None and per_unit >= cap * heads_per_unit:
    assert (out == cap).all()  # more than the prompt: everyone keeps it all
    return
  assert (unit_sums(out, kw['scope']) == per_unit).all()
  if cap is not None:
    assert out.max() <= cap
  floor = kw['sinks'] + kw['window'] if kw['min_per_head'] is None else kw['min_per_head']
  assert out.min() >= (floor if cap is None else min(floor, cap))


@SETTINGS
@given(problems(method='headkv'))
def test_headkv_is_monotone_in_score(problem):
  _, kw = problem
  out = allocate('headkv', **kw)
  scores = kw['scores']
  units = [(scores[l], out[l]) for l in range(len(out))] if kw['scope'] == 'layer' else [
      (scores.reshape(-1), out.reshape(-1))]
  for s, b in units:
    higher = s[:, None] > s[None, :]  # [a, b]: head a scores above head b
    assert (b[:, None] >= b[None, :])[higher].all(), (s, b)


@SETTINGS
@given(problems(method='roles'))
def test_roles_local_heads_keep_sinks_and_window(problem):
  _, kw = problem
  out = allocate('roles', **kw)
  roles, cap = kw['scores'], kw['max_len']
  keep = kw['sinks'] + kw['window']
  keep = keep if cap is None else min(keep, cap)
  local = roles == head_scores.Role.LOCAL
  units = range(len(out)) if kw['scope'] == 'layer' else [slice(None)]
  for u in units:
    all_local = local[u].all()
    others_full = cap is not None and (out[u][~local[u]] == cap).all()
    if not all_local and not others_full:
      assert (out[u][local[u]] == keep).all()


@SETTINGS
@given(st.integers(1, 40), st.lists(st.floats(0, 10), min_size=1, max_size=12),
       st.integers(0, 5), st.one_of(st.none(), st.integers(5, 60)))
def test_split_total_close_to_the_real_split(extra, weights, floor, cap):
  weights = np.array(weights)
  total = floor * weights.size + extra
  out = allocation.split_total(total, weights, floor, cap)
  if cap is not None and total >= cap * weights.size:
    assert (out == cap).all()
    return
  assert out.sum() == total and out.min() >= floor
  if cap is None:  # plain largest remainder: within 1 of the real share
    share = weights / weights.sum() if weights.sum() > 0 else np.full(weights.size,
                                                                      1 / weights.size)
    real = floor + extra * share
    assert (np.abs(out - real) < 1).all()
  else:
    assert out.max() <= cap


def test_uniform_is_the_budget():
  np.testing.assert_array_equal(allocate('uniform', 64, 3, 2), np.full((3, 2), 64))
  np.testing.assert_array_equal(allocate('uniform', 64, 3, 2, max_len=50),
                                np.full((3, 2), 50))


def test_pyramid_decreases_with_depth_and_keeps_the_mean():
  out = allocate('pyramid', 128, 30, 3, sinks=4, window=32)
  layer_totals = out.sum(axis=1)
  assert out.sum() == 128 * 3 * 30
  assert (np.diff(layer_totals) <= 0).all() and layer_totals[0] > layer_totals[-1]
  assert out.min() >= 36
  assert out[-1].max() <= 40  # the last layer is at the floor max(36, 128 / 20)
  with pytest.raises(ValueError, match="scope='model'"):
    allocate('pyramid', 128, 30, 3, scope='layer')
  # capped early layers hand their overflow to later layers
  capped = allocate('pyramid', 128, 30, 3, max_len=150)
  assert capped.max() == 150 and capped.sum() == 128 * 90


def test_adakv_follows_the_top_scores():
  scores = np.zeros((2, 3, 200))
  scores[:, 0] = 1.0  # head 0 holds every top token
  out = allocate('adakv', 50, 2, 3, scores=scores, sinks=0, window=0)
  # head 0: 0.2 * 50 + 0.8 * 150 = 130; others: 0.2 * 50 = 10
  np.testing.assert_array_equal(out, [[130, 10, 10]] * 2)
  out = allocate('adakv', 50, 2, 3, scores=scores, sinks=4, window=16)  # floor 20
  assert (out[:, 1:] == 20).all() and (out.sum(axis=1) == 150).all()
  with pytest.raises(ValueError, match=r'\[layers, kv_heads, T\]'):
    allocate('adakv', 50, 2, 3, scores=np.zeros((2, 3)))


def test_headkv_follows_the_profile():
  scores = np.array([[1.0, 0.0, 3.0]])
  out = allocate('headkv', 100, 1, 3, scores=scores, sinks=4, window=16)
  # floor max(20, 100 * (1 - 1 / 1.005)) = 20; pool 240 split 1 : 0 : 3
  np.testing.assert_array_equal(out, [[80, 20, 200]])
  out = allocate('headkv', 100, 1, 3, scores=scores, max_len=150, sinks=4, window=16)
  np.testing.assert_array_equal(out, [[130, 20, 150]])  # 50 overflow goes to head 0
  out = allocate('headkv', 100, 1, 3, scores=scores, pool_fraction=0.5, min_per_head=0)
  np.testing.assert_array_equal(out, [[88, 50, 162]])  # b_min 50; 87.5, 162.5: tie -> lower index


def test_headkv_and_roles_read_a_profile():
  rng = np.random.default_rng(0)
  q_scores = {n: rng.random((4, 9)) for n in profile_lib.SCORE_NAMES}
  prof = profile_lib.build_profile('m', q_scores, 3)
  out = allocate('headkv', 64, 4, 3, scores=prof, score_name='retrieval')
  np.testing.assert_array_equal(out, allocate('headkv', 64, 4, 3,
                                              scores=prof.scores['retrieval']))
  out = allocate('roles', 64, 4, 3, scores=prof)
  np.testing.assert_array_equal(out, allocate('roles', 64, 4, 3, scores=prof.roles))
  with pytest.raises(ValueError, match='4 layers, 3 KV heads'):
    allocate('headkv', 64, 30, 3, scores=prof)
  with pytest.raises(ValueError, match="score_name 'nope'"):
    allocate('headkv', 64, 4, 3, scores=prof, score_name='nope')


def test_roles_split():
  roles = np.array([[0, 1, 2], [2, 2, 2]])
  out = allocate('roles', 100, 2, 3, scores=roles, sinks=4, window=16)
  # layer 0: local keeps 20; 280 left split 1 : 0.5 above the floor 20 -> 20 + 160, 20 + 80
  np.testing.assert_array_equal(out, [[180, 100, 20], [100, 100, 100]])
  out = allocate('roles', 100, 2, 3, scores=roles, scope='model', sinks=4, window=16)
  # 600 in all; 4 local heads keep 80; 520 left: 20 each + 480 split 2 : 1
  np.testing.assert_array_equal(out, [[340, 180, 20], [20, 20, 20]])


def test_errors_name_the_bad_values():
  with pytest.raises(ValueError, match=r"unknown allocation method 'foo'.*'headkv'"):
    allocate('foo', 64, 2, 3)
  with pytest.raises(ValueError, match='budget 16 is below min_per_head 36'):
    allocate('uniform', 16, 2, 3)
  with pytest.raises(ValueError, match="scope must be one of"):
    allocate('uniform', 64, 2, 3, scope='global')
  with pytest.raises(ValueError, match=r"unknown \['alpha'\]"):
    allocate('headkv', 64, 2, 3, scores=np.ones((2, 3)), alpha=0.1)
  with pytest.raises(ValueError, match='needs scores'):
    allocate('headkv', 64, 2, 3)
  with pytest.raises(ValueError, match='budget must be a positive integer'):
    allocate('uniform', 0, 2, 3)
  with pytest.raises(ValueError, match='non-negative'):
    allocate('headkv', 64, 2, 3, scores=-np.ones((2, 3)))
  with pytest.raises(ValueError, match='roles must be values'):
    allocate('roles', 64, 2, 3, scores=np.full((2, 3), 7))
