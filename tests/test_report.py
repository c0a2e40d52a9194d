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
