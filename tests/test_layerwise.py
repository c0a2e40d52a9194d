"""Layer-by-layer prefill (one program per layer shape) equals the whole-model program exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from headkv_jax import prompt_stats
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.paged_cache import PagedKVCache
from models import layerwise
from models.config import LlamaConfig
from models.llama import Llama
from models.runner import ModelRunner

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
T = 70


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(3))


def _inputs():
  tokens = np.random.RandomState(0).randint(0, 97, (2, T)).astype(np.int32)
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy()
  positions[1, 55:] = -1  # a ragged batch
  return tokens, positions


def _dense():
  return DenseKVCache.create(CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim, 96)


def _paged(bits=None):
  budgets = np.array([[40, 40], [32, 48], [40, 40]])  # layers 0 and 2 share a program
  return PagedKVCache.create(CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim, budgets,
                             "snapkv", chunk_size=T, dtype=jnp.float32, bits=bits)


CACHES = {
    "none": lambda: None,
    "dense": _dense,
    "paged": _paged,
    "paged_4bit": lambda: _paged(np.full((CFG.num_layers, CFG.num_kv_heads), 4)),
    "recording": lambda: prompt_stats.RecordingCache.create(_dense(), 8),
}


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_layerwise_prefill_equals_the_whole_program(model, kind):
  """Same logits and the same cache, bit for bit, for every cache that hands out layer views."""
  runner = ModelRunner(model)
  tokens, positions = _inputs()
  whole = runner._forward(runner.params, jnp.asarray(tokens), jnp.asarray(positions),
                          CACHES[kind](), True)
  assert layerwise.supports(CACHES[kind]())
  step = layerwise.LayerwiseForward(model, runner.graphdef, runner.params)
  by_layer = step(tokens, positions, CACHES[kind](), last_only=True)
  assert jax.tree.structure(whole) == jax.tree.structure(by_layer)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(by_layer)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
