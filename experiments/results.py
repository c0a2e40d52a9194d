"""Resumable experiment results: one JSON line per sample, flushed as it is written.

Layout under `--output_dir`:
  <output_dir>/<phase>/run.json       flags, package versions, devices, python, start time
  <output_dir>/<phase>/results.jsonl  append-only, one record per finished (or skipped) sample
  <output_dir>/<phase>/summary.csv    means of the numeric metrics per cell, with counts and
                                      the 95% Wilson interval of `accuracy` (ci_low, ci_high)

A record holds the key fields `phase, method, task, length, budget, sample`, a `status`
('ok' or 'skipped') and metrics whose names carry their unit: `accuracy`, `perplexity`,
`cache_bytes`, `peak_rss_bytes`, `prefill_s`, `decode_ms_per_token`, ... . A restarted run
asks `done_keys()` and skips those samples; a line cut short by a kill is dropped (that
sample runs again), never an error.

Flags: a directory is reused only when the saved flags equal the new ones, except the flags
in `ignore_flags` (default IGNORED_FLAGS: flags that decide how much work is done or where it
goes, not what a sample's result is — e.g. more `num_samples` extends a run).

  writer = results.ResultsWriter(FLAGS.output_dir, 'phase1', flags)
  for key in results.iter_pending(keys, writer.done_keys(), desc='phase1'):
    writer.write({**dict(zip(results.KEY_FIELDS, key)), 'accuracy': 1.0, ...})
  writer.write_summary()
"""

import datetime
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import resource
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import tqdm

from experiments import stats

KEY_FIELDS = ('method', 'task', 'length', 'budget', 'sample')
GROUP_FIELDS = ('phase', 'method', 'task', 'length', 'budget')
# Flags that never change a sample's result; see the module docstring.
IGNORED_FLAGS = frozenset({
    'output_dir', 'overwrite', 'num_samples', 'progress', 'verbosity', 'v', 'logtostderr',
    'alsologtostderr', 'log_dir', 'stderrthreshold', 'showprefixforinfo'})
PACKAGES = ('jax', 'jaxlib', 'flax', 'transformers', 'numpy', 'pandas')
RUN_FILE, RESULTS_FILE, SUMMARY_FILE = 'run.json', 'results.jsonl', 'summary.csv'
_NOT_METRICS = frozenset(GROUP_FIELDS) | {'sample', 'seed', 'status', 'reason'}
ACCURACY = 'accuracy'  # the metric summaries give a confidence interval (stats.with_interval)


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _to_json(obj: Any) -> Any:
  if hasattr(obj, 'tolist'):  # numpy / jax scalars and arrays
    return obj.tolist()
  return str(obj)


def _jsonable(value: Any) -> Any:
  """`value` as JSON gives it back (tuples -> lists, numpy -> python, other objects -> str)."""
  return json.loads(json.dumps(value, default=_to_json))


def run_info(flags: dict) -> dict:
  """What run.json records: flags, package versions, devices, python, start time."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = [str(d) for d in jax.devices()]
  except Exception as e:  # pylint: disable=broad-except
    devices = [f'unavailable: {e}']
  return {'flags': _jsonable(flags), 'versions': versions, 'devices': devices,
          'python': sys.version, 'platform': platform.platform(), 'start_time': _now(),
          'resumed': []}


def differing_flags(saved: dict, new: dict, ignore_flags: Iterable[str] = IGNORED_FLAGS,
                    added_flags: dict | None = None) -> dict[str, tuple]:
  """{flag: (saved value, new value)} for flags that differ, ignoring `ignore_flags`.

  `added_flags` ({flag: value}) are flags newer than some saved runs: a saved run without
  one matches a new value equal to the listed one (the behaviour it was run with).
  """
  saved, new, ignore = _jsonable(saved), _jsonable(new), set(ignore_flags)
  saved = {**_jsonable({k: v for k, v in (added_flags or {}).items() if k in new}), **saved}
  missing = object()
  return {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new))
          if k not in ignore and saved.get(k, missing) != new.get(k, missing)}


def read_results(path: str) -> list[dict]:
  """All records of a results.jsonl; an unfinished last line (a kill) is dropped."""
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if i != len(lines) - 1:  # a bad line in the middle: not from a kill, but keep going
        logging.warning('Skipping unreadable line %d of %s: %r', i + 1, path, line[:80])
  return records


def _repair_tail(path: str) -> None:
  """Drops an unfinished last line so the next append starts on a fresh line."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if not data or data.endswith(b'\n'):
      return
    cut = data.rfind(b'\n') + 1
    try:
      json.loads(data[cut:])
      f.write(b'\n')  # complete record, only its newline was lost
    except ValueError:
      logging.warning('Dropping unfinished last line of %s: %r', path, data[cut:cut + 80])
      f.truncate(cut)


def summarize(records: list[dict]) -> pd.DataFrame:
  """Mean of every numeric metric per (phase, method, task, length, budget), with counts.

  Columns: the group fields, `n` (finished samples), `n_skipped`, then the metric means,
  `accuracy` first and the others in record order. `accuracy` is followed by `ci_low` and
  `ci_high`, its 95% Wilson score interval over the finished samples that carry an accuracy
  (`stats.with_interval`; every sample of a scored task does, so that count is `n`). Cells
  without an accuracy (perplexity) have NaN bounds.
  """
  if not records:
    return pd.DataFrame(columns=[*GROUP_FIELDS, 'n', 'n_skipped'])
  df = pd.DataFrame(records)
  for field in GROUP_FIELDS:
    if field not in df:
      df[field] = None
  ok = df['status'].fillna('ok').eq('ok') if 'status' in df else pd.Series(True, df.index)
  metrics = []
  for col in df.columns:
    if col in _NOT_METRICS:
      continue
    values = df[col].map(lambda v: float(v) if isinstance(v, (bool, int, float)) else v)
    if not values.map(lambda v: v is None or isinstance(v, float)).all():
      continue  # text or lists: not a metric
    numeric = values.astype(float)
    if numeric.notna().any():
      df[col] = numeric.where(ok)
      metrics.append(col)
  df['n'], df['n_skipped'] = ok.astype(int), (~ok).astype(int)
  counted = ACCURACY in metrics
  metrics.sort(key=lambda m: m != ACCURACY)  # accuracy (and its interval) next to the counts
  if counted:
    df['_n_accuracy'] = df[ACCURACY].notna().astype(int)
  keys = list(GROUP_FIELDS)
  agg = {'n': 'sum', 'n_skipped': 'sum', **{m: 'mean' for m in metrics},
         **({'_n_accuracy': 'sum'} if counted else {})}
  out = df[keys + list(agg)].groupby(keys, dropna=False, sort=True).agg(agg).reset_index()
  if counted:
    out = stats.with_interval(out, ACCURACY, '_n_accuracy').drop(columns=['_n_accuracy'])
  return out


class ResultsWriter:
  """Appends per-sample records of one phase to `<output_dir>/<phase>/results.jsonl`."""

  def __init__(self, output_dir: str, phase: str, flags: dict, *, overwrite: bool = False,
               ignore_flags: Iterable[str] = IGNORED_FLAGS,
               key_fields: tuple[str, ...] = KEY_FIELDS, added_flags: dict | None = None):
    """Opens (or resumes) a phase directory.

    Args:
      output_dir: the run's root directory.
      phase: subdirectory name, e.g. 'phase1'.
      flags: the flags that produced the results (JSON-able values).
      overwrite: delete this phase's earlier run.json, results and summary instead of resuming.
      ignore_flags: flags allowed to differ from the saved ones when resuming.
      added_flags: {flag: value} of flags newer than some saved runs (see `differing_flags`).
      key_fields: record fields that identify a sample (see `done_keys`).

    Raises:
      ValueError: the directory holds a run with different flags, or results without run.json.
    """
    self.phase, self.key_fields = phase, tuple(key_fields)
    self.directory = os.path.join(output_dir, phase)
    self.results_path = os.path.join(self.directory, RESULTS_FILE)
    self.summary_path = os.path.join(self.directory, SUMMARY_FILE)
    run_path = os.path.join(self.directory, RUN_FILE)
    os.makedirs(self.directory, exist_ok=True)
    if overwrite:
      for path in (run_path, self.results_path, self.summary_path):
        if os.path.exists(path):
          os.remove(path)
    if os.path.exists(run_path):
      with open(run_path, encoding='utf-8') as f:
        info = json.load(f)
      diff = differing_flags(info.get('flags', {}), flags, ignore_flags, added_flags)
      if diff:
        listed = ', '.join(f'{k}: saved {a!r} != new {b!r}' for k, (a, b) in diff.items())
        raise ValueError(f'{self.directory} holds results of a run with other flags ({listed}). '
                         'Use another --output_dir, or overwrite=True (--overwrite) to discard '
                         'them.')
      info['flags'] = _jsonable(flags)  # ignored flags (e.g. num_samples) may have grown
      info['resumed'] = info.get('resumed', []) + [_now()]
    elif os.path.exists(self.results_path) and os.path.getsize(self.results_path):
      raise ValueError(f'{self.results_path} exists without {RUN_FILE}, so its flags are '
                       'unknown. Move it away, or pass overwrite=True (--overwrite).')
    else:
      info = run_info(flags)
    self.run_info = info
    _atomic_write_json(run_path, info)
    _repair_tail(self.results_path)
    self._records = read_results(self.results_path)
    self._done = {self.key_of(r) for r in self._records}
    self._file = open(self.results_path, 'a', encoding='utf-8')

  def key_of(self, record: dict) -> tuple:
    """The record's key: its `key_fields` values, in order."""
    missing = [k for k in self.key_fields if k not in record]
    if missing:
      raise ValueError(f'Record lacks key fields {missing}; every record needs '
                       f'{self.key_fields}. Got fields {sorted(record)}.')
    return tuple(record[k] for k in self.key_fields)

  def done_keys(self) -> set[tuple]:
    """Keys of finished and skipped samples (tuples in `key_fields` order)."""
    return set(self._done)

  def records(self) -> list[dict]:
    return list(self._records)

  def write(self, record: dict) -> dict:
    """Appends one finished sample (fills `phase` and `status`), flushed and fsynced."""
    record = _jsonable({'phase': self.phase, 'status': 'ok', **record})
    if record['phase'] != self.phase:
      raise ValueError(f"Record phase {record['phase']!r} != writer phase {self.phase!r}.")
    key = self.key_of(record)
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    os.fsync(self._file.fileno())
    self._records.append(record)
    self._done.add(key)
    return record

  def record_skipped(self, key: tuple | dict, reason: str) -> dict:
    """Records that a sample was not run (e.g. longer than the model's context) and why."""
    if not isinstance(key, dict):
      if len(key) != len(self.key_fields):
        raise ValueError(f'Key {key!r} must have one value per key field {self.key_fields}.')
      key = dict(zip(self.key_fields, key))
    return self.write({**key, 'status': 'skipped', 'reason': reason})

  def write_summary(self) -> pd.DataFrame:
    """Writes summary.csv (see `summarize`) and returns it."""
    summary = summarize(self._records)
    summary.to_csv(self.summary_path, index=False)
    return summary

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> 'ResultsWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _atomic_write_json(path: str, obj: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def grid_keys(methods: Iterable[str], tasks: Iterable[str], lengths: Iterable[int],
              budgets: Iterable[int | None], num_samples: int) -> list[tuple]:
  """Every (method, task, length, budget, sample) of a grid, in KEY_FIELDS order."""
  return list(itertools.product(methods, tasks, lengths, budgets, range(num_samples)))


def iter_units(units: Sequence[Any], total: int, desc: str = '',
               disable: bool | None = None,
               size: Callable[[Any], int] = len) -> Iterator[tuple[Any, Any]]:
  """Yields `(unit, advance)` with a tqdm bar over all `total` keys (ETA); a unit holds
  `size(unit)` pending keys (default: a unit is a group of keys).

  The bar starts at the keys already done; `advance(n)` moves it as the caller finishes keys
  of the unit, and whatever the caller did not report is added once the unit is done.
  """
  units = list(units)
  pending = sum(size(u) for u in units)
  with tqdm.tqdm(total=total, initial=total - pending, desc=desc, unit='sample',
                 disable=disable, dynamic_ncols=True) as bar:
    for unit in units:
      moved = [0]

      def advance(n: int = 1, moved=moved):
        moved[0] += n
        bar.update(n)

      yield unit, advance
      bar.update(max(size(unit) - moved[0], 0))


def iter_pending(keys: Iterable[tuple], done: set[tuple], desc: str = '',
                 disable: bool | None = None) -> Iterator[tuple]:
  """Yields the keys not in `done`, with a tqdm bar (ETA) that starts at the done count.

  The bar advances when the caller asks for the next key, i.e. after a sample is finished.
  """
  keys = list(keys)
  units = [[k] for k in keys if k not in done]
  for unit, _ in iter_units(units, len(keys), desc=desc, disable=disable):
    yield unit[0]
