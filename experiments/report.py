"""Phase 4: markdown tables and PNG plots from every phase's results.jsonl.

  from experiments import report
  report.render_report('results/', 'results/report')   # -> results/report/report.md

Reads `<results_dir>/<phase>/results.jsonl` for each phase in PHASES; a phase without results
gets a one-line note. Tables give each cell's sample count `n` and, for accuracy, its 95%
Wilson score interval (`ci_low`, `ci_high`; `experiments/stats.py`). Plots (matplotlib Agg,
no pyplot state): memory and accuracy vs length (phase 1), accuracy and memory vs budget
(phases 0, 2, 5), ablation bars (phase 3, horizontal, `full` first), accuracy vs cache bytes
and vs effective bits with their Pareto fronts (phase 5), and a bits-per-head heatmap (layers
x KV heads, key and value bits) of the first record per method that carries `head_bits`.
Every accuracy is drawn with its Wilson interval as error bars. Accuracy and cache-bytes plots
have one panel per task: a generation task's `cache_bytes` is its decode-time cache (re-packed
after prefill), a perplexity record's the cache it streamed through (never re-packed: a
compressed one holds its budgets plus one prefill chunk), so the two are never averaged
together. A head-profile heatmap is linked when a record or a run.json names an existing PNG
under one of PROFILE_KEYS. Tables are written by `markdown_table` (pandas' `to_markdown` needs
`tabulate`, which is not a dependency).
"""

import dataclasses
import datetime
import json
import math
import os
import re

from matplotlib import colormaps
from matplotlib import colors
from matplotlib import figure
from matplotlib import transforms
import numpy as np
import pandas as pd

from experiments import results
from experiments import stats

PHASES = {
    'phase0': 'Oracle ceiling',
    'phase1': 'Long sequences: methods x lengths',
    'phase2': 'Budget analysis',
    'phase3': 'Ablation',
    'phase5': 'HAQ-KV: heterogeneous quantization',
}
PROFILE_KEYS = ('head_profile_png', 'profile_heatmap_png')
PERPLEXITY_TASK = 'perplexity'  # = grid.PERPLEXITY_TASK (not imported: the report needs no jax)
# Metrics drawn with their 95% Wilson interval (proportions in [0, 1]).
INTERVAL_METRICS = (results.ACCURACY,)
# What a record's `cache_bytes` measured (experiments/evaluate.py), per kind of task: a
# generation task's final cache, re-packed for decoding (budgets + one slot); perplexity's
# cache after streaming the document, never re-packed (compressed caches: budgets + a chunk).
CACHE_BYTES_HELD = {
    'generation': 'decode-time cache (re-packed after prefill)',
    PERPLEXITY_TASK: 'cache while streaming (not re-packed)',
}


@dataclasses.dataclass(frozen=True)
class Plot:
  """A plot of mean `y` against `x`, one line (or bar) per method.

  Attributes:
    phase: phase whose records it draws.
    x: record field on the x axis (for bars: the field naming the bars).
    y: metric on the y axis; one of INTERVAL_METRICS gets 95% Wilson error bars.
    kind: 'line', 'bar' (horizontal, one per method, `full` on top), 'scatter' or 'pareto'
      (one point per (method, budget) cell at its mean x and y, marker by budget, and the
      front of cells no other beats on both: less x, more y).
    log_y: log-scale y axis (bytes).
    log_x: log-scale x axis.
    by_task: one panel per task that carries `y` (else means pool the tasks).
  """
  phase: str
  x: str
  y: str
  kind: str = 'line'
  log_y: bool = False
  log_x: bool = False
  by_task: bool = False

  @property
  def filename(self) -> str:
    return f'{self.phase}_{self.y}_vs_{self.x}.png'

  @property
  def has_interval(self) -> bool:
    return self.y in INTERVAL_METRICS


PLOTS = (
    Plot('phase1', 'length', 'cache_bytes', log_y=True, by_task=True),
    Plot('phase1', 'length', 'accuracy', by_task=True),
    Plot('phase1', 'length', 'peak_rss_bytes', log_y=True),
    Plot('phase1', 'length', 'decode_ms_per_token'),
    Plot('phase0', 'budget', 'accuracy', by_task=True),
    Plot('phase2', 'budget', 'accuracy', by_task=True),
    Plot('phase2', 'budget', 'cache_bytes', log_y=True, by_task=True),
    Plot('phase3', 'method', 'accuracy', kind='bar', by_task=True),
    Plot('phase5', 'budget', 'accuracy', by_task=True),
    Plot('phase5', 'cache_bytes', 'accuracy', kind='pareto', log_x=True),
    Plot('phase5', 'effective_bits', 'accuracy', kind='pareto'),
)
HEAD_BITS = 'head_bits'  # record field: [layers][KV heads][key bits, value bits]
_BIT_CLASSES = (2, 4, 8, 16)
_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', 'h', '<', '>')
_KV_BITS_LABEL = re.compile(r'^(.*)\[kv_bits=(.*)\]$')
_DODGE_POINTS = 3.0  # horizontal shift between methods' error bars in a line plot


def short_label(method: str) -> str:
  """A plot label: 'headaware[kv_bits=4/2]' -> 'headaware 4/2'; others unchanged."""
  match = _KV_BITS_LABEL.match(str(method))
  return f'{match.group(1)} {match.group(2)}' if match else str(method)


def _cell(value, floatfmt: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  if isinstance(value, float):
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else format(value,
                                                                                    floatfmt)
  return str(value).replace('|', '\\|').replace('\n', ' ')


def markdown_table(df: pd.DataFrame, floatfmt: str = '.4g') -> str:
  """A GitHub markdown table; numbers right-aligned, NaN/None as empty cells."""
  cols = [str(c) for c in df.columns]
  rows = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False)]
  numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
  lines = ['| ' + ' | '.join(cols) + ' |',
           '|' + '|'.join('---:' if n else ':---' for n in numeric) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def _ok_frame(records: list[dict]) -> pd.DataFrame:
  df = pd.DataFrame(records)
  if 'status' in df:
    df = df[df['status'].fillna('ok').eq('ok')]
  return df


def _is_full(label: str) -> bool:
  return label == 'full' or label.startswith('full[')


def method_order(labels) -> list[str]:
  """Unique method labels for legends and bars: `full` (and `full[...]`) first, the rest in
  order of first appearance (the order the run listed its cells, e.g. phase 3's VARIANTS)."""
  seen = list(dict.fromkeys(str(m) for m in labels))
  return sorted(seen, key=lambda m: not _is_full(m))  # stable: keeps appearance order


def cell_stats(df: pd.DataFrame, keys: list[str], y: str) -> pd.DataFrame:
  """Mean `y` per `keys` cell and its sample count `n`; for INTERVAL_METRICS also the 95%
  Wilson bounds `ci_low`, `ci_high` (`stats.with_interval`). Cells in `keys` order."""
  cells = (df.groupby(keys, sort=True)[y].agg(['mean', 'count']).reset_index()
           .rename(columns={'mean': y, 'count': 'n'}))
  return stats.with_interval(cells, y, 'n') if y in INTERVAL_METRICS else cells


def error_bars(cells: pd.DataFrame, y: str) -> np.ndarray:
  """Asymmetric errors `[mean - ci_low, ci_high - mean]` ([2, cells]; 0 where unknown)."""
  mean = cells[y].to_numpy(np.float64)
  err = np.stack([mean - cells[stats.LOW].to_numpy(np.float64),
                  cells[stats.HIGH].to_numpy(np.float64) - mean])
  return np.clip(np.nan_to_num(err), 0.0, None)


def _panel_title(plot: Plot, task) -> str:
  """A panel's task, and for cache bytes what that task's records measured."""
  if task is None:
    return ''
  if plot.y != 'cache_bytes':
    return str(task)
  held = CACHE_BYTES_HELD[PERPLEXITY_TASK if task == PERPLEXITY_TASK else 'generation']
  return f'{task}\n{held}'


def _plot_data(plot: Plot, df: pd.DataFrame) -> pd.DataFrame | None:
  """The finished records `plot` draws (numeric y, and x unless bars), or None if none."""
  needed = {plot.x, plot.y, 'method'} | ({'budget'} if plot.kind == 'pareto' else set())
  if not needed <= set(df.columns):
    return None
  df = df[sorted(needed | ({'task'} & set(df.columns)))].copy()
  df['method'] = df['method'].astype(str)
  df[plot.y] = pd.to_numeric(df[plot.y], errors='coerce')
  df = df.dropna(subset=[plot.y])
  if plot.kind != 'bar':
    df[plot.x] = pd.to_numeric(df[plot.x], errors='coerce')
    df = df.dropna(subset=[plot.x])
  if plot.log_x:
    df = df[df[plot.x] > 0]
  return None if df.empty else df


def _panels(plot: Plot, df: pd.DataFrame) -> list[tuple]:
  """`(task, records)` per panel: each task carrying y (in first-appearance order), or one
  `(None, all records)` panel."""
  if not plot.by_task or 'task' not in df:
    return [(None, df)]
  tasks = list(dict.fromkeys(df['task'].astype(str)))
  return [(task, df[df['task'].astype(str) == task]) for task in tasks]


def _draw_lines(fig: figure.Figure, ax, plot: Plot, df: pd.DataFrame) -> None:
  """One line per method of mean y per x; Wilson error bars (methods dodged a few points
  apart, the data unchanged) for INTERVAL_METRICS."""
  labels = method_order(df['method'])
  style = 'o' if plot.kind == 'scatter' else 'o-'
  for k, method in enumerate(labels):
    cells = cell_stats(df[df['method'] == method], [plot.x], plot.y)
    if plot.has_interval:
      shift = transforms.offset_copy(ax.transData, fig=fig, units='points',
                                     x=(k - (len(labels) - 1) / 2) * _DODGE_POINTS)
      ax.errorbar(cells[plot.x], cells[plot.y], yerr=error_bars(cells, plot.y), fmt=style,
                  capsize=3, label=short_label(method), transform=shift)
      ax.update_datalim(cells[[plot.x, plot.y]].to_numpy(np.float64))  # shifted: not counted
    else:
      ax.plot(cells[plot.x], cells[plot.y], style, label=short_label(method))
  ax.autoscale_view()
  if plot.has_interval:
    ax.set_ylim(-0.05, 1.05)
  ax.legend(fontsize='small')
  ax.set_xlabel(plot.x)
  ax.set_ylabel(plot.y)


def _draw_bars(ax, plot: Plot, df: pd.DataFrame) -> None:
  """Horizontal bars of mean y per method (`full` on top, then appearance order), labelled
  with their sample counts; Wilson error bars for INTERVAL_METRICS."""
  labels = method_order(df['method'])
  cells = cell_stats(df, ['method'], plot.y).set_index('method').loc[labels].reset_index()
  pos = np.arange(len(labels))
  xerr = error_bars(cells, plot.y) if plot.has_interval else None
  ax.barh(pos, cells[plot.y], xerr=xerr, color='tab:blue', capsize=3,
          error_kw=dict(ecolor='black', elinewidth=1))
  ax.set_yticks(pos, [f'{short_label(m)} (n={n})' for m, n in zip(labels, cells['n'])],
                fontsize=8)
  ax.invert_yaxis()  # the first label on top
  if plot.has_interval:
    ax.set_xlim(0, 1.05)
  ax.set_xlabel(plot.y)


def _panel_axes(plot: Plot, panels: int, bars: int) -> tuple[figure.Figure, list]:
  """A figure of `panels` axes (up to 3 a row), sized for `bars` bars in a bar panel."""
  ncols = min(panels, 3)
  nrows = math.ceil(panels / ncols)
  if plot.kind == 'bar':
    size = (max(6.4, 4.2 * ncols), nrows * max(2.6, 0.32 * bars + 1.4))
  else:
    size = (6.4 if panels == 1 else 4.6 * ncols, 4.2 * nrows)
  fig = figure.Figure(figsize=size, dpi=100, layout='constrained')
  axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
  for ax in axes[panels:]:
    ax.set_visible(False)
  return fig, list(axes[:panels])


def plot_figure(plot: Plot, df: pd.DataFrame) -> figure.Figure | None:
  """The figure of `plot` from finished records (`_ok_frame`); None when they lack its
  fields. Axes: one per panel (`Plot.by_task`), in task order."""
  df = _plot_data(plot, df)
  if df is None:
    return None
  if plot.kind == 'pareto':
    return _pareto_figure(plot, df)
  panels = _panels(plot, df)
  fig, axes = _panel_axes(plot, len(panels), df['method'].nunique())
  for ax, (task, part) in zip(axes, panels):
    if plot.kind == 'bar':
      _draw_bars(ax, plot, part)
    else:
      _draw_lines(fig, ax, plot, part)
    if plot.log_y:
      ax.set_yscale('log')
    ax.set_title(_panel_title(plot, task), fontsize=9)
    ax.grid(alpha=0.3)
  pooled = 'samples' if len(panels) > 1 or panels[0][0] is not None else 'samples and tasks'
  bars = '; error bars: 95% Wilson interval' if plot.has_interval else ''
  fig.suptitle(f'{plot.phase}: {plot.y} vs {plot.x} (mean over {pooled}{bars})', fontsize=10)
  return fig


def _draw(plot: Plot, df: pd.DataFrame, path: str) -> bool:
  """Saves `plot_figure(plot, df)` to `path`; False (nothing written) when it is None."""
  fig = plot_figure(plot, df)
  if fig is None:
    return False
  fig.savefig(path)
  return True


def pareto_front(x, y) -> np.ndarray:
  """Indices of the points no other point beats (x <= and y >=, one strictly), by x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  order = np.lexsort((-y, x))  # by x, the best y first among equal x
  front, best = [], -np.inf
  for i in order:
    if y[i] > best:
      front.append(i)
      best = y[i]
  return np.asarray(front, np.int64)


def _pareto_figure(plot: Plot, df: pd.DataFrame) -> figure.Figure:
  """Mean (x, y) per (method, budget) cell: colour by method, marker by budget, Wilson error
  bars on y for INTERVAL_METRICS, and the front."""
  cells = df.groupby(['method', 'budget'])[[plot.x, plot.y]].mean().reset_index()
  cells['n'] = df.groupby(['method', 'budget'])[plot.y].count().to_numpy()
  if plot.has_interval:
    cells = stats.with_interval(cells, plot.y, 'n')
  labels = method_order(sorted(cells['method'].astype(str).unique()))
  budgets = sorted(cells['budget'].unique())
  cmap = colormaps['tab20' if len(labels) > 10 else 'tab10']
  fig = figure.Figure(figsize=(8.8, 4.8), dpi=100, layout='constrained')
  ax = fig.subplots()
  for k, method in enumerate(labels):
    rows = cells[cells['method'].astype(str) == method]
    color = cmap(k % cmap.N)
    for i in range(len(rows)):
      row = rows.iloc[i:i + 1]
      marker = _MARKERS[budgets.index(row['budget'].iloc[0]) % len(_MARKERS)]
      yerr = error_bars(row, plot.y) if plot.has_interval else None
      ax.errorbar(row[plot.x], row[plot.y], yerr=yerr, fmt=marker, color=color, markersize=7,
                  markeredgecolor='black', markeredgewidth=0.5, capsize=2, elinewidth=0.8)
    ax.plot([], [], 'o', color=color, label=short_label(method))  # one legend entry
  front = pareto_front(cells[plot.x], cells[plot.y])
  ax.plot(cells[plot.x].to_numpy()[front], cells[plot.y].to_numpy()[front], '-',
          color='black', linewidth=1, alpha=0.6, zorder=0, label='Pareto front')
  fig.legend(*ax.get_legend_handles_labels(), loc='outside right upper', fontsize='x-small',
             title='method bits', title_fontsize='small')
  handles = [ax.plot([], [], _MARKERS[i % len(_MARKERS)], color='gray',
                     markeredgecolor='black', markeredgewidth=0.5)[0]
             for i in range(len(budgets))]
  fig.legend(handles, ['full' if b == 0 else f'{b:g}' for b in budgets],
             loc='outside right lower', fontsize='x-small', title='budget',
             title_fontsize='small')
  if plot.log_x:
    ax.set_xscale('log')
  ax.set_xlabel(plot.x + (' (log)' if plot.log_x else ''))
  ax.set_ylabel(plot.y)
  bars = ', 95% Wilson interval' if plot.has_interval else ''
  ax.set_title(f'{plot.phase}: {plot.y} vs {plot.x} per (method, budget){bars}', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  return fig


def _head_bits(value) -> np.ndarray | None:
  """A record's head_bits as int [layers, Hkv, 2], or None when it is not one."""
  try:
    bits = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None
  if bits.ndim != 3 or bits.shape[-1] != 2 or not bits.size or np.isnan(bits).any():
    return None
  return bits.astype(np.int64)


def draw_head_bits(records: list[dict], path: str, title: str = '') -> bool:
  """Bits-per-head heatmaps: per method label (its first record with `head_bits`), one
  panel of layers x [key bits of each KV head | value bits of each KV head]. False if none."""
  first = {}
  for r in records:
    bits = _head_bits(r.get(HEAD_BITS))
    if bits is not None and str(r.get('method')) not in first:
      first[str(r.get('method'))] = bits
  if not first:
    return False
  n = len(first)
  ncols = min(n, 6)
  nrows = math.ceil(n / ncols)
  layers = max(b.shape[0] for b in first.values())
  heads = max(b.shape[1] for b in first.values())
  width = max(1.7, 0.32 * 2 * heads + 0.7)
  height = max(2.4, 0.11 * layers + 1.1)
  fig = figure.Figure(figsize=(ncols * width + 1.2, nrows * height + 0.6), dpi=100,
                      layout='constrained')
  axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
  cmap = colors.ListedColormap(['#d7301f', '#fc8d59', '#91bfdb', '#4575b4'])
  norm = colors.BoundaryNorm(np.arange(len(_BIT_CLASSES) + 1) - 0.5, cmap.N)
  image = None
  for ax, (method, bits) in zip(axes, first.items()):
    h = bits.shape[1]
    grid = np.concatenate([bits[..., 0], bits[..., 1]], axis=1)  # [layers, 2 Hkv]
    index = np.searchsorted(_BIT_CLASSES, np.clip(grid, 2, 16))
    image = ax.imshow(index, aspect='auto', cmap=cmap, norm=norm, interpolation='nearest')
    ax.axvline(h - 0.5, color='white', linewidth=2)
    ticks = [f'K{i}' for i in range(h)] + [f'V{i}' for i in range(h)]
    ax.set_xticks(range(2 * h), ticks, fontsize=6, rotation=90 if h > 4 else 0)
    ax.tick_params(axis='y', labelsize=6)
    ax.set_title(short_label(method), fontsize=8)
    ax.set_xlabel('KV head (keys | values)', fontsize=7)
    ax.set_ylabel('layer', fontsize=7)
  for ax in axes[n:]:
    ax.set_visible(False)
  bar = fig.colorbar(image, ax=list(axes[:n]), ticks=range(len(_BIT_CLASSES)), shrink=0.8)
  bar.ax.set_yticklabels([f'{b} bits' for b in _BIT_CLASSES], fontsize=7)
  fig.suptitle(title or 'bits per KV head', fontsize=10)
  fig.savefig(path)
  return True


def _profile_links(results_dir: str, phase: str, records: list[dict], out_dir: str) -> list[str]:
  """Markdown image links to head-profile heatmaps named in run.json or the records."""
  phase_dir = os.path.join(results_dir, phase)
  sources = list(records)
  run_path = os.path.join(phase_dir, results.RUN_FILE)
  if os.path.exists(run_path):
    with open(run_path, encoding='utf-8') as f:
      run = json.load(f)
    sources += [run, run.get('flags', {})]
  paths = {s[k] for s in sources for k in PROFILE_KEYS if isinstance(s.get(k), str)}
  lines = []
  for path in sorted(paths):
    found = next((p for p in (path, os.path.join(phase_dir, path),
                              os.path.join(results_dir, path)) if os.path.isfile(p)), None)
    if found is None:
      lines.append(f'_Head profile heatmap `{path}` is listed but missing._')
    else:
      lines.append(f'![head profile]({os.path.relpath(found, out_dir)})')
  return lines


INTERVAL_NOTE = ('`n`: finished samples of the cell; `ci_low`, `ci_high`: the 95% Wilson score '
                 'interval of `accuracy` over them (empty where a cell has no accuracy); the '
                 'accuracy plots draw it as error bars.')


def _summary_table(records: list[dict]) -> list[str]:
  """The phase's summary table (`results.summarize`, all-empty columns dropped) and, when it
  has accuracy intervals, the line that explains them."""
  summary = results.summarize(records).drop(columns=['phase'])
  summary = summary.dropna(axis=1, how='all')
  note = ['', INTERVAL_NOTE] if stats.LOW in summary else []
  return [markdown_table(summary), *note]


def render_report(results_dir: str, out_dir: str | None = None) -> str:
  """Writes report.md and PNG plots to `out_dir` (default `<results_dir>/report`).

  Returns:
    The path of report.md.
  """
  out_dir = out_dir or os.path.join(results_dir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  lines = ['# headkv-jax results', '',
           f'Results from `{os.path.abspath(results_dir)}`, rendered {now}.', '']
  for phase, title in PHASES.items():
    lines += [f'## {phase}: {title}', '']
    path = os.path.join(results_dir, phase, results.RESULTS_FILE)
    records = results.read_results(path)
    if not records:
      lines += [f'_No results in `{path}`; phase skipped._', '']
      continue
    lines += [f'{len(records)} records.', '', *_summary_table(records), '']
    frame = _ok_frame(records)
    for plot in (p for p in PLOTS if p.phase == phase):
      if _draw(plot, frame, os.path.join(out_dir, plot.filename)):
        lines += [f'![{plot.y} vs {plot.x}]({plot.filename})', '']
    heatmap = f'{phase}_{HEAD_BITS}.png'
    if draw_head_bits(frame.to_dict('records'), os.path.join(out_dir, heatmap),
                      f'{phase}: bits per KV head (first record per method)'):
      lines += [f'![bits per head]({heatmap})', '']
    lines += [line + '\n' for line in _profile_links(results_dir, phase, records, out_dir)]
  report_path = os.path.join(out_dir, 'report.md')
  with open(report_path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines).rstrip() + '\n')
  return report_path
