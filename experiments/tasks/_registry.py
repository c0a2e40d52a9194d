"""The task registry: one name per generator, `make_task` to build any sample."""

import functools

from experiments.tasks import _sample
from experiments.tasks import longbench
from experiments.tasks import needle
from experiments.tasks import passkey
from experiments.tasks import perplexity
from experiments.tasks import variable_tracking

_GENERATORS = {
    'passkey': passkey.make_passkey,
    **{v: functools.partial(needle.make_needle, v) for v in needle.VARIANTS},
    'variable_tracking': variable_tracking.make_variable_tracking,
    'perplexity': perplexity.make_perplexity,
}
# Synthetic tasks; LongBench subsets are named 'longbench/<subset>' (any file in the directory).
TASKS = tuple(_GENERATORS)
LONGBENCH_PREFIX = 'longbench/'


def make_task(name: str, tokenizer, length: int, seed: int, index: int,
              **options) -> _sample.Sample:
  """Builds sample `index` of task `name` at exactly `length` tokens.

  Args:
    name: one of TASKS, or 'longbench/<subset>' (needs `longbench_dir=`).
    tokenizer: a transformers tokenizer.
    length: prompt length in tokens.
    seed: run seed; (name, seed, index) determines the sample.
    index: sample index.
    **options: passed to the generator (`chat=True` wraps passkey, needle and variable
      tracking prompts in the chat template (default: plain completion, which the 135M model
      answers far more reliably); `depth=` for passkey and niah_single,
      `longbench_dir=` for LongBench).
  """
  if name.startswith(LONGBENCH_PREFIX):
    return longbench.make_longbench(name[len(LONGBENCH_PREFIX):], tokenizer, length, seed,
                                    index, **options)
  if name not in _GENERATORS:
    raise ValueError(f'Unknown task {name!r}; allowed: {TASKS} or '
                     f"'{LONGBENCH_PREFIX}<subset>'.")
  return _GENERATORS[name](tokenizer, length, seed, index, **options)
