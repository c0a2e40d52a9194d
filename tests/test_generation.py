"""Generation on tiny random models: batching, chunked prefill, sampling, errors, params cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import LlamaConfig
from models.generation import generate
from models.llama import Llama
from models.loading import load_model
from models.runner import ModelRunner
from models.sampling import SamplingConfig, sample
from tests.tiny_models import build_hf_model

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                  eos_token_ids=(3,))


@pytest.fixture(scope="module")
def runner():
  from flax import nnx
  return ModelRunner(Llama(CFG, rngs=nnx.Rngs(1)))


def _prompts():
  rng = np.random.RandomState(0)
  return [list(rng.randint(4, 97, n)) for n in (37, 5, 80)]


def test_batch_equals_each_prompt_alone(runner):
  """Right-padded ragged prompts: each row's tokens equal generating it alone."""
  prompts = _prompts()
  batch = generate(runner, prompts, 10, eos_ids=[]).tokens
  for p, got in zip(prompts, batch):
    assert got == generate(runner, [p], 10, eos_ids=[]).tokens[0]


@pytest.mark.parametrize("chunk", [7, 32, 64])
def test_chunked_prefill_equals_whole_prefill(runner, chunk):
  """Prefill in chunks (rows ending in different chunks) gives the same tokens."""
  prompts = _prompts()
  whole = generate(runner, prompts, 6, eos_ids=[]).tokens
  assert generate(runner, prompts, 6, eos_ids=[], chunk_size=chunk).tokens == whole


def test_stops_at_eos(runner):
  """A row stops once it emits an EOS id (kept as its last token); others go on."""
  prompts = _prompts()
  free = generate(runner, prompts, 8, eos_ids=[]).tokens
  eos = free[0][2]
  got = generate(runner, prompts, 8, eos_ids=[eos]).tokens
  assert got[0] == free[0][:free[0].index(eos) + 1]
  for g, f in zip(got[1:], free[1:]):
    assert g == (f[:f.index(eos) + 1] if eos in f else f)


def test_sampling_is_seeded_and_top_p_restricts():
  """Same seed, same draws; top_p=tiny always picks the argmax."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50))
  key = jax.random.PRNGKey(1)
  a = sample(logits, key, SamplingConfig(temperature=1.0))
  b = sample(logits, key, SamplingConfig(temperature=1.0))
  assert (a == b).all()
  nucleus = sample(logits, key, SamplingConfig(temperature=1.0, top_p=1e-6))
  assert (nucleus == jnp.argmax(logits, -1)).all()
  with pytest.raises(ValueError, match="top_p must be in"):
    SamplingConfig(top_p=0.0)


def test_bad_prompts_are_named(runner):
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    generate(runner, [[5, 6], []], 4)
  with pytest.raises(ValueError, match="max_position_embeddings=256"):
    generate(runner, [[5] * 250], 10)
  with pytest.raises(ValueError, match="No prompts"):
    generate(runner, [], 4)
  with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
    generate(runner, [[5]], 4, chunk_size=0)


def test_long_context_opt_in(runner):
  """Past the trained context only with allow_long_context=True."""
  out = generate(runner, [[5] * 250], 10, eos_ids=[], allow_long_context=True)
  assert len(out.tokens[0]) == 10


def test_params_cache_round_trip(tmp_path):
  """load_model(params_cache=DIR) saves converted params once and restores them unchanged."""
  build_hf_model("llama").save_pretrained(tmp_path / "hf")
  first, _ = load_model(tmp_path / "hf", with_tokenizer=False, params_cache=tmp_path / "pc")
  assert any((tmp_path / "pc").iterdir())
  second, _ = load_model(tmp_path / "hf", with_tokenizer=False, params_cache=tmp_path / "pc")
  tokens = jnp.asarray(np.arange(20)[None] % 128)
  np.testing.assert_array_equal(np.asarray(first(tokens)[0]), np.asarray(second(tokens)[0]))


def test_unknown_model_is_named():
  with pytest.raises(FileNotFoundError, match="Unknown model 'no-such-model'"):
    load_model("no-such-model")
  with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
    load_model("smollm2-135m", dtype="float8")
