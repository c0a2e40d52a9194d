"""The `Sample` every task generator returns, and the metrics that score it.

A sample is a fixed token sequence (`prompt_tokens`, exactly the tokens the model sees, chat
frame and answer prefix included) plus what it takes to score a generation. Scoring follows
RULER: a reference counts as found when it appears in the generation (case-insensitive);
`all` averages over the references, `any` takes the best. LongBench QA uses its token F1.
"""

import collections
import dataclasses
import math
import re
import string

# metric name -> what `Sample.score` computes.
METRICS = ('substring', 'all', 'any', 'qa_f1', 'perplexity')


@dataclasses.dataclass(frozen=True)
class Sample:
  """One task instance at one length.

  Attributes:
    task: registry name, e.g. 'passkey' or 'longbench/qasper'.
    index: sample index within (task, length, seed).
    seed: the seed the sample was generated from.
    length: the requested length in tokens (LongBench samples shorter than it stay shorter).
    prompt_tokens: token ids fed to the model, chat frame and answer prefix included.
    answer: the reference string, or the list of references for multi-answer tasks.
    metric: one of METRICS; selects what `score` computes.
    needle_spans: [start, end) token spans of every inserted needle sentence.
    value_spans: [start, end) token spans of the values (keys/numbers) inside the needles.
    answer_prefix: text that ends the prompt and that the generation continues.
  """
  task: str
  index: int
  seed: int
  length: int
  prompt_tokens: list[int]
  answer: str | list[str]
  metric: str = 'substring'
  needle_spans: tuple[tuple[int, int], ...] = ()
  value_spans: tuple[tuple[int, int], ...] = ()
  answer_prefix: str = ''

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f'Unknown metric {self.metric!r}; allowed: {METRICS}.')

  @property
  def references(self) -> list[str]:
    return [self.answer] if isinstance(self.answer, str) else list(self.answer)

  def score(self, generated_text: str) -> float:
    """Scores a generation in [0, 1]; NaN for perplexity samples (scored from logits)."""
    refs = self.references
    if self.metric == 'perplexity':
      return math.nan
    if self.metric == 'qa_f1':
      return max(qa_f1(generated_text, r) for r in refs)
    found = [substring_match(generated_text, r) for r in refs]
    if self.metric == 'any':
      return max(found)
    return sum(found) / len(found)  # 'substring' (one reference) and 'all'


def substring_match(generated_text: str, reference: str) -> float:
  """RULER's string match: 1.0 when `reference` occurs in the generation, ignoring case."""
  return float(reference.lower() in generated_text.lower())


def _normalize_answer(text: str) -> str:
  """LongBench/SQuAD normalisation: lower case, no punctuation, articles or extra spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def qa_f1(generated_text: str, reference: str) -> float:
  """LongBench's `qa_f1_score`: token-level F1 between normalised prediction and reference."""
  pred = _normalize_answer(generated_text).split()
  ref = _normalize_answer(reference).split()
  common = collections.Counter(pred) & collections.Counter(ref)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)
