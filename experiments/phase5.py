"""Phase 5: HAQ-KV -- per-KV-head storage bits x head-aware budgets (accuracy vs bytes).

  python -m experiments.phase5                                   # the default grid (below)
  python -m experiments.phase5 --grid=quick                      # minutes on a CPU
  python -m experiments.phase5 --schemes=16,4/2,kivi2,roles,avg:3 --budgets=256
  python -m experiments.phase5 --lengths=2000,4000 --tasks=niah_single --num_samples=20 \\
      --seed=1 --chunk_size=4096 --max_new_tokens=12 --shared_prefill   # one prefill a sample

Every method of `--methods` (default `full`, `headaware`) runs at every `--kv_bits` scheme of
`--schemes` (default SCHEMES: uniform 16/8/4/2-bit, KIVI-2, role-based bits, average-bit
targets 3 and 4; forms in `headkv_jax.bits`); `full` once per (task, length) at budget 0 (the
KIVI-style baseline: quantized, nothing evicted), every other method at each of `--budgets`
(default 512, 256, 128). A cell's label is `<method>[kv_bits=<scheme>]`, e.g.
`headaware[kv_bits=roles]`, `full[kv_bits=8]`; the records carry `cache_bytes`,
`effective_bits` and `head_bits` (per layer and KV head: key and value bits), which phase 4
plots as accuracy vs cache bytes (with the Pareto front), accuracy vs effective bits and the
bits-per-head heatmaps. `--kv_bits` is not used here (the schemes are the sweep). Resumable
like every phase. Writes `<output_dir>/phase5/{run.json,results.jsonl,summary.csv}`.
"""

import dataclasses
import logging

from absl import app

from experiments import cli
from experiments import flags as exp_flags
from experiments import grid
from headkv_jax import methods as methods_lib

PHASE = 'phase5'
SCHEMES = ('16', '8', '4', '2', 'kivi2', 'roles', 'avg:3', 'avg:4')
BUDGETS = (512, 256, 128)
METHODS = ('full', 'headaware')
GRIDS = {
    'default': dict(methods=METHODS, lengths=(2000, 4000), budgets=BUDGETS,
                    tasks=('niah_single', 'perplexity'), num_samples=2, schemes=SCHEMES),
    'quick': dict(methods=METHODS, lengths=(2000,), budgets=(128,), tasks=('niah_single',),
                  num_samples=2, schemes=('16', '4', 'roles')),
    'paper': dict(methods=METHODS, lengths=(2000, 4000), budgets=BUDGETS,
                  tasks=('niah_single', 'perplexity'), num_samples=20, schemes=SCHEMES),
}


def label(method: str, scheme: str) -> str:
  """A cell's `method` label: `headaware[kv_bits=4/2]`."""
  return f'{method}[kv_bits={scheme}]'


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """Every method x scheme x task x length; `full` at budget 0, others at each budget."""
  grid.check_methods(settings.methods, methods_lib.METHODS)
  out = []
  for method in settings.methods:
    for scheme in settings.schemes:
      for budget in ((0,) if method == 'full' else settings.budgets):
        try:
          spec = methods_lib.MethodSpec(method, budget, kv_bits=scheme)
        except ValueError as e:
          raise app.UsageError(f'{label(method, scheme)} at budget {budget}: {e}') from e
        out += [grid.Cell(label(method, scheme), spec, task, length, budget)
                for task in settings.tasks for length in settings.lengths]
  return out


def run(settings: grid.Settings, **kwargs):
  """The grid's defaults for unset fields, then `grid.run_grid` over `cells`."""
  if settings.kv_bits != grid.ADDED_FLAGS['kv_bits']:
    logging.warning('phase5 sweeps --schemes; --kv_bits=%s is not used here.',
                    settings.kv_bits)
    settings = dataclasses.replace(settings, kv_bits=grid.ADDED_FLAGS['kv_bits'])
  settings = settings.with_defaults(GRIDS)
  return grid.run_grid(PHASE, cells(settings), settings, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  cli.run(main)
