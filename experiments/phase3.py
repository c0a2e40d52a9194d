"""Phase 3: ablation of headaware at one length and budget, one component at a time.

  python -m experiments.phase3                           # every variant, 5000 tokens, budget 512
  python -m experiments.phase3 --methods=headaware,headaware[uniform] --budget=256

`--methods` picks variants by label (VARIANTS): head-aware allocation vs uniform budgets
(= SnapKV selection) vs a shuffled profile vs roles-only allocation vs per-layer scope; the
sink and observation-window components on/off; GQA reduction mean vs max; `full` as the
reference. Writes `<output_dir>/phase3/{run.json,results.jsonl,summary.csv}`.
"""

from absl import app

from experiments import flags as exp_flags
from experiments import grid
from headkv_jax import methods as methods_lib

PHASE = 'phase3'
# label -> (MethodSpec fields over MethodSpec('headaware', budget), shuffle the profile).
VARIANTS = {
    'full': (dict(name='full', budget=0), False),
    'headaware': ({}, False),
    'headaware[uniform]': (dict(allocation='uniform'), False),
    'headaware[shuffled]': ({}, True),
    'headaware[roles]': (dict(allocation='roles'), False),
    'headaware[layer_scope]': (dict(scope='layer'), False),
    'headaware[sinks=4]': (dict(n_sink=4), False),
    'headaware[window=0]': (dict(window=0), False),
    'headaware[window=8]': (dict(window=8), False),
    'headaware[gqa=max]': (dict(gqa_reduce='max'), False),
}
GRIDS = {
    'default': dict(methods=tuple(VARIANTS), lengths=(5000,), budget=512,
                    tasks=('passkey', 'perplexity'), num_samples=2),
    'quick': dict(methods=tuple(VARIANTS), lengths=(2000,), budget=128,
                  tasks=('passkey',), num_samples=2),
    'paper': dict(methods=tuple(VARIANTS), lengths=(10000,), budget=1024,
                  tasks=('passkey', 'niah_multikey', 'variable_tracking', 'perplexity'),
                  num_samples=20),
}


def variant_cell(label: str, budget: int, task: str, length: int) -> grid.Cell:
  fields, shuffle = VARIANTS[label]
  spec = methods_lib.MethodSpec(**{'name': 'headaware', 'budget': budget, **fields})
  return grid.Cell(label, spec, task, length, spec.budget, shuffle_profile=shuffle)


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """Every chosen variant x task x length at `settings.budget`."""
  grid.check_methods(settings.methods, tuple(VARIANTS))
  return [variant_cell(label, settings.budget, task, length) for label in settings.methods
          for task in settings.tasks for length in settings.lengths]


def run(settings: grid.Settings, **kwargs):
  settings = settings.with_defaults(GRIDS)
  return grid.run_grid(PHASE, cells(settings), settings, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  app.run(main)
