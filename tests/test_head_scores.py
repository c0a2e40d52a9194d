"""Head scores against brute-force loops; GQA reduction; roles; the profile file."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import head_scores as hs
from headkv_jax import profile as profile_lib


def random_attn(rng, layers=2, heads=3, t=12, peaked=False):
  """Causal attention maps [layers, heads, t, t] whose rows sum to 1."""
  logits = rng.normal(size=(layers, heads, t, t)) * (4.0 if peaked else 1.0)
  causal = np.tril(np.ones((t, t), dtype=bool))
  logits = np.where(causal, logits, -np.inf)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  return attn / attn.sum(-1, keepdims=True)


def test_random_attn_is_a_valid_map():
  attn = random_attn(np.random.default_rng(0))
  np.testing.assert_allclose(attn.sum(-1), 1.0)
  assert (np.triu(attn[0, 0], 1) == 0).all()


@pytest.mark.parametrize('seed', range(3))
def test_retrieval_score_matches_loop(seed):
  rng = np.random.default_rng(seed)
  attn = random_attn(rng, t=16, peaked=True)
  rows = [10, 11, 12, 13]
  targets = [[2, 5], [3, -1], [4, -1], [2, 5]]  # a repeated token sits at 2 and 5
  copied = [True, True, False, True]
  got = hs.retrieval_score(attn, rows, targets, copied)
  want = np.zeros(attn.shape[:2])
  for l in range(attn.shape[0]):
    for h in range(attn.shape[1]):
      hits = 0
      for s, r in enumerate(rows):
        top = max(range(attn.shape[3]), key=lambda k: (attn[l, h, r, k], -k))
        hits += copied[s] and top in targets[s]
      want[l, h] = hits / len(rows)
  np.testing.assert_allclose(got, want)


def test_retrieval_score_hand_made():
  attn = np.zeros((1, 2, 4, 4))
  attn[0, 0, :, 0] = 1.0  # head 0: always the first token
  attn[0, 1] = np.eye(4)[[0, 1, 1, 1]]  # head 1: key 1 from row 1 on
  np.testing.assert_allclose(hs.retrieval_score(attn, [2, 3], [1, 1]), [[0.0, 1.0]])
  np.testing.assert_allclose(hs.retrieval_score(attn, [2, 3], [1, 0]), [[0.5, 0.5]])
  # jnp input works too
  np.testing.assert_allclose(hs.retrieval_score(jnp.asarray(attn), [2, 3], [1, 1]),
                             [[0.0, 1.0]])


@pytest.mark.parametrize('top_n', [1, 3, 7])
def test_retrieval_reasoning_score_matches_loop(top_n):
  rng = np.random.default_rng(top_n)
  attn = random_attn(rng, t=14)
  rows, span = [9, 11, 13], (3, 7)
  got = hs.retrieval_reasoning_score(attn, rows, span, top_n)
  want = np.zeros(attn.shape[:2])
  for l in range(attn.shape[0]):
    for h in range(attn.shape[1]):
      total = 0.0
      for r in rows:
        keys = sorted(range(attn.shape[3]), key=lambda k: (-attn[l, h, r, k], k))[:top_n]
        total += sum(attn[l, h, r, k] for k in keys if span[0] <= k < span[1])
      want[l, h] = total / len(rows)
  np.testing.assert_allclose(got, want)


def test_induction_score_matches_loop():
  rng = np.random.default_rng(5)
  attn = random_attn(rng, t=20)
  first, second, length = 1, 10, 7
  got = hs.induction_score(attn, first, second, length)
  want = np.zeros(attn.shape[:2])
  for l in range(attn.shape[0]):
    for h in range(attn.shape[1]):
      vals = [attn[l, h, second + j, first + j + 1] for j in range(length - 1)]
      want[l, h] = np.mean(vals)
  np.testing.assert_allclose(got, want)


@pytest.mark.parametrize('window', [1, 3, 5])
def test_local_score_matches_loop(window):
  rng = np.random.default_rng(window)
  attn = random_attn(rng, t=11)
  got = hs.local_score(attn, window)
  want = np.zeros(attn.shape[:2])
  rows = range(window, attn.shape[2])
  for l in range(attn.shape[0]):
    for h in range(attn.shape[1]):
      want[l, h] = np.mean([sum(attn[l, h, q, k] for k in range(attn.shape[3])
                                if q - window < k <= q) for q in rows])
  np.testing.assert_allclose(got, want)


def test_scores_on_the_last_rows_only():
  rng = np.random.default_rng(9)
  attn = random_attn(rng, t=10)[:, :, -4:, :]  # the last 4 query rows of 10 keys
  full = random_attn(np.random.default_rng(9), t=10)
  np.testing.assert_allclose(hs.local_score(attn, 2),
                             hs.local_score(full, 2, query_rows=[6, 7, 8, 9]))
  # every score reads absolute positions from a map of the last rows
  np.testing.assert_allclose(hs.retrieval_score(attn, [7, 9], [2, 3]),
                             hs.retrieval_score(full, [7, 9], [2, 3]))
  np.testing.assert_allclose(hs.retrieval_reasoning_score(attn, [8], (1, 4), 2),
                             hs.retrieval_reasoning_score(full, [8], (1, 4), 2))
  np.testing.assert_allclose(hs.induction_score(attn, 3, 6, 3),
                             hs.induction_score(full, 3, 6, 3))
  with pytest.raises(ValueError, match=r'query_rows must lie in \[6, 10\)'):
    hs.retrieval_score(attn, [5], [0])


def test_scores_reject_bad_inputs():
  attn = random_attn(np.random.default_rng(0), t=6)
  with pytest.raises(ValueError, match='query_rows'):
    hs.retrieval_score(attn, [6], [0])
  with pytest.raises(ValueError, match='target_key_pos'):
    hs.retrieval_score(attn, [5, 4], [0])
  with pytest.raises(ValueError, match='answer_span'):
    hs.retrieval_reasoning_score(attn, [5], (4, 9), 2)
  with pytest.raises(ValueError, match='top_n'):
    hs.retrieval_reasoning_score(attn, [5], (1, 3), 0)
  with pytest.raises(ValueError, match='second_start'):
    hs.induction_score(attn, 0, 2, 3)
  with pytest.raises(ValueError, match='window'):
    hs.local_score(attn, 6)
  with pytest.raises(ValueError, match='attn'):
    hs.local_score(attn[0], 2)


def test_reduce_to_kv_heads_groups_like_repeat_kv():
  scores = np.arange(2 * 9, dtype=float).reshape(2, 9)  # 9 query heads, 3 KV heads
  mean = hs.reduce_to_kv_heads(scores, 3)
  np.testing.assert_allclose(mean, [[1, 4, 7], [10, 13, 16]])
  np.testing.assert_allclose(hs.reduce_to_kv_heads(scores, 3, 'max'), [[2, 5, 8],
                                                                       [11, 14, 17]])
  np.testing.assert_allclose(hs.reduce_to_kv_heads(scores, 9), scores)
  with pytest.raises(ValueError, match='divisible'):
    hs.reduce_to_kv_heads(scores, 4)
  with pytest.raises(ValueError, match="'mean' or 'max'"):
    hs.reduce_to_kv_heads(scores, 3, 'sum')


def test_assign_roles_argmax_of_max_normalized():
  retrieval = np.array([[0.8, 0.0, 0.1], [0.0, 0.0, 0.3]])
  induction = np.array([[0.0, 0.5, 0.1], [0.0, 0.0, 0.0]])
  local = np.array([[0.5, 0.5, 1.0], [1.0, 0.9, 0.5]])
  roles = hs.assign_roles(retrieval, induction, local)
  # normalized: retrieval / 0.8, induction / 0.5, local / 1.0
  np.testing.assert_array_equal(roles, [[0, 1, 2], [2, 2, 2]])
  assert roles.dtype == np.int32
  assert hs.ROLE_NAMES == ('retrieval', 'induction', 'local')
  # a model that fails the retrieval probe has no retrieval heads
  roles = hs.assign_roles(np.zeros((2, 3)), induction, local)
  assert (roles != hs.Role.RETRIEVAL).all()
  # ties go to the earlier role
  np.testing.assert_array_equal(hs.assign_roles(np.ones((1, 1)), np.ones((1, 1)),
                                                np.ones((1, 1))), [[0]])


def test_normalize_rank():
  got = hs.normalize_scores(np.array([[0.1, 5.0], [0.1, 2.0]]), 'rank')
  np.testing.assert_allclose(got, [[0.5 / 3, 1.0], [0.5 / 3, 2 / 3]])
  with pytest.raises(ValueError, match="'max' or 'rank'"):
    hs.normalize_scores(np.ones(2), 'z')


def make_profile(model_id='smollm2-135m', layers=4, kv_heads=3, seed=0):
  rng = np.random.default_rng(seed)
  q_scores = {name: rng.random((layers, kv_heads * 3)) for name in profile_lib.SCORE_NAMES}
  return profile_lib.build_profile(model_id, q_scores, kv_heads,
                                   probe_settings={'lengths': [512], 'seed': seed})


def test_profile_round_trip(tmp_path):
  prof = make_profile()
  path = tmp_path / 'p' / 'profile.json'
  prof.save(path)
  back = profile_lib.HeadProfile.load(path)
  assert (back.model_id, back.num_layers, back.num_kv_heads, back.num_q_heads) == (
      'smollm2-135m', 4, 3, 9)
  for name in profile_lib.SCORE_NAMES:
    np.testing.assert_array_equal(back.scores[name], prof.scores[name])
  np.testing.assert_array_equal(back.roles, prof.roles)
  assert back.probe_settings == prof.probe_settings
  assert back.probe_settings['reduce'] == 'mean'
  back.check_matches('smollm2-135m', 4, 3)


def test_profile_nan_and_shape_errors(tmp_path):
  path = tmp_path / 'profile.json'
  make_profile().save(path)
  data = json.loads(path.read_text())
  data['scores']['retrieval'][1][2] = float('nan')
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"profile .*profile.json has NaN in score 'retrieval'"):
    profile_lib.HeadProfile.load(path)
  data['scores']['retrieval'] = [[0.0] * 3] * 2
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="score 'retrieval' of shape"):
    profile_lib.HeadProfile.load(path)
  del data['roles']
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="lacks field 'roles'"):
    profile_lib.HeadProfile.load(path)
  prof = make_profile()
  bad = dict(prof.scores, local=np.full((4, 3), np.nan))
  with pytest.raises(ValueError, match="NaN in score 'local'"):
    profile_lib.HeadProfile(prof.model_id, 4, 3, 9, bad, prof.roles)


def test_profile_mismatch_error():
  prof = make_profile()
  with pytest.raises(ValueError, match=r"'smollm2-135m' \(4 layers, 3 KV heads\).*'llama'"):
    prof.check_matches('llama', 32, 8)
  with pytest.raises(ValueError, match='4 layers'):
    prof.check_matches('smollm2-135m', 30, 3)


def test_plot_heatmaps_writes_png(tmp_path):
  path = tmp_path / 'heat.png'
  profile_lib.plot_heatmaps(make_profile(layers=30), path)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
