"""The Flax Llama family matches transformers' PyTorch implementation (the numerics oracle)."""

import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax.dense_cache import DenseKVCache
from models.config import LlamaConfig
from models.loading import load_model
from models.runner import ModelRunner
from tests.tiny_models import build_hf_model, torch_logits

FAMILIES = ["llama", "llama3", "llama_linear", "tied", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
  """(torch model, our model loaded through the HF-directory loader) for one family."""
  torch_model = build_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  model, _ = load_model(path, with_tokenizer=False)
  return torch_model, model


def test_logits_match_transformers(pair):
  """Plain causal forward: max |Δlogits| < 1e-4 in float32 for every family."""
  torch_model, model = pair
  tokens = np.random.RandomState(0).randint(0, 128, (2, 300))
  ours, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(ours), torch_logits(torch_model, tokens), atol=1e-4)


def test_dense_cache_chunks_match_one_pass(pair):
  """Prefill in uneven chunks through the dense cache == one causal pass."""
  _, model = pair
  cfg = model.config
  tokens = np.random.RandomState(1).randint(0, 128, (2, 70))
  full, _ = model(jnp.asarray(tokens))
  cache = DenseKVCache.create(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 96)
  runner = ModelRunner(model)
  outs = []
  for start, stop in [(0, 33), (33, 34), (34, 70)]:
    pos = np.broadcast_to(np.arange(start, stop), (2, stop - start))
    logits, cache = runner.forward(tokens[:, start:stop], pos, cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), atol=1e-4)


def test_gqa_cache_stores_kv_heads_only():
  """A 9-query / 3-KV-head model keeps 3 heads' worth of cache, never repeat_kv'd."""
  cache = DenseKVCache.create(2, 1, 3, 64, 128)
  assert cache.layers[0].k.shape == (1, 3, 128, 64)


def test_bfloat16_forward_is_close():
  """bfloat16 params run and stay near float32 logits."""
  torch_model = build_hf_model("llama")
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    m32, _ = load_model(d, with_tokenizer=False)
    m16, _ = load_model(d, dtype="bfloat16", with_tokenizer=False)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (1, 40)))
  l32, _ = m32(tokens)
  l16, _ = m16(tokens)
  assert l16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1 * float(jnp.max(jnp.abs(l32))) + 0.05


@pytest.mark.parametrize("bad, match", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(model_type="mistral", sliding_window=64), "sliding_window=64"),
    (dict(num_key_value_heads=4), "divisible by number of KV heads. Got 6 and 4"),
])
def test_unsupported_configs_are_named(bad, match):
  hf = dict(model_type="llama", vocab_size=10, hidden_size=12, intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=128)
  hf.update(bad)
  with pytest.raises(ValueError, match=match):
    LlamaConfig.from_hf(hf)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 3, 8), (5, 8)])
def test_linear_is_nnx_linear(dtype, shape):
  """``llama.Linear`` (one rank-2 dot over the flattened tokens; a single bfloat16 row given
  a zero row to ride with) computes exactly what ``nnx.Linear`` does with the same
  parameters, for one token, a batch of chunks and a plain matrix; a wrong reshape or a
  padding row left in the output would change the shape or the values."""
  from flax import nnx
  from models.llama import Linear
  ours = Linear(8, 6, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  ref = nnx.Linear(8, 6, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
  got, want = ours(x), ref(x)
  assert got.shape == want.shape == shape[:-1] + (6,)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-6, atol=1e-6)
