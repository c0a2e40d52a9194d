"""Phase 4 report: markdown tables and PNG plots from fixture results."""

import json
import os
import shutil

import pandas as pd

from experiments import report

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'report_run')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_markdown_table():
  df = pd.DataFrame({'method': ['full', 'h|2o'], 'budget': [None, 256.0],
                     'accuracy': [0.123456, 1.0]})
  assert report.markdown_table(df).splitlines() == [
      '| method | budget | accuracy |',
      '|:---|---:|---:|',
      '| full |  | 0.1235 |',
      '| h\\|2o | 256 | 1 |',
  ]


def test_render_report_from_fixtures(tmp_path):
  results_dir = tmp_path / 'results_in'
  shutil.copytree(FIXTURE, results_dir)
  heatmap = results_dir / 'phase1' / 'head_profile.png'
  heatmap.write_bytes(PNG_MAGIC)
  (results_dir / 'phase1' / 'run.json').write_text(json.dumps(
      {'flags': {'budget': 256}, 'head_profile_png': 'head_profile.png'}))
  out_dir = tmp_path / 'report'

  path = report.render_report(str(results_dir), str(out_dir))

  assert path == str(out_dir / 'report.md')
  text = (out_dir / 'report.md').read_text()
  for phase in ('phase0', 'phase5'):
    assert f'## {phase}' in text and 'phase skipped' in text.split(f'## {phase}')[1]
  phase1 = text.split('## phase1')[1].split('## phase2')[0]
  assert '| method | task | length | budget | n | n_skipped |' in phase1
  assert '| full | passkey | 20000 |  | 0 | 1 |' in phase1  # the skipped cell
  expected_pngs = {'phase1_cache_bytes_vs_length.png', 'phase1_accuracy_vs_length.png',
                   'phase1_peak_rss_bytes_vs_length.png',
                   'phase1_decode_ms_per_token_vs_length.png', 'phase2_accuracy_vs_budget.png',
                   'phase2_cache_bytes_vs_budget.png', 'phase3_accuracy_vs_method.png'}
  assert {f for f in os.listdir(out_dir) if f.endswith('.png')} == expected_pngs
  for name in expected_pngs:
    assert f']({name})' in text
    assert (out_dir / name).read_bytes().startswith(PNG_MAGIC)
  assert '![head profile](../results_in/phase1/head_profile.png)' in text


def test_missing_heatmap_and_empty_dir(tmp_path):
  os.makedirs(tmp_path / 'phase3')
  (tmp_path / 'phase3' / 'results.jsonl').write_text(json.dumps(
      {'phase': 'phase3', 'method': 'uniform', 'task': 'passkey', 'length': 2000,
       'budget': 128, 'sample': 0, 'accuracy': 1.0,
       'profile_heatmap_png': 'nowhere.png'}) + '\n')
  text = open(report.render_report(str(tmp_path)), encoding='utf-8').read()
  assert '`nowhere.png` is listed but missing' in text
  assert text.count('phase skipped') == 4

  empty = tmp_path / 'empty'
  os.makedirs(empty)
  text = open(report.render_report(str(empty)), encoding='utf-8').read()
  assert text.count('phase skipped') == len(report.PHASES)


def _phase5_records():
  """Fixture phase-5 records: 3 labels x budgets, with bytes, effective bits and head bits."""
  rows = []
  roles = [[[8, 8], [2, 2]], [[4, 4], [8, 8]], [[2, 2], [2, 2]]]  # [layers][Hkv][k, v]
  cells = [('full[kv_bits=16]', 0, 4e6, 32.0, 1.0, [[[16, 16]] * 2] * 3),
           ('full[kv_bits=4/2]', 0, 1.1e6, 4.0, 0.9, [[[4, 2]] * 2] * 3),
           ('headaware[kv_bits=16]', 128, 5e5, 32.0, 0.8, [[[16, 16]] * 2] * 3),
           ('headaware[kv_bits=16]', 256, 1e6, 32.0, 0.9, [[[16, 16]] * 2] * 3),
           ('headaware[kv_bits=roles]', 128, 1.5e5, 5.5, 0.85, roles),
           ('headaware[kv_bits=roles]', 256, 3e5, 5.5, 0.7, roles)]
  for method, budget, nbytes, bits, accuracy, head_bits in cells:
    for sample in range(2):
      rows.append({'phase': 'phase5', 'method': method, 'task': 'niah_single', 'length': 2000,
                   'budget': budget, 'sample': sample, 'status': 'ok',
                   'accuracy': accuracy - 0.1 * sample, 'cache_bytes': nbytes + sample,
                   'effective_bits': bits, 'head_bits': head_bits})
      rows.append({'phase': 'phase5', 'method': method, 'task': 'perplexity', 'length': 2000,
                   'budget': budget, 'sample': sample, 'status': 'ok', 'perplexity': 12.0,
                   'cache_bytes': nbytes, 'effective_bits': bits, 'head_bits': head_bits})
  rows.append({'phase': 'phase5', 'method': 'headaware[kv_bits=2]', 'task': 'niah_single',
               'length': 2000, 'budget': 128, 'sample': 0, 'status': 'skipped',
               'reason': 'no quantized pages'})
  return rows


def test_phase5_pareto_and_head_bits_plots(tmp_path):
  os.makedirs(tmp_path / 'phase5')
  with open(tmp_path / 'phase5' / 'results.jsonl', 'w', encoding='utf-8') as f:
    for r in _phase5_records():
      f.write(json.dumps(r) + '\n')
  text = open(report.render_report(str(tmp_path)), encoding='utf-8').read()
  phase5 = text.split('## phase5')[1]
  names = ('phase5_accuracy_vs_cache_bytes.png', 'phase5_accuracy_vs_effective_bits.png',
           'phase5_head_bits.png', 'phase5_accuracy_vs_budget.png')
  for name in names:
    assert f']({name})' in phase5
    assert (tmp_path / 'report' / name).read_bytes().startswith(PNG_MAGIC)
  assert 'effective_bits' in phase5 and '| headaware[kv_bits=roles] |' in phase5


def test_pareto_front_and_labels():
  # (bytes, accuracy): the front keeps the cheapest best-so-far points, in bytes order.
  x = [4e6, 1.1e6, 5e5, 1e6, 1.5e5, 3e5, 1.5e5]
  y = [1.0, 0.9, 0.8, 0.9, 0.85, 0.7, 0.6]
  assert report.pareto_front(x, y).tolist() == [4, 3, 0]
  assert report.short_label('headaware[kv_bits=roles:8,4/2,2]') == 'headaware roles:8,4/2,2'
  assert report.short_label('headaware[uniform]') == 'headaware[uniform]'


def test_head_bits_heatmap_needs_head_bits(tmp_path):
  path = str(tmp_path / 'bits.png')
  assert not report.draw_head_bits([{'method': 'full', 'head_bits': None},
                                    {'method': 'x', 'head_bits': [[1, 2, 3]]}], path)
  assert not os.path.exists(path)
  records = [{'method': f'headaware[kv_bits={i}]', 'head_bits': [[[8, 4]] * 8] * 30}
             for i in range(8)]  # 30 layers x 8 KV heads, 8 panels over two rows
  assert report.draw_head_bits(records, path)
  assert open(path, 'rb').read().startswith(PNG_MAGIC)
