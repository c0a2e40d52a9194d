"""Probe prompts for head profiling, generated offline and seeded.

Each generator takes a Hugging Face tokenizer and an exact token length and returns a probe:
``tokens`` (list of token ids, exactly that long) plus the token-index annotations that the
score functions in ``headkv_jax.head_scores`` read. Run the model on ``tokens`` once (teacher
forcing: the answer is already at the end) and score its attention maps:

  probe = needle_probe(tok, 1024, needle_format='passkey', depth=0.3, seed=0)
  retrieval_score(attn, probe.query_rows, probe.target_key_pos_padded())
  probe = reasoning_probe(tok, 1024, seed=0)
  retrieval_reasoning_score(attn, probe.query_rows, probe.answer_span, top_n=...)
  probe = induction_probe(tok, 512, seed=0)
  induction_score(attn, probe.first_start, probe.second_start, probe.length)
  probe = text_probe(tok, 512, seed=0)
  local_score(attn, window=64)

The haystack and natural text are CPython's ``pydoc_data.topics`` (English prose that ships
with every Python). Spans are built from separately tokenized pieces, so the annotated ids
are exactly the needle's ids wherever they appear (context and answer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

NEEDLE_FORMATS = ('passkey', 'kv', 'uuid', 'words')
REASONING_TEMPLATES = ('twins', 'moved')
_SNAP_TOKENS = 64  # how far back a needle may move to start after a sentence end
_WORDS = ('apple', 'river', 'candle', 'violet', 'harbor', 'pencil', 'thunder', 'marble',
          'garden', 'falcon', 'copper', 'meadow', 'lantern', 'orange', 'silver', 'planet',
          'window', 'forest', 'basket', 'mirror', 'rocket', 'velvet', 'island', 'tiger')
_NAMES = ('Alice', 'Bruno', 'Clara', 'Daniel', 'Elena', 'Farid', 'Grace', 'Hugo', 'Irene',
          'Jonas', 'Keiko', 'Liam', 'Maya', 'Nikolai', 'Olivia', 'Pablo', 'Rosa', 'Samir')
_CITIES = ('Lisbon', 'Oslo', 'Nairobi', 'Toronto', 'Madrid', 'Vienna', 'Lima', 'Dublin',
           'Seoul', 'Prague', 'Cairo', 'Warsaw', 'Helsinki', 'Quito', 'Athens', 'Perth')


@dataclasses.dataclass(frozen=True)
class NeedleProbe:
  """A needle to copy: the value in the haystack, asked for and answered at the end.

  Attributes:
    tokens: the prompt plus the teacher-forced answer, exactly the requested length.
    needle_span: (start, end) of the value's tokens inside the haystack.
    output_span: (start, end) of the answer at the end (the same ids as the needle).
    query_rows: the rows that emit answer token j: ``output_span[0] - 1 + j``.
    target_key_pos: per row, the needle positions holding the token that row emits (more
      than one when the token repeats inside the needle, e.g. a digit).
    needle_format: one of NEEDLE_FORMATS.
    depth: requested relative depth of the needle in the haystack.
    value: the needle's text.
  """

  tokens: list[int]
  needle_span: tuple[int, int]
  output_span: tuple[int, int]
  query_rows: list[int]
  target_key_pos: list[list[int]]
  needle_format: str
  depth: float
  value: str

  @property
  def answer_span(self) -> tuple[int, int]:
    """The context span holding the answer (for retrieval_reasoning_score)."""
    return self.needle_span

  def target_key_pos_padded(self) -> np.ndarray:
    return _pad(self.target_key_pos)


@dataclasses.dataclass(frozen=True)
class ReasoningProbe:
  """A needle whose answer needs one inference step, next to a distractor.

  Attributes:
    tokens: prompt plus teacher-forced answer, exactly the requested length.
    answer_span: (start, end) of the correct value in the context.
    distractor_span: (start, end) of the distractor's value (same kind, wrong answer).
    link_span: (start, end) of the sentence that the inference needs.
    output_span: (start, end) of the answer at the end.
    query_rows: rows that emit the answer tokens.
    target_key_pos: per row, the answer-span positions holding the emitted token.
    template: one of REASONING_TEMPLATES.
    value: the answer's text.
  """

  tokens: list[int]
  answer_span: tuple[int, int]
  distractor_span: tuple[int, int]
  link_span: tuple[int, int]
  output_span: tuple[int, int]
  query_rows: list[int]
  target_key_pos: list[list[int]]
  template: str
  value: str

  def target_key_pos_padded(self) -> np.ndarray:
    return _pad(self.target_key_pos)


@dataclasses.dataclass(frozen=True)
class InductionProbe:
  """Random tokens ``[first_start, +length)`` repeated at ``[second_start, +length)``."""

  tokens: list[int]
  first_start: int
  second_start: int
  length: int


@dataclasses.dataclass(frozen=True)
class TextProbe:
  """Natural English text (for the local score); ``char_offset`` into the source text."""

  tokens: list[int]
  char_offset: int


def _pad(rows: Sequence[Sequence[int]]) -> np.ndarray:
  width = max(len(r) for r in rows)
  return np.array([list(r) + [-1] * (width - len(r)) for r in rows], dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _source_text() -> str:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return '\n\n'.join(topics.topics[k].strip() for k in sorted(topics.topics))


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)['input_ids'])


def _special_prefix(tokenizer) -> list[int]:
  """Whatever the tokenizer puts before a text (BOS), or nothing."""
  ids = list(tokenizer('x', add_special_tokens=True)['input_ids'])
  plain = _encode(tokenizer, 'x')
  return ids[:ids.index(plain[0])] if plain and plain[0] in ids else []


def _natural_ids(tokenizer, num_tokens: int, rng: np.random.Generator) -> tuple[list[int],
                                                                                 int]:
  """``num_tokens`` ids of source text from a seeded paragraph start, and its offset."""
  text = _source_text()
  chars = 6 * num_tokens + 256
  while True:
    if chars < len(text):
      offset = int(rng.integers(0, len(text) - chars))
      para = text.find('\n\n', offset)
      offset = para + 2 if 0 <= para < len(text) - chars else offset
    else:
      offset = 0
    piece = (text * (chars // len(text) + 2))[offset:offset + chars]
    ids = _encode(tokenizer, piece)
    if len(ids) >= num_tokens:
      return ids[:num_tokens], offset
    chars *= 2


def _value_ids(tokenizer, lead: str, value: str) -> tuple[list[int], list[int]]:
  """(lead ids, value ids): a leading whitespace-only token moves into the lead."""
  lead_ids = _encode(tokenizer, lead)
  value_ids = _encode(tokenizer, ' ' + value)
  if value_ids and not tokenizer.decode(value_ids[:1]).strip():
    lead_ids, value_ids = lead_ids + value_ids[:1], value_ids[1:]
  return lead_ids, value_ids


def _snap(tokenizer, hay: list[int], cut: int) -> int:
  """Moves ``cut`` back to just after a sentence end (within _SNAP_TOKENS), if any."""
  for pos in range(cut, max(0, cut - _SNAP_TOKENS), -1):
    piece = tokenizer.decode(hay[pos - 1:pos])
    if piece.rstrip(' ').endswith(('.', '\n')):
      return pos
  return cut


def _assemble(tokenizer, length: int, inserts: Sequence[tuple[float, list[int]]],
              tail: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
  """prefix + haystack with ``inserts`` at relative depths + ``tail``, exactly ``length``.

  Returns the tokens and each insert's start index (in the order given).
  """
  prefix = _special_prefix(tokenizer)
  fixed = len(prefix) + sum(len(ids) for _, ids in inserts) + len(tail)
  hay_len = length - fixed
  if hay_len < 1:
    raise ValueError(f'length {length} is too short for this probe: its fixed parts take '
                     f'{fixed} tokens; use length >= {fixed + 1}.')
  hay, _ = _natural_ids(tokenizer, hay_len, rng)
  cuts = [_snap(tokenizer, hay, int(round(d * hay_len))) for d, _ in inserts]
  order = sorted(range(len(inserts)), key=lambda i: (cuts[i], i))
  tokens, starts, prev = list(prefix), [0] * len(inserts), 0
  for i in order:
    tokens += hay[prev:cuts[i]]
    starts[i] = len(tokens)
    tokens += inserts[i][1]
    prev = cuts[i]
  tokens += hay[prev:] + tail
  assert len(tokens) == length, (len(tokens), length)
  return tokens, starts


def _copy_annotations(tokens: list[int], span: tuple[int, int],
                      value_ids: list[int]) -> tuple[tuple[int, int], list[int],
                                                     list[list[int]]]:
  """output_span, query_rows and target_key_pos for an answer at the end of ``tokens``."""
  out_start = len(tokens) - len(value_ids)
  rows = [out_start - 1 + j for j in range(len(value_ids))]
  targets = [[p for p in range(*span) if tokens[p] == v] for v in value_ids]
  return (out_start, len(tokens)), rows, targets


def _digits(rng: np.random.Generator, n: int) -> str:
  return str(rng.integers(1, 10)) + ''.join(str(d) for d in rng.integers(0, 10, n - 1))


# format -> (value maker(rng, value_len), default value_len, statement lead, statement end
#            (a newline, so the haystack resumes on a fresh line),
#            question lead); '{key}' is filled with a random word.
_NEEDLES: dict[str, tuple[Callable[[Any, int], str], int, str, str, str]] = {
    'passkey': (_digits, 5, ' The pass key is', '. Remember it.\n',
                '\n\nWhat is the pass key? The pass key is'),
    'kv': (_digits, 7, ' One of the special magic numbers for {key} is:', '.\n',
           '\n\nWhat is the special magic number for {key} mentioned in the provided text? '
           'The special magic number for {key} mentioned in the provided text is:'),
    'uuid': (lambda rng, n: '-'.join(''.join(rng.choice(list('0123456789abcdef'), 4))
                                     for _ in range(n)), 3,
             ' The access code for the {key} server is', '.\n',
             '\n\nWhat is the access code for the {key} server? The access code for the '
             '{key} server is'),
    'words': (lambda rng, n: ' '.join(rng.choice(_WORDS, n, replace=False)), 3,
              ' The secret phrase of the day is', '.\n',
              '\n\nWhat is the secret phrase of the day? The secret phrase of the day is'),
}


def needle_probe(tokenizer, length: int, *, needle_format: str = 'passkey',
                 depth: float = 0.5, value_len: int | None = None,
                 seed: int = 0) -> NeedleProbe:
  """A needle-copy probe (Wu et al. retrieval heads) of exactly ``length`` tokens.

  Args:
    tokenizer: a transformers tokenizer.
    length: total tokens, answer included.
    needle_format: one of NEEDLE_FORMATS (digits, RULER key-value, hex code, words).
    depth: where the needle sits in the haystack, 0 (start) to 1 (end).
    value_len: digits / hex groups / words of the value (default per format).
    seed: everything random (haystack window, value, key) comes from it.
  """
  if needle_format not in _NEEDLES:
    raise ValueError(f'unknown needle_format {needle_format!r}; allowed: '
                     f'{list(NEEDLE_FORMATS)}.')
  if not 0 <= depth <= 1:
    raise ValueError(f'depth must be in [0, 1]. Got {depth}.')
  make_value, default_len, lead, end, question = _NEEDLES[needle_format]
  rng = np.random.default_rng(seed)
  value_len = default_len if value_len is None else int(value_len)
  if value_len < 1:
    raise ValueError(f'value_len must be >= 1. Got {value_len}.')
  key = str(rng.choice(_WORDS))
  value = make_value(rng, value_len)
  lead_ids, value_ids = _value_ids(tokenizer, lead.format(key=key), value)
  needle = lead_ids + value_ids + _encode(tokenizer, end)
  q_ids, answer_ids = _value_ids(tokenizer, question.format(key=key), value)
  if answer_ids != value_ids:  # both come from one encoding of ' ' + value
    raise AssertionError('answer and needle ids differ')
  tokens, (start,) = _assemble(tokenizer, length, [(depth, needle)], q_ids + value_ids, rng)
  span = (start + len(lead_ids), start + len(lead_ids) + len(value_ids))
  output_span, rows, targets = _copy_annotations(tokens, span, value_ids)
  return NeedleProbe(tokens=tokens, needle_span=span, output_span=output_span,
                     query_rows=rows, target_key_pos=targets, needle_format=needle_format,
                     depth=float(depth), value=value)


def needle_probes(tokenizer, lengths: Sequence[int] = (512, 1024),
                  depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                  formats: Sequence[str] = NEEDLE_FORMATS, seed: int = 0) -> list[NeedleProbe]:
  """The grid lengths x depths x formats, each with its own derived seed."""
  probes = []
  for i, (n, d, f) in enumerate((n, d, f) for n in lengths for d in depths for f in formats):
    probes.append(needle_probe(tokenizer, n, needle_format=f, depth=d, seed=seed * 100003 + i))
  return probes


def reasoning_probe(tokenizer, length: int, *, template: str = 'twins', depth: float = 0.5,
                    seed: int = 0) -> ReasoningProbe:
  """A retrieval-reasoning probe (HeadKV-R2) of exactly ``length`` tokens.

  'twins': "A and B are twins and share one locker. A's locker code is V." + a distractor
  "C's locker code is W."; asks for B's code. 'moved': "A moved to the city where B lives.
  B lives in V." + "C lives in W."; asks where A lives. The answer statement sits at
  ``depth``; the link and the distractor at seeded random depths.
  """
  if template not in REASONING_TEMPLATES:
    raise ValueError(f'unknown template {template!r}; allowed: {list(REASONING_TEMPLATES)}.')
  if not 0 <= depth <= 1:
    raise ValueError(f'depth must be in [0, 1]. Got {depth}.')
  rng = np.random.default_rng(seed)
  a, b, c = (str(x) for x in rng.choice(_NAMES, 3, replace=False))
  if template == 'twins':
    value, wrong = _digits(rng, 4), _digits(rng, 4)
    link = f' {a} and {b} are twins, and they share one locker, so they share its code.\n'
    fact_lead, wrong_lead = f" {a}'s locker code is", f" {c}'s locker code is"
    question = f"\n\nWhat is {b}'s locker code? {b}'s locker code is"
  else:
    value, wrong = (str(x) for x in rng.choice(_CITIES, 2, replace=False))
    link = f' {a} moved to the city where {b} lives.\n'
    fact_lead, wrong_lead = f' {b} lives in', f' {c} lives in'
    question = f'\n\nIn which city does {a} live now? {a} lives in'
  fact_ids, value_ids = _value_ids(tokenizer, fact_lead, value)
  wrong_lead_ids, wrong_ids = _value_ids(tokenizer, wrong_lead, wrong)
  dot = _encode(tokenizer, '.\n')
  link_ids = _encode(tokenizer, link)
  q_ids, answer_ids = _value_ids(tokenizer, question, value)
  assert answer_ids == value_ids
  link_depth, wrong_depth = (float(x) for x in rng.uniform(0.05, 0.95, 2))
  inserts = [(depth, fact_ids + value_ids + dot), (link_depth, link_ids),
             (wrong_depth, wrong_lead_ids + wrong_ids + dot)]
  tokens, (fact_at, link_at, wrong_at) = _assemble(tokenizer, length, inserts,
                                                   q_ids + value_ids, rng)
  span = (fact_at + len(fact_ids), fact_at + len(fact_ids) + len(value_ids))
  wrong_span = (wrong_at + len(wrong_lead_ids),
                wrong_at + len(wrong_lead_ids) + len(wrong_ids))
  output_span, rows, targets = _copy_annotations(tokens, span, value_ids)
  return ReasoningProbe(tokens=tokens, answer_span=span, distractor_span=wrong_span,
                        link_span=(link_at, link_at + len(link_ids)),
                        output_span=output_span, query_rows=rows, target_key_pos=targets,
                        template=template, value=value)


def induction_probe(tokenizer, length: int, *, seed: int = 0) -> InductionProbe:
  """Distinct random ordinary tokens, repeated once: exactly ``length`` tokens.

  An odd leftover token goes between the copies (it is random too).
  """
  prefix = _special_prefix(tokenizer)
  rng = np.random.default_rng(seed)
  special = set(tokenizer.all_special_ids)
  pool = np.array([i for i in range(len(tokenizer)) if i not in special])
  half, gap = divmod(length - len(prefix), 2)
  if half < 2 or half + gap > pool.size:
    raise ValueError(f'length must be in [{len(prefix) + 4}, {len(prefix) + pool.size}] '
                     f'for an induction probe. Got {length}.')
  ids = rng.choice(pool, half + gap, replace=False).tolist()
  seq, filler = ids[:half], ids[half:]
  tokens = prefix + seq + filler + seq
  return InductionProbe(tokens=tokens, first_start=len(prefix),
                        second_start=len(prefix) + half + gap, length=half)


def text_probe(tokenizer, length: int, *, seed: int = 0) -> TextProbe:
  """Natural English text of exactly ``length`` tokens (for the local score)."""
  prefix = _special_prefix(tokenizer)
  if length <= len(prefix):
    raise ValueError(f'length must be > {len(prefix)}. Got {length}.')
  ids, offset = _natural_ids(tokenizer, length - len(prefix), np.random.default_rng(seed))
  return TextProbe(tokens=prefix + ids, char_offset=offset)
