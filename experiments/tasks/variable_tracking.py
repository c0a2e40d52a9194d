"""RULER's variable tracking: a chain of `VAR X = VAR Y` assignments hidden in filler.

The chain starts with `VAR A = <5-digit value>.` and each hop assigns the previous variable to
a new one; the question asks for every variable that holds the value (all must be named).
Statements keep their order in the text, at random depths.
"""

import random
import string

from experiments.tasks import _sample
from experiments.tasks import _tokens

NUM_HOPS = 4  # assignments after the first; NUM_HOPS + 1 variables hold the value

INSTRUCTION = 'Memorize and track the chain(s) of variable assignment hidden in the following text.'


def make_variable_tracking(tokenizer, length: int, seed: int, index: int,
                           chat: bool = False) -> _sample.Sample:
  rng = random.Random(f'variable_tracking/{seed}/{index}')
  value = str(rng.randint(10000, 99999))
  names = []
  while len(names) < NUM_HOPS + 1:
    name = ''.join(rng.choices(string.ascii_uppercase, k=5))
    if name not in names:
      names.append(name)
  depths = sorted(rng.random() for _ in names)
  needles = [_tokens.Needle(f'VAR {names[0]} = {value}.', depths[0], values=(names[0],))]
  needles += [_tokens.Needle(f'VAR {names[i]} = VAR {names[i - 1]}.', depths[i],
                             values=(names[i],)) for i in range(1, len(names))]
  question = f'Question: Find all variables that are assigned the value {value} in the text above.'
  prefix = (f'Answer: According to the chain(s) of variable assignment in the text above, '
            f'{len(names)} variables are assigned the value {value}, they are:')
  built = _tokens.assemble(
      tokenizer, task='variable_tracking', length=length, filler=_tokens.noise_filler(tokenizer),
      needles=needles, rng=rng, instruction=INSTRUCTION, question=question, answer_prefix=prefix, chat=chat)
  return _sample.Sample(
      task='variable_tracking', index=index, seed=seed, length=length,
      prompt_tokens=built.prompt_tokens, answer=names, metric='all',
      needle_spans=built.needle_spans, value_spans=built.value_spans, answer_prefix=prefix)
