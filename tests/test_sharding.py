"""Sharded models and caches on a device mesh (``headkv_jax.sharding``, ``ModelRunner(mesh=)``).

The mesh runs need several devices, and XLA_FLAGS=--xla_force_host_platform_device_count=8
only takes effect before JAX starts, while this suite's JAX already runs on one CPU device.
So one subprocess (``tests/mesh_worker.py``) runs a tiny model (6 query / 2 KV heads, MLP 64)
on the meshes "" (one device: the reference), data:8, model:2 and data:2,model:4 for the dense
cache and three compressed methods, lowers each generation's decode block, tries meshes that
cannot serve, and prints JSON; the tests below read it. The parse and flag errors run here.

  .venv/bin/python -m pytest tests/test_sharding.py -q
"""

import json
import os
import subprocess
import sys

import jax
from absl import app
import numpy as np
import pytest

from experiments import cli
from headkv_jax import sharding
from tests.conftest import FAST_COMPILE_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data:8", "model:2", "data:2,model:4")
# snapkv shares headaware's one-shot compression and decode path (only budgets differ).
METHODS = ("full", "streamingllm", "h2o", "headaware")
TOL = 1e-5  # float32, as the parity tests
# 8 CPU devices, compiled as every test is (conftest: ~40% faster compiles of the worker's
# ~100 programs; every run in it, the reference included, uses the same flags).
WORKER_XLA_FLAGS = "--xla_force_host_platform_device_count=8 " + FAST_COMPILE_XLA_FLAGS
# Collectives that move data between devices instead of reducing partial sums.
MOVES = ("all-gather", "all-to-all", "collective-permute")


@pytest.fixture(scope="module")
def runs():
  """The worker's JSON: per mesh and method, logits, tokens, bytes and decode-block facts."""
  env = dict(os.environ, XLA_FLAGS=WORKER_XLA_FLAGS, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  meshes = ",".join([""] + [m.replace(",", "+") for m in MESHES])
  proc = subprocess.run(
      [sys.executable, "-m", "tests.mesh_worker", f"--meshes={meshes}", "--facts", "--errors",
       f"--methods={','.join(METHODS)}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  out = json.loads(lines[-1][len("RESULT "):])
  assert out["devices"] == 8
  return out


def _cases(runs):
  for mesh in MESHES:
    for method in METHODS:
      yield mesh, method, runs["meshes"][mesh][method], runs["meshes"][""][method]


def test_meshes_give_the_single_device_logits_tokens_and_cache(runs):
  """Sharding changes where the work runs, not what it computes: on every mesh and method the
  prefill logits and the final cache (K/V, scores, positions, lengths after evicting while
  decoding) match one device to float32 rounding, and the greedy tokens are identical."""
  for mesh, method, got, ref in _cases(runs):
    where = f"{method} on {mesh}"
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=TOL, atol=TOL, err_msg=where)
    assert got["tokens"] == ref["tokens"], where
    assert got["cache_leaves_match"] and got["cache_ints_equal"], where
    assert got["cache_float_max_diff"] <= TOL, (where, got["cache_float_max_diff"])


def test_layout_splits_what_divides(runs):
  """model:2 divides the 2 KV heads and the MLP: both split. model:4 divides only the MLP
  (64): heads replicated. data:8 splits nothing of the parameters."""
  meshes = runs["meshes"]
  assert meshes["model:2"]["layout"].endswith("(heads split, mlp split)")
  assert meshes["data:2,model:4"]["layout"].endswith("(heads replicated, mlp split)")
  assert meshes["data:8"]["param_specs"] == ["P()"]
  assert "P(None, 'model')" in meshes["model:2"]["param_specs"]


def _documented_replicas(mesh: str, paged: bool, path: str) -> int:
  """How many devices hold each cache byte, as headkv_jax.sharding documents it."""
  sizes = dict(sharding.parse_mesh(mesh))
  model = sizes.get("model", 1)
  heads_split = model == 2  # the tiny model: 2 KV heads
  dense_kv = not paged and path.split("/")[-1] in ("k", "v")
  return 1 if dense_kv and heads_split else model


def test_cache_bytes_per_device_sum_to_one_device_plus_replication(runs):
  """Each device reports its cache bytes; they are equal across devices (balanced), and sum to
  the single-device bytes with each array counted once per replica, replicas as documented
  (paged pools and bookkeeping replicated over model; dense K/V split when heads are)."""
  for mesh, method, got, ref in _cases(runs):
    where = f"{method} on {mesh}"
    n = int(np.prod(list(sharding.parse_mesh(mesh).values())))
    assert got["nbytes"] == ref["nbytes"] == sum(b for b, _, _ in got["leaves"]), where
    assert len(got["device_bytes"]) == n and len(set(got["device_bytes"])) == 1, where
    assert sum(got["device_bytes"]) == got["replicated_bytes"], where
    want = sum(b * _documented_replicas(mesh, got["paged"], p) for b, _, p in got["leaves"])
    assert got["replicated_bytes"] == want, (where, got["leaves"])
    if mesh == "data:8":  # nothing replicated: the devices split the bytes exactly
      assert got["device_bytes"][0] * 8 == ref["nbytes"], where


def test_decode_block_keeps_the_cache_in_place_and_moves_no_cache(runs):
  """The compiled decode block takes and returns the donated state in one sharding (so it
  compiles once per mesh and shapes, as many programs as on one device) and, inside its loop,
  moves no cache-sized data between devices: every all-gather / all-to-all /
  collective-permute is token-sized (fewer elements than one device's smallest K/V shard and
  no axis as long as a cache's 64-slot pools). What remains is the all-reduce after the
  row-parallel matmuls (o_proj, down_proj) on model meshes, scalar reductions of the loop's
  predicates, and, for the dense cache's per-row append, token rows moved to their device."""
  for mesh, method, got, ref in _cases(runs):
    where = f"{method} on {mesh}"
    assert got["state_in_equals_out"], where
    assert got["decode_compiles"] == ref["decode_compiles"], where
    loop = [c for c in got["collectives"] if c["in_loop"]]
    for c in loop:
      if c["kind"] in MOVES:
        dims = [int(d) for d in c["shape"].split("[")[1].split("]")[0].split(",") if d]
        assert c["elements"] < got["smallest_kv_shard"] and max(dims, default=1) < 64, (
            where, c)
    if "model" in mesh:
      assert any(c["kind"] == "all-reduce" and c["elements"] > 1 for c in loop), (where, loop)


def test_meshes_it_cannot_serve_are_named(runs):
  """Too many devices, a model axis that splits nothing, a data axis that does not divide the
  batch: each a MeshError naming the mesh and what would work."""
  errors = runs["errors"]
  assert "needs 16 devices" in errors["data:16"] and "8 cpu device" in errors["data:16"]
  assert "xla_force_host_platform_device_count" in errors["data:16"]
  assert "model:5 divides neither the 2 KV heads nor the MLP width 64" in errors["model:5"]
  assert "data:3" in errors["data:3 on batch 8"] and "batch of 8" in errors["data:3 on batch 8"]


@pytest.mark.parametrize("text, match", [
    ("data=2", "not 'axis:size'"), ("pipeline:2", "unknown axis 'pipeline'; allowed axes: "
                                                   "data, model"),
    ("data:2,data:2", "given twice"), ("model:0", "sizes are >= 1"), ("data:x", "axis:size")])
def test_bad_mesh_text_is_named(text, match):
  """Malformed flag text names the part and the form it should take."""
  with pytest.raises(sharding.MeshError, match=match):
    sharding.parse_mesh(text)


def test_mesh_flag_errors_are_usage_errors():
  """--mesh goes through cli.mesh_from_flag: a bad or impossible mesh is a UsageError (one
  line from every binary); '' is one device (no mesh)."""
  assert cli.mesh_from_flag("") is None
  n = jax.device_count() + 1
  with pytest.raises(app.UsageError, match=f"Bad --mesh='data:{n}'.*needs {n} devices"):
    cli.mesh_from_flag(f"data:{n}")
  with pytest.raises(app.UsageError, match="unknown axis"):
    cli.mesh_from_flag("tensor:2")


def test_parse_and_text_round_trip():
  """The parsed sizes and the mesh text agree; a one-device mesh runs the unsharded path."""
  assert sharding.parse_mesh(" data:2 , model:4 ") == {"data": 2, "model": 4}
  assert sharding.parse_mesh("") == {}
  mesh = sharding.make_mesh("model:1")
  assert sharding.mesh_text(mesh) == "data:1,model:1"
