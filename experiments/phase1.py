"""Phase 1: full / h2o / streamingllm / headaware x 2000, 5000, 10000, 20000 tokens.

  python -m experiments.phase1 --budget=4096                 # ~13 min on a 2-core CPU
  python -m experiments.phase1 --budget=4096 --grid=paper    # the seed plan's full grid

Per cell (method, task, length) at one `--budget`: task accuracy (passkey), perplexity
(`pydoc_data.topics` streamed through the cache), real cache bytes, peak RSS, prefill seconds
and decode ms/token. Every cell runs through chunked prefill (`--chunk_size`), so the `full`
baseline at 20,000 tokens fits in CPU memory; lengths past the model's context (8,192 for
SmolLM2) run anyway and their records say `past_context: true`. There the compressed methods
roll their positions (`--position_mode=auto`: keys rotated by their slot in the compacted cache,
so the model never sees a position past its context; `--position_mode=both` adds the
original-position cells as well, the rolled ones labelled `<method>[rolled]`).
Writes `<output_dir>/phase1/{run.json,results.jsonl,summary.csv}`; rerun to resume.
"""

from experiments import cli
from experiments import flags as exp_flags
from experiments import grid

PHASE = 'phase1'
METHODS = ('full', 'h2o', 'streamingllm', 'headaware')
LENGTHS = (2000, 5000, 10000, 20000)
PAPER_TASKS = ('passkey', 'niah_single', 'niah_multikey', 'niah_multivalue',
               'niah_multiquery', 'variable_tracking', 'perplexity')
# Sized from measured wall times on a 2-core CPU: one passkey sample visits all four lengths
# (37k tokens) for all four methods in 12 min 45 s (every on-disk cache empty); adding
# `--tasks=passkey,perplexity` doubles the prefill work (46 min measured before the speed-ups).
GRIDS = {
    'default': dict(methods=METHODS, lengths=LENGTHS, budget=4096, tasks=('passkey',),
                    num_samples=1),
    'quick': dict(methods=METHODS, lengths=(2000,), budget=256,
                  tasks=('passkey', 'perplexity'), num_samples=2),
    'paper': dict(methods=METHODS, lengths=LENGTHS, budget=4096, tasks=PAPER_TASKS,
                  num_samples=20),
}


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """Every (method, task, length) at `settings.budget`; `full` is recorded at budget 0."""
  return grid.method_cells(settings, (settings.budget,))


def run(settings: grid.Settings, **kwargs):
  """Resolves the phase defaults and runs the grid; kwargs go to `grid.run_grid`."""
  settings = settings.with_defaults(GRIDS)
  return grid.run_grid(PHASE, cells(settings), settings, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  cli.run(main)
