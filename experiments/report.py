"""Phase 4: markdown tables and PNG plots from every phase's results.jsonl.

  from experiments import report
  report.render_report('results/', 'results/report')   # -> results/report/report.md

Reads `<results_dir>/<phase>/results.jsonl` for each phase in PHASES; a phase without results
gets a one-line note. Plots (matplotlib Agg, no pyplot state): memory and accuracy vs length
(phase 1), accuracy and memory vs budget (phases 0, 2, 5), ablation bars (phase 3), accuracy
vs cache bytes and vs effective bits with their Pareto fronts (phase 5), and a bits-per-head
heatmap (layers x KV heads, key and value bits) of the first record per method that carries
`head_bits`. A head-profile heatmap is linked when a record or a run.json names an existing
PNG under one of PROFILE_KEYS. Tables are written by `markdown_table`
(pandas' `to_markdown` needs `tabulate`, which is not a dependency).
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
import numpy as np
import pandas as pd

from experiments import results

PHASES = {
    'phase0': 'Oracle ceiling',
    'phase1': 'Long sequences: methods x lengths',
    'phase2': 'Budget analysis',
    'phase3': 'Ablation',
    'phase5': 'HAQ-KV: heterogeneous quantization',
}
PROFILE_KEYS = ('head_profile_png', 'profile_heatmap_png')


@dataclasses.dataclass(frozen=True)
class Plot:
  """A plot of mean `y` against `x`, one line (or bar) per method.

  Attributes:
    phase: phase whose records it draws.
    x: record field on the x axis (for bars: the field naming the bars).
    y: metric on the y axis.
    kind: 'line', 'bar', 'scatter' or 'pareto' (one point per (method, budget) cell at its
      mean x and y, marker by budget, and the front of cells no other beats on both: less x,
      more y).
    log_y: log-scale y axis (bytes).
    log_x: log-scale x axis.
  """
  phase: str
  x: str
  y: str
  kind: str = 'line'
  log_y: bool = False
  log_x: bool = False

  @property
  def filename(self) -> str:
    return f'{self.phase}_{self.y}_vs_{self.x}.png'


PLOTS = (
    Plot('phase1', 'length', 'cache_bytes', log_y=True),
    Plot('phase1', 'length', 'accuracy'),
    Plot('phase1', 'length', 'peak_rss_bytes', log_y=True),
    Plot('phase1', 'length', 'decode_ms_per_token'),
    Plot('phase0', 'budget', 'accuracy'),
    Plot('phase2', 'budget', 'accuracy'),
    Plot('phase2', 'budget', 'cache_bytes', log_y=True),
    Plot('phase3', 'method', 'accuracy', kind='bar'),
    Plot('phase5', 'budget', 'accuracy'),
    Plot('phase5', 'cache_bytes', 'accuracy', kind='pareto', log_x=True),
    Plot('phase5', 'effective_bits', 'accuracy', kind='pareto'),
)
HEAD_BITS = 'head_bits'  # record field: [layers][KV heads][key bits, value bits]
_BIT_CLASSES = (2, 4, 8, 16)
_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', 'h', '<', '>')
_KV_BITS_LABEL = re.compile(r'^(.*)\[kv_bits=(.*)\]$')


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


def _draw(plot: Plot, df: pd.DataFrame, path: str) -> bool:
  """Draws `plot` from finished records; False when the data lacks its fields."""
  needed = {plot.x, plot.y, 'method'} | ({'budget'} if plot.kind == 'pareto' else set())
  if not needed <= set(df.columns):
    return False
  df = df[list(needed)].copy()
  df[plot.y] = pd.to_numeric(df[plot.y], errors='coerce')
  df = df.dropna(subset=[plot.y])
  if plot.kind != 'bar':
    df[plot.x] = pd.to_numeric(df[plot.x], errors='coerce')
    df = df.dropna(subset=[plot.x])
  if plot.log_x:
    df = df[df[plot.x] > 0]
  if df.empty:
    return False
  if plot.kind == 'pareto':
    _draw_pareto(plot, df, path)
    return True
  fig = figure.Figure(figsize=(6.4, 4.2), dpi=100, layout='tight')
  ax = fig.subplots()
  if plot.kind == 'bar':
    means = df.groupby('method')[plot.y].mean().sort_values()
    ax.bar(means.index.astype(str), means.values, color='tab:blue')
    ax.tick_params(axis='x', labelrotation=30)
  else:
    for method, group in df.groupby('method'):
      means = group.groupby(plot.x)[plot.y].mean().sort_index()
      style = 'o' if plot.kind == 'scatter' else 'o-'
      ax.plot(means.index, means.values, style, label=str(method))
    ax.legend(fontsize='small')
    ax.set_xlabel(plot.x)
  if plot.log_y:
    ax.set_yscale('log')
  ax.set_ylabel(plot.y)
  ax.set_title(f'{plot.phase}: {plot.y} vs {plot.x} (mean over samples and tasks)')
  ax.grid(alpha=0.3)
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


def _draw_pareto(plot: Plot, df: pd.DataFrame, path: str) -> None:
  """Mean (x, y) per (method, budget) cell: colour by method, marker by budget, the front."""
  cells = df.groupby(['method', 'budget'])[[plot.x, plot.y]].mean().reset_index()
  labels = sorted(cells['method'].astype(str).unique())
  budgets = sorted(cells['budget'].unique())
  cmap = colormaps['tab20' if len(labels) > 10 else 'tab10']
  fig = figure.Figure(figsize=(8.8, 4.8), dpi=100, layout='constrained')
  ax = fig.subplots()
  for k, method in enumerate(labels):
    rows = cells[cells['method'].astype(str) == method]
    color = cmap(k % cmap.N)
    for _, row in rows.iterrows():
      marker = _MARKERS[budgets.index(row['budget']) % len(_MARKERS)]
      ax.plot(row[plot.x], row[plot.y], marker, color=color, markersize=7,
              markeredgecolor='black', markeredgewidth=0.5)
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
  ax.set_title(f'{plot.phase}: {plot.y} vs {plot.x} per (method, budget)', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  fig.savefig(path)


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


def _summary_table(records: list[dict]) -> str:
  summary = results.summarize(records).drop(columns=['phase'])
  summary = summary.dropna(axis=1, how='all')
  return markdown_table(summary)


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
    lines += [f'{len(records)} records.', '', _summary_table(records), '']
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
