"""Token-level prompt assembly shared by the task generators.

Prompts are built from token ids, never by tokenizing one long string, so every sample has
exactly the requested length and generation stays fast: each filler text is tokenized once per
tokenizer and sliced. Needles are inserted only where a filler token starts a word (its text
begins with whitespace) and are tokenized with a leading space, so decoding the prompt and
tokenizing it again gives the needle the same tokens.

Layout of a prompt (`chat=True`):
  chat head | instruction | filler with needles | question | chat tail | answer prefix
"""

import dataclasses
import random
import weakref

import numpy as np

# The passkey paper's haystack (Mohtashami & Jaggi, 2023); RULER uses it for variable tracking.
NOISE_TEXT = ('The grass is green. The sky is blue. The sun is yellow. Here we go. '
              'There and back again.')
_SENTINEL = '\u2063CONTENT\u2063'

_PER_TOKENIZER = weakref.WeakKeyDictionary()


def _cache(tokenizer) -> dict:
  """A dict of derived data that lives as long as the tokenizer does."""
  return _PER_TOKENIZER.setdefault(tokenizer, {})


def encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass(frozen=True)
class Filler:
  """A tokenized haystack text.

  Attributes:
    ids: token ids. # [n]
    word_start: the token is a word with leading whitespace (not whitespace alone). # [n]
    sentence_start: a word start right after a token ending in '.', '!' or '?'. # [n]
  """
  ids: np.ndarray
  word_start: np.ndarray
  sentence_start: np.ndarray

  def take(self, start: int, count: int) -> 'Filler':
    """`count` tokens from `start`, wrapping around the end of the text."""
    idx = (start + np.arange(count)) % len(self.ids)  # [count]
    return Filler(self.ids[idx], self.word_start[idx], self.sentence_start[idx])

  def slots(self) -> np.ndarray:
    """Where a needle may go: sentence starts if any, else word starts, and both ends."""
    starts = self.sentence_start if self.sentence_start.any() else self.word_start
    return np.concatenate([[0], np.flatnonzero(starts), [len(self.ids)]])

  def next_start(self, start: int) -> int:
    """First sentence (else word) start at or after `start`, wrapping; `start` if none."""
    starts = self.sentence_start if self.sentence_start.any() else self.word_start
    idx = np.flatnonzero(np.roll(starts, -start))  # offsets from `start`
    return (start + int(idx[0])) % len(self.ids) if len(idx) else start


def _make_filler(tokenizer, ids: list[int]) -> Filler:
  ids = np.asarray(ids, dtype=np.int64)
  uniq = np.unique(ids)
  texts = dict(zip(uniq.tolist(), tokenizer.batch_decode([[int(u)] for u in uniq])))
  word = {i: t[:1].isspace() and bool(t.strip()) for i, t in texts.items()}
  ends = {i: t.rstrip().endswith(('.', '!', '?')) for i, t in texts.items()}
  word_start = np.array([word[i] for i in ids.tolist()], dtype=bool)  # [n]
  after_end = np.array([ends[i] for i in np.roll(ids, 1).tolist()], dtype=bool)  # [n]
  return Filler(ids, word_start, word_start & after_end)


def _pydoc_topics() -> list[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k] for k in sorted(topics.topics)]


def noise_filler(tokenizer) -> Filler:
  """The repeated 'The grass is green...' haystack (one period, wrapped by `take`)."""
  cache = _cache(tokenizer)
  if 'noise' not in cache:
    cache['noise'] = _make_filler(tokenizer, encode(tokenizer, ' ' + NOISE_TEXT))
  return cache['noise']


def essay_filler(tokenizer) -> Filler:
  """CPython's `pydoc_data.topics` with whitespace collapsed: ~100k tokens of prose."""
  cache = _cache(tokenizer)
  if 'essay' not in cache:
    text = ' ' + ' '.join(' '.join(_pydoc_topics()).split())
    cache['essay'] = _make_filler(tokenizer, encode(tokenizer, text))
  return cache['essay']


def document_tokens(tokenizer) -> np.ndarray:
  """CPython's `pydoc_data.topics` verbatim (for perplexity), topics in sorted order."""
  cache = _cache(tokenizer)
  if 'document' not in cache:
    text = '\n\n'.join(_pydoc_topics())
    cache['document'] = np.asarray(encode(tokenizer, text), dtype=np.int64)
  return cache['document']


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
  """Tokens before and after a user message, up to the assistant's turn.

  Uses the tokenizer's chat template (its default system prompt included); a tokenizer with
  no template gets an empty head and a blank-line tail.
  """
  cache = _cache(tokenizer)
  if 'chat' not in cache:
    if getattr(tokenizer, 'chat_template', None):
      text = tokenizer.apply_chat_template(
          [{'role': 'user', 'content': _SENTINEL}], tokenize=False,
          add_generation_prompt=True)
      head, tail = text.split(_SENTINEL)
      cache['chat'] = (encode(tokenizer, head), encode(tokenizer, tail))
    else:
      cache['chat'] = ([], encode(tokenizer, '\n\n'))
  return cache['chat']


def find_span(tokenizer, ids: list[int], value: str) -> tuple[int, int]:
  """The shortest [start, end) span of `ids` whose decoded text contains `value`."""
  for end in range(1, len(ids) + 1):
    if value in tokenizer.decode(ids[:end]):
      break
  else:
    raise ValueError(f'{value!r} does not occur in {tokenizer.decode(ids)!r}.')
  start = end - 1
  while value not in tokenizer.decode(ids[start:end]):
    start -= 1
  return start, end


@dataclasses.dataclass(frozen=True)
class Needle:
  """A sentence to hide in the filler.

  Attributes:
    text: the sentence; tokenized with a leading space.
    depth: where it goes, as a fraction of the filler (0 = start, 1 = end).
    values: substrings of `text` whose token spans are reported (keys, numbers).
  """
  text: str
  depth: float
  values: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Assembled:
  prompt_tokens: list[int]
  needle_spans: tuple[tuple[int, int], ...]
  value_spans: tuple[tuple[int, int], ...]


def assemble(tokenizer, *, task: str, length: int, filler: Filler, needles: list[Needle],
             rng: random.Random, instruction: str, question: str, answer_prefix: str,
             chat: bool = True) -> Assembled:
  """Builds a prompt of exactly `length` tokens; see the module docstring for the layout."""
  # Without the chat frame the answer prefix starts its own line, as in plain completion.
  head, tail = chat_frame(tokenizer) if chat else ([], encode(tokenizer, '\n'))
  before = head + encode(tokenizer, instruction + '\n')
  after = encode(tokenizer, '\n' + question) + tail + encode(tokenizer, answer_prefix)
  needle_ids = [encode(tokenizer, ' ' + n.text) for n in needles]
  fixed = len(before) + len(after) + sum(map(len, needle_ids))
  n_filler = length - fixed
  if n_filler < 0:
    raise ValueError(f'length={length} is too short for task {task!r}: its instruction, '
                     f'needles, question and chat frame alone take {fixed} tokens.')
  start = filler.next_start(rng.randrange(len(filler.ids)))
  hay = filler.take(start, n_filler)
  slots = hay.slots()  # [m] filler indices where a needle may go
  points = [int(slots[np.argmin(np.abs(slots - round(n.depth * n_filler)))]) for n in needles]
  order = sorted(range(len(needles)), key=lambda i: (points[i], i))

  tokens, needle_spans, value_spans, cursor = list(before), [], [], 0
  for i in order:
    tokens.extend(hay.ids[cursor:points[i]].tolist())
    cursor = points[i]
    offset = len(tokens)
    tokens.extend(needle_ids[i])
    needle_spans.append((offset, len(tokens)))
    for value in needles[i].values:
      s, e = find_span(tokenizer, needle_ids[i], value)
      value_spans.append((offset + s, offset + e))
  tokens.extend(hay.ids[cursor:].tolist())
  tokens.extend(after)
  assert len(tokens) == length, (len(tokens), length)
  return Assembled(tokens, tuple(needle_spans), tuple(value_spans))
