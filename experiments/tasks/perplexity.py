"""Long-document perplexity: a window of CPython's `pydoc_data.topics` text (~110k tokens).

A sample is `length` consecutive tokens from a seeded offset; the metric (mean negative
log-likelihood of each next token) is computed from the model's logits by the caller, so
`Sample.score` returns NaN and `answer` is empty.
"""

import random

from experiments.tasks import _sample
from experiments.tasks import _tokens


def make_perplexity(tokenizer, length: int, seed: int, index: int) -> _sample.Sample:
  doc = _tokens.document_tokens(tokenizer)
  if not 2 <= length <= len(doc):
    raise ValueError(f'perplexity length={length} must be in [2, {len(doc)}], the tokens in '
                     'pydoc_data.topics.')
  start = random.Random(f'perplexity/{seed}/{index}').randrange(len(doc) - length + 1)
  return _sample.Sample(
      task='perplexity', index=index, seed=seed, length=length,
      prompt_tokens=doc[start:start + length].tolist(), answer='', metric='perplexity')
