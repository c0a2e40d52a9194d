"""Phase 3: ablation of headaware at one length and budget, one component at a time.

  python -m experiments.phase3                           # every variant, 5000 tokens, budget 512
  python -m experiments.phase3 --methods=headaware,headaware[uniform] --budget=256

`--methods` picks variants by label (VARIANTS, or combinations such as
`headaware[pool_kernel=7,sinks=0]`, see `parse_variant`): head-aware allocation vs uniform budgets
(= SnapKV selection) vs a shuffled profile vs roles-only allocation vs per-layer scope; the
sink and observation-window components on/off; GQA reduction mean vs max; the SnapKV pooling
kernel; the profile score the budgets follow; the share of the budget split by score; `full`
as the reference. `--kv_bits` stores every variant at those bits unless its label sets
`kv_bits` (`headaware[kv_bits=roles]`). Writes
`<output_dir>/phase3/{run.json,results.jsonl,summary.csv}`.
"""

from absl import app

from experiments import cli
from experiments import flags as exp_flags
from experiments import grid
from experiments import labels
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
    'headaware[sinks=0]': (dict(n_sink=0), False),
    'headaware[window=0]': (dict(window=0), False),
    'headaware[window=8]': (dict(window=8), False),
    'headaware[gqa=max]': (dict(gqa_reduce='max'), False),
    'headaware[pool_kernel=7]': (dict(pool_kernel=7), False),
    'headaware[score=retrieval]': (dict(score_name='retrieval'), False),
    'headaware[pool_fraction=0.5]': (dict(pool_fraction=0.5), False),
    'headaware[latest]': (dict(score_mode='latest'), False),
    'headaware[accumulate]': (dict(score_mode='accumulate'), False),
    'headaware[keydiff]': (dict(score_mode='keydiff', pool_kernel=3), False),
    'headaware[keydiff_window]': (dict(score_mode='keydiff_window', pool_kernel=3), False),
}
# The quick grid's components: allocation, profile, sinks, window, GQA reduction.
QUICK_VARIANTS = ('full', 'headaware', 'headaware[uniform]', 'headaware[shuffled]',
                  'headaware[roles]', 'headaware[sinks=0]', 'headaware[pool_kernel=7]',
                  'headaware[gqa=max]')
GRIDS = {
    'default': dict(methods=tuple(VARIANTS), lengths=(5000,), budget=512,
                    tasks=('passkey', 'perplexity'), num_samples=2),
    'quick': dict(methods=QUICK_VARIANTS, lengths=(2000,), budget=128,
                  tasks=('passkey',), num_samples=2),
    'paper': dict(methods=tuple(VARIANTS), lengths=(10000,), budget=1024,
                  tasks=('passkey', 'niah_multikey', 'variable_tracking', 'perplexity'),
                  num_samples=20),
}


def parse_variant(label: str) -> tuple[dict, bool]:
  """(MethodSpec fields, shuffle) of a label: one of VARIANTS, or a combination written
  `headaware[field=value,...]` (`experiments.labels.parse_method_label`: MethodSpec fields or
  their aliases; a bare `uniform`, `roles` or `layer_scope` / `shuffled` as in VARIANTS, whose
  fields a field=value part overrides), e.g. `headaware[pool_kernel=7,sinks=0]` or
  `headaware[kv_bits=roles:8/8,4/2,2/2,sinks=0]` (text fields such as kv_bits take the text).
  """
  if label in VARIANTS:
    return VARIANTS[label]
  name, given, bare = labels.parse_method_label(label, bare=True)
  if name != 'headaware':
    raise app.UsageError(f'Unknown variant {label!r}; allowed: {", ".join(VARIANTS)} or '
                         "'headaware[field=value,...]'.")
  fields, shuffle = {}, False
  for part in bare:
    if f'headaware[{part}]' not in VARIANTS:
      raise app.UsageError(f'Bad part {part!r} of variant {label!r}: write field=value or '
                           'one of ' + ', '.join(v[len('headaware['):-1] for v in VARIANTS
                                                 if v.startswith('headaware[')) + '.')
    more, more_shuffle = VARIANTS[f'headaware[{part}]']
    fields.update(more)
    shuffle |= more_shuffle
  return {**fields, **given}, shuffle


def variant_cell(label: str, budget: int, task: str, length: int,
                 kv_bits: str = '16') -> grid.Cell:
  """The cell of a variant label; `kv_bits` (the --kv_bits flag) unless the label sets it."""
  fields, shuffle = parse_variant(label)
  try:
    spec = methods_lib.MethodSpec(**{'name': 'headaware', 'budget': budget, 'kv_bits': kv_bits,
                                     **fields})
    spec.policy()  # validates the policy knobs (e.g. an even pool_kernel)
  except ValueError as e:
    raise app.UsageError(f'Variant {label!r}: {e}') from e
  return grid.Cell(label, spec, task, length, spec.budget, shuffle_profile=shuffle)


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """Every chosen variant x task x length at `settings.budget` (and `settings.kv_bits`)."""
  return [variant_cell(label, settings.budget, task, length, settings.kv_bits)
          for label in settings.methods for task in settings.tasks
          for length in settings.lengths]


def run(settings: grid.Settings, **kwargs):
  settings = settings.with_defaults(GRIDS)
  return grid.run_grid(PHASE, cells(settings), settings, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  cli.run(main)
