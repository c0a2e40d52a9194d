"""Wilson score intervals, and the summary tables that carry them."""

import math

import numpy as np
import pandas as pd
import pytest

from experiments import results
from experiments import stats


def _quadratic_wilson(k, n, z=stats.Z95):
  """The interval as the roots of (p - k/n)^2 = z^2 p (1 - p) / n, written independently."""
  phat = k / n
  a = 1 + z * z / n
  b = -(2 * phat + z * z / n)
  c = phat * phat
  root = math.sqrt(b * b - 4 * a * c)
  return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize('k, n, expected', [
    (0, 10, (0.0, 0.2775)),
    (5, 10, (0.2366, 0.7634)),
    (10, 10, (0.7225, 1.0)),
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (score interval, no correction).
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
])
def test_known_values(k, n, expected):
  low, high = stats.wilson_interval(k, n)
  assert isinstance(low, float) and isinstance(high, float)
  assert (round(low, 4), round(high, 4)) == expected


@pytest.mark.parametrize('k, n', [(1, 2), (3, 7), (19, 20), (0.5 * 2, 2), (7.5, 20)])
def test_matches_the_quadratic_roots(k, n):
  assert stats.wilson_interval(k, n) == pytest.approx(_quadratic_wilson(k, n), abs=1e-12)


def test_matches_scipy():
  scipy_stats = pytest.importorskip('scipy.stats')
  for k, n in ((0, 10), (3, 10), (10, 10), (17, 40), (1, 1)):
    ci = scipy_stats.binomtest(k, n).proportion_ci(0.95, method='wilson')
    assert stats.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_edges_and_arrays():
  assert stats.wilson_interval(0, 10)[0] == 0.0  # exactly, not -1e-17
  assert stats.wilson_interval(10, 10)[1] == 1.0
  assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))  # no samples, no interval
  low, high = stats.wilson_interval(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]))
  np.testing.assert_allclose(low[:3], [0.0, 0.236593, 0.722467], atol=1e-6)
  np.testing.assert_allclose(high[:3], [0.277533, 0.763407, 1.0], atol=1e-6)
  assert np.isnan(low[3]) and np.isnan(high[3])
  for k, n in ((-1, 3), (4, 3), (0, -1)):
    with pytest.raises(ValueError, match='0 <= k <= n'):
      stats.wilson_interval(k, n)


def test_with_interval_inserts_columns_after_the_value():
  frame = pd.DataFrame({'method': ['a', 'b', 'c', 'd'], 'accuracy': [0.5, 0.0, np.nan, 1.0],
                        'n': [10, 10, 4, 0], 'x': [1, 2, 3, 4]})
  out = stats.with_interval(frame)
  assert list(out.columns) == ['method', 'accuracy', 'ci_low', 'ci_high', 'n', 'x']
  np.testing.assert_allclose(out['ci_low'][:2], [0.236593, 0.0], atol=1e-6)
  np.testing.assert_allclose(out['ci_high'][:2], [0.763407, 0.277533], atol=1e-6)
  assert out[['ci_low', 'ci_high']].iloc[2:].isna().all().all()  # no accuracy / no samples
  assert 'ci_low' not in frame  # a copy
  assert stats.with_interval(frame.drop(columns=['accuracy'])).equals(
      frame.drop(columns=['accuracy']))


def _record(method, task, sample, **metrics):
  return {'phase': 'phase1', 'method': method, 'task': task, 'length': 2000, 'budget': 256,
          'sample': sample, 'status': 'ok', **metrics}


def test_summary_carries_n_and_the_interval(tmp_path):
  records = [_record('h2o', 'passkey', i, cache_bytes=100, accuracy=float(i < 3))
             for i in range(10)]
  records += [_record('full', 'passkey', i, cache_bytes=900, accuracy=0.0) for i in range(4)]
  records += [_record('h2o', 'perplexity', i, cache_bytes=200, perplexity=9.0)
              for i in range(2)]
  records.append({**_record('full', 'passkey', 4), 'status': 'skipped', 'reason': 'oom'})
  with results.ResultsWriter(str(tmp_path), 'phase1', {'budget': 256}) as writer:
    for r in records:
      writer.write(r)
    writer.write_summary()
  csv = pd.read_csv(tmp_path / 'phase1' / results.SUMMARY_FILE)
  assert list(csv.columns) == ['phase', 'method', 'task', 'length', 'budget', 'n',
                               'n_skipped', 'accuracy', 'ci_low', 'ci_high', 'cache_bytes',
                               'perplexity']
  rows = {(r.method, r.task): r for r in csv.itertuples()}
  h2o = rows['h2o', 'passkey']
  assert (h2o.n, h2o.accuracy) == (10, 0.3)
  assert (h2o.ci_low, h2o.ci_high) == pytest.approx(stats.wilson_interval(3, 10))
  full = rows['full', 'passkey']
  assert (full.n, full.n_skipped, full.accuracy, full.ci_low) == (4, 1, 0.0, 0.0)
  assert full.ci_high == pytest.approx(stats.wilson_interval(0, 4)[1])
  perplexity = rows['h2o', 'perplexity']
  assert perplexity.n == 2 and pd.isna(perplexity.ci_low) and pd.isna(perplexity.ci_high)
