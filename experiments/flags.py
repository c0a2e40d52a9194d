"""Flags shared by every phase binary, and the `grid.Settings` they make.

  python -m experiments.phase1 --budget=4096 --num_samples=2 --output_dir=results/

Grid flags left unset (`--methods`, `--lengths`, `--budget`, `--budgets`, `--tasks`,
`--num_samples`, `--schemes`) take the phase's defaults for `--grid` ('default', 'quick' or
'paper'; see each phase's GRIDS). `--kv_bits` stores every cell's cache at those bits
(`headkv_jax.bits`). Importing this module defines the flags once, so the phase modules and
`run_all` can all import it.

The flags of every binary, phases or not, are in `experiments/cli.py`, which each binary starts
through (`cli.run(main)`): `--compilation_cache_dir` (JAX's persistent compilation cache) and
`--params_cache_dir` (the embedded models' converted parameters), both on by default under
`~/.cache/headkv_jax/` ('' turns one off); it also prints a user's error (a bad flag value,
model or head profile) as one line with exit status 1.
"""

from absl import flags

from experiments import grid
from experiments.labels import join_brackets, join_schemes

_MODEL = flags.DEFINE_string('model', 'smollm2-135m',
                             'Embedded alias, Hugging Face directory or .gguf file.')
_METHODS = flags.DEFINE_list('methods', None,
                             "Methods (phase 3: variant labels); default: the phase's.")
_LENGTHS = flags.DEFINE_list('lengths', None, "Prompt lengths in tokens; default: the phase's.")
_BUDGET = flags.DEFINE_integer('budget', None,
                               "Tokens kept per KV head per layer (phases 1, 3); default: "
                               "the phase's.")
_BUDGETS = flags.DEFINE_list('budgets', None,
                             'Budgets for phases 0 and 2 (phase 2 adds them to its own).')
_TASKS = flags.DEFINE_list('tasks', None,
                           "Tasks (see experiments.tasks.TASKS, 'longbench/<subset>'); "
                           "default: the phase's.")
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None,
                                    "Samples per (method, task, length, budget) cell.")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every generated sample.')
_CHUNK_SIZE = flags.DEFINE_integer('chunk_size', grid.Settings.chunk_size,
                                   'Prefill chunk in tokens (every cell, so 20k tokens fit).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Model dtype.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'results',
                                  'Root directory; each phase writes <output_dir>/<phase>/.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               "Discard a phase's earlier results instead of resuming.")
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', grid.Settings.max_new_tokens,
                                       'Tokens generated per answer.')
_PROFILE = flags.DEFINE_string('profile', None,
                               "Head profile JSON; default: the model's shipped profile.")
_LONGBENCH_DIR = flags.DEFINE_string('longbench_dir', None,
                                     'Directory of LongBench <subset>.jsonl files.')
_GRID = flags.DEFINE_enum('grid', 'default', list(grid.GRID_NAMES),
                          "Phase defaults: 'default' (CPU-sized), 'quick' (minutes), "
                          "'paper' (the seed plan's full grid).")
_KV_BITS = flags.DEFINE_string(
    'kv_bits', grid.Settings.kv_bits,
    'HAQ-KV storage bits of every cell (phase 5 sweeps --schemes instead): 16 (no '
    'quantization), 8, 4 or 2 (keys = values), K/V such as 4/2 (keys >= values), kivi2 (2/2 '
    'with a 128-token full-precision residual), roles (retrieval 8/4, induction 4/2, local '
    '2/2 from the head profile), roles:8/8,4/4,2/2 (an explicit role table), avg:3.5 (a '
    'target average of (key + value) / 2 bits spent on the heads of highest '
    'retrieval-reasoning score). See headkv_jax.bits.')
_SCHEMES = flags.DEFINE_list(
    'schemes', None,
    "Phase 5: the --kv_bits schemes to sweep, e.g. '16,4/2,kivi2,roles,avg:3'; default: the "
    "grid's.")
_SHARED_PREFILL = flags.DEFINE_bool(
    'shared_prefill', False,
    'One-shot eviction from one prefill per sample shared by every method and budget (a '
    'budget sweep at the cost of one prompt pass; needs --chunk_size >= the longest prompt).')
_POSITION_MODE = flags.DEFINE_enum(
    'position_mode', grid.Settings.position_mode, list(grid.POSITION_MODES),
    "Where compressed caches place keys: 'original' positions; 'cache_relative' (rolled: "
    "rotated by their slot in the compacted cache, StreamingLLM's positions, so an 8k model "
    "never sees a position past 8k); 'auto' (default) rolls exactly the samples past the "
    "model's context; 'both' runs every compressed method in both modes, the rolled cells "
    "labelled <method>[rolled]. Records say which mode ran; `full` stays original.")


def _ints(name: str, values):
  if values is None:
    return None
  return tuple(grid.parse_int(name, v) for v in values)


def settings_from_flags(**overrides) -> grid.Settings:
  """The parsed flags as `grid.Settings` (unset grid flags stay None); `overrides` win."""
  values = dict(
      model=_MODEL.value,
      methods=None if _METHODS.value is None else tuple(join_brackets(_METHODS.value)),
      lengths=_ints('--lengths', _LENGTHS.value),
      budget=_BUDGET.value,
      budgets=_ints('--budgets', _BUDGETS.value),
      tasks=None if _TASKS.value is None else tuple(_TASKS.value),
      num_samples=_NUM_SAMPLES.value,
      seed=_SEED.value,
      chunk_size=_CHUNK_SIZE.value,
      dtype=_DTYPE.value,
      output_dir=_OUTPUT_DIR.value,
      overwrite=_OVERWRITE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      profile=_PROFILE.value,
      longbench_dir=_LONGBENCH_DIR.value,
      grid=_GRID.value,
      shared_prefill=_SHARED_PREFILL.value,
      kv_bits=_KV_BITS.value,
      schemes=None if _SCHEMES.value is None else tuple(join_schemes(_SCHEMES.value)),
      position_mode=_POSITION_MODE.value,
  )
  values.update(overrides)
  return grid.Settings(**values)


def phase_main(phase: str, run):
  """The ``main(argv)`` of a phase binary: flags -> ``run(settings)`` -> printed summary."""
  from absl import app

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    settings = settings_from_flags()
    grid.print_summary(phase, run(settings), settings.output_dir)

  return main
