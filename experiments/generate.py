r"""Generate text with a Llama-family model and a KV cache.

  python -m experiments.generate --model=smollm2-135m --prompt="What is 2+2?" --max_new_tokens=32
  python -m experiments.generate --prompt_file=long.txt --json
  python -m experiments.generate --prompt="a" --prompt="bb b" --temperature=0.7 --top_p=0.9

Several ``--prompt`` flags run as one batch (prompts of different lengths are padded and
masked). ``--chat`` wraps each prompt in the tokenizer's chat template.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

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
  from models.generation import generate
  from models.loading import load_model
  from models.runner import ModelRunner
  from models.sampling import SamplingConfig

  texts = read_prompts()
  model, tokenizer = load_model(_MODEL.value, _DTYPE.value)
  prompts = []
  for text in texts:
    if _CHAT.value:
      ids = tokenizer.apply_chat_template(
          [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
      ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
      ids = tokenizer.encode(text, add_special_tokens=False)
    prompts.append(list(ids))
  start = time.perf_counter()
  result = generate(
      ModelRunner(model), prompts, _MAX_NEW.value,
      sampling=SamplingConfig(_TEMPERATURE.value, _TOP_P.value), seed=_SEED.value,
      chunk_size=_CHUNK.value, allow_long_context=_ALLOW_LONG.value)
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
    out = dict(out, cache_nbytes=int(result.cache.nbytes), seconds=round(seconds, 3))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
  else:
    for r in records:
      print(r["generated_text"])


if __name__ == "__main__":
  app.run(main)
