r"""Model speed on this machine: our jitted Flax model vs transformers' PyTorch, same run.

  python -m experiments.bench_model                      # SmolLM2-135M, float32
  python -m experiments.bench_model --prefill_len=2048 --decode_context=4096 --decode_steps=32
  python -m experiments.bench_model --torch_device=cuda   # on a GPU: both frameworks on it
  python -m experiments.bench_model --dtypes=float32,bfloat16   # both, one table each

Prints prefill tokens/s (one prompt of ``--prefill_len`` tokens into an empty cache) and decode
ms/token (one token at a time after a ``--decode_context``-token prompt), for both frameworks
side by side with their ratio (>1 means ours is faster), for each of ``--dtypes`` (parameters,
activations and cache of both frameworks in that dtype). PyTorch (the test extra) is needed.
"""

from __future__ import annotations

import time

from absl import app, flags
import numpy as np

from experiments import cli

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Alias, HF directory or .gguf file.")
_PREFILL = flags.DEFINE_integer("prefill_len", 2048, "Prompt length for the prefill figure.")
_CONTEXT = flags.DEFINE_integer("decode_context", 4096, "Context length for the decode figure.")
_STEPS = flags.DEFINE_integer("decode_steps", 32, "Decode steps timed.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Prefill repetitions (best is reported).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Model dtypes to compare, each in its own "
                            "table: float32, bfloat16.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "PyTorch's device ('cpu', 'cuda'): "
                                    "put it where JAX runs for a fair ratio.")


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bench_jax(model, tokens_prefill, tokens_context, steps, repeats):
  import jax
  import jax.numpy as jnp
  from headkv_jax.dense_cache import DenseKVCache
  from models.runner import ModelRunner

  cfg = model.config
  runner = ModelRunner(model)

  def new_cache(capacity):
    return DenseKVCache.create(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, capacity,
                               model.dtype)

  def prefill():
    logits, cache = runner.forward(tokens_prefill, None, new_cache(tokens_prefill.shape[1]),
                                   last_only=True)
    jax.block_until_ready(logits)

  prefill()  # compile
  prefill_s = _best(prefill, repeats)

  n = tokens_context.shape[1]
  logits, cache = runner.forward(tokens_context, None, new_cache(n + steps + 1), last_only=True)
  tok = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
  def step(tok, cache, pos):
    logits, cache = runner.forward(tok, jnp.full((1, 1), pos, jnp.int32), cache, last_only=True)
    return jnp.argmax(logits, -1)[:, None].astype(jnp.int32), cache
  tok, cache = step(tok, cache, n)  # compile
  jax.block_until_ready(tok)
  start = time.perf_counter()
  for i in range(steps):
    tok, cache = step(tok, cache, n + 1 + i)
  jax.block_until_ready(tok)
  decode_ms = (time.perf_counter() - start) / steps * 1e3
  return tokens_prefill.shape[1] / prefill_s, decode_ms, cache.nbytes


def torch_model_from_source(source, dtype="float32"):
  """transformers' PyTorch model with the very weights our loader reads (GGUF or HF dir)."""
  import torch
  import transformers
  from models.gguf_checkpoint import read_gguf_checkpoint
  from models.hf_checkpoint import read_hf_checkpoint

  hf_config, state = (read_hf_checkpoint if source.is_dir() else read_gguf_checkpoint)(source)
  config = transformers.AutoConfig.for_model(**hf_config)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
  if missing or unexpected:
    raise ValueError(f"torch model/state mismatch: missing {missing}, unexpected {unexpected}")
  return model.to(getattr(torch, dtype)).eval()


def bench_torch(source, tokens_prefill, tokens_context, steps, repeats, device="cpu",
                dtype="float32"):
  try:
    import torch
    import transformers
  except ImportError as e:
    raise app.UsageError("The PyTorch comparison needs the test extra: pip install '.[test]'") from e
  tm = torch_model_from_source(source, dtype).to(device)
  tm.eval()
  tp = torch.tensor(tokens_prefill, device=device)
  tc = torch.tensor(tokens_context, device=device)
  sync = torch.cuda.synchronize if tp.is_cuda else (lambda: None)
  with torch.inference_mode():
    def prefill():
      tm(tp, use_cache=True, logits_to_keep=1)
      sync()
    prefill()
    prefill_s = _best(prefill, repeats)
    out = tm(tc, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    out = tm(tok, past_key_values=past, use_cache=True)  # warm
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
      out = tm(tok, past_key_values=past, use_cache=True)
      past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    decode_ms = (time.perf_counter() - start) / steps * 1e3
  return tokens_prefill.shape[1] / prefill_s, decode_ms


def main(argv):
  del argv
  import jax
  import torch
  from models.loading import load_model, resolve_source

  dtypes = _DTYPES.value
  unknown = [d for d in dtypes if d not in ("float32", "bfloat16")]
  if unknown or not dtypes:
    raise app.UsageError(f"--dtypes={','.join(dtypes)}: each must be float32 or bfloat16.")
  torch_where = (torch.cuda.get_device_name() if _TORCH_DEVICE.value.startswith("cuda")
                 else f"cpu, {torch.get_num_threads()} threads")
  for dtype in dtypes:
    model, _ = load_model(_MODEL.value, dtype, with_tokenizer=False)
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    tokens_prefill = rng.randint(0, vocab, (1, _PREFILL.value)).astype(np.int32)
    tokens_context = rng.randint(0, vocab, (1, _CONTEXT.value)).astype(np.int32)
    j_prefill, j_decode, nbytes = bench_jax(
        model, tokens_prefill, tokens_context, _STEPS.value, _REPEATS.value)
    del model
    t_prefill, t_decode = bench_torch(
        resolve_source(_MODEL.value), tokens_prefill, tokens_context, _STEPS.value,
        _REPEATS.value, _TORCH_DEVICE.value, dtype)
    print(f"model {_MODEL.value}, {dtype}; jax on {jax.devices()[0].device_kind}, "
          f"torch on {torch_where}")
    print(f"{'':28s}{'jax (ours)':>12s}{'pytorch':>12s}{'ratio':>8s}")
    print(f"{f'prefill tok/s @ {_PREFILL.value}':28s}{j_prefill:12.0f}{t_prefill:12.0f}"
          f"{j_prefill / t_prefill:8.2f}")
    print(f"{f'decode ms/token @ {_CONTEXT.value}':28s}{j_decode:12.1f}{t_decode:12.1f}"
          f"{t_decode / j_decode:8.2f}")
    print(f"jax dense cache bytes at {_CONTEXT.value}: {nbytes:,}", flush=True)


if __name__ == "__main__":
  cli.run(main)
