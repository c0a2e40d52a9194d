r"""Generate text with a Llama-family model and a KV cache.

  python -m experiments.generate --model=smollm2-135m --prompt="What is 2+2?" --max_new_tokens=32
  python -m experiments.generate --prompt_file=long.txt --json
  python -m experiments.generate --prompt="a" --prompt="bb b" --temperature=0.7 --top_p=0.9
  python -m experiments.generate --method=snapkv --budget=256 --prompt_file=long.txt --json
  python -m experiments.generate --method=headaware --budget=128 --chunk_size=512 ...
  python -m experiments.generate --method=headaware --budget=256 --kv_bits=roles --json ...

Several ``--prompt`` flags run as one batch (prompts of different lengths are padded and
masked). ``--chat`` wraps each prompt in the tokenizer's chat template.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
import numpy as np

from experiments import cli

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Alias, HF directory or .gguf file.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read one prompt from this file.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_CHAT = flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Prefill chunk size (default: whole prompt).")
_METHOD = flags.DEFINE_string(
    "method", "full", "KV-cache method: full, streamingllm, h2o, snapkv, pyramidkv, adakv, "
    "headaware.")
_BUDGET = flags.DEFINE_integer("budget", 256, "Average tokens kept per KV head per layer.")
_POSITION_MODE = flags.DEFINE_enum(
    "position_mode", "original", ["original", "cache_relative"],
    "cache_relative rotates keys by their cache slot (StreamingLLM past the trained context).")
_KV_BITS = flags.DEFINE_string(
    "kv_bits", "16", "Storage bits per KV head (HAQ-KV): 16, 8, 4, 2, K/V (e.g. 4/2), kivi2, "
    "roles, roles:8/8,4/2,2/2 or avg:3.5; see headkv_jax.bits.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Head profile JSON for headaware (default: the shipped one for --model).")
_ALLOW_LONG = flags.DEFINE_bool(
    "allow_long_context", False, "Allow prompts past the model's max_position_embeddings.")


def read_prompts() -> list[str]:
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    try:
      with open(_PROMPT_FILE.value, encoding="utf-8") as f:
        prompts.append(f.read())
    except OSError as e:
      raise app.UsageError(f"Cannot read --prompt_file={_PROMPT_FILE.value!r}: {e}") from e
  if not prompts:
    raise app.UsageError("Give --prompt (one or more) or --prompt_file.")
  return prompts


def main(argv):
  del argv
  from headkv_jax import bits
  from headkv_jax import methods
  from headkv_jax import sharding
  from models.generation import generate
  from models.method_driver import MethodDriver
  from models.loading import load_model
  from models.runner import ModelRunner
  from models.sampling import SamplingConfig

  texts = read_prompts()
  try:
    spec = methods.MethodSpec(_METHOD.value, _BUDGET.value, position_mode=_POSITION_MODE.value,
                              kv_bits=_KV_BITS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  model, tokenizer = load_model(_MODEL.value, _DTYPE.value)
  profile = None
  if spec.name in methods.PROFILE_METHODS or bits.parse_kv_bits(spec.kv_bits).needs_profile:
    from headkv_jax.profile import HeadProfile
    from headkv_jax.profiles import load_shipped_profile
    profile = (HeadProfile.load(_PROFILE.value) if _PROFILE.value
               else load_shipped_profile(model.config.model_id))
  prompts = []
  for text in texts:
    if _CHAT.value:
      ids = tokenizer.apply_chat_template(
          [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
      ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
      ids = tokenizer.encode(text, add_special_tokens=False)
    prompts.append(list(ids))
  try:
    driver = MethodDriver.create(spec, model.config, prompt_len=max(map(len, prompts)),
                                 max_new_tokens=_MAX_NEW.value, chunk_size=_CHUNK.value,
                                 dtype=model.dtype, profile=profile)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  hooks = driver.generate_kwargs()
  try:
    runner = ModelRunner(model)  # on --mesh (a model axis that splits nothing is refused)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  start = time.perf_counter()
  try:
    result = generate(
        runner, prompts, _MAX_NEW.value,
        sampling=SamplingConfig(_TEMPERATURE.value, _TOP_P.value), seed=_SEED.value,
        allow_long_context=_ALLOW_LONG.value, **hooks)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  seconds = time.perf_counter() - start
  records = []
  for text, ids, new in zip(texts, prompts, result.tokens):
    records.append({
        "prompt_tokens": len(ids),
        "generated_text": tokenizer.decode(new, skip_special_tokens=True),
        "generated_ids": new,
    })
  if _JSON.value:
    out = records[0] if len(records) == 1 else {"results": records}
    counts = np.asarray(result.cache.token_counts())  # [layers, B, Hkv]
    out = dict(out, method=spec.name, budget=spec.budget if spec.name != "full" else None,
               cache_nbytes=int(result.cache.nbytes),
               prefill_cache_nbytes=int(result.prefill_cache_bytes),
               kv_tokens_per_head=counts.transpose(1, 0, 2).tolist(),
               prefill_s=round(result.prefill_s, 3), seconds=round(seconds, 3),
               kv_bits=spec.kv_bits)
    if runner.mesh is not None:  # bytes held on each device (replicas counted on each)
      out.update(mesh=runner.mesh_text,
                 cache_nbytes_per_device=sorted(sharding.device_bytes(result.cache).values()))
    if getattr(result.cache, "head_bits", None) is not None:  # quantized caches
      out.update(effective_bits=float(result.cache.effective_bits),
                 head_bits=np.asarray(result.cache.head_bits).tolist())
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
  else:
    for r in records:
      print(r["generated_text"])


if __name__ == "__main__":
  cli.run(main)
