"""Phase 4: markdown tables and PNG plots from every phase's results.jsonl.

  from experiments import report
  report.render_report('results/', 'results/report')   # -> results/report/report.md

Reads `<results_dir>/<phase>/results.jsonl` for each phase in PHASES; a phase without results
gets a one-line note. Plots (matplotlib Agg, no pyplot state): memory and accuracy vs length
(phase 1), accuracy and memory vs budget (phases 0, 2, 5), ablation bars (phase 3), accuracy
vs cache bytes (phase 5). A head-profile heatmap is linked when a record or a run.json names
an existing PNG under one of PROFILE_KEYS. Tables are written by `markdown_table`
(pandas' `to_markdown` needs `tabulate`, which is not a dependency).
"""

import dataclasses
import datetime
import json
import math
import os

from matplotlib import figure
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
    kind: 'line', 'bar' or 'scatter'.
    log_y: log-scale y axis (bytes).
  """
  phase: str
  x: str
  y: str
  kind: str = 'line'
  log_y: bool = False

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
    Plot('phase5', 'cache_bytes', 'accuracy', kind='scatter'),
)


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
  needed = {plot.x, plot.y, 'method'}
  if not needed <= set(df.columns):
    return False
  df = df[list(needed)].copy()
  df[plot.y] = pd.to_numeric(df[plot.y], errors='coerce')
  df = df.dropna(subset=[plot.y])
  if plot.kind != 'bar':
    df[plot.x] = pd.to_numeric(df[plot.x], errors='coerce')
    df = df.dropna(subset=[plot.x])
  if df.empty:
    return False
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
    lines += [line + '\n' for line in _profile_links(results_dir, phase, records, out_dir)]
  report_path = os.path.join(out_dir, 'report.md')
  with open(report_path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines).rstrip() + '\n')
  return report_path
