"""The grid runner every phase shares: cells x samples -> resumable per-sample records.

  settings = grid.Settings(lengths=(2000,), budget=128, tasks=('passkey',), num_samples=2)
  cells = [grid.Cell('full', MethodSpec('full'), 'passkey', 2000, 0),
           grid.Cell('headaware', MethodSpec('headaware', 128), 'passkey', 2000, 128)]
  summary = grid.run_grid('phase1', cells, settings)   # -> results/phase1/{results.jsonl,...}

A cell is one (method label, MethodSpec, task, length, budget); the label names the record's
`method` so that variants of one method (phase 3's `headaware[uniform]`) stay apart. The model
is loaded once (or passed as `runner=`), the pending samples of the whole grid run under one
progress bar, and each finished sample is appended to `results.jsonl` at once (see
`experiments/results.py`), so a killed run resumes where it stopped. A cell that cannot run
(a budget below the method's minimum, no head profile, the oracle on perplexity) is recorded
as `status='skipped'` with its reason; an unknown task or method is a UsageError before any
work. The task 'perplexity' is scored by `evaluate_perplexity`, every other task by
`evaluate_sample`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Callable, Iterable, Sequence

from absl import app
import numpy as np

from experiments import evaluate
from experiments import results
from experiments import tasks as tasks_lib
from headkv_jax import bits as bits_lib
from headkv_jax import memory_maps
from headkv_jax import methods
from headkv_jax import profile as profile_lib
from models import method_driver
from models import shared_prefill

GRID_NAMES = ('default', 'quick', 'paper')
# --position_mode: 'auto' rolls positions (cache_relative) for the samples past the model's
# trained context and keeps them original inside it; 'both' runs every compressed method in
# both modes, the rolled cells labelled `<method>[rolled]`.
POSITION_MODES = ('auto', 'original', 'cache_relative', 'both')
ROLLED = '[rolled]'
PERPLEXITY_TASK = 'perplexity'
PROFILE_PNG = 'head_profile.png'  # copied into each phase directory for the report
# Settings fields a phase fills from its GRIDS when the user left them unset.
GRID_FIELDS = ('methods', 'lengths', 'budget', 'budgets', 'tasks', 'num_samples', 'schemes')
# Settings added after earlier runs were saved, with the value that reproduces those runs: a
# saved run.json without one of them resumes when the new value is this one.
ADDED_FLAGS = {'kv_bits': '16', 'schemes': None, 'position_mode': 'original'}
# Most bytes of shared prefills (dense prompt caches + statistics) held at once; a cell then
# runs over all of them (one compile per cell for up to this many bytes of samples).
SHARED_BYTES = 8 << 30


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a phase run needs beyond its cells; the flags of `experiments/flags.py`.

  Attributes:
    model: embedded alias, Hugging Face directory or .gguf file.
    methods: method names (phase 3: variant labels); None = the phase's default.
    lengths: prompt lengths in tokens.
    budget: one budget (phases 1 and 3).
    budgets: budgets (phases 0 and 2).
    tasks: task names.
    num_samples: samples per cell.
    seed: seed of every generated sample.
    chunk_size: prefill chunk (tokens) of every cell.
    dtype: 'float32' or 'bfloat16'.
    output_dir: root directory of the results.
    overwrite: discard earlier results of the phase instead of resuming.
    max_new_tokens: tokens generated per answer.
    profile: head profile JSON; None = the model's shipped profile.
    longbench_dir: directory of LongBench `<subset>.jsonl` files.
    grid: which of the phase's GRIDS fills unset fields.
    shared_prefill: one-shot eviction from one prefill per sample, shared by every method
      and budget of a (task, length) (`models.shared_prefill`); needs `chunk_size` >= the
      longest prompt. Perplexity, the oracle and cache_relative cells run alone.
    kv_bits: HAQ-KV storage bits of every cell (`headkv_jax.bits.parse_kv_bits`; '16' = no
      quantization); kept in its canonical text.
    schemes: phase 5's kv_bits schemes (canonical texts); None = the phase's default.
    position_mode: one of POSITION_MODES: how compressed cells place keys ('original'
      positions, or 'cache_relative': rolled, rotated by their slot in the compacted cache);
      'auto' rolls exactly the samples past the model's context; records say which ran.
  """

  model: str = 'smollm2-135m'
  methods: tuple[str, ...] | None = None
  lengths: tuple[int, ...] | None = None
  budget: int | None = None
  budgets: tuple[int, ...] | None = None
  tasks: tuple[str, ...] | None = None
  num_samples: int | None = None
  seed: int = 0
  chunk_size: int = 1024
  dtype: str = 'float32'
  output_dir: str = 'results'
  overwrite: bool = False
  max_new_tokens: int = 24
  profile: str | None = None
  longbench_dir: str | None = None
  grid: str = 'default'
  shared_prefill: bool = False
  kv_bits: str = '16'
  schemes: tuple[str, ...] | None = None
  position_mode: str = 'auto'

  def __post_init__(self):
    if self.grid not in GRID_NAMES:
      raise app.UsageError(f'Unknown --grid={self.grid!r}; allowed: {", ".join(GRID_NAMES)}.')
    if self.position_mode not in POSITION_MODES:
      raise app.UsageError(f'Unknown --position_mode={self.position_mode!r}; allowed: '
                           f'{", ".join(POSITION_MODES)}.')
    object.__setattr__(self, 'kv_bits', check_kv_bits(self.kv_bits))
    if self.schemes is not None:
      schemes = [check_kv_bits(s, '--schemes') for s in self.schemes]
      if not schemes:
        raise app.UsageError('--schemes is empty; give at least one, e.g. --schemes=16,4.')
      object.__setattr__(self, 'schemes', tuple(dict.fromkeys(schemes)))  # unique, in order
    for name in ('chunk_size', 'num_samples', 'budget'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise app.UsageError(f'--{name} must be >= 1. Got {value}.')
    if self.max_new_tokens < 1:
      raise app.UsageError(f'--max_new_tokens must be >= 1. Got {self.max_new_tokens}.')
    for name in ('lengths', 'budgets'):
      bad = [v for v in getattr(self, name) or () if v < 1]
      if bad:
        raise app.UsageError(f'--{name} must be positive. Got {bad}.')

  def with_defaults(self, grids: dict[str, dict]) -> 'Settings':
    """Fills the unset GRID_FIELDS from `grids[self.grid]` (a phase's GRIDS)."""
    defaults = grids[self.grid]
    return dataclasses.replace(self, **{
        k: defaults.get(k) for k in GRID_FIELDS if getattr(self, k) is None})


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid cell; each of its samples is one record.

  Attributes:
    method: the record's `method` label (e.g. 'headaware[uniform]').
    spec: the compression method it runs.
    task: task name.
    length: prompt length in tokens.
    budget: the record's budget (0 for `full`).
    shuffle_profile: run with the head profile's scores shuffled across heads (phase 3).
  """

  method: str
  spec: methods.MethodSpec
  task: str
  length: int
  budget: int
  shuffle_profile: bool = False

  def key(self, sample: int) -> tuple:
    return (self.method, self.task, self.length, self.budget, sample)


def check_kv_bits(text: str, flag: str = '--kv_bits') -> str:
  """The canonical text of a kv_bits scheme, or a UsageError naming it and the forms."""
  try:
    return bits_lib.parse_kv_bits(text).text
  except ValueError as e:
    raise app.UsageError(f'Bad {flag}: {e}') from None


def method_cells(settings: Settings, budgets: Sequence[int]) -> list[Cell]:
  """`full` once per (task, length) at budget 0; every other method at each of `budgets`;
  all at `settings.kv_bits`, in the position modes of `settings.position_mode` (`full`, whose
  dense cache rolls nothing, always at original positions)."""
  check_methods(settings.methods, methods.METHODS)
  out = []
  for method in settings.methods:
    for budget in ((0,) if method == 'full' else budgets):
      for label, mode in position_variants(method, settings.position_mode):
        spec = methods.MethodSpec(method, budget, kv_bits=settings.kv_bits, position_mode=mode)
        out += [Cell(label, spec, task, length, budget)
                for task in settings.tasks for length in settings.lengths]
  return out


def position_variants(method: str, position_mode: str) -> list[tuple[str, str]]:
  """`(label, spec position_mode)` of the cells of `method` under --position_mode ('auto'
  cells start original; `resolve_position_mode` rolls the samples past the context)."""
  if method == 'full' or position_mode in ('auto', 'original'):
    return [(method, 'original')]
  if position_mode == 'cache_relative':
    return [(method, 'cache_relative')]
  return [(method, 'original'), (method + ROLLED, 'cache_relative')]


def resolve_position_mode(spec: methods.MethodSpec, length: int, settings: Settings,
                          config) -> methods.MethodSpec:
  """`spec` as it runs on a `length`-token sample: with --position_mode=auto, a compressed
  method whose sample (+ the new tokens) is past the model's context rolls its positions."""
  if (settings.position_mode == 'auto' and config.past_context(length + settings.max_new_tokens)
      and spec.name != 'full' and spec.position_mode == 'original'):
    return dataclasses.replace(spec, position_mode='cache_relative')
  return spec


def parse_int(flag: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise app.UsageError(f'{flag} takes integers. Got {value!r}.') from None


def check_methods(names: Iterable[str], allowed: Sequence[str], flag: str = '--methods'):
  """UsageError naming the unknown method names and the allowed ones."""
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise app.UsageError(f'Unknown {flag} {unknown}; allowed: {", ".join(allowed)}.')


def check_tasks(names: Iterable[str], longbench_dir: str | None = None):
  """UsageError for an unknown task or LongBench subsets whose files are missing."""
  names = list(names)
  prefix = tasks_lib.LONGBENCH_PREFIX
  unknown = [n for n in names if n not in tasks_lib.TASKS and not n.startswith(prefix)]
  if unknown:
    raise app.UsageError(f'Unknown --tasks {unknown}; allowed: {", ".join(tasks_lib.TASKS)} '
                         f"or '{prefix}<subset>' with --longbench_dir.")
  subsets = [n[len(prefix):] for n in names if n.startswith(prefix)]
  if subsets:
    if not longbench_dir:
      raise app.UsageError(f'Tasks {[prefix + s for s in subsets]} need --longbench_dir.')
    try:
      tasks_lib.load_longbench(longbench_dir, subsets)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(str(e)) from e


def shuffled_profile(profile: profile_lib.HeadProfile, seed: int) -> profile_lib.HeadProfile:
  """`profile` with every score and role moved to a random other (layer, KV head)."""
  order = np.random.default_rng(seed).permutation(profile.num_layers * profile.num_kv_heads)
  shape = (profile.num_layers, profile.num_kv_heads)

  def move(a):
    return np.asarray(a).reshape(-1)[order].reshape(shape)

  return dataclasses.replace(
      profile, scores={k: move(v) for k, v in profile.scores.items()},
      roles=move(profile.roles),
      probe_settings=dict(profile.probe_settings, shuffled_seed=seed))


def load_profile(settings: Settings) -> tuple[profile_lib.HeadProfile | None, str | None]:
  """(profile, its heatmap PNG or None): `settings.profile`, else the model's shipped one."""
  from headkv_jax import profiles  # pylint: disable=g-import-not-at-top

  if settings.profile:
    try:
      profile = profile_lib.HeadProfile.load(settings.profile)
    except profile_lib.ProfileError as e:
      raise app.UsageError(f'Cannot read --profile={settings.profile!r}: {e}') from e
    path = settings.profile
  else:
    try:
      path = str(profiles.shipped_profile(settings.model))
    except FileNotFoundError as e:
      logging.warning('%s Head-aware cells will be skipped.', e)
      return None, None
    profile = profiles.load_shipped_profile(settings.model)
  png = os.path.splitext(path)[0] + '.png'
  return profile, png if os.path.isfile(png) else None


def skip_reason(cell: Cell, config, profile) -> str | None:
  """Why `cell` cannot run on a model of `config`, or None."""
  if cell.task == PERPLEXITY_TASK and cell.spec.name == 'oracle':
    return "the oracle needs an answer's attention; perplexity has no answer"
  if cell.spec.name == 'full':
    return None
  try:
    methods.method_budgets(cell.spec, config.num_layers, config.num_kv_heads,
                           max_len=cell.length, profile=profile)
  except ValueError as e:
    return str(e)
  return None


def evaluate_cell(runner, tokenizer, sample, cell: Cell, settings: Settings,
                  profile) -> dict:
  """Metrics of one sample: `evaluate_perplexity` for 'perplexity', else `evaluate_sample`."""
  if cell.task == PERPLEXITY_TASK:
    return evaluate.evaluate_perplexity(runner, sample, cell.spec,
                                        chunk_size=settings.chunk_size, profile=profile)
  return evaluate.evaluate_sample(runner, tokenizer, sample, cell.spec,
                                  chunk_size=settings.chunk_size, profile=profile,
                                  max_new_tokens=settings.max_new_tokens)


def _spec_text(spec: methods.MethodSpec) -> str:
  default = methods.MethodSpec(spec.name, spec.budget)
  changed = [f'{f.name}={getattr(spec, f.name)}' for f in dataclasses.fields(spec)
             if f.name not in ('name', 'budget') and getattr(spec, f.name) != getattr(default,
                                                                                     f.name)]
  return ' '.join([spec.name, f'budget={spec.budget}', *changed])


def _all_done(phase: str, cells, settings: Settings) -> bool:
  """Whether `phase`'s results already hold every sample of `cells` (a resumed, finished run)."""
  path = os.path.join(settings.output_dir, phase, 'results.jsonl')
  if settings.overwrite or not os.path.isfile(path):
    return False
  try:
    done = {tuple(r.get(k) for k in results.KEY_FIELDS) for r in results.read_results(path)}
  except ValueError:  # a damaged file: the writer repairs or refuses it, with the model checked
    return False
  return all(c.key(i) in done for c in cells for i in range(settings.num_samples))


def check_model(settings: Settings) -> None:
  """UsageError before any work when `settings.model` cannot be loaded.

  A path has its config read (no weights); an embedded alias only needs its package installed
  (its GGUF is known good, and parsing GGUF metadata alone takes ~3 s).
  """
  from models import embedded  # pylint: disable=g-import-not-at-top
  from models import loading  # pylint: disable=g-import-not-at-top
  from models.errors import ModelLoadError  # pylint: disable=g-import-not-at-top

  try:
    if embedded.is_embedded_alias(settings.model):
      loading.resolve_source(settings.model)
    else:
      loading.load_config(settings.model)
  except ModelLoadError as e:
    raise app.UsageError(f'Cannot load --model={settings.model!r}: {e}') from e


def load_model(settings: Settings):
  """`(ModelRunner, tokenizer)` of `settings.model` (UsageError when it cannot be loaded)."""
  from models import loading  # pylint: disable=g-import-not-at-top
  from models.errors import ModelLoadError  # pylint: disable=g-import-not-at-top
  from models.runner import ModelRunner  # pylint: disable=g-import-not-at-top

  check_mesh()
  try:
    model, tokenizer = loading.load_model(settings.model, settings.dtype)
  except ModelLoadError as e:
    raise app.UsageError(f'Cannot load --model={settings.model!r}: {e}') from e
  return ModelRunner(model), tokenizer


def check_mesh() -> None:
  """UsageError when `--mesh` splits the batch: a phase runs one sample at a time (batch 1)."""
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.default_mesh()
  if mesh is not None and mesh.shape['data'] > 1:
    d = mesh.shape['data']
    raise app.UsageError(
        f'--mesh={sharding.mesh_text(mesh)}: the phases run one sample at a time (batch 1), '
        f'which data:{d} cannot split; put the devices on the model axis instead (e.g. '
        f'--mesh=model:{d * mesh.shape["model"]}).')


def _mesh(runner) -> str:
  """The record's `mesh`: the runner's mesh text, '' on one device."""
  return getattr(runner, 'mesh_text', '')


def _position_fields(spec: methods.MethodSpec) -> dict:
  """The record's position mode; `rolled` (a number in the summary: the share of a cell's
  samples that ran at rolled positions) makes `auto` cells readable from the tables."""
  return {'position_mode': spec.position_mode, 'rolled': spec.position_mode == 'cache_relative'}


Evaluate = Callable[..., dict]


def _run_sample(key: tuple, cell: Cell, runner, tokenizer, settings: Settings, profile,
                evaluate_fn: Evaluate) -> dict:
  """The record of one sample: its metrics, or status 'skipped' and the ValueError's reason."""
  cell = dataclasses.replace(
      cell, spec=resolve_position_mode(cell.spec, cell.length, settings, runner.config))
  record = {**dict(zip(results.KEY_FIELDS, key)), 'seed': settings.seed,
            'spec': _spec_text(cell.spec), **_position_fields(cell.spec),
            'mesh': _mesh(runner)}
  options = ({'longbench_dir': settings.longbench_dir}
             if cell.task.startswith(tasks_lib.LONGBENCH_PREFIX) else {})
  try:
    sample = tasks_lib.make_task(cell.task, tokenizer, cell.length, settings.seed, key[4],
                                 **options)
    return {**record, **evaluate_fn(runner, tokenizer, sample, cell, settings, profile)}
  except ValueError as e:
    logging.warning('%s skipped: %s', key, e)
    return {**record, 'status': 'skipped', 'reason': str(e)}


def _shares_prefill(cell: Cell) -> bool:
  return cell.task != PERPLEXITY_TASK and shared_prefill.supports(cell.spec)


def _shared_units(pending: Sequence[tuple], by_key: dict,
                  settings: Settings) -> list[tuple[list, bool]]:
  """`(keys, shared)` work units: the pending keys grouped per (task, length) where cells can
  share a prefill (first, in (task, length) order), then every other key alone."""
  groups: dict[tuple, list] = {}
  alone = []
  for key in pending:
    if _shares_prefill(by_key[key[:4]]):
      groups.setdefault((key[1], key[2]), []).append(key)
    else:
      alone.append(([key], False))
  longest = max((length for _, length in groups), default=0)
  if settings.chunk_size < longest:
    raise app.UsageError(
        f'--shared_prefill is one-shot eviction: it needs --chunk_size >= the longest prompt '
        f'({longest} tokens). Got --chunk_size={settings.chunk_size}.')
  return [(groups[g], True) for g in sorted(groups)] + alone


def _run_shared(keys: Sequence[tuple], by_key: dict, runner, tokenizer, settings: Settings,
                profiles: dict, write: Callable[[dict], None]) -> None:
  """Records of `keys` (one task and length): each sample prefilled once, then each cell run
  over the held prefills (one compile per cell), at most SHARED_BYTES of prefills at a time."""
  keyset = set(keys)
  cells = list({k[:4]: by_key[k[:4]] for k in keys}.values())
  first = cells[0]
  window = shared_prefill.record_window([c.spec for c in cells])
  accumulate = method_driver.record_accumulated([c.spec for c in cells])
  options = ({'longbench_dir': settings.longbench_dir}
             if first.task.startswith(tasks_lib.LONGBENCH_PREFIX) else {})

  def base(cell, i):
    return {**dict(zip(results.KEY_FIELDS, cell.key(i))), 'seed': settings.seed,
            'spec': _spec_text(cell.spec), **_position_fields(cell.spec),
            'mesh': _mesh(runner)}

  def run_cells(held):
    for cell in cells:
      for i, sample, shared in held:
        if cell.key(i) not in keyset:
          continue
        try:
          metrics = evaluate.evaluate_from_shared(
              runner, tokenizer, sample, shared, cell.spec,
              profile=profiles[cell.shuffle_profile], max_new_tokens=settings.max_new_tokens)
        except ValueError as e:
          logging.warning('%s skipped: %s', cell.key(i), e)
          metrics = {'status': 'skipped', 'reason': str(e)}
        write({**base(cell, i), **metrics})
      memory_maps.release_near_limit()  # see run_grid

  held, held_bytes = [], 0
  for i in sorted({k[4] for k in keys}):
    try:
      sample = tasks_lib.make_task(first.task, tokenizer, first.length, settings.seed, i,
                                   **options)
      shared = shared_prefill.prefill(runner, [list(sample.prompt_tokens)],
                                      settings.max_new_tokens, window=window,
                                      accumulate=accumulate, allow_long_context=True)
    except ValueError as e:
      logging.warning('%s sample %d skipped: %s', first.key(i)[1:3], i, e)
      for cell in cells:
        if cell.key(i) in keyset:
          write({**base(cell, i), 'status': 'skipped', 'reason': str(e)})
      continue
    held.append((i, sample, shared))
    held_bytes += shared.nbytes
    if held_bytes >= SHARED_BYTES:
      run_cells(held)
      held, held_bytes = [], 0
  if held:
    run_cells(held)


def run_grid(phase: str, cells: Sequence[Cell], settings: Settings, *, runner=None,
             tokenizer=None, evaluate_fn: Evaluate | None = None, progress: bool | None = None):
  """Runs (or resumes) every sample of `cells`; returns the summary DataFrame.

  Args:
    phase: the results subdirectory, e.g. 'phase1'.
    cells: the grid; labels (method, task, length, budget) must be unique.
    settings: resolved settings (`num_samples` set).
    runner, tokenizer: a loaded model (`models.runner.ModelRunner`) and its tokenizer;
      loaded from `settings.model` when None, and only if a sample is pending.
    evaluate_fn: `(runner, tokenizer, sample, cell, settings, profile) -> metrics`;
      default `evaluate_cell`. A ValueError from it records the sample as skipped.
    progress: show the progress bar (None: tqdm decides).
  """
  if settings.num_samples is None:
    raise ValueError('settings.num_samples is unset; call Settings.with_defaults first.')
  check_tasks(sorted({c.task for c in cells}), settings.longbench_dir)
  by_key = {c.key(0)[:4]: c for c in cells}
  if len(by_key) != len(cells):
    raise ValueError('Cells must be unique per (method, task, length, budget). Got '
                     f'{[c.key(0)[:4] for c in cells]}.')
  if runner is None and not _all_done(phase, cells, settings):
    check_model(settings)  # before the profile: its warning would hide the error
  profile, png = load_profile(settings)
  profiles = {False: profile,
              True: profile and shuffled_profile(profile, settings.seed)}
  # The report links the heatmap named under this key (copied beside the results).
  flags = dict(dataclasses.asdict(settings), phase=phase, head_profile_png=png and PROFILE_PNG)
  try:
    writer = results.ResultsWriter(settings.output_dir, phase, flags,
                                   overwrite=settings.overwrite, added_flags=ADDED_FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  with writer:
    if png:
      shutil.copyfile(png, os.path.join(writer.directory, PROFILE_PNG))
    keys = [c.key(i) for c in cells for i in range(settings.num_samples)]
    done = writer.done_keys()
    if any(k not in done for k in keys) and runner is None:
      runner, tokenizer = load_model(settings)
    reasons = {}
    pending = [k for k in keys if k not in done]
    units = (_shared_units(pending, by_key, settings) if settings.shared_prefill
             and evaluate_fn is None else [([k], False) for k in pending])
    for (unit, is_shared), advance in results.iter_units(
        units, len(keys), desc=phase, disable=progress is False, size=lambda u: len(u[0])):
      cell = by_key[unit[0][:4]]
      # Cells of one method and prompt bucket reuse each other's executables; a long grid
      # drops them only near the process's memory-map limit (LLVM fails to map code past it).
      memory_maps.release_near_limit()
      runnable = []
      for key in unit:
        c = by_key[key[:4]]
        if c not in reasons:
          reasons[c] = skip_reason(c, runner.config, profile)
        if reasons[c] is not None:
          writer.record_skipped(key, reasons[c])
        else:
          runnable.append(key)
      if is_shared and runnable:

        def write(record):
          writer.write(record)
          advance(1)

        _run_shared(runnable, by_key, runner, tokenizer, settings, profiles, write)
      elif runnable:
        writer.write(_run_sample(runnable[0], cell, runner, tokenizer, settings,
                                 profiles[cell.shuffle_profile], evaluate_fn or evaluate_cell))
    return writer.write_summary()


def print_summary(phase: str, summary, output_dir: str) -> None:
  """Prints a phase's summary table (markdown) and where its files are."""
  from experiments import report  # pylint: disable=g-import-not-at-top

  print(f'\n## {phase} ({os.path.join(output_dir, phase)})\n')
  print(report.markdown_table(summary.dropna(axis=1, how='all')))
