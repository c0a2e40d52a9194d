"""Two ``jax.distributed`` CPU processes on localhost run one sharded generation.

Each process owns one CPU device; a loopback coordinator joins them into one 2-device mesh
(``model:2``: the tiny model's 2 KV heads and MLP split across the processes, the dense
cache's KV heads too), and gloo carries the cross-process all-reduces. Each process also runs
the same generation alone on its own device; ``tests/mesh_worker.py`` prints both.

  .venv/bin/python -m pytest tests/test_multiprocess.py -q
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE_XLA_FLAGS
from tests.test_sharding import ROOT, TOL

# jaxlib builds without gloo cannot run CPU collectives across processes.
try:
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  HAS_GLOO = hasattr(_jax, "make_gloo_tcp_collectives")
except ImportError:  # pragma: no cover
  HAS_GLOO = False


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(not HAS_GLOO, reason="this jaxlib has no gloo CPU collectives "
                    "(jax._src.lib._jax.make_gloo_tcp_collectives is missing)")
def test_two_processes_decode_the_single_process_tokens():
  """A model:2 mesh over two processes (coordinator on 127.0.0.1) prefills and decodes with
  the weights and the dense cache split between them: both processes get the tokens, logits
  and final cache that one process gets alone, the decode block keeps its state sharding,
  and the model-axis all-reduces really cross processes (2 processes, 2 devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.mesh_worker", "--meshes=,model:2", "--methods=full",
       "--facts", f"--coordinator={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=300)
      lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
      assert p.returncode == 0 and lines, stderr[-4000:]
      outputs.append(json.loads(lines[-1][len("RESULT "):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for out in outputs:
    assert out["processes"] == 2 and out["devices"] == 2
    alone, shared = out["meshes"][""]["full"], out["meshes"]["model:2"]["full"]
    assert out["meshes"]["model:2"]["layout"].endswith("(heads split, mlp split)")
    assert shared["tokens"] == alone["tokens"]
    np.testing.assert_allclose(shared["logits"], alone["logits"], rtol=TOL, atol=TOL)
    assert shared["cache_ints_equal"] and shared["cache_float_max_diff"] <= TOL
    assert shared["state_in_equals_out"]
    assert any(c["kind"] == "all-reduce" and c["in_loop"] for c in shared["collectives"])
    # Each process holds half of the dense K/V and all of the bookkeeping.
    assert shared["device_bytes"][0] < alone["nbytes"]
  assert outputs[0]["meshes"]["model:2"]["full"]["tokens"] == \
      outputs[1]["meshes"]["model:2"]["full"]["tokens"]
