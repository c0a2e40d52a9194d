"""The compiled decode loop (blocks of steps on device) against the step-by-step Python loop.

Every test runs both loops on a tiny random model and asserts the same tokens: the blocks must
be a faster way to run the same steps (same positions, eviction, PRNG keys and EOS), never a
different generation.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from headkv_jax import methods
from models.config import LlamaConfig
from models.generation import generate
from models.method_driver import method_hooks
from models.llama import Llama
from models.runner import ModelRunner
from models.sampling import SamplingConfig
from tests import tiny_models

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=1,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                  eos_token_ids=(3,))
GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.9)
NEW = 11  # not a multiple of BLOCK: the last block is shorter
BLOCK = 4


@pytest.fixture(scope="module")
def runner():
  return ModelRunner(Llama(CFG, rngs=nnx.Rngs(5)))


def _prompts():
  """A ragged batch: rows of different lengths, some past the small budgets."""
  rng = np.random.RandomState(2)
  return [list(rng.randint(4, 97, n)) for n in (41, 9, 30)]


def _both(runner, prompts, new=NEW, **kwargs):
  """(step-by-step result, compiled-blocks result) of the same generation."""
  steps = generate(runner, prompts, new, compiled=False, **kwargs)
  blocks = generate(runner, prompts, new, block_size=BLOCK, **kwargs)
  return steps, blocks


def _method_kwargs(name: str, kv_bits: str = "16") -> dict:
  """``generate`` hooks of a small-budget method: every row past its budget evicts."""
  prompts = _prompts()
  spec = methods.MethodSpec(name, 0 if name == "full" else 24, window=8, kv_bits=kv_bits)
  scores = None
  if name == "oracle":  # random answer attention; the driver's partial hooks take it as operands
    rng = np.random.RandomState(0)
    scores = tuple(jnp.asarray(rng.rand(3, CFG.num_heads, 128), jnp.float32)
                   for _ in range(CFG.num_layers))
  return method_hooks(spec, CFG, batch=len(prompts), prompt_len=max(map(len, prompts)),
                      max_new_tokens=NEW, chunk_size=None, dtype=np.float32,
                      profile=tiny_models.tiny_profile(3, [[0, 2]]), oracle_scores=scores)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_dense_blocks_equal_steps(runner, sampling):
  """Dense cache, ragged batch, greedy and sampled: the blocks emit the step loop's tokens,
  all NEW of them (a last block shorter than BLOCK), and count the same model steps."""
  steps, blocks = _both(runner, _prompts(), sampling=sampling, seed=7, eos_ids=[])
  assert blocks.tokens == steps.tokens
  assert all(len(t) == NEW for t in blocks.tokens)
  assert blocks.decode_steps == NEW - 1 and blocks.decode_s > 0


@pytest.mark.parametrize("name", [m for m in methods.METHODS if m != "full"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_every_method_blocks_equal_steps(runner, name, sampling):
  """Each policy's eviction traced inside the block (h2o's per-step scores, the oracle's
  partial hook, snapkv from a 4-bit pool) keeps the tokens of the step loop, greedy and
  sampled, and the same tokens per head."""
  kwargs = _method_kwargs(name, "4" if name == "snapkv" else "16")
  steps, blocks = _both(runner, _prompts(), sampling=sampling, seed=1, eos_ids=[], **kwargs)
  assert blocks.tokens == steps.tokens
  counts = np.asarray(blocks.cache.token_counts())
  np.testing.assert_array_equal(counts, np.asarray(steps.cache.token_counts()))
  assert counts[:, 0].max() < len(_prompts()[0]) + NEW - 1  # the longest row was evicted


@pytest.mark.parametrize("name", ["full", "h2o"])
def test_eos_mid_block_stops_like_steps(runner, name):
  """A row that emits EOS mid-block stops there (EOS kept), decodes at position -1 after, and
  the other rows go on: the same tokens as the step loop."""
  prompts = _prompts()
  kwargs = _method_kwargs(name)
  free = generate(runner, prompts, NEW, compiled=False, eos_ids=[], **kwargs).tokens
  eos = free[0][5]  # row 0 emits it at step 5: inside the second block
  steps, blocks = _both(runner, prompts, eos_ids=[eos], **kwargs)
  assert blocks.tokens == steps.tokens
  assert blocks.tokens[0] == free[0][:free[0].index(eos) + 1]


def test_all_rows_done_exits_early(runner):
  """Once every row has emitted EOS the block stops on device: no step runs past it."""
  prompt = _prompts()[:1]
  free = generate(runner, prompt, NEW, compiled=False, eos_ids=[]).tokens[0]
  eos = free[6]
  stop = free.index(eos)
  out = generate(runner, prompt, 20, eos_ids=[eos], block_size=32)
  assert out.tokens[0] == free[:stop + 1]
  assert out.decode_steps == stop  # one model step per token after the first


@pytest.mark.parametrize("new, block", [(1, BLOCK), (5, 1), (BLOCK + 1, BLOCK)])
def test_block_edges(runner, new, block):
  """One new token (no block runs), blocks of one step, one step past a full block."""
  prompts = _prompts()
  steps = generate(runner, prompts, new, compiled=False, eos_ids=[])
  blocks = generate(runner, prompts, new, block_size=block, eos_ids=[])
  assert blocks.tokens == steps.tokens
  assert all(len(t) == new for t in blocks.tokens)
  with pytest.raises(ValueError, match="block_size must be positive, got 0"):
    generate(runner, prompts, new, block_size=0)


def _decode_block_compiles(run):
  """``run()``'s result and the names of the threads that compiled a decode block in it."""
  compiled_by = []

  def listen(event, duration, fun_name="", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration" and "decode_block" in fun_name:
      compiled_by.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    return run(), compiled_by
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("name, kv_bits", [("full", "16"), ("h2o", "16"), ("headaware", "4/2")])
def test_decode_block_compiles_while_the_prefill_computes(name, kv_bits):
  """``generate`` compiles the decode block from the prefilled cache's shapes in a thread,
  before waiting for the prefill: the decode then runs that very program (compiled once,
  in that thread, not again at the first block) and gives the tokens it gives without."""
  kwargs = _method_kwargs(name, kv_bits)
  model = Llama(CFG, rngs=nnx.Rngs(5))
  ahead, threads = _decode_block_compiles(
      lambda: generate(ModelRunner(model), _prompts(), NEW, block_size=BLOCK, **kwargs))
  plain, compiled_by = _decode_block_compiles(
      lambda: generate(ModelRunner(model), _prompts(), NEW, block_size=BLOCK,
                       compile_ahead=False, **kwargs))
  assert threads == ["compile-decode-block"]
  assert compiled_by == ["MainThread"]  # the listener sees the compile where it happens
  assert ahead.tokens == plain.tokens


def test_a_hook_that_needs_concrete_values_compiles_the_decode_block_after_it():
  """The decode block compiles from the shapes ``after_prefill`` will return, before it
  runs; a hook that reads values on the host cannot be traced for them, and then the block
  compiles in the thread after the hook (no error), with the tokens of a plain generation."""
  seen = []

  def host_hook(cache):  # a host-side check: needs concrete values
    seen.append(int(np.asarray(cache.layers[0].lengths).max()))
    return cache

  model = Llama(CFG, rngs=nnx.Rngs(5))
  prompts = _prompts()
  ahead, threads = _decode_block_compiles(
      lambda: generate(ModelRunner(model), prompts, NEW, block_size=BLOCK,
                       after_prefill=host_hook))
  plain = generate(ModelRunner(model), prompts, NEW, block_size=BLOCK, compile_ahead=False,
                   after_prefill=host_hook)
  assert threads == ["compile-decode-block"]
  assert seen == [max(map(len, prompts))] * 2
  assert ahead.tokens == plain.tokens
