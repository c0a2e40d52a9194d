"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden in repeated filler.

The SmolLM2 tokenizer writes each digit as its own token, so the key is five tokens.
"""

import random

from experiments.tasks import _sample
from experiments.tasks import _tokens

# The original wording ("an important info ... I will quiz you") loses the 135M model at 2k
# tokens (0/3 in our check); naming the pass key in the instruction brings it to 3/3.
INSTRUCTION = ('There is an important pass key hidden inside a lot of irrelevant text. '
               'Find it and memorize it.')
QUESTION = 'What is the pass key?'
ANSWER_PREFIX = 'The pass key is'


def make_passkey(tokenizer, length: int, seed: int, index: int,
                 depth: float | None = None, chat: bool = False) -> _sample.Sample:
  """A passkey sample; `depth` (0..1) fixes the needle position, else it is drawn."""
  rng = random.Random(f'passkey/{seed}/{index}')
  key = str(rng.randint(10000, 99999))
  depth = rng.random() if depth is None else depth
  needle = _tokens.Needle(f'The pass key is {key}. Remember it. {key} is the pass key.',
                          depth, values=(key,))
  built = _tokens.assemble(
      tokenizer, task='passkey', length=length, filler=_tokens.noise_filler(tokenizer),
      needles=[needle], rng=rng, instruction=INSTRUCTION, question=QUESTION,
      answer_prefix=ANSWER_PREFIX, chat=chat)
  return _sample.Sample(
      task='passkey', index=index, seed=seed, length=length,
      prompt_tokens=built.prompt_tokens, answer=key, metric='substring',
      needle_spans=built.needle_spans, value_spans=built.value_spans[:1],
      answer_prefix=ANSWER_PREFIX)
