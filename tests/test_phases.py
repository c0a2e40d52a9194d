"""Phase binaries end to end on a tiny random model with SmolLM2's real tokenizer.

  .venv/bin/python -m pytest tests/test_phases.py -q

The model is injected (`runner=`, `tokenizer=`), so no checkpoint is read; its vocabulary is
the tokenizer's so the real task generators run unchanged. A random head profile of the tiny
model's shape is passed as `--profile`.
"""

import dataclasses
import json
import os

from absl import app
from flax import nnx
import numpy as np
import pandas as pd
import pytest

from experiments import flags as exp_flags
from experiments import grid
from experiments import labels
from experiments import phase0
from experiments import phase1
from experiments import phase2
from experiments import phase3
from experiments import phase4
from experiments import phase5
from experiments import results
from experiments import run_all
from headkv_jax import bits as bits_lib
from headkv_jax import profile as profile_lib
from models.config import LlamaConfig
from models.llama import Llama
from models.runner import ModelRunner

LENGTH = 256


class _Killed(Exception):
  pass


RECORD_KEYS = {'phase', 'method', 'task', 'length', 'budget', 'sample', 'status'}


@pytest.fixture(scope='module')
def model():
  from models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = tokenizer_lib.load_tokenizer('smollm2-135m')
  except (FileNotFoundError, OSError) as e:
    pytest.skip(f'SmolLM2 tokenizer unavailable: {e}')
  cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=512)
  return ModelRunner(Llama(cfg, rngs=nnx.Rngs(0))), tokenizer


@pytest.fixture(scope='module')
def profile_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  scores = {n: rng.random((2, 2)) for n in profile_lib.SCORE_NAMES}
  profile = profile_lib.HeadProfile(model_id='tiny', num_layers=2, num_kv_heads=2,
                                    num_q_heads=4, scores=scores,
                                    roles=np.array([[0, 1], [2, 2]]))
  path = str(tmp_path_factory.mktemp('profile') / 'tiny.json')
  profile.save(path)
  profile_lib.plot_heatmaps(profile, path[:-len('.json')] + '.png')  # the report links it
  return path


def _settings(tmp_path, profile_path, **kw):
  base = dict(model='tiny', lengths=(LENGTH,), tasks=('passkey',), num_samples=1,
              chunk_size=128, max_new_tokens=4, output_dir=str(tmp_path),
              profile=profile_path, grid='quick')
  return grid.Settings(**{**base, **kw})


def _records(tmp_path, phase):
  return results.read_results(os.path.join(tmp_path, phase, results.RESULTS_FILE))


def _check_files(tmp_path, phase):
  directory = os.path.join(tmp_path, phase)
  for name in (results.RUN_FILE, results.RESULTS_FILE, results.SUMMARY_FILE):
    assert os.path.isfile(os.path.join(directory, name)), name
  with open(os.path.join(directory, results.RUN_FILE), encoding='utf-8') as f:
    run = json.load(f)
  assert run['flags']['phase'] == phase and run['versions']['jax']
  summary = pd.read_csv(os.path.join(directory, results.SUMMARY_FILE))
  assert {'method', 'task', 'length', 'budget', 'n', 'n_skipped'} <= set(summary.columns)
  records = _records(tmp_path, phase)
  assert records and all(RECORD_KEYS <= set(r) for r in records)
  return records


def test_phase1_writes_records_and_resumes(model, profile_path, tmp_path, monkeypatch):
  runner, tokenizer = model
  # Three of phase 1's methods (streamingllm's phase-1 cells run in
  # test_other_flags_refused_unless_overwrite): each one more only adds compiles.
  settings = _settings(tmp_path, profile_path, budget=64, tasks=('passkey', 'perplexity'),
                       methods=('full', 'h2o', 'headaware'))
  calls, kill_at = [], [3]
  real = grid.evaluate_cell

  def counting(*args):
    calls.append(args[3].key(args[2].index))
    if len(calls) == kill_at[0]:
      raise _Killed  # a kill in the middle of the grid
    return real(*args)

  with pytest.raises(_Killed):
    phase1.run(settings, runner=runner, tokenizer=tokenizer, evaluate_fn=counting)
  assert len(_records(tmp_path, 'phase1')) == 2
  calls.clear()
  kill_at[0] = None
  phase1.run(settings, runner=runner, tokenizer=tokenizer, evaluate_fn=counting)
  records = _check_files(tmp_path, 'phase1')
  assert len(calls) == 6 - 2  # 3 methods x 2 tasks; the 2 finished samples are not redone
  assert len({tuple(r[k] for k in results.KEY_FIELDS) for r in records}) == len(records) == 6
  by_method = {(r['method'], r['task']): r for r in records}
  assert by_method[('full', 'passkey')]['budget'] == 0
  ok = by_method[('headaware', 'passkey')]
  assert ok['status'] == 'ok' and ok['budget'] == 64 and ok['cache_bytes'] > 0
  for key in ('accuracy', 'prefill_s', 'decode_ms_per_token', 'peak_rss_bytes'):
    assert key in ok
  assert by_method[('h2o', 'perplexity')]['perplexity'] > 1
  # A third run finds nothing to do and loads no model.
  calls.clear()
  phase1.run(settings, evaluate_fn=counting)
  assert not calls


def test_skipped_cell_records_its_reason(model, profile_path, tmp_path):
  runner, tokenizer = model
  settings = _settings(tmp_path, profile_path, methods=('snapkv', 'headaware'), budget=8)
  summary = phase1.run(settings, runner=runner, tokenizer=tokenizer, progress=False)
  records = _records(tmp_path, 'phase1')
  assert {r['status'] for r in records} == {'skipped'}
  assert all('below the minimum' in r['reason'] for r in records)
  assert summary['n_skipped'].sum() == 2


def test_unknown_method_and_task_fail_before_work(profile_path, tmp_path):
  with pytest.raises(app.UsageError, match='allowed'):
    phase1.run(_settings(tmp_path, profile_path, methods=('fulll',)))
  with pytest.raises(app.UsageError, match='allowed'):
    phase1.run(_settings(tmp_path, profile_path, tasks=('passkee',)))
  with pytest.raises(app.UsageError, match='longbench_dir'):
    phase1.run(_settings(tmp_path, profile_path, tasks=('longbench/qasper',)))
  with pytest.raises(app.UsageError, match='field=value'):
    phase3.run(_settings(tmp_path, profile_path, methods=('headaware[nope]',)))
  with pytest.raises(app.UsageError, match='allowed'):
    phase3.run(_settings(tmp_path, profile_path, methods=('snapkv',)))
  assert not os.path.exists(os.path.join(tmp_path, 'phase1', results.RESULTS_FILE))


def test_phase3_variant_labels_combine_fields():
  """A label `headaware[a=x,b=y]` sets MethodSpec fields (aliases, named variants, shuffle);
  bad fields, values and policy knobs are UsageErrors naming the label."""
  cell = phase3.variant_cell('headaware[pool_kernel=13,sinks=4,uniform,shuffled]', 64,
                             'passkey', 500)
  assert (cell.spec.pool_kernel, cell.spec.n_sink, cell.spec.allocation) == (13, 4, 'uniform')
  assert cell.shuffle_profile and cell.method.startswith('headaware[') and cell.budget == 64
  assert phase3.variant_cell('headaware[pool_fraction=0.5]', 64, 'passkey', 500).spec \
      .pool_fraction == 0.5
  for label, match in (('headaware[foo=1]', 'field=value'), ('headaware[window=x]', 'int'),
                       ('headaware[pool_kernel=4]', 'odd'), ('headaware[scope=global]', 'scope')):
    with pytest.raises(app.UsageError, match=match):
      phase3.variant_cell(label, 64, 'passkey', 500)


def test_kv_bits_reach_the_cells():
  """--kv_bits sets every phase's MethodSpec; a phase-3 label's kv_bits (text, role tables
  with commas included) wins over it; bad schemes are UsageErrors naming them."""
  settings = grid.Settings(methods=('full', 'h2o'), lengths=(500,), tasks=('passkey',),
                           kv_bits=' 4 / 2 ')
  assert settings.kv_bits == '4/2'  # canonical
  assert {c.spec.kv_bits for c in grid.method_cells(settings, (64,))} == {'4/2'}
  assert phase3.variant_cell('headaware', 64, 'passkey', 500, '4/2').spec.kv_bits == '4/2'
  cell = phase3.variant_cell('headaware[kv_bits=roles:8/8,4/2,2/2,sinks=0]', 64, 'passkey',
                             500, '4/2')
  assert cell.spec.n_sink == 0
  assert bits_lib.parse_kv_bits(cell.spec.kv_bits).role_bits == ((8, 8), (4, 2), (2, 2))
  assert phase3.variant_cell('headaware[kv_bits=avg:3]', 64, 'passkey', 500).spec.kv_bits \
      in ('avg:3', 'avg:3.0')
  cell = phase3.variant_cell('headaware[kv_bits=roles@group=64,residual=16,staging=2]', 64,
                             'passkey', 500)
  assert (cell.spec.kv_bits, cell.spec.staging) == ('roles@group=64,residual=16', 2.0)
  assert labels.join_schemes(['16', 'roles@group=64', 'residual=16', 'roles:8/4', '4/2',
                                 '2/2@residual=8', 'avg:3']) == [
                                     '16', 'roles@group=64,residual=16',
                                     'roles:8/4,4/2,2/2@residual=8', 'avg:3']
  for bad, match in (('4/8', 'K >= V'), ('3', 'allowed widths'), ('avg:1', 'outside')):
    with pytest.raises(app.UsageError, match=match):
      grid.Settings(kv_bits=bad)
    with pytest.raises(app.UsageError, match='schemes'):
      grid.Settings(schemes=('16', bad))
  with pytest.raises(app.UsageError, match='kv_bits'):
    phase3.variant_cell('headaware[kv_bits=4/8]', 64, 'passkey', 500)


def test_position_modes_reach_the_records(model, profile_path, tmp_path):
  """--position_mode=auto rolls exactly the compressed samples past the model's context (512
  positions here); 'both' runs each compressed method in both modes under two labels; every
  record says which mode ran, and `full` stays at original positions."""
  runner, tokenizer = model

  def fake(runner, tokenizer, sample, cell, settings, profile):
    return {'accuracy': 1.0, 'ran': cell.spec.position_mode}

  def run(directory, mode):
    settings = _settings(directory, profile_path, methods=('full', 'h2o'), budget=64,
                         lengths=(256, 600), position_mode=mode)
    phase1.run(settings, runner=runner, tokenizer=tokenizer, evaluate_fn=fake, progress=False)
    records = _records(directory, 'phase1')
    assert all(r['position_mode'] == r['ran'] for r in records)
    return {(r['method'], r['length']): r['position_mode'] for r in records}

  o, rolled = 'original', 'cache_relative'
  assert run(tmp_path / 'auto', 'auto') == {
      ('full', 256): o, ('full', 600): o, ('h2o', 256): o, ('h2o', 600): rolled}
  assert run(tmp_path / 'both', 'both') == {
      ('full', 256): o, ('full', 600): o, ('h2o', 256): o, ('h2o', 600): o,
      ('h2o[rolled]', 256): rolled, ('h2o[rolled]', 600): rolled}
  with pytest.raises(app.UsageError, match="position_mode='rolling'.*auto, original"):
    grid.Settings(position_mode='rolling')


def test_phase5_cells_and_labels(profile_path, tmp_path):
  settings = _settings(tmp_path, profile_path, tasks=None, num_samples=None, lengths=None,
                       grid='default').with_defaults(phase5.GRIDS)
  cells = phase5.cells(settings)
  schemes = phase5.SCHEMES
  assert settings.schemes == schemes and settings.budgets == (512, 256, 128)
  per = len(settings.tasks) * len(settings.lengths)
  assert len(cells) == per * len(schemes) * (1 + 3)  # full + 3 budgets per scheme
  labels = {c.method for c in cells}
  assert labels == {f'{m}[kv_bits={s}]' for m in ('full', 'headaware') for s in schemes}
  for c in cells:
    scheme = c.method.split('[kv_bits=')[1][:-1]
    assert c.spec.kv_bits == scheme and c.spec.name == c.method.split('[')[0]
    assert (c.budget == 0) == (c.spec.name == 'full') and c.budget == c.spec.budget
  assert {c.budget for c in cells} == {0, 128, 256, 512}
  quick = phase5.cells(_settings(tmp_path, profile_path, tasks=None, num_samples=None,
                                 lengths=None).with_defaults(phase5.GRIDS))
  assert sorted({(c.method, c.budget) for c in quick}) == [
      ('full[kv_bits=16]', 0), ('full[kv_bits=4]', 0), ('full[kv_bits=roles]', 0),
      ('headaware[kv_bits=16]', 128), ('headaware[kv_bits=4]', 128),
      ('headaware[kv_bits=roles]', 128)]
  assert {(c.task, c.length) for c in quick} == {('niah_single', 2000)}
  # --schemes are canonical and unique; --methods may name any method.
  picked = phase5.cells(dataclasses.replace(settings, schemes=('8/8', '8', 'KIVI2'),
                                            methods=('snapkv',), budgets=(64,)))
  assert {c.method for c in picked} == {'snapkv[kv_bits=8]', 'snapkv[kv_bits=kivi2]'}
  with pytest.raises(app.UsageError, match='allowed'):
    phase5.cells(dataclasses.replace(settings, methods=('fulll',)))


def test_phase5_runs_and_resumes(model, profile_path, tmp_path):
  """Phase 5 resumes after a kill; quantized cells record their bits and hold fewer bytes
  (needs the quantized caches; checked on the same records, not a second run)."""
  runner, tokenizer = model
  settings = _settings(tmp_path, profile_path, methods=('full', 'headaware'),
                       schemes=('16', '4/2', 'roles'), budgets=(64,))
  calls, kill_at = [], [4]
  real = grid.evaluate_cell

  def counting(*args):
    calls.append(args[3].key(args[2].index))
    if len(calls) == kill_at[0]:
      raise _Killed
    return real(*args)

  with pytest.raises(_Killed):
    phase5.run(settings, runner=runner, tokenizer=tokenizer, evaluate_fn=counting,
               progress=False)
  assert len(_records(tmp_path, 'phase5')) == 3
  calls.clear()
  kill_at[0] = None
  phase5.run(settings, runner=runner, tokenizer=tokenizer, evaluate_fn=counting,
             progress=False)
  assert len(calls) == 6 - 3  # 2 methods x 3 schemes; the finished ones are not redone
  records = _check_files(tmp_path, 'phase5')
  by_label = {r['method']: r for r in records}
  assert set(by_label) == {f'{m}[kv_bits={s}]' for m in ('full', 'headaware')
                           for s in ('16', '4/2', 'roles')}
  assert {r['status'] for r in records} == {'ok'}, records
  assert by_label['headaware[kv_bits=4/2]']['budget'] == 64
  assert 'kv_bits=4/2' in by_label['headaware[kv_bits=4/2]']['spec']
  full, low = by_label['headaware[kv_bits=16]'], by_label['headaware[kv_bits=4/2]']
  assert low['cache_bytes'] < full['cache_bytes']
  assert low['effective_bits'] < full['effective_bits']
  assert np.asarray(low['head_bits']).shape == (2, 2, 2)
  assert {tuple(p) for p in np.asarray(low['head_bits']).reshape(-1, 2)} == {(4, 2)}
  calls.clear()
  phase5.run(settings, evaluate_fn=counting)  # nothing left: no model is loaded
  assert not calls
  with pytest.raises(app.UsageError, match='other flags'):
    phase5.run(dataclasses.replace(settings, schemes=('8',)), runner=runner,
               tokenizer=tokenizer)


def test_other_flags_refused_unless_overwrite(model, profile_path, tmp_path):
  runner, tokenizer = model
  settings = _settings(tmp_path, profile_path, methods=('streamingllm',), budget=32)
  phase1.run(settings, runner=runner, tokenizer=tokenizer, progress=False)
  other = _settings(tmp_path, profile_path, methods=('streamingllm',), budget=48)
  with pytest.raises(app.UsageError, match='other flags'):
    phase1.run(other, runner=runner, tokenizer=tokenizer)
  phase1.run(dataclasses.replace(other, overwrite=True), runner=runner,
             tokenizer=tokenizer, progress=False)
  assert [r['budget'] for r in _records(tmp_path, 'phase1')] == [48]


def test_phase0_oracle_and_phase2_budgets(model, profile_path, tmp_path, monkeypatch):
  runner, tokenizer = model
  settings = _settings(tmp_path, profile_path, methods=('full', 'oracle'), budgets=(32,),
                       tasks=('passkey', 'perplexity'))
  phase0.run(settings, runner=runner, tokenizer=tokenizer, progress=False)
  records = {(r['method'], r['task']): r for r in _check_files(tmp_path, 'phase0')}
  oracle = records[('oracle', 'passkey')]
  assert oracle['status'] == 'ok' and oracle['oracle_s'] > 0 and oracle['kv_tokens_max'] <= 32
  assert records[('oracle', 'perplexity')]['status'] == 'skipped'
  monkeypatch.setitem(phase2.GRID_BUDGETS, 'quick', (64,))
  phase2.run(dataclasses.replace(settings, methods=None, tasks=('passkey',)), runner=runner,
             tokenizer=tokenizer, progress=False)
  budgets = {r['budget'] for r in _check_files(tmp_path, 'phase2')}
  assert budgets == {0, 32, 64}  # full, --budgets, the grid's


def test_shared_prefill_records_equal_separate_runs(model, profile_path, tmp_path,
                                                    monkeypatch):
  """--shared_prefill: one prefill per (task, length, sample) gives each method/budget the
  answer and cache bytes its own one-shot run gives; perplexity cells still run alone; a
  chunk shorter than the prompt is refused (shared is one-shot eviction)."""
  runner, tokenizer = model
  monkeypatch.setitem(phase2.GRID_BUDGETS, 'quick', (64,))
  kw = dict(methods=('full', 'h2o', 'headaware'), budgets=(40,),
            tasks=('passkey', 'perplexity'), num_samples=2, chunk_size=LENGTH)
  alone = _settings(tmp_path / 'alone', profile_path, **kw)
  shared = _settings(tmp_path / 'shared', profile_path, shared_prefill=True, **kw)
  for settings in (alone, shared):
    phase2.run(settings, runner=runner, tokenizer=tokenizer, progress=False)
  a, b = (_check_files(s.output_dir, 'phase2') for s in (alone, shared))
  assert len(a) == len(b) == 2 * 2 * (1 + 2 * 2)  # tasks x samples x (full + 2 x 2 budgets)
  key = lambda r: tuple(r[k] for k in results.KEY_FIELDS)
  a, b = {key(r): r for r in a}, {key(r): r for r in b}
  assert a.keys() == b.keys()
  for k, r in b.items():
    if k[1] == 'perplexity':
      assert 'shared_prefill' not in r and r['perplexity'] == a[k]['perplexity']
    else:
      assert r['shared_prefill'] and r['status'] == 'ok', r
      for field in ('generated', 'accuracy', 'cache_bytes', 'kv_tokens_mean', 'score_mode',
                    'staging'):
        assert r.get(field) == a[k].get(field), (k, field)
  with pytest.raises(app.UsageError, match='chunk_size'):
    phase2.run(dataclasses.replace(shared, chunk_size=128, overwrite=True), runner=runner,
               tokenizer=tokenizer, progress=False)


def test_phase3_variants_and_phase4_report(model, profile_path, tmp_path):
  runner, tokenizer = model
  settings = _settings(tmp_path, profile_path, budget=48)
  profile = profile_lib.HeadProfile.load(profile_path)
  assert set(phase3.QUICK_VARIANTS) <= set(phase3.VARIANTS)
  every = phase3.cells(dataclasses.replace(settings, methods=tuple(phase3.VARIANTS)))
  assert all(grid.skip_reason(c, runner.config, profile) is None for c in every)
  # Run the variants that change the budgets or the selection (compiles dominate the time).
  chosen = ('full', 'headaware', 'headaware[uniform]', 'headaware[shuffled]',
            'headaware[roles]', 'headaware[window=0]')
  phase3.run(dataclasses.replace(settings, methods=chosen), runner=runner, tokenizer=tokenizer,
             progress=False)
  records = _check_files(tmp_path, 'phase3')
  assert {r['method']: r['status'] for r in records} == {m: 'ok' for m in chosen}, records
  report = phase4.run(str(tmp_path))
  text = open(report, encoding='utf-8').read()
  assert '## phase3' in text and 'headaware[uniform]' in text
  assert os.path.isfile(os.path.join(tmp_path, 'phase3', grid.PROFILE_PNG))
  assert '![head profile](../phase3/head_profile.png)' in text
  assert os.path.isfile(os.path.join(tmp_path, 'report', 'phase3_accuracy_vs_method.png'))
  with pytest.raises(app.UsageError, match='does not exist'):
    phase4.run(str(tmp_path / 'nowhere'))


def test_run_all_quick_writes_every_phase(model, profile_path, tmp_path, monkeypatch):
  runner, tokenizer = model
  for module, methods in ((phase0, ('full', 'oracle')), (phase1, ('full', 'headaware')),
                          (phase2, ('headaware',)), (phase3, ('headaware[roles]',)),
                          (phase5, ('headaware',))):
    quick = dict(module.GRIDS['quick'], methods=methods, num_samples=1, tasks=('passkey',))
    if module is phase5:
      quick['schemes'] = ('roles',)
    monkeypatch.setitem(module.GRIDS, 'quick', quick)  # fewer cells: compiles dominate
  monkeypatch.setitem(phase2.GRID_BUDGETS, 'quick', (64,))
  settings = _settings(tmp_path, profile_path, tasks=None, num_samples=None, budget=64,
                       budgets=(64,), lengths=(200,))
  report = run_all.run(settings, runner=runner, tokenizer=tokenizer, progress=False)
  for phase in run_all.PHASES:
    assert {r['status'] for r in _check_files(tmp_path, phase)} == {'ok'}
  assert os.path.isfile(report)
  with pytest.raises(app.UsageError, match='methods'):
    run_all.run(dataclasses.replace(settings, methods=('full',)))


def test_flags_make_settings():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from experiments import flags as exp_flags  # pylint: disable=g-import-not-at-top

  with flagsaver.flagsaver():
    flags.FLAGS(['phase1', '--lengths=1000,2000', '--methods=full,h2o', '--budget=128',
                 '--grid=quick'])
    settings = exp_flags.settings_from_flags()
    assert settings.lengths == (1000, 2000) and settings.methods == ('full', 'h2o')
    assert settings.tasks is None and settings.chunk_size == 1024
    resolved = settings.with_defaults(phase1.GRIDS)
    assert resolved.tasks == phase1.GRIDS['quick']['tasks'] and resolved.budget == 128
    flags.FLAGS(['phase3', '--methods=full,headaware[pool_kernel=13,sinks=4],headaware'])
    assert exp_flags.settings_from_flags().methods == (
        'full', 'headaware[pool_kernel=13,sinks=4]', 'headaware')
    flags.FLAGS(['phase5', '--kv_bits=KIVI2', '--schemes=16,roles:8/8,4/2,2/2,4,avg:3'])
    settings = exp_flags.settings_from_flags()
    assert settings.kv_bits == 'kivi2'
    assert settings.schemes == ('16', 'roles:8,4/2,2', '4', 'avg:3')
    flags.FLAGS(['phase1', '--kv_bits=4/8'])
    with pytest.raises(app.UsageError, match='4/8'):
      exp_flags.settings_from_flags()
    flags.FLAGS(['phase1', '--kv_bits=16', '--lengths=1k'])
    with pytest.raises(app.UsageError, match='1k'):
      exp_flags.settings_from_flags()
  with pytest.raises(app.UsageError, match='chunk_size'):
    grid.Settings(chunk_size=0)
