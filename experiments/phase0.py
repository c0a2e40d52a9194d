"""Phase 0: the oracle ceiling -- full cache vs the `oracle` policy (and SnapKV) per budget.

  python -m experiments.phase0                       # passkey + niah_multikey at 2000 tokens
  python -m experiments.phase0 --budgets=64,128 --lengths=1000

The `oracle` keeps, per KV head, the tokens the *answer* attends to most: one full-cache
teacher-forced pass over prompt + reference answer (`models.attention_maps`) gives each
layer's answer attention by position, and the cache is compressed with those scores after
every prefill chunk (generated tokens score highest, so they stay). It is the best any
attention-based selection could do at that budget; `snapkv` at the same budget is the practical
method next to it. Perplexity has no answer, so oracle cells there are recorded as skipped.
Writes `<output_dir>/phase0/{run.json,results.jsonl,summary.csv}`.
"""

import time

import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import evaluate
from experiments import flags as exp_flags
from experiments import grid
from models import attention_maps
from models import generation

PHASE = 'phase0'
METHODS = ('full', 'snapkv', 'oracle')
GRIDS = {
    'default': dict(methods=METHODS, lengths=(2000,), budgets=(128, 256, 512, 1024),
                    tasks=('passkey', 'niah_multikey'), num_samples=3),
    'quick': dict(methods=METHODS, lengths=(2000,), budgets=(128, 256), tasks=('passkey',),
                  num_samples=2),
    'paper': dict(methods=METHODS, lengths=(2000, 5000, 10000),
                  budgets=(256, 512, 1024, 2048, 4096),
                  tasks=('passkey', 'niah_single', 'niah_multikey', 'variable_tracking'),
                  num_samples=20),
}


def answer_tokens(tokenizer, sample) -> list[int]:
  """The reference answer as the model would continue the prompt (references joined)."""
  text = ', '.join(r.strip() for r in sample.references)
  if sample.answer_prefix and not sample.answer_prefix[-1].isspace():
    text = ' ' + text
  return tokenizer.encode(text, add_special_tokens=False)


def oracle_scores(runner, tokenizer, sample, positions: int) -> tuple[jnp.ndarray, ...]:
  """Per layer ``[1, Hq, positions]``: attention the reference answer pays to each position.

  Positions past the prompt (generated tokens) get a score above every prompt token's.
  """
  prompt = list(sample.prompt_tokens)
  answer = answer_tokens(tokenizer, sample)
  # Teacher forced: the query at position P - 1 + j predicts answer token j.
  maps = attention_maps.attention_maps(runner, [prompt + answer[:-1]], len(answer))
  scores = maps.sum(axis=3)[..., :len(prompt)]  # [layers, 1, Hq, P]
  out = np.full(scores.shape[:-1] + (positions,), scores.max() + 1.0, np.float32)
  out[..., :len(prompt)] = scores
  return tuple(jnp.asarray(layer) for layer in out)


def evaluate_oracle(runner, tokenizer, sample, spec, *, chunk_size, max_new_tokens) -> dict:
  """`evaluate.evaluate_sample` for the oracle policy (same metrics, plus `oracle_s`)."""
  prompt = list(sample.prompt_tokens)
  t0 = time.perf_counter()
  capacity = generation.capacity(len(prompt), max_new_tokens, chunk_size)  # cache positions
  scores = oracle_scores(runner, tokenizer, sample, capacity)
  oracle_s = time.perf_counter() - t0
  record = evaluate.evaluate_sample(runner, tokenizer, sample, spec, chunk_size=chunk_size,
                                    max_new_tokens=max_new_tokens, oracle_scores=scores)
  return dict(record, oracle_s=oracle_s)


def evaluate_phase0(runner, tokenizer, sample, cell, settings, profile) -> dict:
  """`grid.evaluate_cell`, with the oracle's cells run by `evaluate_oracle`."""
  if cell.spec.name == 'oracle':
    return evaluate_oracle(runner, tokenizer, sample, cell.spec,
                           chunk_size=settings.chunk_size,
                           max_new_tokens=settings.max_new_tokens)
  return grid.evaluate_cell(runner, tokenizer, sample, cell, settings, profile)


def cells(settings: grid.Settings) -> list[grid.Cell]:
  """`full` once per (task, length); every other method per budget."""
  return grid.method_cells(settings, settings.budgets)


def run(settings: grid.Settings, **kwargs):
  settings = settings.with_defaults(GRIDS)
  return grid.run_grid(PHASE, cells(settings), settings, evaluate_fn=evaluate_phase0, **kwargs)


main = exp_flags.phase_main(PHASE, run)


if __name__ == '__main__':
  cli.run(main)
