"""Phase 4 report: markdown tables and PNG plots from fixture results."""

import json
import os
import shutil

from matplotlib import container as containers
import numpy as np
import pandas as pd
import pytest

from experiments import phase4
from experiments import report
from experiments import stats

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


def _errorbars(ax):
  """{label: ErrorbarContainer} of an axes' error bars (bars' ones under their index)."""
  out = {}
  for i, container in enumerate(ax.containers):
    if isinstance(container, containers.ErrorbarContainer):
      out[container.get_label() if not container.get_label().startswith('_') else i] = container
  return out


def _assert_bounds(container, intervals, axis=1):
  """The error bars of `container` span `intervals` ([(low, high)] per point), along y
  (axis=1) or x (axis=0)."""
  segments = container.lines[2][0].get_segments()
  drawn = [(s[0][axis], s[1][axis]) for s in segments]
  np.testing.assert_allclose(drawn, intervals, atol=1e-12)


def _captured_figures(monkeypatch):
  """Figures `render_report` draws, by file name (plot_figure wrapped)."""
  figures = {}
  draw = report.plot_figure

  def capture(plot, df):
    fig = draw(plot, df)
    if fig is not None:
      figures[plot.filename] = fig
    return fig

  monkeypatch.setattr(report, 'plot_figure', capture)
  return figures


def test_phase4_renders_wilson_error_bars_from_fixtures(tmp_path, monkeypatch):
  results_dir = tmp_path / 'results'
  shutil.copytree(FIXTURE, results_dir)
  figures = _captured_figures(monkeypatch)
  text = open(phase4.run(str(results_dir)), encoding='utf-8').read()

  phase1 = text.split('## phase1')[1].split('## phase2')[0]
  assert '| n | n_skipped | accuracy | ci_low | ci_high |' in phase1
  assert '| streamingllm | passkey | 2000 | 256 | 2 | 0 | 0.5 | 0.09453 | 0.9055 |' in phase1
  assert '| streamingllm | passkey | 5000 | 256 | 2 | 0 | 0 | 0 | 0.6576 |' in phase1
  assert 'Wilson score interval' in phase1
  # Accuracy vs length: one panel (passkey), one error-bar series per method, full first.
  (ax,) = figures['phase1_accuracy_vs_length.png'].axes
  bars = _errorbars(ax)
  assert list(bars) == ['full', 'h2o', 'streamingllm', 'headaware']
  streaming = bars['streamingllm']
  assert streaming.lines[0].get_xdata().tolist() == [2000, 5000]
  assert streaming.lines[0].get_ydata().tolist() == [0.5, 0.0]
  expected = [stats.wilson_interval(1, 2), stats.wilson_interval(0, 2)]
  _assert_bounds(streaming, expected)
  _assert_bounds(bars['full'], [stats.wilson_interval(2, 2)] * 2)
  # Budget sweep (phase 2): the 0.5 scores of two samples are k = 1 of n = 2.
  (ax,) = figures['phase2_accuracy_vs_budget.png'].axes
  _assert_bounds(_errorbars(ax)['headaware'],
                 [stats.wilson_interval(1, 2)] * 2 + [stats.wilson_interval(2, 2)])
  # Ablation bars: horizontal, with x error bars.
  (ax,) = figures['phase3_accuracy_vs_method.png'].axes
  (bar_errors,) = _errorbars(ax).values()
  labels = [t.get_text() for t in ax.get_yticklabels()]
  assert labels == ['uniform (n=2)', 'headaware (n=2)', 'shuffled_profile (n=2)',
                    'roles_only (n=2)']  # the records' order (no `full` here)
  half, whole = stats.wilson_interval(1.5, 2), stats.wilson_interval(2, 2)
  _assert_bounds(bar_errors, [half, whole, half, half], axis=0)
  # Memory plots have no error bars.
  assert not any(_errorbars(a) for a in figures['phase1_peak_rss_bytes_vs_length.png'].axes)


def _phase3_records():
  """Ablation records written in cell order, `full` in the middle, long labels."""
  labels = ('headaware', 'headaware[uniform]', 'full', 'headaware[pool_fraction=0.5]',
            'headaware[score=retrieval]')
  return [{'phase': 'phase3', 'method': label, 'task': 'passkey', 'length': 2000,
           'budget': 0 if label == 'full' else 128, 'sample': s, 'status': 'ok',
           'accuracy': float(s < k)}
          for k, label in enumerate(labels) for s in range(4)]


def test_phase3_bars_put_full_first_and_keep_the_cell_order():
  records = _phase3_records()
  assert report.method_order(r['method'] for r in records) == [
      'full', 'headaware', 'headaware[uniform]', 'headaware[pool_fraction=0.5]',
      'headaware[score=retrieval]']
  plot = next(p for p in report.PLOTS if p.phase == 'phase3')
  (ax,) = report.plot_figure(plot, report._ok_frame(records)).axes
  labels = [t.get_text() for t in ax.get_yticklabels()]  # horizontal bars: no overlap
  assert labels == ['full (n=4)', 'headaware (n=4)', 'headaware[uniform] (n=4)',
                    'headaware[pool_fraction=0.5] (n=4)', 'headaware[score=retrieval] (n=4)']
  assert ax.yaxis_inverted()  # the first label on top
  (bars,) = [c for c in ax.containers if isinstance(c, containers.BarContainer)]
  assert [p.get_width() for p in bars.patches] == [0.5, 0.0, 0.25, 0.75, 1.0]
  _assert_bounds(bars.errorbar, [stats.wilson_interval(k, 4) for k in (2, 0, 1, 3, 4)],
                 axis=0)


def test_cache_bytes_plots_keep_decode_and_perplexity_records_apart():
  rows = []
  for method, decode, streamed in (('full', 9e6, 9e6), ('h2o', 1e6, 3e6)):
    for sample in range(2):
      rows.append({'method': method, 'task': 'passkey', 'length': 2000, 'sample': sample,
                   'accuracy': 1.0, 'cache_bytes': decode, 'prefill_cache_bytes': streamed})
      rows.append({'method': method, 'task': 'perplexity', 'length': 2000, 'sample': sample,
                   'perplexity': 8.0, 'cache_bytes': streamed})
  plot = report.PLOTS[0]
  assert (plot.phase, plot.y, plot.by_task) == ('phase1', 'cache_bytes', True)
  decode_ax, stream_ax = report.plot_figure(plot, report._ok_frame(rows)).axes
  assert decode_ax.get_title().splitlines() == ['passkey', report.CACHE_BYTES_HELD['generation']]
  assert stream_ax.get_title().splitlines() == ['perplexity',
                                               report.CACHE_BYTES_HELD['perplexity']]
  assert [line.get_ydata().tolist() for line in decode_ax.get_lines()] == [[9e6], [1e6]]
  assert [line.get_ydata().tolist() for line in stream_ax.get_lines()] == [[9e6], [3e6]]
  assert not _errorbars(decode_ax)


def test_phase5_pareto_points_carry_error_bars(tmp_path):
  plot = next(p for p in report.PLOTS if p.kind == 'pareto' and p.x == 'cache_bytes')
  (ax,) = report.plot_figure(plot, report._ok_frame(_phase5_records())).axes
  bars = [c for c in ax.containers if isinstance(c, containers.ErrorbarContainer)]
  assert len(bars) == 6  # one per (method, budget) cell
  # full[kv_bits=16]: accuracies 1.0 and 0.9 over 2 samples -> k = 1.9 of n = 2.
  first = [b for b in bars if b.lines[0].get_xdata().tolist() == [4e6 + 0.5]]
  _assert_bounds(first[0], [stats.wilson_interval(1.9, 2)])
