"""Every phase in order (0, 1, 2, 3, 5, then the phase-4 report), with one loaded model.

  python -m experiments.run_all --quick          # CPU-sized grid, ~10-15 min on 2 cores
  python -m experiments.run_all                  # each phase's default grid (hours)
  python -m experiments.run_all --grid=paper     # the seed plan's grid

Shared flags (experiments/flags.py) apply to every phase: `--lengths=1000` shortens all of
them. `--methods` is refused here (the phases name methods differently; run a phase alone).
Writes `<output_dir>/phase{0,1,2,3,5}/` and `<output_dir>/report/report.md`.
"""

from absl import app
from absl import flags

from experiments import cli
from experiments import flags as exp_flags
from experiments import grid
from experiments import phase0
from experiments import phase1
from experiments import phase2
from experiments import phase3
from experiments import phase4
from experiments import phase5

_QUICK = flags.DEFINE_bool('quick', False, "Same as --grid=quick: a grid of minutes.")
PHASES = {'phase0': phase0, 'phase1': phase1, 'phase2': phase2, 'phase3': phase3,
          'phase5': phase5}


def run(settings: grid.Settings, *, runner=None, tokenizer=None, progress=None) -> str:
  """Runs phases 0-3 and 5 on one model, then renders the report; returns report.md's path."""
  if settings.methods is not None:
    raise app.UsageError('run_all takes no --methods (each phase has its own); run '
                         f'a phase alone, e.g. `python -m experiments.phase1 --methods='
                         f'{",".join(settings.methods)}`.')
  if runner is None:
    runner, tokenizer = grid.load_model(settings)
  for name, module in PHASES.items():
    summary = module.run(settings, runner=runner, tokenizer=tokenizer, progress=progress)
    grid.print_summary(name, summary, settings.output_dir)
  return phase4.run(settings.output_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  overrides = {}
  if _QUICK.value:
    if flags.FLAGS.grid not in ('default', 'quick'):
      raise app.UsageError(f'--quick contradicts --grid={flags.FLAGS.grid}.')
    overrides['grid'] = 'quick'
  settings = exp_flags.settings_from_flags(**overrides)
  print(f'Wrote {run(settings)}')


if __name__ == '__main__':
  cli.run(main)
