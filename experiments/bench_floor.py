"""The memory floor of a decode step, and the parts of ``experiments.bench_cache`` without flags.

A decode step of one sequence reads every weight once and every K/V byte its cache holds
once, and does little arithmetic per byte: on a CPU (and on a GPU at batch 1) it is
memory-bound, so no implementation can step faster than

  floor = (param bytes + cache bytes) / copy bandwidth

where the copy bandwidth is the best sustained memory throughput this machine reaches,
measured in the same run (``probe_bandwidths``, ``floor_bandwidth``). ``bench_cache`` prints
every method's decode ms/token beside its floor and their ratio. Kept free of absl flags so
tests import it (``bench_cache`` defines ``--model``, as ``experiments.flags`` does).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

RESULT_PREFIX = "RESULT "


def _best_s(fn, repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn`` (after one untimed call)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def probe_bandwidths(mib: int = 512, repeats: int = 5) -> dict[str, float]:
  """Bytes per second of streaming passes over ``mib`` MiB, best of ``repeats`` each.

  ``xla_copy``: a jitted ``x + 1`` over float32, bytes read + written; ``xla_read``: a jitted
  sum of the same array, bytes read; on the CPU also ``host_copy``: numpy's ``copyto`` into a
  preallocated array (a ``memcpy``), read + written. Each does one trivial op per element of
  an array far larger than any cache level, as the weights and a long prompt's KV cache are,
  so its time is the memory's. XLA's CPU elementwise loops are not memory-bound on every
  machine (``xla_copy`` reached 4 GB/s where ``memcpy`` reached 19), hence the three.
  """
  x = jnp.ones(mib * 2**20 // 4, jnp.float32)  # ones: no denormals to slow the float units
  plus_one, total = jax.jit(lambda a: a + 1), jax.jit(jnp.sum)
  rates = {"xla_copy": 2 * x.nbytes / _best_s(lambda: plus_one(x).block_until_ready(), repeats),
           "xla_read": x.nbytes / _best_s(lambda: total(x).block_until_ready(), repeats)}
  if jax.default_backend() == "cpu":  # the model's arrays are host memory: memcpy is a probe
    host = np.asarray(x)
    out = np.empty_like(host)
    rates["host_copy"] = 2 * host.nbytes / _best_s(lambda: np.copyto(out, host), repeats)
  return rates


def floor_bandwidth(rates: dict[str, float]) -> float:
  """The floor's bandwidth, bytes/s: the fastest of ``rates`` (from ``probe_bandwidths``).

  Why this one: a decode step must move its weights and its K/V bytes from memory once, and
  no way of moving them beats the fastest pass this machine's memory was seen to sustain in
  this run. The best probe, and the best of its runs, is taken: a busy neighbour only slows
  a run, so the best is the closest to the machine's own figure, and the floor stays a floor.
  Copies count bytes read + written (a decode step's traffic is nearly all reads; memory's
  throughput is shared by both directions).
  """
  return max(rates.values())


def param_bytes(model) -> int:
  """Bytes of the weights one decode step reads: every parameter of ``model`` (an ``nnx``
  Llama), with an untied input embedding table counted as one row (a step gathers one row per
  token; a tied table is read whole by the LM head)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  if not model.config.tie_word_embeddings:
    table = model.embed_tokens.embedding[...]
    total -= table.nbytes - table.nbytes // table.shape[0]
  return int(total)


def floor_ms_per_token(weight_bytes: int, kv_bytes: int, bandwidth: float) -> float:
  """Milliseconds one decode step needs at least: the bytes it reads over ``bandwidth`` (B/s)."""
  return 1e3 * (weight_bytes + kv_bytes) / bandwidth


def with_floor(row: dict, bandwidth: float) -> dict:
  """``row`` (a child's record: ``param_bytes``, ``cache_bytes``, ``decode_ms_per_token``) plus
  ``floor_ms_per_token`` and ``decode_over_floor`` (None when nothing was decoded)."""
  floor = floor_ms_per_token(row["param_bytes"], row["cache_bytes"], bandwidth)
  decode = row.get("decode_ms_per_token")
  return dict(row, floor_ms_per_token=floor,
              decode_over_floor=decode / floor if decode is not None else None)


def result_line(record: dict) -> str:
  """The one line a child prints for its parent."""
  return RESULT_PREFIX + json.dumps(record)


def parse_result(stdout: str) -> dict | None:
  """The record of the last result line in a child's ``stdout`` (None if it printed none).

  Other lines (a library's prints, warnings) are skipped, so only the prefix is trusted."""
  lines = [l for l in stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def _num(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> list[str]:
  """The markdown table of ``rows`` (records ``with_floor``), one line per method."""
  head = ("method", "cache MB (decode)", "x fewer than full bf16", "effective bits",
          "cache MB (prefill)", "peak RSS MB", "prefill s", "decode ms/tok", "floor ms/tok",
          "decode / floor", "passkey")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = (r["method"], f"{r['cache_bytes'] / 2**20:.1f}",
             f"{r['full_bf16_kv_bytes'] / r['cache_bytes']:.1f}", f"{r['effective_bits']:.2f}",
             f"{r['prefill_cache_bytes'] / 2**20:.1f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
             f"{r['prefill_s']:.1f}", _num(r["decode_ms_per_token"], ".1f"),
             f"{r['floor_ms_per_token']:.1f}", _num(r["decode_over_floor"], ".1f"),
             f"{r['accuracy']:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def versus_full(rows: list[dict]) -> list[str]:
  """One line per method against ``full`` (none without a ``full`` row): bytes, decode and
  prefill ratios, and the floors' ratio (the decode speed-up a memory-bound step could reach)."""
  base = next((r for r in rows if r["method"] == "full"), None)
  if base is None:
    return []
  lines = []
  for r in rows:
    if r is base:
      continue
    decode = (f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.1f}x"
              if base["decode_ms_per_token"] and r["decode_ms_per_token"] else "-")
    smaller = base["cache_bytes"] / r["cache_bytes"]
    floors = base["floor_ms_per_token"] / r["floor_ms_per_token"]
    lines.append(f"{r['method']} vs full: cache bytes {smaller:.1f}x smaller, decode {decode} "
                 f"faster (floors {floors:.1f}x), prefill "
                 f"{base['prefill_s'] / r['prefill_s']:.2f}x")
  return lines
