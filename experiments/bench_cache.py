r"""Compressed vs full KV cache at long context: memory, prefill and decode, same machine.

  python -m experiments.bench_cache                       # 20,000 tokens, snapkv@1024 vs full
  python -m experiments.bench_cache --length=8000 --methods=full,snapkv,headaware --budget=512
  python -m experiments.bench_cache --methods=full,headaware,headaware[kv_bits=roles]  # HAQ-KV
  python -m experiments.bench_cache --methods='snapkv,snapkv[position_mode=cache_relative,kv_bits=4/2]'

Each method runs in its own fresh child process (this module with ``--child``), so its peak
RSS and its compiled programs are its own; the parent collects one JSON line per method. The
prompt is a passkey sample of exactly ``--length`` tokens, prefilled in chunks of
``--chunk_size``; then ``--decode_steps`` tokens are generated.

Before the methods, the parent measures the machine's copy bandwidth (streaming passes over
``--copy_mb`` MiB, see ``experiments.bench_floor``). A method's memory floor is its param bytes
plus its cache's bytes while decoding, over that bandwidth: the table gives decode ms/token
beside the floor and their ratio. Prints one row per method and the ratios vs full.
"""

from __future__ import annotations

import subprocess
import sys

from absl import flags

from experiments import bench_floor
from experiments import cli
from experiments import labels

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Alias, HF directory or .gguf file.")
_LENGTH = flags.DEFINE_integer("length", 20000, "Prompt length in tokens.")
_METHODS = flags.DEFINE_list("methods", ["full", "snapkv"],
                             "Methods to compare; 'name[field=value,...]' sets MethodSpec "
                             "fields of one, e.g. full,headaware,headaware[kv_bits=roles],"
                             "snapkv[position_mode=cache_relative].")
_BUDGET = flags.DEFINE_integer("budget", 1024, "Average tokens per KV head per layer.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Prefill chunk size.")
_KV_BITS = flags.DEFINE_string("kv_bits", "16", "Storage bits per KV head of every method "
                               "without its own [kv_bits=...]: "
                               "16, 8, 4, 2, K/V (e.g. 4/2), kivi2, roles, roles:8/8,4/2,2/2, "
                               "avg:3.5; see headkv_jax.bits.")
_STEPS = flags.DEFINE_integer("decode_steps", 32, "Decode steps (the first compiles, untimed).")
_COPY_MB = flags.DEFINE_integer("copy_mb", 512, "Size of the copy-bandwidth probe, MiB.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one method and print JSON.")


def parse_method(label: str):
  """The MethodSpec of a --methods label (:func:`experiments.labels.method_spec` at --budget
  and --kv_bits)."""
  return labels.method_spec(label, _BUDGET.value, _KV_BITS.value)


def run_one(label: str) -> dict:
  from experiments.evaluate import evaluate_sample
  from experiments.tasks import make_task
  from headkv_jax.bits import parse_kv_bits
  from headkv_jax.methods import PROFILE_METHODS
  from models.loading import load_model
  from models.runner import ModelRunner

  spec = parse_method(label)
  model, tokenizer = load_model(_MODEL.value)
  profile = None
  if spec.name in PROFILE_METHODS or parse_kv_bits(spec.kv_bits).needs_profile:
    from headkv_jax.profiles import load_shipped_profile
    profile = load_shipped_profile(model.config.model_id)
  sample = make_task("passkey", tokenizer, _LENGTH.value, seed=0, index=0, depth=0.5)
  record = evaluate_sample(ModelRunner(model), tokenizer, sample, spec,
                           chunk_size=_CHUNK.value, profile=profile,
                           max_new_tokens=_STEPS.value,
                           compile_ahead=False)  # prefill s timed alone
  cfg = model.config  # the full cache of prompt + new tokens in bfloat16, K and V
  bf16 = 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (
      len(sample.prompt_tokens) + _STEPS.value)
  return dict(record, method=label, full_bf16_kv_bytes=bf16,
              param_bytes=bench_floor.param_bytes(model))


def run_child(method: str) -> dict:
  """``method``'s record, from a fresh process of this module (its peak RSS is its own)."""
  argv = [sys.executable, "-m", "experiments.bench_cache", f"--child={method}"] + [
      f"--{f}={flags.FLAGS[f].serialize().split('=', 1)[1]}" for f in
      ("model", "length", "budget", "chunk_size", "decode_steps", "kv_bits",
       "attention_impl")] + cli.cache_flags()
  proc = subprocess.run(argv, capture_output=True, text=True)
  record = bench_floor.parse_result(proc.stdout)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("bench_cache: error: ")]
  if proc.returncode and errors:  # a user's error (bad model, profile): its one line
    raise SystemExit(errors[-1])
  if proc.returncode or record is None:
    print(proc.stderr[-3000:], file=sys.stderr)
    raise SystemExit(f"method {method} failed (exit {proc.returncode})")
  return record


def main(argv):
  del argv
  if _CHILD.value:
    print(bench_floor.result_line(run_one(_CHILD.value)))
    return
  method_labels = labels.join_brackets(_METHODS.value)
  for label in method_labels:  # a bad entry fails before anything runs
    parse_method(label)
  rates = bench_floor.probe_bandwidths(_COPY_MB.value)
  bandwidth = bench_floor.floor_bandwidth(rates)
  rows = [bench_floor.with_floor(run_child(m), bandwidth) for m in method_labels]
  print(f"{_LENGTH.value} tokens, chunk {_CHUNK.value}, budget {_BUDGET.value}, kv_bits "
        f"{_KV_BITS.value}, model {_MODEL.value}, {_STEPS.value} decode steps")
  probes = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in rates.items())
  print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (best of {probes} GB/s over "
        f"{_COPY_MB.value} MiB); params read per step {rows[0]['param_bytes'] / 2**20:.1f} MB; "
        "floor ms/tok = (params + cache MB (decode)) / copy bandwidth")
  print("\n".join(bench_floor.table(rows) + bench_floor.versus_full(rows)))


if __name__ == "__main__":
  cli.run(main)
