"""Phase 2: budget analysis -- headaware at budgets 2048, 4096, 8192 (plus any --budgets).

  python -m experiments.phase2
  python -m experiments.phase2 --budgets=128,256,512,1024 --lengths=5000   # small-model budgets

`--budgets` adds to the grid's budgets; `full` runs once per (task, length) as the reference.
Writes `<output_dir>/phase2/{run.json,results.jsonl,summary.csv}`.
"""

import dataclasses


from experiments import cli
from experiments import flags as exp_flags
from experiments import grid

PHASE = 'phase2'
BUDGETS = (2048, 4096, 8192)
GRIDS = {
    'default': dict(methods=('full', 'headaware'), lengths=(10000,), tasks=('passkey',),
                    num_samples=2),
    'quick': dict(methods=('full', 'headaware'), lengths=(2000,), tasks=('passkey',),
                  num_samples=2),
    'paper': dict(methods=('full', 'headaware'), lengths=(10000, 20000),
                  tasks=('passkey', 'niah_multikey', 'variable_tracking', 'perplexity'),
                  num_samples=20),
}
GRID_BUDGETS = {'default': BUDGETS, 'quick': (128, 256), 'paper': BUDGETS}


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """`full` once per (task, length); every other method at each budget."""
  return grid.method_cells(settings, settings.budgets)


def run(settings: grid.Settings, **kwargs):
  """The grid's budgets plus `settings.budgets` (sorted, unique), then `grid.run_grid`."""
  extra = settings.budgets or ()
  settings = settings.with_defaults(GRIDS)
  budgets = sorted(set(GRID_BUDGETS[settings.grid]) | set(extra))
  settings = dataclasses.replace(settings, budgets=tuple(budgets))
  return grid.run_grid(PHASE, cells(settings), settings, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  cli.run(main)
