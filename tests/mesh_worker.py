"""Runs a tiny model on several device meshes and prints what ``tests/test_sharding.py`` checks.

Run in a fresh process with forced host devices (the flag must be set before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_worker

It prints one JSON object: per mesh and method, the prefill's last logits, the greedy tokens
of a generation (prefill, compression, compiled decode blocks with eviction), how far its
final cache is from the first mesh's (the reference, "" = one device), the cache bytes per
device, and the facts of the compiled decode block (donated state in == out, the collectives
in its HLO); with ``--errors``, the messages of meshes that cannot serve.
A second mode, ``--process_id=i --num_processes=n --coordinator=host:port``, is one process
of a ``jax.distributed`` run (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

# 6 query / 2 KV heads, MLP 64: model:2 splits heads and MLP, model:4 only the MLP (the KV
# heads are replicated), which covers both cache layouts of headkv_jax.sharding.
CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=1, num_heads=6,
              num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=())
BATCH = 8
NEW_TOKENS = 5
# (label, method, budget, prefill chunk or None for one shot)
# Budget 24 of prompts of 9..40 tokens: every policy evicts, and a layer's pool (2 heads x
# 32 slots) is longer than any model width, so a collective over slots is told apart.
METHODS = (("full", "full", 0, None), ("streamingllm", "streamingllm", 24, None),
           ("h2o", "h2o", 24, 16), ("snapkv", "snapkv", 24, None),
           ("headaware", "headaware", 24, None))
MESHES = ("", "data:8", "model:2", "data:2,model:4")
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def prompts(batch: int = BATCH):
  rng = np.random.RandomState(0)
  return [list(rng.randint(1, CONFIG["vocab_size"], n)) for n in
          np.linspace(9, 40, batch).astype(int)]


def build_model():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models.config import LlamaConfig  # pylint: disable=g-import-not-at-top
  from models.llama import Llama  # pylint: disable=g-import-not-at-top

  return Llama(LlamaConfig(**CONFIG), rngs=nnx.Rngs(3))


def driver(label: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from headkv_jax import methods  # pylint: disable=g-import-not-at-top
  from models.method_driver import MethodDriver  # pylint: disable=g-import-not-at-top
  from tests import tiny_models  # pylint: disable=g-import-not-at-top

  _, name, budget, chunk = next(m for m in METHODS if m[0] == label)
  spec = methods.MethodSpec(name, budget, window=4, n_sink=2)
  profile = tiny_models.tiny_profile(5, [[1, 2]]) if name == "headaware" else None
  return MethodDriver.create(spec, build_model().config, prompt_len=40,
                             max_new_tokens=NEW_TOKENS, chunk_size=chunk, dtype=jnp.float32,
                             profile=profile)


def collectives(hlo: str) -> list[dict]:
  """Every collective of a compiled HLO module: kind, result shape, elements, in a loop body."""
  out = []
  bodies = set(re.findall(r"body=(%?[\w.\-]+)", hlo))
  computation = ""
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$", line)
    if head:
      computation = head.group(1)
    for kind in COLLECTIVES:
      m = re.search(r"=\s*(\(?[\w\[\],{}:\s/#*]*?\)?)\s+" + kind + r"(?:-start)?\(", line)
      if m:
        dims = [int(d) for d in re.findall(r"\[([\d,]+)\]", m.group(1))
                for d in [np.prod([int(x) for x in d.split(",") if x])]]
        out.append(dict(kind=kind, shape=m.group(1).strip(), elements=int(max(dims or [1])),
                        in_loop=computation in bodies or computation.lstrip("%") in
                        {b.lstrip("%") for b in bodies}))
  return out


def record_decode_blocks(runner) -> list:
  """Makes ``runner`` remember the (loop, abstract state, abstract operands) of every decode
  block it runs, so the very program a generation ran can be lowered again for its HLO."""
  import jax  # pylint: disable=g-import-not-at-top
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  calls = []
  run = runner.decode_block

  def recording(loop, state, *operands):
    state, operands = runner.place((state, operands), sharding.batch_size(state))
    calls.append((loop,) + jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, operands)))
    return run(loop, state, *operands)

  runner.decode_block = recording
  return calls


def decode_facts(runner, out, call) -> dict:
  """The compiled decode block of a generation: donated state shardings in == out, the
  collectives of its HLO, and the smallest K/V array one device holds (for scale)."""
  import jax  # pylint: disable=g-import-not-at-top

  loop, state, operands = call
  compiled = runner.lower_decode_block(loop, state, *operands).compile()
  state_in = compiled.input_shardings[0][1]  # (params, state, *operands); the loop is static
  state_out = compiled.output_shardings[0]  # (state, tokens)
  leaves = jax.tree_util.tree_leaves(state)
  flat_in, flat_out = jax.tree_util.tree_leaves(state_in), jax.tree_util.tree_leaves(state_out)
  same = len(flat_in) == len(flat_out) == len(leaves) and all(
      i.is_equivalent_to(o, len(x.shape)) for i, o, x in zip(flat_in, flat_out, leaves))
  kv = [x.addressable_shards[0].data.size
        for p, x in jax.tree_util.tree_flatten_with_path(out.cache)[0]
        if x.ndim >= 3 and any(getattr(k, "name", None) in ("k", "v") for k in p)]
  return dict(state_in_equals_out=bool(same), collectives=collectives(compiled.as_text()),
              smallest_kv_shard=int(min(kv)),
              cache_specs=sorted({str(s.spec) for s in jax.tree_util.tree_leaves(state_in[0])}))


def host_leaves(tree) -> list[np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def host(x):  # a leaf split across processes is gathered (every process gets all of it)
    if x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return [host(x) for x in jax.tree_util.tree_leaves(tree)]


def run_mesh(mesh_text: str, labels, with_facts: bool, baseline: dict | None) -> dict:
  """Every method of ``labels`` on one mesh: prefill logits, greedy tokens, the final cache
  against ``baseline``'s (the same run on one device), bytes per device, decode-block facts."""
  import jax  # pylint: disable=g-import-not-at-top
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top
  from models import generation as gen  # pylint: disable=g-import-not-at-top
  from models.runner import ModelRunner  # pylint: disable=g-import-not-at-top

  runner = ModelRunner(build_model(), mesh=mesh_text)
  calls = record_decode_blocks(runner)
  result = {"layout": runner.layout.describe() if runner.layout else "one device",
            "param_specs": sorted({str(getattr(x.sharding, "spec", "one device")) for x in
                                   jax.tree_util.tree_leaves(runner.params)})}
  for label in labels:
    t0 = time.perf_counter()
    kwargs = driver(label).generate_kwargs()
    decode_hook = kwargs.pop("after_decode_step")
    done = gen.prefill(runner, prompts(), NEW_TOKENS, **kwargs)
    out = gen.decode(runner, done.cache, done.last_logits, done.lengths, NEW_TOKENS,
                     sampling=gen.sampling_lib.SamplingConfig(), seed=0, eos=set(),
                     after_decode_step=decode_hook)
    cache = host_leaves(out.cache)
    entry = dict(logits=np.asarray(done.last_logits, np.float64).tolist(), tokens=out.tokens,
                 nbytes=int(out.cache.nbytes), paged=type(out.cache).__name__ == "PagedKVCache",
                 leaves=[[int(x.nbytes), sharding.replicas(x), "/".join(
                     str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k))))
                     for k in path)]
                         for path, x in jax.tree_util.tree_flatten_with_path(out.cache)[0]],
                 device_bytes=sorted(sharding.device_bytes(out.cache).values()),
                 replicated_bytes=int(sharding.replicated_bytes(out.cache)),
                 decode_compiles=runner._decode_block._jitted._cache_size())  # pylint: disable=protected-access
    if baseline is not None:
      ref = baseline[label]
      floats = [np.abs(a - r).max(initial=0.0) for a, r in zip(cache, ref)
                if np.issubdtype(a.dtype, np.floating)]
      entry.update(cache_leaves_match=len(cache) == len(ref) and all(
          a.shape == r.shape for a, r in zip(cache, ref)),
                   cache_float_max_diff=float(max(floats, default=0.0)),
                   cache_ints_equal=all(np.array_equal(a, r) for a, r in zip(cache, ref)
                                        if not np.issubdtype(a.dtype, np.floating)))
    else:
      result.setdefault("_caches", {})[label] = cache
    t1 = time.perf_counter()
    if with_facts and runner.layout is not None:
      entry.update(decode_facts(runner, out, calls[-1]))
    entry.update(run_s=round(t1 - t0, 2), facts_s=round(time.perf_counter() - t1, 2))
    result[label] = entry
  return result


def mesh_errors() -> dict:
  """The MeshError messages of meshes these devices or this model or batch cannot serve."""
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top
  from models import generation as gen  # pylint: disable=g-import-not-at-top
  from models.runner import ModelRunner  # pylint: disable=g-import-not-at-top

  def message(fn):
    try:
      fn()
    except sharding.MeshError as e:
      return str(e)
    return None

  return {
      "data:16": message(lambda: sharding.make_mesh("data:16")),
      "model:5": message(lambda: ModelRunner(build_model(), mesh="model:5")),
      "data:3 on batch 8": message(lambda: gen.generate(
          ModelRunner(build_model(), mesh="data:3"), prompts(), 2, eos_ids=[])),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--meshes", default=",".join(m.replace(",", "+") for m in MESHES),
                      help="'+' joins the axes of one mesh, ',' separates meshes")
  parser.add_argument("--methods", default=",".join(m[0] for m in METHODS))
  parser.add_argument("--facts", action="store_true", help="lower decode blocks, read HLO")
  parser.add_argument("--errors", action="store_true", help="try meshes that cannot serve")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args(argv)
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  if args.coordinator:
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  # A private compilation cache: lowering a decode block again for its HLO reads back the
  # program the generation compiled instead of compiling it twice.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mesh_worker_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  labels = args.methods.split(",")
  out = {"devices": jax.device_count(), "processes": jax.process_count(), "meshes": {},
         "errors": mesh_errors() if args.errors else {}}
  baseline = None
  for mesh in args.meshes.split(","):  # the first mesh is the reference of the others
    mesh = mesh.replace("+", ",")
    res = run_mesh(mesh, labels, args.facts, baseline)
    if baseline is None:
      baseline = res.pop("_caches")
    out["meshes"][mesh] = res
  print("RESULT " + json.dumps(out))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
