"""LongBench (Bai et al., 2023) from local JSONL files: `<directory>/<subset>.jsonl`.

Each line holds LongBench's fields `context`, `input` and `answers` (a list). Prompts use
LongBench's per-subset templates (a generic QA template for subsets not listed). As in
LongBench's `pred.py`, a prompt longer than the target keeps its first and last halves; here
the cut is made on token ids, so the sample is exactly `length` tokens, chat frame included.
A record shorter than `length` stays whole (shorter): padding a real document would change it.
The chat frame is skipped for the few-shot and code subsets, as LongBench does.
"""

import functools
import json
import os

from experiments.tasks import _sample
from experiments.tasks import _tokens

FIELDS = ('context', 'input', 'answers')

_QA_PASSAGES = ('Answer the question based on the given passages. Only give me the answer and '
                'do not output any other words.')
PROMPTS = {
    'narrativeqa': (
        'You are given a story, which can be either a novel or a movie script, and a question. '
        'Answer the question as concisely as you can, using a single phrase if possible. Do not '
        'provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the '
        'story as concisely as you can, using a single phrase if possible. Do not provide any '
        'explanation.\n\nQuestion: {input}\n\nAnswer:'),
    'multifieldqa_en': (
        'Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following '
        'question based on the above text, only give me the answer and do not output any other '
        'words.\n\nQuestion: {input}\nAnswer:'),
    'hotpotqa': (_QA_PASSAGES + '\n\nThe following are given passages.\n{context}\n\n'
                 + _QA_PASSAGES + '\n\nQuestion: {input}\nAnswer:'),
    'triviaqa': (
        'Answer the question based on the given passage. Only give me the answer and do not '
        'output any other words. The following are some examples.\n\n{context}\n\n{input}'),
    'passage_retrieval_en': (
        'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which '
        'paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n'
        '{input}\n\nPlease enter the number of the paragraph that the abstract is from. The '
        'answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '),
    'trec': ('Please determine the type of the question below. Here are some examples of '
             'questions.\n\n{context}\n{input}'),
}
PROMPTS['2wikimqa'] = PROMPTS['musique'] = PROMPTS['hotpotqa']
DEFAULT_PROMPT = PROMPTS['multifieldqa_en']

NO_CHAT = ('trec', 'triviaqa', 'samsum', 'lsht', 'lcc', 'repobench-p')
# Subsets scored by "does the answer occur"; all others by LongBench's QA token F1.
SUBSTRING_SUBSETS = ('trec', 'lsht', 'passage_count', 'passage_retrieval_en',
                     'passage_retrieval_zh')


def load_longbench(directory: str, subsets: list[str] | tuple[str, ...]) -> dict[str, list[dict]]:
  """Reads `<directory>/<subset>.jsonl` for every subset -> {subset: [record, ...]}."""
  missing = [s for s in subsets if not os.path.isfile(os.path.join(directory, f'{s}.jsonl'))]
  if missing:
    found = sorted(f for f in os.listdir(directory) if f.endswith('.jsonl')) if os.path.isdir(
        directory) else []
    raise FileNotFoundError(
        f'LongBench directory {directory!r} lacks {[f"{s}.jsonl" for s in missing]}; it holds '
        f'{found}. Put one JSONL file per subset there with fields {FIELDS}.')
  return {s: list(_read_subset(directory, s)) for s in subsets}


@functools.lru_cache(maxsize=32)
def _read_subset(directory: str, subset: str) -> tuple[dict, ...]:
  path = os.path.join(directory, f'{subset}.jsonl')
  records = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      absent = [k for k in FIELDS if k not in record]
      if absent:
        raise ValueError(f'{path}:{line_no} lacks fields {absent}; LongBench records need '
                         f'{FIELDS}.')
      records.append(record)
  return tuple(records)


def make_longbench(subset: str, tokenizer, length: int, seed: int, index: int, *,
                   longbench_dir: str | None = None) -> _sample.Sample:
  """Sample `index` of a subset, middle-truncated to `length` tokens (see module docstring)."""
  if longbench_dir is None:
    raise ValueError(f'Task longbench/{subset} needs longbench_dir=<directory with '
                     f'{subset}.jsonl>; got None.')
  records = load_longbench(longbench_dir, [subset])[subset]
  if not 0 <= index < len(records):
    raise IndexError(f'longbench/{subset} index={index} out of range: {longbench_dir!r} has '
                     f'{len(records)} records.')
  record = records[index]
  body = _tokens.encode(tokenizer, PROMPTS.get(subset, DEFAULT_PROMPT).format(
      context=record['context'], input=record['input']))
  head, tail = ([], []) if subset in NO_CHAT else _tokens.chat_frame(tokenizer)
  room = length - len(head) - len(tail)
  if room < 2:
    raise ValueError(f'length={length} is too short for longbench/{subset}: the chat frame '
                     f'takes {len(head) + len(tail)} tokens.')
  if len(body) > room:
    body = body[:room // 2] + body[len(body) - (room - room // 2):]
  answers = [str(a) for a in record['answers']]
  return _sample.Sample(
      task=f'longbench/{subset}', index=index, seed=seed, length=length,
      prompt_tokens=head + body + tail, answer=answers,
      metric='any' if subset in SUBSTRING_SUBSETS else 'qa_f1')
