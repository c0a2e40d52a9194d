"""Phase 4: the report -- markdown tables and PNG plots from every phase's results.

  python -m experiments.phase4 --output_dir=results     # -> results/report/report.md + PNGs

Reads `<output_dir>/phase{0,1,2,3,5}/results.jsonl` (a phase without results gets a note) and
writes `<output_dir>/report/`: per phase a summary table (means per cell, sample and skipped
counts, accuracy's 95% Wilson interval `ci_low`/`ci_high`), memory / accuracy / decode-speed
vs length (phase 1), accuracy and memory vs budget (phases 0, 2), ablation bars (phase 3),
HAQ-KV accuracy vs cache bytes (Pareto front) and vs effective bits with the bits-per-head
heatmaps (phase 5, `experiments/phase5.py`) and the head-profile heatmap. Accuracies are drawn
with their Wilson intervals as error bars; accuracy and cache-bytes plots have one panel per
task. See `experiments/report.py`.
"""

import os

from absl import app

from experiments import cli
from experiments import flags as exp_flags
from experiments import report

REPORT_DIR = 'report'


def run(output_dir: str) -> str:
  """Renders `<output_dir>/report/report.md`; returns its path."""
  if not os.path.isdir(output_dir):
    raise app.UsageError(f'--output_dir={output_dir!r} does not exist; run a phase first.')
  return report.render_report(output_dir, os.path.join(output_dir, REPORT_DIR))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(f'Wrote {run(exp_flags.settings_from_flags().output_dir)}')


if __name__ == '__main__':
  cli.run(main)
