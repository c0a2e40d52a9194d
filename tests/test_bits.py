"""HAQ-KV bit schemes: --kv_bits texts, per-head bit allocation, labels."""

import itertools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from headkv_jax import bits as bits_lib
from headkv_jax import head_scores
from headkv_jax import profile as profile_lib

Role = head_scores.Role
LADDER = bits_lib.AVG_LADDER


def _profile(num_layers, num_kv_heads, seed=0, roles=None, reasoning=None):
  rng = np.random.default_rng(seed)
  scores = {n: rng.random((num_layers, num_kv_heads)) for n in profile_lib.SCORE_NAMES}
  if reasoning is not None:
    scores['retrieval_reasoning'] = np.asarray(reasoning, np.float64)
  if roles is None:
    roles = rng.integers(0, len(Role), (num_layers, num_kv_heads))
  return profile_lib.HeadProfile(model_id='tiny', num_layers=num_layers,
                                 num_kv_heads=num_kv_heads, num_q_heads=2 * num_kv_heads,
                                 scores=scores, roles=roles)


@pytest.mark.parametrize('text, kind, kv, canonical, residual', [
    ('16', 'uniform', (16, 16), '16', 32),
    ('8', 'uniform', (8, 8), '8', 32),
    (' 4 ', 'uniform', (4, 4), '4', 32),
    ('2', 'uniform', (2, 2), '2', 32),
    ('4/2', 'uniform', (4, 2), '4/2', 32),
    ('8 / 4', 'uniform', (8, 4), '8/4', 32),
    ('8/8', 'uniform', (8, 8), '8', 32),
    ('16/2', 'uniform', (16, 2), '16/2', 32),
    ('KIVI2', 'kivi2', (2, 2), 'kivi2', 128),
])
def test_uniform_forms(text, kind, kv, canonical, residual):
  scheme = bits_lib.parse_kv_bits(text)
  assert (scheme.kind, (scheme.key_bits, scheme.value_bits)) == (kind, kv)
  assert (scheme.text, scheme.residual) == (canonical, residual)
  assert bits_lib.parse_kv_bits(scheme.text) == scheme  # the canonical text round-trips
  assert bits_lib.parse_kv_bits(scheme) is scheme
  assert not scheme.needs_profile and scheme.is_full_precision == (text == '16')
  out = bits_lib.allocate_bits(text, 3, 2)
  assert out.dtype == np.int32 and out.shape == (3, 2, 2)
  assert (out[..., 0] == kv[0]).all() and (out[..., 1] == kv[1]).all()
  assert bits_lib.bits_label(out) == f'{kv[0]}/{kv[1]}'


@pytest.mark.parametrize('text, table, canonical', [
    ('roles', ((8, 4), (4, 2), (4, 2)), 'roles'),
    ('ROLES : 8/4, 4/2, 4/2', ((8, 4), (4, 2), (4, 2)), 'roles'),
    ('roles:8/4,4/2,2/2', ((8, 4), (4, 2), (2, 2)), 'roles:8/4,4/2,2'),
    ('roles:8/8,4/4,2/2', ((8, 8), (4, 4), (2, 2)), 'roles:8,4,2'),
    ('roles:8/8,4/2,2/2', ((8, 8), (4, 2), (2, 2)), 'roles:8,4/2,2'),
    ('roles:16,8/4,4/2', ((16, 16), (8, 4), (4, 2)), 'roles:16,8/4,4/2'),
])
def test_roles_forms_and_table(text, table, canonical):
  scheme = bits_lib.parse_kv_bits(text)
  assert (scheme.kind, scheme.role_bits, scheme.text) == ('roles', table, canonical)
  assert bits_lib.parse_kv_bits(canonical) == scheme and scheme.needs_profile
  roles = np.array([[Role.RETRIEVAL, Role.LOCAL], [Role.INDUCTION, Role.RETRIEVAL],
                    [Role.LOCAL, Role.LOCAL]])
  out = bits_lib.allocate_bits(scheme, 3, 2, profile=_profile(3, 2, roles=roles))
  assert out.dtype == np.int32 and out.shape == (3, 2, 2)
  for layer, head in itertools.product(range(3), range(2)):
    assert tuple(out[layer, head]) == table[roles[layer, head]]
  assert bits_lib.bits_label(out) == 'mixed'


@pytest.mark.parametrize('text, target', [('avg:3.5', 3.5), ('AVG=3', 3.0), ('avg: 16', 16.0),
                                          ('avg:2', 2.0), ('avg=4.25', 4.25)])
def test_avg_forms(text, target):
  scheme = bits_lib.parse_kv_bits(text)
  assert (scheme.kind, scheme.target) == ('avg', target)
  assert scheme.text == f'avg:{target:g}' and bits_lib.parse_kv_bits(scheme.text) == scheme


def _check_avg(out, target, score, weights=None):
  """The avg scheme's promises (see allocate_bits) on one result."""
  w = np.ones(score.shape) if weights is None else np.asarray(weights, np.float64)
  assert (out[..., 0] >= out[..., 1]).all()
  assert {tuple(p) for p in out.reshape(-1, 2)} <= set(LADDER)
  avg = bits_lib.mean_bits(out, weights)
  assert avg <= target + 1e-9
  level = np.array([LADDER.index(tuple(p)) for p in out.reshape(-1, 2)])
  s = score.reshape(-1)
  for i, j in itertools.permutations(range(s.size), 2):
    if s[i] > s[j]:
      assert level[i] >= level[j], (i, j)  # a higher score never has fewer bits
  cost = np.array([k + v for k, v in LADDER]) / 2
  for i in range(s.size):
    if level[i] == len(LADDER) - 1:
      continue
    keeps_order = all(level[i] + 1 <= level[j] for j in range(s.size) if s[j] > s[i])
    if weights is None or keeps_order:
      step = (cost[level[i] + 1] - cost[level[i]]) * w.reshape(-1)[i] / w.sum()
      assert avg + step > target + 1e-9, f'head {i} could still go up'


def test_avg_spends_on_the_best_scoring_heads():
  reasoning = np.array([[0.9, 0.1, 0.5], [0.3, 0.95, 0.2]])
  profile = _profile(2, 3, reasoning=reasoning)
  out = bits_lib.allocate_bits('avg:2', 2, 3, profile=profile)
  assert (out == 2).all()
  out = bits_lib.allocate_bits('avg:16', 2, 3, profile=profile)
  assert (out == 16).all()
  # 6 heads start at 2 bits; avg 4 leaves 6 * 2 = 12 bits to spend: the best head climbs to
  # 8/8 (+6; 16/16 would cost 8 more), the second best to 8/8 (+6): exactly 4.
  out = bits_lib.allocate_bits('avg:4', 2, 3, profile=profile)
  assert tuple(out[1, 1]) == (8, 8) and tuple(out[0, 0]) == (8, 8)
  assert (out[[0, 0, 1, 1], [1, 2, 0, 2]] == 2).all()
  assert bits_lib.mean_bits(out) == 4.0
  _check_avg(out, 4.0, reasoning)
  # Ties go to the lower flat index.
  flat = _profile(2, 3, reasoning=np.zeros((2, 3)))
  out = bits_lib.allocate_bits('avg:2.5', 2, 3, profile=flat)
  assert [tuple(p) for p in out.reshape(-1, 2)] == [(4, 4), (4, 2)] + [(2, 2)] * 4


def test_avg_weights_count_stored_tokens():
  reasoning = np.array([[0.9, 0.1]])
  profile = _profile(1, 2, reasoning=reasoning)
  # The best head holds 3/4 of the tokens: 2/2 -> 4/2 costs it 0.75 bits of the average, so
  # 4/4 would pass 3; the other head's 4/2 costs 0.25: exactly 3.
  out = bits_lib.allocate_bits('avg:3', 1, 2, profile=profile, weights=[[3, 1]])
  assert [tuple(p) for p in out.reshape(-1, 2)] == [(4, 2), (4, 2)]
  _check_avg(out, 3.0, reasoning, [[3, 1]])
  unweighted = bits_lib.allocate_bits('avg:3', 1, 2, profile=profile)
  assert [tuple(p) for p in unweighted.reshape(-1, 2)] == [(4, 4), (2, 2)]


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 4), heads=st.integers(1, 4), seed=st.integers(0, 10**6),
       target=st.floats(2, 16), weighted=st.booleans())
def test_avg_invariants(layers, heads, seed, target, weighted):
  rng = np.random.default_rng(seed)
  profile = _profile(layers, heads, seed=seed)
  weights = rng.integers(1, 50, (layers, heads)) if weighted else None
  out = bits_lib.allocate_bits(f'avg:{target}', layers, heads, profile=profile,
                               weights=weights)
  assert out.shape == (layers, heads, 2) and out.dtype == np.int32
  _check_avg(out, target, profile.scores['retrieval_reasoning'], weights)
  again = bits_lib.allocate_bits(f'avg:{target}', layers, heads, profile=profile,
                                 weights=weights)
  np.testing.assert_array_equal(out, again)  # deterministic


@pytest.mark.parametrize('text, match', [
    ('3', 'allowed widths: 16, 8, 4, 2'),
    ('32', 'allowed widths'),
    ('0', 'allowed widths'),
    ('4/8', 'K >= V'),
    ('roles:8/8,2/4,2/2', 'K >= V'),
    ('roles:8/8,4/4,3/3', 'allowed widths'),
    ('roles:8,4', 'needs 3 entries'),
    ('foo', 'allowed: 16, 8, 4, 2'),
    ('', 'allowed: 16'),
    ('8/', 'Cannot parse'),
    ('4/2/2', 'Cannot parse'),
    ('kivi4', 'Cannot parse'),
    ('avg:1.5', r'outside \[2, 16\]'),
    ('avg:17', r'outside \[2, 16\]'),
    ('avg:nan', 'outside'),
    ('avg:x', 'must be a number'),
])
def test_bad_texts(text, match):
  with pytest.raises(ValueError, match=match) as e:
    bits_lib.parse_kv_bits(text)
  assert repr(text) in str(e.value) or text == ''


@pytest.mark.parametrize('text, canonical, group, residual, fp_sinks', [
    ('roles', 'roles', 64, 16, 4),
    ('roles@group=64,residual=16', 'roles', 64, 16, 4),
    ('roles@group=64,residual=20', 'roles@residual=20', 64, 20, 4),
    ('ROLES @ residual=16, group=32', 'roles@group=32', 32, 16, 4),
    ('roles@residual=32,group=32', 'roles@group=32,residual=32', 32, 32, 4),
    ('4/2@group=64', '4/2@group=64', 64, 32, 4),
    ('4/2@residual=32', '4/2', None, 32, 4),
    ('kivi2@residual=0', 'kivi2@residual=0', None, 0, 4),
    ('kivi2@residual=128', 'kivi2', None, 128, 4),
    ('roles:8/4,4/2,2/2@group=16', 'roles:8/4,4/2,2@group=16', 16, 16, 4),
    ('roles@fp_sinks=4', 'roles', 64, 16, 4),
    ('roles@fp_sinks=0,residual=0', 'roles@residual=0,fp_sinks=0', 64, 0, 0),
    ('4@fp_sinks=8', '4@fp_sinks=8', None, 32, 8),
])
def test_scheme_options(text, canonical, group, residual, fp_sinks):
  """`@group=G,residual=R,fp_sinks=F` set the scale group, the full-precision residual and
  the full-precision first tokens (role tables default to group 64, residual 16; the rest to
  the cache's 32 / 32, KIVI-2's residual 128; 4 first tokens everywhere); where they differ
  from the scheme's defaults they are part of the canonical text (cells that differ in them
  are different methods), and the canonical text round-trips."""
  scheme = bits_lib.parse_kv_bits(text)
  assert (scheme.text, scheme.group, scheme.residual, scheme.fp_sinks) == (
      canonical, group, residual, fp_sinks)
  assert bits_lib.parse_kv_bits(scheme.text) == scheme
  base = bits_lib.parse_kv_bits(text.partition('@')[0])
  assert (scheme.kind, scheme.role_bits, scheme.key_bits) == (base.kind, base.role_bits,
                                                              base.key_bits)


@pytest.mark.parametrize('text, match', [
    ('16@group=64', '16-bit storage quantizes nothing'),
    ('roles@g=64', "cannot parse option 'g=64'"),
    ('roles@group=64,group=32', "cannot parse option 'group=32'"),
    ('roles@group=x', "cannot parse option 'group=x'"),
    ('roles@', "cannot parse option ''"),
    ('roles@group=0', 'group=0 must be >= 1'),
    ('roles@sinks=0', "cannot parse option 'sinks=0'"),  # the policy's sinks, not a storage option
])
def test_bad_scheme_options(text, match):
  with pytest.raises(ValueError, match=match):
    bits_lib.parse_kv_bits(text)


def test_bad_allocations():
  with pytest.raises(ValueError, match='must be text'):
    bits_lib.parse_kv_bits(4)
  for text in ('roles', 'avg:3'):
    with pytest.raises(ValueError, match=f"'{text}' needs a head profile"):
      bits_lib.allocate_bits(text, 2, 2)
    with pytest.raises(ValueError, match='3 layers, 2 KV heads'):
      bits_lib.allocate_bits(text, 3, 2, profile=_profile(2, 2))
  profile = _profile(2, 2)
  with pytest.raises(ValueError, match=r'weights have shape \(2,\)'):
    bits_lib.allocate_bits('avg:3', 2, 2, profile=profile, weights=[1, 2])
  with pytest.raises(ValueError, match='>= 0.*-1'):
    bits_lib.allocate_bits('avg:3', 2, 2, profile=profile, weights=[[1, 2], [-1, 3]])
  with pytest.raises(ValueError, match='sum to 0'):
    bits_lib.allocate_bits('avg:3', 2, 2, profile=profile, weights=np.zeros((2, 2)))
  with pytest.raises(ValueError, match='weights have shape'):
    bits_lib.allocate_bits('8', 2, 2, weights=np.ones((2, 3)))  # checked for every scheme
  with pytest.raises(ValueError, match='>= 1'):
    bits_lib.allocate_bits('8', 0, 2)
  with pytest.raises(ValueError, match=r'\[layers, Hkv, 2\]'):
    bits_lib.bits_label(np.zeros((2, 2)))
