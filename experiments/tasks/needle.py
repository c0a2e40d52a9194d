"""RULER-style needle-in-a-haystack tasks over the `pydoc_data.topics` essay haystack.

Needles follow RULER's template: "One of the special magic numbers for {key} is: {value}."
with adjective-noun keys and 7-digit values.
- niah_single: one needle, ask for it.
- niah_multikey: several needles with different keys, ask for one (the rest distract).
- niah_multivalue: one key with several values, ask for all of them.
- niah_multiquery: several keys, ask for all of their values.
"""

import random

from experiments.tasks import _sample
from experiments.tasks import _tokens

NUM_KEYS = 4  # needles in multikey / multiquery
NUM_VALUES = 4  # values in multivalue

INSTRUCTION = ('Some special magic numbers are hidden within the following text. Make sure to '
               'memorize it. I will quiz you about the numbers afterwards.')

_ADJECTIVES = (
    'abiding', 'amber', 'ancient', 'brave', 'bright', 'calm', 'clever', 'crimson', 'curious',
    'dusty', 'eager', 'elegant', 'fancy', 'fragile', 'gentle', 'gloomy', 'golden', 'hollow',
    'humble', 'icy', 'jolly', 'lively', 'lucky', 'misty', 'noisy', 'odd', 'proud', 'quiet',
    'rapid', 'rusty', 'silent', 'sleepy', 'smooth', 'sturdy', 'tame', 'tidy', 'vivid', 'wary',
    'wild', 'young')
_NOUNS = (
    'anchor', 'apple', 'badge', 'basket', 'beacon', 'bottle', 'bridge', 'cabin', 'candle',
    'castle', 'cloud', 'comet', 'desk', 'engine', 'feather', 'garden', 'guitar', 'hammer',
    'harbor', 'island', 'jacket', 'kettle', 'ladder', 'lantern', 'meadow', 'mirror', 'needle',
    'orchard', 'pebble', 'pillow', 'river', 'saddle', 'shadow', 'spoon', 'tower', 'tunnel',
    'violin', 'wagon', 'window', 'zephyr')

VARIANTS = ('niah_single', 'niah_multikey', 'niah_multivalue', 'niah_multiquery')


def _keys(rng: random.Random, count: int) -> list[str]:
  pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)
  return [f'{a}-{n}' for a, n in pairs]


def _values(rng: random.Random, count: int) -> list[str]:
  return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]


def _needle(key: str, value: str, depth: float) -> _tokens.Needle:
  return _tokens.Needle(f'One of the special magic numbers for {key} is: {value}.', depth,
                        values=(value,))


def _join(keys: list[str]) -> str:
  return ', '.join(keys[:-1]) + f', and {keys[-1]}' if len(keys) > 1 else keys[0]


def make_needle(variant: str, tokenizer, length: int, seed: int, index: int,
                depth: float | None = None, chat: bool = False) -> _sample.Sample:
  """A RULER needle sample; `depth` (0..1) fixes the needle of niah_single, else drawn."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown needle task {variant!r}; allowed: {VARIANTS}.')
  rng = random.Random(f'{variant}/{seed}/{index}')
  if variant == 'niah_single':
    key, value = _keys(rng, 1)[0], _values(rng, 1)[0]
    needles = [_needle(key, value, rng.random() if depth is None else depth)]
    asked, answer, metric = [key], value, 'substring'
  elif variant == 'niah_multikey':
    keys, values = _keys(rng, NUM_KEYS), _values(rng, NUM_KEYS)
    needles = [_needle(k, v, rng.random()) for k, v in zip(keys, values)]
    asked, answer, metric = [keys[0]], values[0], 'substring'
  elif variant == 'niah_multivalue':
    key, values = _keys(rng, 1)[0], _values(rng, NUM_VALUES)
    needles = [_needle(key, v, rng.random()) for v in values]
    asked, answer, metric = [key], values, 'all'
  else:  # niah_multiquery
    keys, values = _keys(rng, NUM_KEYS), _values(rng, NUM_KEYS)
    needles = [_needle(k, v, rng.random()) for k, v in zip(keys, values)]
    asked, answer, metric = keys, values, 'all'

  if metric == 'substring':
    question = (f'What is the special magic number for {asked[0]} mentioned in the provided '
                'text?')
    prefix = f'The special magic number for {asked[0]} mentioned in the provided text is'
  else:
    question = (f'What are all the special magic numbers for {_join(asked)} mentioned in the '
                'provided text?')
    prefix = f'The special magic numbers for {_join(asked)} mentioned in the provided text are'
  built = _tokens.assemble(
      tokenizer, task=variant, length=length, filler=_tokens.essay_filler(tokenizer),
      needles=needles, rng=rng, instruction=INSTRUCTION, question=question,
      answer_prefix=prefix, chat=chat)
  return _sample.Sample(
      task=variant, index=index, seed=seed, length=length, prompt_tokens=built.prompt_tokens,
      answer=answer, metric=metric, needle_spans=built.needle_spans,
      value_spans=built.value_spans, answer_prefix=prefix)
