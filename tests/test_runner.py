"""ResultsWriter: resume after a kill, flag checks, summary CSV; progress and RSS helpers."""

import json
import os

import pandas as pd
import pytest

from experiments import results

FLAGS = {'model': 'smollm2-135m', 'budget': 256, 'lengths': [2000, 5000], 'num_samples': 4,
         'output_dir': '/tmp/x'}


def _record(method, sample, length=2000, budget=256, **metrics):
  return {'method': method, 'task': 'passkey', 'length': length, 'budget': budget,
          'sample': sample, **metrics}


def test_run_json(tmp_path):
  with results.ResultsWriter(str(tmp_path), 'phase1', FLAGS) as writer:
    assert writer.done_keys() == set()
  with open(tmp_path / 'phase1' / 'run.json', encoding='utf-8') as f:
    info = json.load(f)
  assert info['flags'] == FLAGS
  assert set(info['versions']) >= {'jax', 'flax', 'transformers', 'numpy'}
  assert info['versions']['numpy'] and info['devices'] and info['python'] and info['start_time']


def test_resume_after_kill(tmp_path):
  writer = results.ResultsWriter(str(tmp_path), 'phase1', FLAGS)
  for sample in range(3):
    writer.write(_record('h2o', sample, accuracy=1.0, cache_bytes=1000))
  writer.close()
  path = tmp_path / 'phase1' / 'results.jsonl'
  with open(path, 'ab') as f:  # a kill in the middle of the fourth record
    f.write(b'{"phase": "phase1", "method": "h2o", "task": "passk')

  # A larger num_samples is not a different run.
  writer = results.ResultsWriter(str(tmp_path), 'phase1', {**FLAGS, 'num_samples': 8})
  assert writer.done_keys() == {('h2o', 'passkey', 2000, 256, s) for s in range(3)}
  writer.write(_record('h2o', 3, accuracy=0.0, cache_bytes=1000))
  writer.close()
  lines = path.read_text().splitlines()
  assert len(lines) == 4 and all(json.loads(line) for line in lines)
  assert [r['sample'] for r in results.read_results(str(path))] == [0, 1, 2, 3]
  with open(tmp_path / 'phase1' / 'run.json', encoding='utf-8') as f:
    info = json.load(f)
  assert len(info['resumed']) == 1 and info['flags']['num_samples'] == 8


def test_complete_last_line_without_newline_is_kept(tmp_path):
  writer = results.ResultsWriter(str(tmp_path), 'phase1', FLAGS)
  writer.write(_record('full', 0, accuracy=1.0))
  writer.close()
  path = tmp_path / 'phase1' / 'results.jsonl'
  path.write_text(path.read_text().rstrip('\n'))
  writer = results.ResultsWriter(str(tmp_path), 'phase1', FLAGS)
  writer.write(_record('full', 1, accuracy=1.0))
  writer.close()
  assert len(results.read_results(str(path))) == 2


def test_differing_flags_refused(tmp_path):
  results.ResultsWriter(str(tmp_path), 'phase2', FLAGS).close()
  with pytest.raises(ValueError, match=r"budget: saved 256 != new 512.*model: saved "
                                       r"'smollm2-135m' != new 'llama'"):
    results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'budget': 512, 'model': 'llama'})
  with pytest.raises(ValueError, match=r'new_flag: saved None != new 1'):
    results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'new_flag': 1})
  # Caller-chosen flags may differ.
  results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'budget': 512},
                        ignore_flags={'budget'}).close()


def test_added_flags_resume_older_runs(tmp_path):
  """A run saved before a flag existed resumes at that flag's old behaviour, not another."""
  results.ResultsWriter(str(tmp_path), 'phase2', FLAGS).close()
  added = {'kv_bits': '16', 'schemes': None}
  results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'kv_bits': '16', 'schemes': None},
                        added_flags=added).close()
  with pytest.raises(ValueError, match=r"kv_bits: saved '16' != new '4/2'"):
    results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'kv_bits': '4/2'},
                          added_flags=added)
  with pytest.raises(ValueError, match='kv_bits: saved None'):  # only when asked
    results.ResultsWriter(str(tmp_path / 'other'), 'phase2', FLAGS).close()
    results.ResultsWriter(str(tmp_path / 'other'), 'phase2', {**FLAGS, 'kv_bits': '16'})


def test_overwrite_discards(tmp_path):
  writer = results.ResultsWriter(str(tmp_path), 'phase2', FLAGS)
  writer.write(_record('headaware', 0, accuracy=1.0))
  writer.close()
  writer = results.ResultsWriter(str(tmp_path), 'phase2', {**FLAGS, 'budget': 512},
                                 overwrite=True)
  assert writer.done_keys() == set() and writer.records() == []
  writer.close()


def test_results_without_run_json_refused(tmp_path):
  os.makedirs(tmp_path / 'phase3')
  (tmp_path / 'phase3' / 'results.jsonl').write_text('{"method": "x"}\n')
  with pytest.raises(ValueError, match='without run.json'):
    results.ResultsWriter(str(tmp_path), 'phase3', FLAGS)


def test_skipped_and_key_validation(tmp_path):
  with results.ResultsWriter(str(tmp_path), 'phase1', FLAGS) as writer:
    rec = writer.record_skipped(('full', 'passkey', 20000, None, 0), 'past the context')
    assert rec['status'] == 'skipped' and rec['reason'] == 'past the context'
    assert ('full', 'passkey', 20000, None, 0) in writer.done_keys()
    with pytest.raises(ValueError, match=r"lacks key fields \['sample'\]"):
      writer.write({'method': 'full', 'task': 'passkey', 'length': 1, 'budget': None})
    with pytest.raises(ValueError, match='one value per key field'):
      writer.record_skipped(('full', 'passkey'), 'x')


def test_summary_csv(tmp_path):
  with results.ResultsWriter(str(tmp_path), 'phase1', FLAGS) as writer:
    writer.write(_record('full', 0, budget=None, accuracy=1.0, cache_bytes=4000,
                         prefill_s=1.0, generated='12345'))
    writer.write(_record('full', 1, budget=None, accuracy=0.0, cache_bytes=4000,
                         prefill_s=3.0, generated='no'))
    writer.write(_record('h2o', 0, accuracy=True, cache_bytes=1000, prefill_s=2.0))
    writer.record_skipped(('h2o', 'passkey', 2000, 256, 1), 'oom')
    summary = writer.write_summary()
  csv = pd.read_csv(tmp_path / 'phase1' / 'summary.csv')
  assert list(csv.columns[:7]) == ['phase', 'method', 'task', 'length', 'budget', 'n',
                                   'n_skipped']
  assert 'generated' not in csv.columns and 'sample' not in csv.columns
  full = csv[csv.method == 'full'].iloc[0]
  assert (full.n, full.n_skipped, full.accuracy, full.prefill_s) == (2, 0, 0.5, 2.0)
  assert pd.isna(full.budget)
  h2o = csv[csv.method == 'h2o'].iloc[0]
  assert (h2o.n, h2o.n_skipped, h2o.accuracy, h2o.cache_bytes, h2o.budget) == (1, 1, 1.0,
                                                                                1000, 256)
  assert len(summary) == 2


def test_numpy_values_keep_their_type(tmp_path):
  np = pytest.importorskip('numpy')
  with results.ResultsWriter(str(tmp_path), 'phase1', FLAGS) as writer:
    writer.write(_record('full', np.int64(0), length=np.int32(2000),
                         accuracy=np.float32(1.0)))
    assert ('full', 'passkey', 2000, 256, 0) in writer.done_keys()


def test_grid_and_iter_pending():
  keys = results.grid_keys(['full', 'h2o'], ['passkey'], [2000], [None], num_samples=3)
  assert len(keys) == 6 and keys[0] == ('full', 'passkey', 2000, None, 0)
  done = {keys[0], keys[4]}
  assert list(results.iter_pending(keys, done, disable=True)) == [
      k for k in keys if k not in done]


def test_peak_rss_bytes():
  rss = results.peak_rss_bytes()
  assert 10 * 2**20 < rss < 2**40  # between 10 MiB and 1 TiB: KiB were converted to bytes
  assert results.peak_rss_bytes() >= rss


def test_progress_bar_counts_done_samples(capsys):
  keys = results.grid_keys(['full'], ['passkey'], [2000, 5000], [None], num_samples=3)
  pending = results.iter_pending(keys, set(keys[:2]), desc='phase1', disable=False)
  next(pending)
  assert '2/6' in capsys.readouterr().err  # starts at the finished samples
  list(pending)
  assert '6/6' in capsys.readouterr().err
